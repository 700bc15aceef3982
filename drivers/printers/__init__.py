"""Receipt printers: document layout and transports (virtual printer today)."""

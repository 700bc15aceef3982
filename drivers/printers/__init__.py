"""Receipt printers: the ESC/POS encoder and status decoder (pure), transports (serial,
network, file), one printer's device driver, and the virtual printer (docs/printers.md)."""

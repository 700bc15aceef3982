"""sd_notify(3) for Type=notify services: READY, STATUS, WATCHDOG, STOPPING.

The protocol is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (``@`` means
the abstract namespace). It is a dozen lines, so we speak it here rather than depend on the
unmaintained ``sdnotify`` package; outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("gateway.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = environ if environ is not None else dict(os.environ)
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        msg = "\n".join(lines).encode("utf-8")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.sendto(msg, self.address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
        finally:
            s.close()

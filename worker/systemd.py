"""The sd_notify protocol (READY, STOPPING, WATCHDOG, STATUS), with no dependency."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("syncworker.systemd")


class Notifier:
    """Sends state changes to systemd when run as a Type=notify service; a no-op otherwise."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: object) -> None:
        if not self._address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            # A broken notify socket must never take the worker down.
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(ready=1)
        else:
            self.notify(ready=1, status=status)

    def stopping(self) -> None:
        self.notify(stopping=1)

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def status(self, text: str) -> None:
        self.notify(status=text)

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec, in seconds, if systemd asked this process for pings."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2 / 1_000_000

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

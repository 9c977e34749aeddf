"""The sd_notify protocol (READY, STOPPING, WATCHDOG, STATUS) without libsystemd."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("syncworker.systemd")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None if systemd wants none from us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID names the process systemd expects pings from; a child that inherited
    # the environment must not ping on its parent's behalf.
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Sends state changes to systemd when run as a Type=notify service; a no-op otherwise."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            # An abstract socket: its name starts with a NUL byte instead of "@".
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            if address:
                # e.g. vsock:CID:PORT, which systemd offers to virtual machines only.
                log.debug("NOTIFY_SOCKET %r is not a unix socket: not notifying systemd", address)
            self._address = ""
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: object) -> None:
        """Send KEY=VALUE lines (keys upper-cased) in one datagram."""
        if not self._address or not fields:
            return
        # A newline inside a value would start a field of its own (STATUS="x\nSTOPPING=1").
        lines = (f"{key.upper()}={value}".replace("\n", " ") for key, value in fields.items())
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Called from the event loop: if systemd's queue is full, drop the message
                # rather than block every job until PID 1 catches up.
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(message, self._address)
        except OSError as exc:
            # A broken notify socket must never take the worker down.
            log.debug("sd_notify %s failed: %s", message.split(b"\n", 1)[0].decode(), exc)

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

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

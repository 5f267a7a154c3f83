"""systemd's notify protocol: plain datagrams to $NOTIFY_SOCKET (READY, STATUS, WATCHDOG, ...)."""

from __future__ import annotations

import socket

import structlog

log = structlog.get_logger("supervisor.sd_notify")


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, address: str | None, watchdog_usec: str | None = None, watchdog_pid: str | None = None,
                 pid: int = 0):
        self.address = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s: float | None = None
        if watchdog_usec and (not watchdog_pid or watchdog_pid == str(pid)):
            try:
                usec = int(watchdog_usec)
            except ValueError:
                usec = 0
            if usec > 0:
                self.watchdog_s = usec / 1_000_000
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        msg = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", address=self.address, error=str(exc))
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

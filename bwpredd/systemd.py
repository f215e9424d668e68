"""The sd_notify datagram protocol: tell systemd we are ready, alive,
reloading or stopping. A no-op when ``$NOTIFY_SOCKET`` is unset."""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

    Args:
        address: the socket path (``@name`` for an abstract socket); None or
            empty disables notifications.
        watchdog_usec: ``$WATCHDOG_USEC``; 0 when the watchdog is off.
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address or ""
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Notifier:
        """Build from ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (honouring
        ``WATCHDOG_PID``: the watchdog is ours only if it names us)."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        return cls(env.get("NOTIFY_SOCKET"), int(usec) if enabled else 0)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float:
        """Half the watchdog timeout (systemd's advice); 0 when off."""
        return self.watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False (never an exception) if it failed.

        Args:
            lines: e.g. ``"READY=1"``, ``"STATUS=serving"``.
        """
        if self._sock is None:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            self._sock.sendto("\n".join(lines).encode(), addr)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""systemd's readiness/watchdog protocol without libsystemd (``sd_notify(3)``).

A notification is one datagram of newline-separated ``KEY=VALUE`` lines sent to the
``AF_UNIX``/``SOCK_DGRAM`` address in ``$NOTIFY_SOCKET``; a leading ``@`` names the Linux
abstract namespace (the ``@`` becomes a NUL byte).  With ``WatchdogSec=`` the manager exports
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``): the service must send ``WATCHDOG=1`` more often than
that — we ping at half the interval, and only when ``WATCHDOG_PID`` is unset or names us (a
child that inherited the environment must not keep a hung parent alive).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op, so daemons call it
unconditionally::

    n = Notifier.from_env()
    n.ready(status="bridging eth1 <-> tap0")
    while running:
        ...
        n.watchdog_if_due()
    n.stopping()
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from uvmbus.errors import ConfigError

__all__ = ["Notifier", "notify", "watchdog_interval"]


def _address(value: str) -> str | bytes:
    if not value:
        raise ConfigError("NOTIFY_SOCKET is empty")
    if value.startswith("@"):
        return b"\0" + value[1:].encode()          # abstract namespace
    if not value.startswith("/"):
        raise ConfigError(f"NOTIFY_SOCKET={value!r}: neither an absolute path nor @abstract")
    return value


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID`` ≠ ``pid``)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return value / 2e6


class Notifier:
    """Sends notifications to one ``NOTIFY_SOCKET`` (or nowhere, when there is none)."""

    def __init__(self, address: str | None, *, watchdog: float | None = None):
        self.address = address
        self.watchdog = watchdog
        """Seconds between pings, or None (no watchdog for us)."""
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        self.sent: list[str] = []
        """Every message sent (kept short: the last 32), for status and tests."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

        With ``unset`` those variables are removed from :data:`os.environ` afterwards, so
        children (nbdkit, hooks running commands) do not inherit them."""
        env = os.environ if env is None else env
        n = cls(env.get("NOTIFY_SOCKET") or None, watchdog=watchdog_interval(env))
        if unset:
            for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(k, None)
        return n

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased).  True if a datagram went out."""
        lines = []
        for k, v in fields.items():
            text = str(v)
            if "\n" in text:
                raise ConfigError(f"sd_notify {k}: values are one line")
            lines.append(f"{k.upper()}={text}")
        return self.send_raw("\n".join(lines))

    def send_raw(self, message: str) -> bool:
        if self.address is None:
            return False
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock = s
        try:
            self._sock.sendto(message.encode(), _address(self.address))
        except OSError:
            # The manager went away (or a test stopped listening): never kill the daemon
            # over a notification.
            return False
        self.sent.append(message)
        del self.sent[:-32]
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (plus ``STATUS=`` in the same datagram).  Also counts as the first
        watchdog ping."""
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        self._last_ping = time.monotonic()
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def ping(self) -> bool:
        """``WATCHDOG=1`` now."""
        self._last_ping = time.monotonic()
        return self.send(WATCHDOG=1)

    def watchdog_due(self) -> bool:
        return self.watchdog is not None and time.monotonic() - self._last_ping >= self.watchdog

    def watchdog_if_due(self) -> bool:
        """Ping if half of ``WATCHDOG_USEC`` has passed since the last ping."""
        if self.watchdog_due():
            return self.ping()
        return False

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(**fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """One-shot ``sd_notify(0, message)``."""
    n = Notifier.from_env(env)
    try:
        return n.send_raw(message)
    finally:
        n.close()

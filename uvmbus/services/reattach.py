"""A daemon's VMBus device going away and coming back (issue 12.2), shared by ``uvmbus blk
export``, ``uvmbus net bridge`` and ``uvmbus ic run``.

When the device is rescinded, its channel revoked or its ring found corrupt, the daemon
reports it at once (control ``status``, metrics, sd_notify ``STATUS=``; :meth:`DeviceWatch.problem`
as the daemon's ``problem_fn`` stops the watchdog), keeps its outside face (NBD socket, TAP
interface) and waits up to ``timeout`` seconds for the host to offer the device again under
the same GUID (its sysfs directory reappears), then reopens it.  No re-offer in time: the
daemon stops with status 1 so that systemd restarts it (docs/reliability.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from uvmbus.errors import ChannelError, ChannelTimeout, WouldBlock
from uvmbus.services.daemon import Daemon

__all__ = ["DeviceWatch", "RETRY_PERIOD"]

#: seconds between two reopen attempts while the device is back but will not open yet
RETRY_PERIOD = 0.5


class DeviceWatch:
    """Loss of one VMBus device and the bounded wait for its re-offer."""

    def __init__(self, daemon: Daemon, root: str, device_id: str, timeout: float, log: logging.Logger):
        self.daemon = daemon
        self.root = root
        self.device_id = device_id
        self.timeout = timeout
        self.log = log
        #: why the device is gone ("" while attached), since when, and reattachments done
        self.lost = ""
        self.lost_at = 0.0
        self.reattaches = 0
        self._next_try = 0.0

    def sysfs_dir(self) -> Path:
        return Path(self.root) / "sys" / "bus" / "vmbus" / "devices" / self.device_id

    def gone_reason(self, endpoint: Any = None) -> str:
        """Why the device is gone, "" if it looks attached: its sysfs directory vanished
        (rescind), or its endpoint reported the channel revoked (host loss)."""
        if not self.sysfs_dir().exists():
            return "the device was rescinded (its sysfs entry is gone)"
        if endpoint is not None and getattr(endpoint, "revoked", False):
            return "the host revoked the channel"
        return ""

    @staticmethod
    def is_loss(exc: BaseException) -> bool:
        """A failure of the channel itself (revoked, corrupt ring, rescinded), not of one request."""
        return isinstance(exc, ChannelError) and not isinstance(exc, (ChannelTimeout, WouldBlock))

    def mark_lost(self, reason: str) -> None:
        if self.lost:
            return
        self.lost_at = time.monotonic()
        self._next_try = 0.0
        self.lost = reason
        self.log.error("device lost: %s; waiting up to %g s for a re-offer", reason, self.timeout)
        self.daemon.set_status(f"device lost: {reason}; waiting up to {self.timeout:g} s for a re-offer")

    def problem(self) -> str:
        """For ``Daemon.problem_fn``: unhealthy (and no watchdog) while the device is gone."""
        return f"device lost: {self.lost}" if self.lost else ""

    def may_retry(self) -> bool:
        """True when it is time to try reopening: lost, the device is offered again, and the
        last attempt was at least :data:`RETRY_PERIOD` ago."""
        now = time.monotonic()
        if not self.lost or now < self._next_try or not self.sysfs_dir().exists():
            return False
        self._next_try = now + RETRY_PERIOD
        return True

    def reattached(self, status: str) -> None:
        self.reattaches += 1
        self.log.info("reattached after %.1f s (%s)", time.monotonic() - self.lost_at, self.lost)
        self.lost = ""
        self.daemon.set_status(status)

    def give_up(self, why: str) -> None:
        """Stop the daemon with status 1 (systemd restarts it)."""
        self.daemon.failed = True
        self.daemon.request_stop(why)

    def check_expired(self) -> bool:
        """From the main loop: past the bounded wait, stop with status 1; True if so."""
        if not self.lost or self.daemon.stop_event.is_set():
            return False
        gone = time.monotonic() - self.lost_at
        if gone <= self.timeout:
            return False
        self.log.error("no re-offer within %g s: exiting so the service is restarted", self.timeout)
        self.give_up(f"device lost for {gone:.1f} s: {self.lost}")
        return True

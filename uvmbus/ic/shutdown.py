"""Shutdown IC (type 3): a host request to power off, restart or hibernate (§7.5).

As Linux's hv_util.c: flags 0/1 (FORCE) power off, 2/3 restart, 4/5 hibernate when the guest
can hibernate (else E_FAIL), anything else E_FAIL; the reply goes out *before* the action.  The
action is a callback; :func:`systemctl_action` is what the daemon uses."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvmbus.ic import wire
from uvmbus.ic.framework import IcService
from uvmbus.ic.wire import MsgType, Status

__all__ = ["ShutdownRequest", "ShutdownService", "hibernate_supported", "systemctl_action"]

log = logging.getLogger("uvmbus.ic")

F_FORCE = 0x1
F_RESTART = 0x2
F_HIBERNATE = 0x4


@dataclass(frozen=True)
class ShutdownRequest:
    action: str          # "poweroff", "reboot" or "hibernate"
    force: bool
    reason_code: int
    timeout_seconds: int
    message: str


def hibernate_supported(root: str | Path = "/") -> bool:
    """Linux's test: "disk" in /sys/power/state and a resume device configured."""
    try:
        state = (Path(root) / "sys/power/state").read_text().split()
        disk = (Path(root) / "sys/power/disk").read_text()
    except OSError:
        return False
    return "disk" in state and "[disabled]" not in disk


def systemctl_action(req: ShutdownRequest, *, dry_run: bool = False) -> None:
    """Run ``systemctl poweroff|reboot|hibernate`` (``--force`` for a forced request is not
    used: systemd's orderly shutdown is what a host request means on Linux too)."""
    cmd = ["systemctl", req.action, "--no-block"]
    log.warning("host requested %s (reason %#x): %s%s", req.action, req.reason_code,
                " ".join(cmd), " [dry run]" if dry_run else "")
    if not dry_run:
        subprocess.run(cmd, check=False, timeout=30)


class ShutdownService(IcService):
    name = "shutdown"
    msgtype = MsgType.SHUTDOWN
    message_versions = ((3, 2), (3, 1), (3, 0), (1, 0))
    min_body = wire.sizeof("ic_shutdown")          # Linux: recvlen >= 28 + 2060

    def __init__(self, callback: Callable[[ShutdownRequest], None],
                 can_hibernate: Callable[[], bool] = hibernate_supported) -> None:
        super().__init__()
        self.callback = callback
        self.can_hibernate = can_hibernate
        self.requests: list[ShutdownRequest] = []

    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        m = wire.load("ic_shutdown", body)
        flags = int(m.flags)
        raw = bytes(m.display_message)
        text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if flags in (0, F_FORCE):
            action = "poweroff"
        elif flags in (F_RESTART, F_RESTART | F_FORCE):
            action = "reboot"
        elif flags in (F_HIBERNATE, F_HIBERNATE | F_FORCE):
            if not self.can_hibernate():
                self._problem("refused", "hibernate requested but this guest cannot hibernate")
                return int(Status.E_FAIL), None
            action = "hibernate"
        else:
            self._problem("refused", f"shutdown flags {flags:#x} not understood")
            return int(Status.E_FAIL), None
        req = ShutdownRequest(action, bool(flags & F_FORCE), int(m.reason_code),
                              int(m.timeout_seconds), text)
        self.requests.append(req)
        self.counters[action] += 1
        return int(Status.S_OK), lambda: self.callback(req)

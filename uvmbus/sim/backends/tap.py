"""TAP backend of the simulated NIC: a real kernel interface on the host side.

The TAP is a :class:`uvmbus.tap.TapInterface` (the same code the net bridge uses): created
with ``/dev/net/tun`` and, when a network namespace is named, moved into it (created if
missing, removed at close if we created it) and brought up there.
Frames the guest sends are written to the TAP fd from C (``uvb_nvsp`` backend fd); a reader
thread waits for the fd and hands whole batches to ``uvb_nvsp_fd_rx`` (C, GIL released),
which RSS-steers them into the queues' inboxes; the model then pokes those queues' workers.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

from uvmbus.native import ffi, lib
from uvmbus.tap import TapInterface

__all__ = ["TapDevice"]


class TapDevice:
    """One TAP interface (optionally in a network namespace) plus its reader thread."""

    def __init__(self, ifname: str, netns: str = "", *, mtu: int = 1500):
        self.ifname = ifname
        self.netns = netns
        self._stop = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.tap = TapInterface(ifname, netns=netns or None, mtu=mtu)
        except BaseException:
            self._close_pipe()
            raise

    @property
    def fd(self) -> int:
        return self.tap.fd

    def start(self, nic: Any, on_queues: Callable[[int], None]) -> None:
        """Start the reader: frames go to ``nic`` (a ``struct uvb_nvsp *``); ``on_queues``
        gets the bit mask of queues that received frames (to wake their workers)."""
        self._thread = threading.Thread(target=self._run, args=(nic, on_queues),
                                        name=f"tap-{self.ifname}", daemon=True)
        self._thread.start()

    def _run(self, nic: Any, on_queues: Callable[[int], None]) -> None:
        mask = ffi.new("uint64_t *")
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        while not self._stop:
            p.poll(1000)
            if self._stop:
                break
            mask[0] = 0
            n = lib.uvb_nvsp_fd_rx(nic, self.fd, 256, mask)
            if n < 0:
                break
            if mask[0]:
                on_queues(int(mask[0]))

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.tap.close()                 # the TAP disappears with its fd; our netns too
        self._close_pipe()

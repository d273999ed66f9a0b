"""TAP backend of the simulated NIC: a real kernel interface on the host side.

The TAP is created with ``/dev/net/tun`` (``TUNSETIFF``, ``IFF_TAP | IFF_NO_PI``), then —
when a network namespace is named — moved into it (the namespace is created if it does not
exist, and removed again at close if we created it) and brought up there with pyroute2.
Frames the guest sends are written to the TAP fd from C (``uvb_nvsp`` backend fd); a reader
thread waits for the fd and hands whole batches to ``uvb_nvsp_fd_rx`` (C, GIL released),
which RSS-steers them into the queues' inboxes; the model then pokes those queues' workers.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import Any

from uvmbus.errors import ConfigError, PrivilegeError, SimulatorError
from uvmbus.native import ffi, lib

__all__ = ["TapDevice"]

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


class TapDevice:
    """One TAP interface (optionally in a network namespace) plus its reader thread."""

    def __init__(self, ifname: str, netns: str = "", *, mtu: int = 1500):
        self.ifname = ifname
        self.netns = netns
        self.created_netns = False
        self.fd = -1
        self._stop = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._create(mtu)
        except BaseException:
            self.close()
            raise

    def _create(self, mtu: int) -> None:
        from pyroute2 import IPRoute, NetNS, netns

        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PrivilegeError("TAP backend: cannot open /dev/net/tun (needs CAP_NET_ADMIN)") from exc
        except FileNotFoundError as exc:
            raise ConfigError("TAP backend: /dev/net/tun does not exist (tun module not loaded)") from exc
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", self.ifname.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            raise SimulatorError(f"TAP backend: TUNSETIFF {self.ifname} failed: {exc}") from exc
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.ifname)
            if not idx:
                raise SimulatorError(f"TAP backend: {self.ifname} did not appear")
            if self.netns:
                if self.netns not in netns.listnetns():
                    netns.create(self.netns)
                    self.created_netns = True
                ipr.link("set", index=idx[0], net_ns_fd=self.netns)
            else:
                ipr.link("set", index=idx[0], state="up", mtu=mtu)
        if self.netns:
            with NetNS(self.netns) as ns:
                idx = ns.link_lookup(ifname=self.ifname)
                ns.link("set", index=idx[0], state="up", mtu=mtu)
                lo = ns.link_lookup(ifname="lo")
                if lo:
                    ns.link("set", index=lo[0], state="up")

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

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)            # a non-persistent TAP disappears with its fd
            self.fd = -1
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self.created_netns:
            from pyroute2 import netns
            try:
                netns.remove(self.netns)
            except OSError:
                pass
            self.created_netns = False

"""What the parts of the simulated host may use of each other, as typing protocols.

The simulator (event loop) owns devices, a device owns its channels and its model; the parts
below call back up only through these narrow views, so the modules form layers with no import
circle (tests/test_imports.py):

    simulator → binding, device → channel, models → hostapi → config, kernel, faults, memory

* :class:`HostVm` — the simulator as a device and the binder see it;
* :class:`HostDevice` — a device as its channels and its model see it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from uvmbus.sim.config import SimConfig
from uvmbus.sim.faults import Faults
from uvmbus.sim.kernel import KernelMode
from uvmbus.sim.memory import GpadlBuffer, SharedMemfd
from uvmbus.sim.tree import Tree

if TYPE_CHECKING:
    from uvmbus.dma.sim import GuestRam

__all__ = ["HostDevice", "HostVm"]


class HostVm(Protocol):
    """The simulator's services for devices and the binder (all on the event loop except
    ``call_soon``, ``later`` and ``log``, which any thread may call)."""

    config: SimConfig
    kernel: KernelMode
    tree: Tree
    counters: Counter[str]
    guest_ram: Any
    int_page: SharedMemfd
    monitor_page: SharedMemfd
    monitor: Any
    devices: Any

    def log(self, message: str, *, debug: bool = False) -> None: ...
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...
    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None: ...
    def alloc_relid(self) -> int: ...
    def alloc_monitor_id(self) -> int: ...
    def free_monitor_id(self, mid: int) -> None: ...
    def next_gpadl(self) -> int: ...
    def alloc_uio(self, dev: Any) -> int: ...
    def free_uio(self, n: int) -> None: ...
    def alloc_ifname(self, dev: Any) -> tuple[str, str]: ...
    def alloc_scsi_host(self, dev: Any) -> int: ...
    def add_endpoint(self, dev: Any) -> None: ...
    def remove_endpoint(self, dev: Any) -> None: ...
    def forget_connection(self, conn: Any) -> None: ...
    def watch_device(self, dev: Any) -> None: ...
    def device_by_id(self, guid: str) -> Any: ...
    def rescind(self, dev: Any, reoffer_after: float | None = None) -> None: ...


class HostDevice(Protocol):
    """A device as its channels and its model see it."""

    vm: HostVm
    config: SimConfig
    kernel: KernelMode
    device_id: str
    relid: int | None
    notify: Any
    faults: Faults
    model: Any
    channels: dict[int, Any]

    @property
    def guest_ram(self) -> GuestRam | None: ...
    @property
    def primary(self) -> Any: ...
    def buffer(self, kind: str) -> GpadlBuffer | None: ...
    def offer_subchannels(self, count: int) -> int: ...
    def rescind(self, reoffer_after: float | None = None) -> None: ...
    def log(self, message: str, *, debug: bool = False) -> None: ...
    def poke_channels(self) -> None: ...

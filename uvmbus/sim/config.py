"""Settings of one simulator run (what ``uvmbus sim`` options turn into)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.sim.kernel import KernelMode

__all__ = ["DeviceSpec", "SimConfig"]


@dataclass
class DeviceSpec:
    """One device to offer at start: a registered model name plus its options."""

    model: str
    options: dict[str, str] = field(default_factory=dict)
    bind: str | None = None
    """Driver to bind at start (None: the model's kernel driver, or unbound)."""


@dataclass
class SimConfig:
    root: Path
    kernel: KernelMode
    devices: list[DeviceSpec]
    monitored: bool = True
    monitored_subchannels: bool = True
    monitor_latency_us: float = 50.0
    monitor_idle_us: float = 2000.0
    """monitor scan interval once idle (uvmbus.sim.monitor; 0: never back off)"""
    honour_page_latency: bool = True
    subchannel_delay: float = 0.2
    """seconds between a sub-channel offer and its ``ring`` file (the §1.8 race)"""
    guest_ram: int = 256 * 1024 * 1024
    guest_ram_base_pfn: int = 0x100000
    host_spin_us: float = 20.0
    """how long a host channel keeps polling (TX masked) after its last packet"""
    signal_grace: float = 5.0
    """seconds the host accepts a guest signal it could not rule out (see HostChannel)"""
    bind_uio: bool = False
    """--bind: register every model device's class with uio_hv_generic at start"""
    ic_devices: bool = True
    """offer the usual integration-component devices bound to hv_utils"""
    owns_root: bool = False
    """the simulator created the root directory (and removes it at exit)"""
    quiet: bool = False
    record: Any = None
    """--record: a uvmbus.trace.Recorder (host side) every channel records into"""

    @property
    def page_size(self) -> int:
        return self.kernel.page_size

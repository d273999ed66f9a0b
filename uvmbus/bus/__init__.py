"""The VMBus bus layer: ``/sys/bus/vmbus`` under a root (``/`` or a simulated host's tree).

- :mod:`~uvmbus.bus.classes`  class GUID table (short names, kernel drivers)
- :mod:`~uvmbus.bus.devices`  :class:`Bus`, :class:`VmbusDevice`, channels and UIO maps
- :mod:`~uvmbus.bus.kernel`   :class:`KernelQuirks`: uio_hv_generic behaviour per kernel release
- :mod:`~uvmbus.bus.binding`  :func:`bind_uio` / :func:`unbind_uio`
- :mod:`~uvmbus.bus.safety`   :func:`check_safe_to_take` (OS disk / management NIC guard)
- :mod:`~uvmbus.bus.lock`     :func:`lock_device`: one user per device (flock on its sysfs dir)

This layer depends only on :mod:`uvmbus.errors`.
"""

from uvmbus.bus.binding import bind_uio, unbind_uio
from uvmbus.bus.classes import CLASSES, VmbusClass, lookup_class, normalize_guid
from uvmbus.bus.devices import UIO_DRIVER, Bus, ChannelInfo, MapInfo, VmbusDevice
from uvmbus.bus.kernel import KernelQuirks, parse_release
from uvmbus.bus.lock import DeviceLock, device_holder, hold_device, lock_device
from uvmbus.bus.safety import BlockUser, LiveSystem, SystemView, check_safe_to_take

__all__ = [
    "CLASSES",
    "UIO_DRIVER",
    "BlockUser",
    "Bus",
    "ChannelInfo",
    "DeviceLock",
    "KernelQuirks",
    "LiveSystem",
    "MapInfo",
    "SystemView",
    "VmbusClass",
    "VmbusDevice",
    "bind_uio",
    "check_safe_to_take",
    "device_holder",
    "hold_device",
    "lock_device",
    "lookup_class",
    "normalize_guid",
    "parse_release",
    "unbind_uio",
]

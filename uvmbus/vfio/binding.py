"""Hand a PCI function to ``vfio-pci`` and give it back to its kernel driver.

The sysfs recipe (Documentation/driver-api/vfio.rst; ``driver_override`` since Linux 3.16)::

    echo vfio-pci > /sys/bus/pci/devices/<bdf>/driver_override
    echo <bdf>    > /sys/bus/pci/devices/<bdf>/driver/unbind     # if bound
    echo <bdf>    > /sys/bus/pci/drivers/vfio-pci/bind            # or drivers_probe

Idempotent like :func:`uvmbus.bus.bind_uio`: a function already on vfio-pci with its group
node present is returned at once; kernel idempotency errnos count as success and every step
is confirmed by re-reading the tree.  The same safety refusals apply (a controller holding a
mounted filesystem, swap or the root disk is refused unless forced).
"""

from __future__ import annotations

import errno
import time

from uvmbus.bus.binding import _wait
from uvmbus.bus.safety import SystemView, check_safe_to_take
from uvmbus.bus.sysfs import write_attr
from uvmbus.errors import BusError
from uvmbus.vfio.pci import VFIO_DRIVER, PciBus, PciFunction

__all__ = ["bind_vfio", "unbind_vfio", "vfio_module_hint"]


def vfio_module_hint(fn: PciFunction) -> str:
    """What to load so that ``fn`` can be bound to vfio-pci."""
    if fn.iommu_group is None:
        return ("this function has no IOMMU group: the machine has no (enabled) IOMMU. On "
                "Hyper-V/Azure that is normal: load VFIO in no-IOMMU mode with `modprobe vfio "
                "enable_unsafe_noiommu_mode=1 && modprobe vfio-pci` (the kernel needs "
                "CONFIG_VFIO_NOIOMMU). Elsewhere enable the IOMMU (intel_iommu=on / amd_iommu=on).")
    return "run `modprobe vfio-pci` (as root) and retry"


def _ready(fn: PciFunction) -> bool:
    return fn.driver == VFIO_DRIVER and fn.vfio_group_path is not None


def bind_vfio(bus: PciBus, fn: PciFunction | str, *, force: bool = False, timeout: float = 10.0,
              system: SystemView | None = None) -> PciFunction:
    """Bind ``fn`` to vfio-pci and wait for its ``/dev/vfio`` group node.  Raises
    :class:`UnsafeDeviceError` (OS uses it, unless ``force``), :class:`PrivilegeError`,
    :class:`BusError` (module missing, kernel refused, timeout)."""
    f = bus.function(fn) if isinstance(fn, str) else fn
    deadline = time.monotonic() + timeout
    if f.driver == VFIO_DRIVER and _wait(lambda: _ready(f), deadline):
        return f
    drv = bus.driver_path(VFIO_DRIVER)
    if not drv.is_dir():
        raise BusError(f"{drv} does not exist: the vfio-pci driver is not loaded; "
                       + vfio_module_hint(f), path=str(drv))
    if not force:
        check_safe_to_take(bus, f, system=system)
    if (f.path / "driver_override").exists():
        write_attr(f.path / "driver_override", VFIO_DRIVER)
    current = f.driver
    if current not in (None, VFIO_DRIVER):
        write_attr(bus.driver_path(current) / "unbind", f.name, ok_errnos=(errno.ENODEV,))
        if not _wait(lambda: f.driver != current, deadline):
            raise BusError(f"{f.name} is still bound to {current} after unbind ({timeout:g} s); "
                           "check dmesg", path=str(f.path))
    if f.driver != VFIO_DRIVER:
        write_attr(drv / "bind", f.name, ok_errnos=(errno.EBUSY,))
    if _wait(lambda: _ready(f), deadline):
        return f
    state = f"driver={f.driver or 'none'}, iommu_group={f.iommu_group}"
    raise BusError(f"{f.name} did not bind to vfio-pci within {timeout:g} s ({state}). "
                   f"Check dmesg; {vfio_module_hint(f)}", path=str(f.path))


def unbind_vfio(bus: PciBus, fn: PciFunction | str, *, timeout: float = 10.0) -> PciFunction:
    """Give ``fn`` back to the kernel: unbind from vfio-pci, clear ``driver_override`` and let
    the kernel probe its own driver (``drivers_probe``).  A function on another driver is left
    alone."""
    f = bus.function(fn) if isinstance(fn, str) else fn
    deadline = time.monotonic() + timeout
    if f.driver not in (None, VFIO_DRIVER):
        return f
    if f.driver == VFIO_DRIVER:
        write_attr(bus.driver_path(VFIO_DRIVER) / "unbind", f.name, ok_errnos=(errno.ENODEV,))
        if not _wait(lambda: f.driver != VFIO_DRIVER, deadline):
            raise BusError(f"{f.name} is still bound to vfio-pci after unbind ({timeout:g} s): "
                           "is a process holding its /dev/vfio group open?", path=str(f.path))
    if f.driver_override == VFIO_DRIVER:
        write_attr(f.path / "driver_override", "\n")
    probe = bus.pci_path / "drivers_probe"
    if probe.exists():
        write_attr(probe, f.name, ok_errnos=(errno.ENODEV, errno.EINVAL))
        _wait(lambda: f.driver is not None, deadline)
    return f

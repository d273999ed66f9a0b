"""Hand a VMBus device to ``uio_hv_generic`` and give it back to its kernel driver.

The sysfs recipe (uio_vmbus.md §1.1, storvsc_ic.md §6.1)::

    echo <class-guid> > drivers/uio_hv_generic/new_id     # EEXIST: already registered
    echo uio_hv_generic > devices/<dev>/driver_override   # optional, sticks across re-probes
    echo -n <dev>     > drivers/<current>/unbind          # ENODEV: not bound there
    echo -n <dev>     > drivers/uio_hv_generic/bind       # EBUSY: new_id already bound it

The kernel's idempotency errnos count as success.  A write is never trusted on its own: the
simulator's attribute files are plain files (a write cannot fail there) and the real kernel
may refuse a probe silently (e.g. a non-monitored channel before v6.10, §1.6), so every step
is confirmed by re-reading the tree (``driver`` link, ``uio/uioN``, ``<root>/dev/uioN``),
polling every 10 ms up to a deadline.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

from uvmbus.bus.classes import DRIVER_MODULES
from uvmbus.bus.devices import UIO_DRIVER, Bus, VmbusDevice
from uvmbus.bus.safety import SystemView, check_safe_to_take
from uvmbus.bus.sysfs import write_attr
from uvmbus.errors import BusError

__all__ = ["bind_uio", "unbind_uio"]

_POLL = 0.010


def _wait(cond: Callable[[], bool], deadline: float) -> bool:
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return cond()
        time.sleep(_POLL)


def _uio_ready(device: VmbusDevice) -> bool:
    uio = device.uio
    return uio is not None and (device.bus.root / "dev" / uio).exists()


def _resolve(bus: Bus, device: VmbusDevice | str) -> VmbusDevice:
    return bus.device(device) if isinstance(device, str) else device


def bind_uio(bus: Bus, device: VmbusDevice | str, *, force: bool = False,
             timeout: float = 10.0, persist_override: bool = True,
             system: SystemView | None = None) -> VmbusDevice:
    """Bind ``device`` to uio_hv_generic and wait until ``<root>/dev/uioN`` exists.

    Already bound to uio: returns at once (after waiting for the node if it is still being
    created).  Unless ``force``, :func:`check_safe_to_take` runs first (``system`` is passed
    to it).  With ``persist_override`` the device's ``driver_override`` (if the kernel has
    it) is set so no other driver grabs the device on a re-probe.  Returns the device.

    Raises :class:`UnsafeDeviceError`, :class:`PrivilegeError` (not root) or
    :class:`BusError` (module not loaded, kernel refused, timeout).
    """
    dev = _resolve(bus, device)
    deadline = time.monotonic() + timeout
    if dev.driver == UIO_DRIVER and _wait(lambda: _uio_ready(dev), deadline):
        return dev
    uio_drv = bus.driver_path(UIO_DRIVER)
    if not uio_drv.is_dir():
        raise BusError(
            f"{uio_drv} does not exist: the uio_hv_generic driver is not loaded. "
            "Run `modprobe uio_hv_generic` (as root) and retry.", path=str(uio_drv))
    if not force:
        check_safe_to_take(bus, dev, system=system)
    class_id = dev.class_id
    if class_id is None:
        raise BusError(f"{dev.path}/class_id is missing; cannot register the class with "
                       "uio_hv_generic", path=str(dev.path))

    write_attr(uio_drv / "new_id", class_id, ok_errnos=(errno.EEXIST,))
    override = dev.driver_override
    if (dev.path / "driver_override").exists() and (
            persist_override or override not in (None, UIO_DRIVER)):
        write_attr(dev.path / "driver_override", UIO_DRIVER)
    current = dev.driver
    if current not in (None, UIO_DRIVER):
        write_attr(bus.driver_path(current) / "unbind", dev.name, ok_errnos=(errno.ENODEV,))
        if not _wait(lambda: dev.driver != current, deadline):
            raise BusError(
                f"{dev.device_id} is still bound to {current} after writing to "
                f"{bus.driver_path(current)}/unbind ({timeout:g} s). Check dmesg.",
                path=str(dev.path))
    if dev.driver != UIO_DRIVER:
        write_attr(uio_drv / "bind", dev.name, ok_errnos=(errno.EBUSY,))
    if _wait(lambda: dev.driver == UIO_DRIVER and _uio_ready(dev), deadline):
        return dev
    raise BusError(_bind_timeout_message(bus, dev, timeout), path=str(dev.path))


def _bind_timeout_message(bus: Bus, dev: VmbusDevice, timeout: float) -> str:
    state = (f"driver={dev.driver or 'none'}, uio={dev.uio or 'none'}"
             + (f", {dev.uio_dev_path} missing" if dev.uio else ""))
    hints = ["is uio_hv_generic loaded (`lsmod | grep uio_hv_generic`, "
             "`modprobe uio_hv_generic`)?",
             "does dmesg show a probe error?"]
    if dev.monitor_id is None:
        try:
            kernel = bus.kernel
        except Exception:  # hint only; a missing osrelease must not mask the real error
            kernel = None
        if kernel is not None and not kernel.nonmonitored_supported:
            hints.insert(0, f"the primary channel is not monitor-allocated and Linux "
                            f"{kernel.release} < 6.10 refuses such channels "
                            "('vmbus channel requires hypercall');")
    if dev.uio and not dev.bus.root.joinpath("dev", dev.uio).exists():
        hints.append("is udev/devtmpfs creating /dev/uioN?")
    return (f"{dev.device_id} ({dev.class_name}) did not bind to uio_hv_generic within "
            f"{timeout:g} s ({state}). Check: " + " ".join(hints))


def unbind_uio(bus: Bus, device: VmbusDevice | str, *, timeout: float = 10.0) -> VmbusDevice:
    """Give ``device`` back to its class's kernel driver (from the class table).

    Unbinds from uio_hv_generic, clears a ``driver_override`` of ``uio_hv_generic`` and binds
    the kernel driver, waiting until the ``driver`` link shows it.  A device already bound to
    another driver is left alone; a class without a kernel driver (e.g. fcopy on ≥6.10) is
    left unbound.  Returns the device.
    """
    dev = _resolve(bus, device)
    deadline = time.monotonic() + timeout
    if dev.driver not in (None, UIO_DRIVER):
        return dev
    if dev.driver == UIO_DRIVER:
        write_attr(bus.driver_path(UIO_DRIVER) / "unbind", dev.name, ok_errnos=(errno.ENODEV,))
        if not _wait(lambda: dev.driver != UIO_DRIVER, deadline):
            raise BusError(f"{dev.device_id} is still bound to uio_hv_generic after unbind "
                           f"({timeout:g} s). Is a process holding {dev.uio_dev_path} open?",
                           path=str(dev.path))
    if dev.driver_override == UIO_DRIVER:
        write_attr(dev.path / "driver_override", "\n")
    cls = dev.vmbus_class
    candidates = cls.kernel_drivers if cls else ()
    if not candidates:
        return dev
    present = [d for d in candidates if bus.driver_path(d).is_dir()]
    if not present:
        modules = " or ".join(DRIVER_MODULES.get(d, d) for d in candidates)
        raise BusError(f"{dev.device_id} is now unbound, but its kernel driver "
                       f"({', '.join(candidates)}) is not loaded: run `modprobe {modules}`.",
                       path=str(dev.path))
    target = present[0]
    if dev.driver != target:
        write_attr(bus.driver_path(target) / "bind", dev.name, ok_errnos=(errno.EBUSY,))
    if _wait(lambda: dev.driver == target, deadline):
        return dev
    raise BusError(f"{dev.device_id} did not bind to {target} within {timeout:g} s; "
                   "check dmesg.", path=str(dev.path))

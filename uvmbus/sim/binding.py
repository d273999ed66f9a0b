"""Driver binding of the simulated bus: what writes to the sysfs binding files do.

Rules (uio_vmbus.md §1.1; the kernel's driver core):

* ``drivers/uio_hv_generic/new_id`` ← class GUID: register the class (a second time:
  EEXIST) and bind every *unbound* device of that class at once (driver_attach);
* ``drivers/<drv>/bind`` ← device GUID: bind if the device is unbound and the driver
  matches (EBUSY if bound, ENODEV if no match); ``unbind``: only from the driver it is
  bound to (ENODEV otherwise);
* ``devices/<guid>/driver_override`` ← driver name (empty: clear): from then on only that
  driver matches; it does not re-probe by itself;
* ``drivers_probe`` ← device GUID: probe an unbound device (override, dynamic ids, then the
  kernel drivers' static class tables).

A sysfs write cannot fail here (the files are plain files): refused writes are logged with
the errno the kernel would have returned and counted (``sysfs_errors`` in ``stats``).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

from uvmbus.sim.tree import DRIVERS

if TYPE_CHECKING:
    from uvmbus.sim.device import SimDevice
    from uvmbus.sim.hostapi import HostVm

__all__ = ["KERNEL_DRIVER_CLASSES", "Binder"]

UIO = "uio_hv_generic"

#: static id tables of the kernel drivers the simulated VM has loaded
KERNEL_DRIVER_CLASSES: dict[str, frozenset[str]] = {
    "hv_netvsc": frozenset({"f8615163-df3e-46c5-913f-f2d2f965ed0e"}),
    "hv_storvsc": frozenset({"ba6163d9-04a1-4d29-b605-72e2ffb1dc7f",
                             "32412632-86cb-44a2-9b5c-50d1417354f5",
                             "2f9bcc4a-0069-4af3-b76b-6fd0be528cda"}),
    "hv_utils": frozenset({"0e0b6031-5213-4934-818b-38d90ced39db", "9527e630-d0ae-497b-adce-e80ab0175caf",
                           "57164f39-9115-4e78-ab55-382f3bd5422d", "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
                           "35fa2e29-ea23-4236-96ae-3a6ebacba440"}),
}


def _guid(text: str) -> str:
    return text.strip().strip("{}").lower()


class Binder:
    def __init__(self, vm: HostVm):
        self.vm = vm
        self.uio_ids: set[str] = set()

    # -- matching ---------------------------------------------------------------------------
    def matches(self, dev: SimDevice, driver: str) -> bool:
        if dev.driver_override:
            return dev.driver_override == driver
        if driver == UIO:
            return dev.class_id in self.uio_ids
        return dev.class_id in KERNEL_DRIVER_CLASSES.get(driver, frozenset())

    def probe(self, dev: SimDevice, driver: str) -> bool:
        """Bind ``dev`` to a matching ``driver``; a kernel driver forced onto a class it does
        not handle (driver_override) fails its probe, as hv_netvsc would on a non-NIC."""
        if driver != UIO and dev.class_id not in KERNEL_DRIVER_CLASSES.get(driver, frozenset()):
            return False
        return dev.bind(driver)

    def attach(self, dev: SimDevice) -> None:
        """Probe an unbound device against every driver (device_add / drivers_probe)."""
        if dev.driver or not dev.present:
            return
        for drv in (UIO, *KERNEL_DRIVER_CLASSES):
            if self.matches(dev, drv) and self.probe(dev, drv):
                return

    # -- the files ----------------------------------------------------------------------------
    def handle_write(self, path: Path) -> None:
        try:
            value = path.read_text()
        except OSError:
            return
        name, parent = path.name, path.parent
        tree = self.vm.tree
        if parent.parent == tree.drivers and parent.name in DRIVERS:
            if name == "new_id":
                self.new_id(parent.name, value)
            elif name == "remove_id":
                self.remove_id(parent.name, value)
            elif name == "bind":
                self.bind(parent.name, value)
            elif name == "unbind":
                self.unbind(parent.name, value)
        elif path == tree.vmbus / "drivers_probe":
            dev = self._device(value, "drivers_probe")
            if dev is not None:
                self.attach(dev)
        elif name == "driver_override" and parent.parent == tree.devices:
            dev = self.vm.device_by_id(parent.name)
            if dev is not None:
                self.set_override(dev, value)

    def _refuse(self, what: str, code: int) -> None:
        self.vm.counters["sysfs_errors"] += 1
        self.vm.log(f"sysfs: {what}: -{errno.errorcode.get(code, code)} (a real kernel fails the write)")

    def _device(self, value: str, what: str) -> SimDevice | None:
        dev = self.vm.device_by_id(_guid(value))
        if dev is None or not dev.present:
            if value.strip():
                self._refuse(f"{what} {value.strip()!r}: no such device", errno.ENODEV)
            return None
        return dev

    def new_id(self, driver: str, value: str) -> None:
        if not value.strip():
            return
        cls = _guid(value.split()[0])
        if driver != UIO:
            self._refuse(f"{driver}/new_id {cls}", errno.EINVAL)
            return
        if cls in self.uio_ids:
            self._refuse(f"{driver}/new_id {cls}: already registered", errno.EEXIST)
            return
        self.uio_ids.add(cls)
        for dev in self.vm.devices:
            if dev.class_id == cls and dev.present and dev.driver is None and self.matches(dev, UIO):
                self.probe(dev, UIO)

    def remove_id(self, driver: str, value: str) -> None:
        cls = _guid(value.split()[0]) if value.strip() else ""
        if driver == UIO and cls in self.uio_ids:
            self.uio_ids.discard(cls)
        elif cls:
            self._refuse(f"{driver}/remove_id {cls}", errno.ENODEV)

    def bind(self, driver: str, value: str) -> None:
        dev = self._device(value, f"{driver}/bind")
        if dev is None:
            return
        if dev.driver is not None:
            if dev.driver != driver:
                self._refuse(f"{driver}/bind {dev.device_id}: bound to {dev.driver}", errno.EBUSY)
            return                  # bound to it already: EBUSY, the usual idempotent case
        if not self.matches(dev, driver):
            self._refuse(f"{driver}/bind {dev.device_id}: driver does not match the device", errno.ENODEV)
            return
        if not self.probe(dev, driver):
            self._refuse(f"{driver}/bind {dev.device_id}: probe failed", errno.EOPNOTSUPP)

    def unbind(self, driver: str, value: str) -> None:
        dev = self._device(value, f"{driver}/unbind")
        if dev is None:
            return
        if dev.driver != driver:
            if dev.driver is not None:
                self._refuse(f"{driver}/unbind {dev.device_id}: bound to {dev.driver}", errno.ENODEV)
            return
        dev.unbind()

    def set_override(self, dev: SimDevice, value: str) -> None:
        v = value.strip()
        new = None if v in ("", "(null)") else v
        if new != dev.driver_override:
            dev.driver_override = new
            if v != value.rstrip("\n") or v == "":
                self.vm.tree.set_driver_override(dev.device_id, new)

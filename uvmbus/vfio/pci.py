"""PCI functions under a root directory: identity, IOMMU group, driver, Hyper-V vPCI parent.

``PciBus("/")`` reads the real ``/sys/bus/pci``; a test passes a directory laid out the same
way.  Everything is re-read on each access, like :class:`uvmbus.bus.Bus`.

Hyper-V passthrough functions (DDA NVMe, SR-IOV VFs) sit behind ``pci-hyperv``: each is first
a VMBus device, whose sysfs directory holds the PCI host bridge (``pci<domain>:00``) and below
it the function.  The PCI domain is taken from bytes 4-5 of the instance GUID (the second
group of its text form; Linux resolves collisions by picking another number, so the sysfs
path, not the formula, is what :attr:`PciFunction.vmbus_parent` reads).
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from uvmbus.bus.children import OsChildren, find_children
from uvmbus.bus.classes import normalize_guid
from uvmbus.bus.sysfs import read_text
from uvmbus.errors import ConfigError, NotFound

__all__ = ["PciBus", "PciFunction", "VFIO_DRIVER", "class_name", "guid_domain",
           "normalize_bdf"]

VFIO_DRIVER = "vfio-pci"
_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4,8}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_GUID_RE = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}\}?$")

#: (class << 8 | subclass) -> name, and a few full class codes
_CLASSES = {
    0x0100: "scsi", 0x0101: "ide", 0x0106: "sata", 0x0107: "sas", 0x0108: "nvme",
    0x0200: "ethernet", 0x0207: "infiniband", 0x0300: "vga", 0x0302: "3d",
    0x0600: "host-bridge", 0x0601: "isa-bridge", 0x0604: "pci-bridge", 0x0c03: "usb",
    0x0c05: "smbus", 0x0805: "sd-host", 0x0880: "system", 0x1200: "accelerator",
}


def class_name(code: int) -> str:
    """A short name for a 24-bit PCI class code (``0x010802`` -> ``nvme``)."""
    return _CLASSES.get(code >> 8, f"class-{code >> 8:04x}")


def normalize_bdf(ref: str) -> str | None:
    """``DDDD:BB:DD.F`` (lowercase; domain 0000 added) for a PCI address, else None."""
    m = _BDF_RE.match(ref.strip())
    if not m:
        return None
    dom = m.group(1) or "0000"
    return f"{int(dom, 16):04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def guid_domain(guid: str) -> int:
    """The PCI domain pci-hyperv derives from a vPCI instance GUID (bytes 4-5, i.e. the
    second group of ``aaaaaaaa-BBBB-...``), before collision handling."""
    g = normalize_guid(guid)
    if g is None:
        raise ConfigError(f"{guid!r} is not a GUID")
    return int(g.split("-")[1], 16)


class PciFunction(OsChildren):
    """A view of ``sys/bus/pci/devices/<bdf>``; every property re-reads the tree."""

    def __init__(self, bus: PciBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.path = bus.pci_path / "devices" / name

    def __repr__(self) -> str:
        return f"<PciFunction {self.name} {self.vendor_id:04x}:{self.device_id_num:04x} driver={self.driver}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PciFunction) and (other.bus.root, other.name) == (
            self.bus.root, self.name)

    def __hash__(self) -> int:
        return hash((self.bus.root, self.name))

    def _hex(self, attr: str) -> int:
        text = read_text(self.path / attr)
        try:
            return int(text, 16) if text else 0
        except ValueError:
            return 0

    # -- identity -----------------------------------------------------------------------------
    @property
    def device_id(self) -> str:
        """The PCI address (``0000:00:04.0``): what the CLI and the locks name."""
        return self.name

    @property
    def vendor_id(self) -> int:
        return self._hex("vendor")

    @property
    def device_id_num(self) -> int:
        return self._hex("device")

    @property
    def class_code(self) -> int:
        return self._hex("class")

    @property
    def class_name(self) -> str:
        return class_name(self.class_code)

    @property
    def domain(self) -> int:
        return int(self.name.split(":")[0], 16)

    @property
    def numa_node(self) -> int | None:
        text = read_text(self.path / "numa_node")
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    # -- binding ------------------------------------------------------------------------------
    @property
    def driver(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.path / "driver"))
        except OSError:
            return None

    @property
    def driver_override(self) -> str | None:
        text = read_text(self.path / "driver_override")
        return None if text in (None, "", "(null)") else text

    @property
    def iommu_group(self) -> int | None:
        """The IOMMU group number (``iommu_group`` link), None without one."""
        try:
            return int(os.path.basename(os.readlink(self.path / "iommu_group")))
        except (OSError, ValueError):
            return None

    def group_members(self) -> list[str]:
        """PCI addresses of every function in this function's IOMMU group (itself included)."""
        g = self.iommu_group
        if g is None:
            return [self.name]
        d = self.bus.root / "sys/kernel/iommu_groups" / str(g) / "devices"
        try:
            return sorted(e.name for e in os.scandir(d))
        except OSError:
            return [self.name]

    @property
    def noiommu(self) -> bool:
        """True when the group is a VFIO no-IOMMU group (``/dev/vfio/noiommu-N``)."""
        g = self.iommu_group
        return g is not None and (self.bus.root / "dev/vfio" / f"noiommu-{g}").exists()

    @property
    def vfio_group_path(self) -> Path | None:
        """``<root>/dev/vfio/N`` or ``noiommu-N`` when it exists (bound to vfio-pci)."""
        g = self.iommu_group
        if g is None:
            return None
        for name in (str(g), f"noiommu-{g}"):
            p = self.bus.root / "dev/vfio" / name
            if p.exists():
                return p
        return None

    @property
    def vfio_cdev(self) -> Path | None:
        """``<root>/dev/vfio/devices/vfioX`` (iommufd cdev API) when the kernel offers it."""
        try:
            names = [e.name for e in os.scandir(self.path / "vfio-dev") if e.name.startswith("vfio")]
        except OSError:
            return None
        for n in sorted(names):
            p = self.bus.root / "dev/vfio/devices" / n
            if p.exists():
                return p
        return None

    # -- Hyper-V vPCI ---------------------------------------------------------------------------
    @cached_property
    def vmbus_parent(self) -> str | None:
        """Instance GUID of the VMBus device this function hangs below (pci-hyperv), or None."""
        try:
            real = os.path.realpath(self.path)
        except OSError:
            return None
        for part in reversed(Path(real).parts):
            if _GUID_RE.match(part):
                return normalize_guid(part)
        return None

    @property
    def slot(self) -> str | None:
        """Name of the PCI slot holding this function (pci-hyperv: the vPCI device's serial,
        which a netvsc VF association names), or None."""
        addr = self.name.rsplit(".", 1)[0]
        for name, a in self.bus.slots().items():
            if a == addr:
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.name, "vendor": f"{self.vendor_id:04x}",
            "device": f"{self.device_id_num:04x}", "class": f"{self.class_code:06x}",
            "class_name": self.class_name, "driver": self.driver,
            "driver_override": self.driver_override, "iommu_group": self.iommu_group,
            "noiommu": self.noiommu, "vmbus_parent": self.vmbus_parent, "slot": self.slot,
            "net": self.net_interfaces(), "block": self.block_devices(),
        }


class PciBus:
    """The PCI bus under ``root`` (``"/"`` on a real system)."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.pci_path = self.root / "sys/bus/pci"

    def __repr__(self) -> str:
        return f"PciBus({str(self.root)!r})"

    def functions(self, *, cls: str | None = None) -> list[PciFunction]:
        """Every PCI function, sorted by address (only class ``cls``, e.g. ``nvme``, if given)."""
        try:
            names = sorted(e.name for e in os.scandir(self.pci_path / "devices"))
        except OSError:
            return []
        out = [PciFunction(self, n) for n in names]
        return [f for f in out if f.class_name == cls] if cls else out

    def driver_path(self, driver: str) -> Path:
        return self.pci_path / "drivers" / driver

    def slots(self) -> dict[str, str]:
        """Slot name -> ``DDDD:BB:DD`` (``sys/bus/pci/slots/<name>/address``).  pci-hyperv
        names each vPCI slot after the device's serial number (decimal; pci-hyperv.c
        hv_pci_assign_slots), which is what a VF association's ``serial`` carries."""
        out: dict[str, str] = {}
        try:
            entries = sorted(e.name for e in os.scandir(self.pci_path / "slots"))
        except OSError:
            return out
        for name in entries:
            addr = read_text(self.pci_path / "slots" / name / "address")
            if addr:
                out[name] = addr.strip().lower()
        return out

    def by_slot(self, name: str) -> list[PciFunction]:
        """The functions in the slot called ``name`` (a Hyper-V VF's serial), sorted."""
        addr = self.slots().get(str(name))
        if not addr:
            return []
        return [f for f in self.functions() if f.name.rsplit(".", 1)[0] == addr]

    def by_mac(self, mac: bytes) -> list[PciFunction]:
        """Functions with a network interface whose address is ``mac`` (Linux's fallback when
        no slot matches compares the permanent address: netvsc_drv.c get_netvsc_byslot;
        sysfs shows the current one)."""
        if not mac:
            return []
        want = ":".join(f"{b:02x}" for b in mac)
        hits = []
        for f in self.functions():
            for dev in find_children(f.path, "net"):
                addr = read_text(dev / "address")
                if addr and addr.strip().lower() == want:
                    hits.append(f)
                    break
        return hits

    def function(self, ref: str, *, cls: str | None = None) -> PciFunction:
        """The function named by ``ref``: a PCI address (``0000:00:04.0``, ``00:04.0``), the
        instance GUID of its Hyper-V vPCI parent, or a class name (``nvme``) when exactly one
        function has it."""
        if not self.pci_path.is_dir():
            raise NotFound(f"no PCI bus under {self.root} (no sys/bus/pci)")
        bdf = normalize_bdf(ref)
        if bdf is not None:
            f = PciFunction(self, bdf)
            if not f.path.exists():
                raise NotFound(f"no PCI function {bdf} under {self.root} (`uvmbus list --pci` "
                               "shows them)")
            return f
        guid = normalize_guid(ref) if _GUID_RE.match(ref) else None
        if guid:
            hits = [f for f in self.functions() if f.vmbus_parent == guid]
            if not hits:
                raise NotFound(f"no PCI function below VMBus device {guid} (is pci-hyperv "
                               "loaded and the device offered?)")
            return hits[0]
        hits = self.functions(cls=ref)
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise NotFound(f"no PCI function of class {ref!r} under {self.root}; name it by "
                           "address (`uvmbus list --pci`)")
        raise ConfigError(f"{len(hits)} PCI functions of class {ref!r} "
                          f"({', '.join(f.name for f in hits)}): name one by address")

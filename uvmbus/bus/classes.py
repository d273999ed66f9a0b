"""Known VMBus device classes (interface-type GUIDs).

A VMBus device is identified by two GUIDs: the *class* (interface type, e.g. "synthetic
NIC") and the *instance*.  This table maps class GUIDs to a short name used on the command
line (``uvmbus bind netvsc``), a description, the in-kernel driver(s) that normally own the
class (so :func:`uvmbus.bus.binding.unbind_uio` can give a device back), and the kernel's
preferred ring size for the class (used by :mod:`uvmbus.bus.kernel` to predict ring sizes).

Sources: storvsc_ic.md §8 (class GUID table), uio_vmbus.md §1.1 and §1.5 (``pref_ring_size``:
fcopy 16 KiB, classes the kernel does not know 68 KiB, everything else 0 = default 2 MiB).

Notes on kernel drivers:
- ``hv_storvsc`` claims SCSI, IDE (the "IDE accelerator") and Fibre Channel classes.
- ``hv_utils`` claims the integration components; file copy moved to the userspace
  ``hv_fcopy_uio_daemon`` in v6.10, so fcopy has no kernel driver to return to.
- AVMA1/AVMA2/RDV/IMC are on the kernel's "unsupported" list: Linux never creates devices
  for them, so they should not appear in sysfs (listed here for the simulator and for names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CLASSES",
    "DRIVER_MODULES",
    "UNKNOWN_PREF_RING_SIZE",
    "VmbusClass",
    "lookup_class",
    "normalize_guid",
]

_GUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

#: Kernel ``pref_ring_size`` for classes missing from the kernel's ``vmbus_devs`` table.
UNKNOWN_PREF_RING_SIZE = 0x11000


def normalize_guid(text: str) -> str | None:
    """Return ``text`` as a lowercase GUID without braces, or None if it is not a GUID.

    Accepts the sysfs form ``"{F8615163-...}\\n"`` as well as the bare form.
    """
    s = text.strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    s = s.lower()
    return s if _GUID_RE.match(s) else None


@dataclass(frozen=True)
class VmbusClass:
    """One VMBus device class."""

    name: str
    """Short name, e.g. ``"netvsc"``; unique within the table."""
    guid: str
    """Class GUID, lowercase, no braces."""
    description: str
    kernel_drivers: tuple[str, ...] = ()
    """In-kernel driver names that bind this class, most preferred first (may be empty)."""
    aliases: tuple[str, ...] = ()
    pref_ring_size: int = 0
    """Kernel ``pref_ring_size`` (0 = the 2 MiB default), uio_vmbus.md §1.5."""

    @property
    def kernel_driver(self) -> str | None:
        """The preferred in-kernel driver, or None if Linux has none for this class."""
        return self.kernel_drivers[0] if self.kernel_drivers else None


_U = UNKNOWN_PREF_RING_SIZE

CLASSES: tuple[VmbusClass, ...] = (
    VmbusClass("netvsc", "f8615163-df3e-46c5-913f-f2d2f965ed0e", "Synthetic network adapter",
               ("hv_netvsc",), ("net", "nic")),
    VmbusClass("storvsc", "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f", "Synthetic SCSI controller",
               ("hv_storvsc",), ("scsi",)),
    VmbusClass("ide", "32412632-86cb-44a2-9b5c-50d1417354f5", "Synthetic IDE accelerator",
               ("hv_storvsc",), ("blkvsc",)),
    VmbusClass("fc", "2f9bcc4a-0069-4af3-b76b-6fd0be528cda", "Synthetic Fibre Channel adapter",
               ("hv_storvsc",)),
    VmbusClass("shutdown", "0e0b6031-5213-4934-818b-38d90ced39db", "Shutdown IC", ("hv_utils",)),
    VmbusClass("timesync", "9527e630-d0ae-497b-adce-e80ab0175caf", "Time synchronization IC",
               ("hv_utils",)),
    VmbusClass("heartbeat", "57164f39-9115-4e78-ab55-382f3bd5422d", "Heartbeat IC",
               ("hv_utils",)),
    VmbusClass("kvp", "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6", "Key-value pair (data exchange) IC",
               ("hv_utils",)),
    VmbusClass("vss", "35fa2e29-ea23-4236-96ae-3a6ebacba440", "Volume shadow copy (backup) IC",
               ("hv_utils",), ("backup",)),
    VmbusClass("fcopy", "34d14be3-dee4-41c8-9ae7-6b174977c192", "File copy (guest services) IC",
               (), ("guest-services",), 0x4000),
    VmbusClass("balloon", "525074dc-8985-46e2-8057-a307dc18a502", "Dynamic memory (balloon)",
               ("hv_balloon",)),
    VmbusClass("mouse", "cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a", "Synthetic mouse",
               ("hid_hyperv",)),
    VmbusClass("keyboard", "f912ad6d-2b17-48ea-bd65-f927a61c7684", "Synthetic keyboard",
               ("hyperv_keyboard",)),
    VmbusClass("framebuffer", "da0a7802-e377-4aac-8e77-0558eb1073f8", "Synthetic video",
               ("hyperv_drm", "hyperv_fb"), ("video", "synthvid")),
    VmbusClass("nd", "8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501", "NetworkDirect (RDMA)",
               (), ("rdma",)),
    VmbusClass("pci", "44c4f61d-4444-4400-9d52-802e27ede19f", "PCI Express pass-through (vPCI)",
               ("hv_pci",), ("vpci",)),
    VmbusClass("avma1", "f8e65716-3cb3-4a06-9a60-1889c5cccab5", "Activation (AVMA 1)"),
    VmbusClass("avma2", "3375baf4-9e15-4b30-b765-67acb10d607b", "Inherited activation (AVMA 2)"),
    VmbusClass("rdv", "276aacf4-ac15-426c-98dd-7521ad3f01fe", "Remote desktop virtualization IC"),
    VmbusClass("vmbfs", "c376c1c3-d276-48d2-90a9-c04748072c60", "VMBus file system (IMC)",
               (), ("imc",)),
    VmbusClass("uart", "8b60ccf6-709f-4c11-90b5-229c959a9e6a", "VMBus serial port",
               (), ("serial",), _U),
    VmbusClass("get", "8dedd1aa-9056-49e4-bfd6-1bf90dc38ef0", "Guest emulation transport (OpenHCL)",
               (), (), _U),
    VmbusClass("crashdump", "427b03e7-4ceb-4286-b5fc-486f4a1dd439", "Crash dump (OpenHCL)",
               (), (), _U),
    # not a Hyper-V class: the test device of `uvmbus sim --echo` (uvmbus.sim.models.echo);
    # unknown to the kernel's table, hence its pref_ring_size
    VmbusClass("echo", "0e7e0c0d-0000-4000-8000-7573766d6275", "uvmbus simulator echo test device",
               (), (), _U),
)

#: Loadable module that provides each in-kernel driver (for "modprobe ..." hints).
DRIVER_MODULES: dict[str, str] = {
    "hv_netvsc": "hv_netvsc",
    "hv_storvsc": "hv_storvsc",
    "hv_utils": "hv_utils",
    "hv_balloon": "hv_balloon",
    "hid_hyperv": "hid_hyperv",
    "hyperv_keyboard": "hyperv_keyboard",
    "hyperv_drm": "hyperv_drm",
    "hyperv_fb": "hyperv_fb",
    "hv_pci": "pci_hyperv",
    "uio_hv_generic": "uio_hv_generic",
}

_BY_GUID = {c.guid: c for c in CLASSES}
_BY_NAME = {n: c for c in CLASSES for n in (c.name, *c.aliases)}


def lookup_class(key: str) -> VmbusClass | None:
    """Find a class by GUID (any case, braces optional), short name or alias; None if unknown."""
    guid = normalize_guid(key)
    if guid is not None:
        return _BY_GUID.get(guid)
    return _BY_NAME.get(key.strip().lower())

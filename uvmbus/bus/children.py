"""The OS-side children of a sysfs device directory: the network interfaces and whole disks
the kernel created below it (a VMBus device's ``net/``/``block/``, a PCI function's, also
nested ones such as a vPCI VF's interface or NVMe namespaces).  Shared by
:class:`uvmbus.bus.devices.VmbusDevice` and :class:`uvmbus.vfio.pci.PciFunction` (the safety
check asks both the same questions)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OsChildren", "find_children"]

_WALK_DEPTH = 8  # how deep below a device to look for block/net children


def find_children(top: Path, container: str, *, disks: bool = False) -> list[Path]:
    """Subdirectories of every directory called ``container`` below ``top``.

    With ``disks``, also directories that look like a whole disk outside a ``block/`` folder
    (a ``dev`` file plus a ``queue/`` directory, e.g. NVMe namespaces below a vPCI device).
    Symlinks are not followed (except ``top`` itself), so sysfs back-links cannot loop.
    """
    found: list[Path] = []
    top_s = os.path.realpath(top)
    base_depth = top_s.count(os.sep)
    for cur, dirs, files in os.walk(top_s):
        if cur != top_s and os.path.basename(cur) == container:
            found.extend(Path(cur, d) for d in dirs)
            dirs[:] = []
        elif disks and cur != top_s and "dev" in files and "queue" in dirs:
            found.append(Path(cur))
            dirs[:] = []
        elif cur.count(os.sep) - base_depth >= _WALK_DEPTH:
            dirs[:] = []
    return found


class OsChildren:
    """Mixin for a device class with a sysfs directory ``self.path``."""

    path: Path

    def net_interfaces(self) -> list[str]:
        """Network interfaces below this device (``net/<ifname>``, also nested e.g. vPCI VFs)."""
        return sorted({p.name for p in find_children(self.path, "net")})

    def block_devices(self) -> list[str]:
        """Whole disks below this device (``…/block/<sdX>``, also nested NVMe), sorted."""
        return sorted({p.name for p in self.block_device_paths()})

    def block_device_paths(self) -> list[Path]:
        """sysfs directories of the disks found by :meth:`block_devices`."""
        return find_children(self.path, "block", disks=True)

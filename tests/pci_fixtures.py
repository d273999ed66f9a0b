"""Fake ``/sys/bus/pci`` trees (and ``/dev/vfio`` nodes) in a temp dir, plus a tiny fake
driver core that reacts to ``bind``/``unbind``/``drivers_probe`` writes.

Layout as the kernel shows it: ``sys/bus/pci/devices/<bdf>`` is a symlink into
``sys/devices/...`` (below the VMBus device for a Hyper-V vPCI function:
``.../VMBUS:00/<guid>/pci<dom>:00/<bdf>``), ``driver`` and ``iommu_group`` are relative
symlinks, ``class``/``vendor``/``device`` are ``0x``-prefixed hex, IOMMU groups list their
members in ``sys/kernel/iommu_groups/N/devices/``.  Binding to vfio-pci creates
``dev/vfio/N`` (or ``dev/vfio/noiommu-N`` when the tree is built with ``noiommu=True``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


class PciTree:
    def __init__(self, root: Path, *, noiommu: bool = False) -> None:
        self.root = Path(root)
        self.pci = self.root / "sys/bus/pci"
        self.noiommu = noiommu
        for d in ("sys/bus/pci/devices", "sys/bus/pci/drivers", "dev/vfio"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        _write(self.pci / "drivers_probe", "")
        self.paths: dict[str, Path] = {}
        self.groups: dict[str, int] = {}

    def add_driver(self, name: str) -> Path:
        d = self.pci / "drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            _write(d / f, "")
        return d

    def add_function(self, bdf: str, *, vendor: int = 0x1b36, device: int = 0x0010,
                     cls: int = 0x010802, group: int | None = 1, driver: str | None = None,
                     vmbus_parent: str | None = None) -> Path:
        dom = bdf.split(":")[0]
        if vmbus_parent:
            real = (self.root / "sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00"
                    / vmbus_parent / f"pci{dom}:00" / bdf)
        else:
            real = self.root / f"sys/devices/pci{dom}:00" / bdf
        real.mkdir(parents=True, exist_ok=True)
        _write(real / "vendor", f"0x{vendor:04x}\n")
        _write(real / "device", f"0x{device:04x}\n")
        _write(real / "class", f"0x{cls:06x}\n")
        _write(real / "driver_override", "(null)\n")
        _symlink(self.pci / "devices" / bdf, real)
        self.paths[bdf] = real
        if group is not None:
            gdir = self.root / "sys/kernel/iommu_groups" / str(group)
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            _symlink(real / "iommu_group", gdir)
            _symlink(gdir / "devices" / bdf, real)
            self.groups[bdf] = group
        if driver:
            self.set_driver(bdf, driver)
        return real

    def add_disk(self, bdf: str, name: str) -> Path:
        d = self.paths[bdf] / "nvme" / "nvme0" / name
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "dev", "259:0\n")
        (d / "queue").mkdir(exist_ok=True)
        return d

    def driver_of(self, bdf: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.paths[bdf] / "driver"))
        except OSError:
            return None

    def set_driver(self, bdf: str, name: str | None) -> None:
        link = self.paths[bdf] / "driver"
        if link.is_symlink():
            link.unlink()
        group = self.groups.get(bdf)
        if name is None:
            if group is not None and not any(
                    self.driver_of(b) == "vfio-pci" for b, g in self.groups.items()
                    if g == group and b != bdf):
                for n in (str(group), f"noiommu-{group}"):
                    (self.root / "dev/vfio" / n).unlink(missing_ok=True)
            return
        drv = self.add_driver(name) if not (self.pci / "drivers" / name).is_dir() else \
            self.pci / "drivers" / name
        _symlink(link, drv)
        if name == "vfio-pci" and group is not None:
            node = f"noiommu-{group}" if self.noiommu else str(group)
            _write(self.root / "dev/vfio" / node, "")


class FakePciKernel:
    """Background thread playing the PCI driver core: ``drivers/X/bind`` binds an unbound
    function whose ``driver_override`` allows X; ``unbind`` unbinds; ``drivers_probe`` binds
    the override, else the function's ``native`` driver.  Every write is logged."""

    def __init__(self, tree: PciTree, native: dict[str, str] | None = None) -> None:
        self.tree = tree
        self.native = native or {}
        self.log: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakePciKernel:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _override(self, bdf: str) -> str | None:
        text = (self.tree.paths[bdf] / "driver_override").read_text().strip()
        return None if text in ("", "(null)") else text

    def _run(self) -> None:
        t = self.tree
        while not self._stop.wait(0.002):
            for d in sorted((t.pci / "drivers").iterdir()):
                for fname in ("unbind", "bind"):
                    f = d / fname
                    text = f.read_text().strip() if f.exists() else ""
                    if not text:
                        continue
                    f.write_text("")
                    self.log.append((d.name, fname, text))
                    if text not in t.paths:
                        continue
                    if fname == "unbind" and t.driver_of(text) == d.name:
                        t.set_driver(text, None)
                    elif fname == "bind" and t.driver_of(text) is None:
                        ov = self._override(text)
                        if ov in (None, d.name):
                            t.set_driver(text, d.name)
            probe = t.pci / "drivers_probe"
            text = probe.read_text().strip()
            if text:
                probe.write_text("")
                self.log.append(("", "drivers_probe", text))
                if text in t.paths and t.driver_of(text) is None:
                    target = self._override(text) or self.native.get(text)
                    if target:
                        t.set_driver(text, target)

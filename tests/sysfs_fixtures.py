"""Build fake ``/sys/bus/vmbus`` trees in a temp dir, and a tiny fake kernel that reacts to
``new_id``/``bind``/``unbind`` writes the way the real driver core does.

Reusable by any test that needs a VMBus tree::

    tree = SysfsTree(tmp_path)
    tree.add_driver("hv_netvsc"); tree.add_driver("uio_hv_generic")
    nic = tree.add_device(NIC_CLASS, monitor_id=1, driver="hv_netvsc")
    tree.add_net(nic, "simeth0")
    with FakeKernel(tree):
        bind_uio(Bus(tmp_path), nic.guid)

Layout follows uio_vmbus.md §1.1/§1.3/§1.9: device dirs are symlinks into ``sys/devices``
(like the real kernel), ``class_id``/``device_id`` carry braces, ``monitor_id`` is omitted for
non-monitored channels, ``driver`` is a relative symlink, ``sys/class/uio/uioN`` links to the
device's ``uio/uioN``, map sizes/addresses are printed as ``0x…`` like the UIO core does.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NIC_CLASS = "f8615163-df3e-46c5-913f-f2d2f965ed0e"
SCSI_CLASS = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"
FCOPY_CLASS = "34d14be3-dee4-41c8-9ae7-6b174977c192"
KVP_CLASS = "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6"
UIO = "uio_hv_generic"
PAGE = 4096
MiB = 1024 * 1024


@dataclass
class FakeDevice:
    guid: str
    class_id: str
    relid: int
    path: Path
    """The real directory (``devices/<guid>`` is a symlink to it unless built without)."""
    channels: dict[int, Path] = field(default_factory=dict)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


class SysfsTree:
    """Builder for a fake root containing ``sys/bus/vmbus``, ``sys/class/uio``, ``dev``,
    ``proc/sys/kernel/osrelease``."""

    def __init__(self, root: Path, *, osrelease: str = "6.16.0-uvmbus-sim",
                 symlink_devices: bool = True):
        self.root = Path(root)
        self.vmbus = self.root / "sys/bus/vmbus"
        self.symlink_devices = symlink_devices
        self.devices: dict[str, FakeDevice] = {}
        self._next_relid = 10
        self._next_uio = 0
        for d in ("sys/bus/vmbus/devices", "sys/bus/vmbus/drivers", "sys/class/uio", "dev"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.set_osrelease(osrelease)

    # -- bus-wide ------------------------------------------------------------------------------

    def set_osrelease(self, release: str) -> None:
        _write(self.root / "proc/sys/kernel/osrelease", release + "\n")

    def add_driver(self, name: str) -> Path:
        d = self.vmbus / "drivers" / name
        for f in ("new_id", "bind", "unbind"):
            _write(d / f, "")
        return d

    # -- devices -------------------------------------------------------------------------------

    def add_device(self, class_id: str, guid: str | None = None, *, relid: int | None = None,
                   monitor_id: int | None = None, driver: str | None = None,
                   driver_override: str | None = "(null)") -> FakeDevice:
        """A device with its primary channel; ``monitor_id=None`` = not monitor-allocated;
        ``driver_override=None`` = old kernel without the attribute."""
        guid = guid or str(uuid.uuid4())
        if relid is None:
            relid = self._next_relid
        self._next_relid = max(self._next_relid, relid) + 1
        link = self.vmbus / "devices" / guid
        path = (self.root / "sys/devices/LNXSYSTM:00/VMBUS:00" / guid
                if self.symlink_devices else link)
        path.mkdir(parents=True)
        if self.symlink_devices:
            _symlink(link, path)
        _write(path / "class_id", f"{{{class_id}}}\n")
        _write(path / "device_id", f"{{{guid}}}\n")
        _write(path / "id", f"{relid}\n")
        if monitor_id is not None:
            _write(path / "monitor_id", f"{monitor_id}\n")
        if driver_override is not None:
            _write(path / "driver_override", driver_override + "\n")
        dev = FakeDevice(guid, class_id, relid, path)
        self.devices[guid] = dev
        self.add_channel(dev, relid, 0, monitor_id=monitor_id)
        if driver:
            self.set_driver(dev, driver)
        return dev

    def add_channel(self, dev: FakeDevice, relid: int, subchannel_id: int, *,
                    monitor_id: int | None = None, ring_size: int | None = None) -> Path:
        """``channels/<relid>``; ``ring_size`` (per direction) creates a sparse ``ring`` file
        of twice that size."""
        c = dev.path / "channels" / str(relid)
        _write(c / "subchannel_id", f"{subchannel_id}\n")
        if monitor_id is not None:
            _write(c / "monitor_id", f"{monitor_id}\n")
        if ring_size is not None:
            with open(c / "ring", "wb") as f:
                f.truncate(2 * ring_size)
        dev.channels[relid] = c
        return c

    def set_driver(self, dev: FakeDevice, name: str | None) -> None:
        link = dev.path / "driver"
        if link.is_symlink():
            link.unlink()
        if name is not None:
            _symlink(link, self.vmbus / "drivers" / name)

    def driver_of(self, dev: FakeDevice) -> str | None:
        link = dev.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def attach_uio(self, dev: FakeDevice, *, ring_size: int = 2 * MiB + PAGE, nmaps: int = 3,
                   gpadls: tuple[int, int] = (925200, 925201), dev_node: bool = True,
                   int_map_size: int = PAGE) -> str:
        """Create ``uio/uioN`` (+ ``sys/class/uio/uioN``, maps, ``dev/uioN``) and the primary
        ``ring`` file, as uio_hv_generic's probe + first open would."""
        name = f"uio{self._next_uio}"
        self._next_uio += 1
        u = dev.path / "uio" / name
        _write(u / "name", "uio_hv_generic\n")
        _write(u / "version", "0.02.1\n")
        maps = [("txrx_rings", 2 * ring_size), ("int_page", int_map_size),
                ("monitor_page", int_map_size), (f"recv:{gpadls[0]}", 31 * MiB),
                (f"send:{gpadls[1]}", 16 * MiB)][:nmaps]
        for i, (mname, size) in enumerate(maps):
            m = u / "maps" / f"map{i}"
            _write(m / "name", mname + "\n")
            _write(m / "size", f"0x{size:016x}\n")
            _write(m / "addr", f"0x{0x100000000 + i * 0x10000000:016x}\n")
            _write(m / "offset", "0x0\n")
        _symlink(self.root / "sys/class/uio" / name, u)
        ring = dev.path / "channels" / str(dev.relid) / "ring"
        with open(ring, "wb") as f:
            f.truncate(2 * ring_size)
        if dev_node:
            _write(self.root / "dev" / name, "")
        return name

    def detach_uio(self, dev: FakeDevice) -> None:
        udir = dev.path / "uio"
        if not udir.is_dir():
            return
        for u in udir.iterdir():
            for p in (self.root / "sys/class/uio" / u.name, self.root / "dev" / u.name):
                if p.is_symlink() or p.exists():
                    p.unlink()
        _rmtree(udir)
        for c in dev.channels.values():
            (c / "ring").unlink(missing_ok=True)

    # -- OS-side children --------------------------------------------------------------------

    def add_net(self, dev: FakeDevice, ifname: str) -> Path:
        p = dev.path / "net" / ifname
        _write(p / "ifindex", "99\n")
        return p

    def add_disk(self, dev: FakeDevice, name: str, *, partitions: tuple[str, ...] = (),
                 holders: dict[str, str | None] | None = None, lun: int = 0,
                 devnum: tuple[int, int] | None = None) -> Path:
        """``host0/target0:0:0/0:0:0:<lun>/block/<name>`` with partition dirs and holders
        (holder name → dm name or None)."""
        base = dev.path / "host0/target0:0:0" / f"0:0:0:{lun}" / "block" / name
        (base / "queue").mkdir(parents=True)
        if devnum:
            _write(base / "dev", f"{devnum[0]}:{devnum[1]}\n")
        for i, part in enumerate(partitions, 1):
            _write(base / part / "partition", f"{i}\n")
            if devnum:
                _write(base / part / "dev", f"{devnum[0]}:{devnum[1] + i}\n")
        for holder, dm_name in (holders or {}).items():
            h = base / "holders" / holder
            h.mkdir(parents=True)
            if dm_name:
                _write(h / "dm" / "name", dm_name + "\n")
        return base


def _rmtree(p: Path) -> None:
    for child in p.iterdir():
        if child.is_dir() and not child.is_symlink():
            _rmtree(child)
        else:
            child.unlink()
    p.rmdir()


class FakeKernel:
    """Background thread emulating the driver core's reaction to sysfs writes.

    - ``new_id`` <class guid>: the driver now matches that class; unbound devices of the class
      (whose ``driver_override`` allows it) bind immediately.
    - ``unbind`` <dev>: unbinds if bound to that driver (uio: removes uio/ and /dev/uioN).
    - ``bind`` <dev>: binds if unbound and matching (override, or id table/new_id).
    - ``refuse_uio``: uio_hv_generic probe fails (the device stays unbound), for timeouts.
    - ``new_id_attaches=False``: ``new_id`` only registers the class (so ``bind`` is needed).

    Pending writes found in one scan are handled new_id → bind → unbind: a binder waits for
    each unbind to take effect before its next write, so an unbind pending together with a
    bind is always the newer one (e.g. a redundant ``bind`` left over from bind_uio, followed
    by unbind_uio).  Handling them the other way round would re-bind the device.  The fake is
    asynchronous like the simulator, so callers must verify outcomes, not assume them.

    Every processed write is logged in ``self.log`` as ``(driver, file, value)``.
    """

    def __init__(self, tree: SysfsTree, *, refuse_uio: bool = False,
                 new_id_attaches: bool = True, id_tables: dict[str, set[str]] | None = None):
        self.tree = tree
        self.refuse_uio = refuse_uio
        self.new_id_attaches = new_id_attaches
        # driver -> classes it matches; kernel drivers match their classes statically.
        self.ids: dict[str, set[str]] = {k: set(v) for k, v in (id_tables or {}).items()}
        self.log: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeKernel:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            drivers = sorted((self.tree.vmbus / "drivers").iterdir())
            for fname in ("new_id", "bind", "unbind"):
                for d in drivers:
                    f = d / fname
                    text = f.read_text().strip() if f.exists() else ""
                    if not text:
                        continue
                    f.write_text("")
                    self.log.append((d.name, fname, text))
                    getattr(self, "_" + fname)(d.name, text)

    def _override(self, dev: FakeDevice) -> str | None:
        p = dev.path / "driver_override"
        text = p.read_text().strip() if p.exists() else ""
        return None if text in ("", "(null)") else text

    def _matches(self, driver: str, dev: FakeDevice) -> bool:
        override = self._override(dev)
        if override is not None:
            return override == driver
        return dev.class_id in self.ids.get(driver, set())

    def _probe(self, driver: str, dev: FakeDevice) -> None:
        if driver == UIO:
            if self.refuse_uio:
                return
            self.tree.set_driver(dev, driver)
            self.tree.attach_uio(dev, nmaps=5 if dev.class_id == NIC_CLASS else 3)
        else:
            self.tree.set_driver(dev, driver)

    def _new_id(self, driver: str, text: str) -> None:
        self.ids.setdefault(driver, set()).add(text.lower())
        if not self.new_id_attaches:
            return
        for dev in list(self.tree.devices.values()):
            if self.tree.driver_of(dev) is None and self._matches(driver, dev):
                self._probe(driver, dev)

    def _unbind(self, driver: str, text: str) -> None:
        dev = self.tree.devices.get(text)
        if dev is not None and self.tree.driver_of(dev) == driver:
            if driver == UIO:
                self.tree.detach_uio(dev)
            self.tree.set_driver(dev, None)

    def _bind(self, driver: str, text: str) -> None:
        dev = self.tree.devices.get(text)
        if dev is not None and self.tree.driver_of(dev) is None and self._matches(driver, dev):
            self._probe(driver, dev)

"""The VMBus device tree under a root directory: devices, channels, UIO maps.

``Bus("/")`` reads the real ``/sys/bus/vmbus``; ``Bus(tmpdir)`` reads a simulated host's
tree, which has the same layout (the simulator is only different behind ``/dev/uioN``).
Everything is read live from the tree on each access, so a device object always reflects
the current binding.  Layout and attribute meanings: uio_vmbus.md §1.1 (device naming,
``driver`` and ``uio/uioN``), §1.3 (UIO maps, ``recv:<gpadl>``/``send:<gpadl>``), §1.5 and
§1.8 (``channels/<relid>/ring``: mmap-able, size = 2 × ring size per direction, TX first),
§1.9 (``class_id``/``device_id`` printed with braces; ``monitor_id`` hidden when the channel
is not monitor-allocated).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from uvmbus.bus.children import OsChildren
from uvmbus.bus.classes import VmbusClass, lookup_class, normalize_guid
from uvmbus.bus.kernel import KernelQuirks
from uvmbus.bus.sysfs import parse_number, read_guid, read_int, read_text
from uvmbus.errors import BusError, ConfigError, NotFound

__all__ = ["Bus", "ChannelInfo", "MapInfo", "VmbusDevice"]

UIO_DRIVER = "uio_hv_generic"
_MAP_RE = re.compile(r"^map(\d+)$")
_UIO_RE = re.compile(r"^uio(\d+)$")
_GPADL_RE = re.compile(r"^(recv|send):(.*)$")


@dataclass(frozen=True)
class ChannelInfo:
    """One channel of a device (``channels/<relid>/``)."""

    relid: int
    subchannel_id: int | None
    """0 for the primary channel; None if the kernel does not show it (yet)."""
    monitor_id: int | None
    """None when the channel is not monitor-allocated (signal via ``write(fd, 1)``)."""
    ring_path: str | None
    """``channels/<relid>/ring``: a sub-channel's appears once it is open; the primary's exists
    from the bind to uio_hv_generic on, but maps only while the device is open."""
    ring_size_per_direction: int | None
    """``stat(ring).st_size // 2``; exact only on kernels with ``ring_file_size_exact``."""


@dataclass(frozen=True)
class MapInfo:
    """One UIO map (``/sys/class/uio/uioN/maps/mapK``); mmap offset is ``index * PAGE_SIZE``."""

    index: int
    name: str
    size: int
    offset: int
    addr: int | None
    gpadl: int | None
    """GPADL handle of the NIC receive/send buffer, parsed from ``recv:<n>``/``send:<n>``."""


class VmbusDevice(OsChildren):
    """A view of ``sys/bus/vmbus/devices/<guid>``; every property re-reads the tree."""

    def __init__(self, bus: Bus, name: str):
        self.bus = bus
        self.name = name
        """Directory name (what ``bind``/``unbind`` expect); the instance GUID."""
        self.path = bus.vmbus_path / "devices" / name

    def __repr__(self) -> str:
        return f"<VmbusDevice {self.device_id} {self.class_name} driver={self.driver}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmbusDevice) and (other.bus.root, other.name) == (
            self.bus.root, self.name)

    def __hash__(self) -> int:
        return hash((self.bus.root, self.name))

    # -- identity -----------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        """Instance GUID (lowercase, no braces)."""
        return normalize_guid(self.name) or read_guid(self.path / "device_id") or self.name

    @property
    def class_id(self) -> str | None:
        """Class GUID (lowercase, no braces), None if ``class_id`` is missing."""
        return read_guid(self.path / "class_id")

    @property
    def vmbus_class(self) -> VmbusClass | None:
        cid = self.class_id
        return lookup_class(cid) if cid else None

    @property
    def class_name(self) -> str:
        """Short class name (``netvsc``, ``storvsc``, …) or ``"unknown"``."""
        cls = self.vmbus_class
        return cls.name if cls else "unknown"

    @property
    def relid(self) -> int | None:
        """Relid of the primary channel (the ``id`` attribute)."""
        return read_int(self.path / "id")

    @property
    def monitor_id(self) -> int | None:
        """Monitor id of the primary channel; None when not monitor-allocated."""
        return read_int(self.path / "monitor_id")

    # -- binding ------------------------------------------------------------------------------

    @property
    def driver(self) -> str | None:
        """Name of the bound driver (target of the ``driver`` link), None if unbound."""
        link = self.path / "driver"
        try:
            return os.path.basename(os.readlink(link))
        except OSError:
            return None

    @property
    def driver_override(self) -> str | None:
        """Contents of ``driver_override``; None if the file is absent or the override unset."""
        text = read_text(self.path / "driver_override")
        return None if text in (None, "", "(null)") else text

    @property
    def uio(self) -> str | None:
        """UIO node name (``"uio0"``) when bound to uio_hv_generic, else None."""
        try:
            names = [e.name for e in os.scandir(self.path / "uio") if _UIO_RE.match(e.name)]
        except OSError:
            return None
        return min(names, key=lambda n: int(n[3:])) if names else None

    @property
    def uio_dev_path(self) -> str | None:
        """``<root>/dev/uioN`` (a char device, or the simulator's socket), or None."""
        uio = self.uio
        return str(self.bus.root / "dev" / uio) if uio else None

    # -- channels and maps ------------------------------------------------------------------

    def channels(self) -> list[ChannelInfo]:
        """All channels in ``channels/``, sorted by relid (primary first when relids agree)."""
        base = self.path / "channels"
        try:
            entries = [e.name for e in os.scandir(base) if e.name.isdigit()]
        except OSError:
            return []
        out = []
        for name in entries:
            cdir = base / name
            ring = cdir / "ring"
            try:
                size = os.stat(ring).st_size
            except OSError:
                ring_path, per_dir = None, None
            else:
                ring_path, per_dir = str(ring), (size // 2 if size else None)
            out.append(ChannelInfo(
                relid=int(name),
                subchannel_id=read_int(cdir / "subchannel_id"),
                monitor_id=read_int(cdir / "monitor_id"),
                ring_path=ring_path,
                ring_size_per_direction=per_dir,
            ))
        out.sort(key=lambda c: (c.subchannel_id != 0, c.relid))
        return out

    @property
    def uio_sysfs_path(self) -> Path | None:
        """``sys/class/uio/uioN`` (falling back to the device's own ``uio/uioN``)."""
        uio = self.uio
        if uio is None:
            return None
        cls_path = self.bus.root / "sys/class/uio" / uio
        return cls_path if cls_path.is_dir() else self.path / "uio" / uio

    def maps(self) -> list[MapInfo]:
        """UIO maps sorted by index; [] when not bound to uio.  Maps 3/4 exist only for NICs
        on recent kernels (uio_vmbus.md §1.3), so never assume five."""
        upath = self.uio_sysfs_path
        if upath is None:
            return []
        base = upath / "maps"
        try:
            entries = [(int(m.group(1)), e.name) for e in os.scandir(base)
                       if (m := _MAP_RE.match(e.name))]
        except OSError:
            return []
        return [_read_map(base / name, idx) for idx, name in sorted(entries)]

    @property
    def primary_ring_size(self) -> int | None:
        """Per-direction size of the primary ring (``maps/map0/size // 2``), None if unknown."""
        for m in self.maps():
            if m.index == 0:
                return m.size // 2
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``uvmbus list --json``)."""
        return {
            "device_id": self.device_id,
            "class_id": self.class_id,
            "class": self.class_name,
            "driver": self.driver,
            "uio": self.uio,
            "relid": self.relid,
            "monitor_id": self.monitor_id,
            "channels": [asdict(c) for c in self.channels()],
            "net": self.net_interfaces(),
            "block": self.block_devices(),
        }


def _read_map(mdir: Path, index: int) -> MapInfo:
    name = read_text(mdir / "name")
    size = read_int(mdir / "size")
    if name is None or size is None:
        raise BusError(f"{mdir}: UIO map without 'name' or 'size'", path=str(mdir))
    gpadl = None
    if m := _GPADL_RE.match(name):
        gpadl = parse_number(m.group(2), mdir / "name")
    return MapInfo(index=index, name=name, size=size, offset=read_int(mdir / "offset") or 0,
                   addr=read_int(mdir / "addr"), gpadl=gpadl)


class Bus:
    """The VMBus bus under ``root`` (``"/"`` on a real system)."""

    def __init__(self, root: str | os.PathLike[str] = "/"):
        self.root = Path(root)
        self.vmbus_path = self.root / "sys/bus/vmbus"

    def __repr__(self) -> str:
        return f"Bus({str(self.root)!r})"

    @cached_property
    def kernel(self) -> KernelQuirks:
        """uio_hv_generic behaviour of the kernel behind this root."""
        return KernelQuirks.for_root(self.root)

    def devices(self) -> list[VmbusDevice]:
        """Every device in ``sys/bus/vmbus/devices``, sorted by instance GUID; [] if no VMBus."""
        try:
            names = [e.name for e in os.scandir(self.vmbus_path / "devices")]
        except OSError:
            return []
        return [VmbusDevice(self, n) for n in sorted(names)]

    def drivers(self) -> list[str]:
        """Registered VMBus drivers (``sys/bus/vmbus/drivers/*``)."""
        try:
            return sorted(e.name for e in os.scandir(self.vmbus_path / "drivers") if e.is_dir())
        except OSError:
            return []

    def driver_path(self, name: str) -> Path:
        return self.vmbus_path / "drivers" / name

    def device(self, ref: str) -> VmbusDevice:
        """Resolve ``ref``: a full instance GUID (braces optional), a unique GUID prefix, a
        class short name/alias or class GUID matching exactly one device.

        Raises :class:`NotFound` (nothing matches) or :class:`ConfigError` (ambiguous), both
        listing the candidates.
        """
        key = ref.strip().lower().strip("{}")
        if not key:
            raise ConfigError("empty device reference")
        devs = self.devices()
        exact = [d for d in devs if d.device_id == key]
        if exact:
            return exact[0]
        cls = lookup_class(key)
        matches = [d for d in devs
                   if d.device_id.startswith(key) or (cls is not None and d.class_id == cls.guid)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            listing = _describe(devs) if devs else (
                f"no VMBus devices under {self.vmbus_path} (a simulator's devices: pass its root, "
                "root= in Python or --root / UVMBUS_ROOT on the command line)")
            raise NotFound(f"no VMBus device matches {ref!r}; available: {listing}")
        raise ConfigError(f"{ref!r} is ambiguous; it matches {_describe(matches)}. "
                          "Use a longer GUID prefix.")


def _describe(devs: list[VmbusDevice]) -> str:
    return ", ".join(f"{d.device_id} ({d.class_name})" for d in devs)

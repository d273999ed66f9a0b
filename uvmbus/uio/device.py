"""An opened uio_hv_generic device: endpoint, maps, signalling, sub-channel ring files.

Nothing here knows about rings or packets; the channel layer builds channels
from what this exposes (uio_vmbus.md §1.3–§1.8):

* map 0 ``txrx_rings`` — the primary channel's TX ring followed by its RX ring;
  per-direction size = map size / 2, header page = the guest page size;
* map 1 ``int_page`` — the guest→host half starts at +2048;
* map 2 ``monitor_page`` — monitor trigger groups (signalling monitored channels);
* maps ``recv:<gpadl>`` / ``send:<gpadl>`` — NIC receive/send buffers (NIC only,
  newer kernels; may be absent);
* sub-channel rings are sysfs files ``channels/<relid>/ring`` that appear some
  time after the VSP grants them (no uevent): poll for them.

Signalling (§1.7) is set up per channel as a native ``struct uvb_signal``:
monitored channels set their monitor trigger bit; non-monitored channels set
their int-page bit and write 1 to the endpoint, which needs kernel ≥ 6.10 (and
≥ 6.16 for sub-channels, which older kernels cannot kick individually).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Any

from uvmbus.bus import Bus, DeviceLock, KernelQuirks, VmbusDevice, lock_device
from uvmbus.errors import BusError, ConfigError, KernelUnsupported, NotFound, RingCorrupt
from uvmbus.native import buffer_pointer, ffi, lib, release
from uvmbus.uio.endpoint import OPEN_TIMEOUT, Endpoint, open_endpoint

UIO_DRIVER = "uio_hv_generic"
#: DPDK polls 1000 x 10 ms for late sub-channel ring files (§1.8)
SUBCHANNEL_POLL_INTERVAL = 0.01


@dataclass
class MappedRegion:
    """One uio map, mapped read/write."""

    index: int
    name: str
    size: int
    mm: mmap.mmap
    offset: int = 0
    gpadl: int | None = None
    ptr: Any = field(default=None, repr=False)   # uint8_t * at the region start (mm + offset)

    def close(self) -> None:
        if self.ptr is not None:
            release(self.ptr)
            self.ptr = None
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover - a caller still holds a view
            pass


@dataclass
class SubchannelRing:
    """A sub-channel's mapped ``ring`` file."""

    relid: int
    subchannel_id: int
    monitor_id: int | None
    path: str
    mm: mmap.mmap
    ring_bytes: int       # per direction


class UioDevice:
    """A VMBus device bound to uio_hv_generic, opened for use.

    ``lock`` (default True) takes the device's lock (:mod:`uvmbus.bus.lock`) for as long as
    the device is open: a second opener fails at once with :class:`~uvmbus.errors.DeviceBusy`
    naming the holder.  ``lock=False`` is for experts who share a device on purpose.
    ``timeout``: seconds the simulator's endpoint may take to answer the open (a stopped or
    hung ``uvmbus sim``); a real ``/dev/uioN`` opens at once."""

    def __init__(self, bus: Bus, device: VmbusDevice, *, lock: bool = True,
                 timeout: float = OPEN_TIMEOUT):
        if device.driver != UIO_DRIVER or not device.uio:
            raise BusError(
                f"device {device.device_id} is bound to {device.driver or 'no driver'}, not {UIO_DRIVER}: "
                f"bind it first (`uvmbus bind {device.device_id}{_root_opt(bus)}`)"
            )
        path, relid = device.uio_dev_path, device.relid
        if path is None or relid is None:
            raise BusError(f"device {device.device_id}: no uio node or no channel id in sysfs "
                           "(is the device being bound or removed right now?)")
        self.bus = bus
        self.device = device
        self._lock: DeviceLock | None = lock_device(device) if lock else None
        #: the primary channel's relid (sysfs ``id``)
        self.relid: int = relid
        self.uio_path: str = path
        self.quirks: KernelQuirks = bus.kernel
        #: seconds an endpoint open may wait for the simulator (also for extra waiters)
        self.open_timeout = timeout
        try:
            self.endpoint: Endpoint = open_endpoint(path, timeout=timeout)
        except BaseException:
            self._unlock()
            raise
        self.page_size = self.endpoint.page_size
        self._regions: dict[int, MappedRegion] = {}
        try:
            # sysfs of a device being rescinded may vanish under us: close what is open
            self._maps = {m.index: m for m in device.maps()}
            self._map_required()
        except BaseException:
            self.close()
            raise

    # -- maps ---------------------------------------------------------------
    def _map(self, index: int) -> MappedRegion:
        if index in self._regions:
            return self._regions[index]
        info = self._maps.get(index)
        if info is None:
            raise NotFound(f"{self.device.device_id}: uio map {index} does not exist")
        offset = info.offset or 0
        mm = self.endpoint.map(index, info.size + offset)
        region = MappedRegion(index, info.name, info.size, mm, offset, info.gpadl)
        region.ptr = buffer_pointer(mm) + offset
        self._regions[index] = region
        return region

    def _map_required(self) -> None:
        expect = {0: "txrx_rings", 1: "int_page", 2: "monitor_page"}
        for idx, name in expect.items():
            info = self._maps.get(idx)
            if info is None or info.name != name:
                raise ConfigError(f"{self.device.device_id}: uio map {idx} should be {name!r}, found "
                                  f"{info.name if info else 'nothing'}")
        rings = self._maps[0]
        ps = self.page_size
        if rings.size % 2 or rings.size // 2 <= ps or (rings.size // 2 - ps) % 8:
            raise RingCorrupt(f"map 0 is {rings.size} bytes: not two rings with {ps}-byte header pages",
                              channel=self.device.device_id)
        for idx in (1, 2):
            if self._maps[idx].size < 4096:
                raise ConfigError(f"{self.device.device_id}: map {idx} is only {self._maps[idx].size} bytes")
        self._map(0)
        self._map(1)
        self._map(2)

    @property
    def rings(self) -> MappedRegion:
        """Map 0: the primary channel's ring pair."""
        return self._regions[0]

    @property
    def primary_ring_bytes(self) -> int:
        return self._maps[0].size // 2

    @property
    def int_page_send(self) -> Any:
        """Pointer to the guest→host half of the interrupt page."""
        return self._regions[1].ptr + lib.HV_INT_PAGE_SEND_OFFSET

    @property
    def monitor_page(self) -> Any:
        return self._regions[2].ptr

    def buffer(self, kind: str) -> MappedRegion:
        """The NIC receive (``"recv"``) or send (``"send"``) buffer, with its GPADL handle."""
        for idx, info in self._maps.items():
            if info.name.startswith(kind + ":"):
                return self._map(idx)
        raise NotFound(
            f"{self.device.device_id}: no {kind!r} buffer map; uio_hv_generic provides the receive and "
            "send buffers for network devices only (maps 3/4)"
        )

    def has_buffer(self, kind: str) -> bool:
        return any(info.name.startswith(kind + ":") for info in self._maps.values())

    # -- signalling -----------------------------------------------------------
    def make_signal(self, relid: int, monitor_id: int | None, *, subchannel: bool = False) -> Any:
        """A native ``struct uvb_signal`` for one channel (§1.7)."""
        s = ffi.new("struct uvb_signal *")
        s.relid = relid
        s.fd = -1
        if monitor_id is not None:
            if not 0 <= monitor_id < lib.HV_MONITOR_IDS:
                raise ConfigError(f"monitor id {monitor_id} of relid {relid} is out of range 0..127")
            s.monitor_page = self.monitor_page
            s.monitor_id = monitor_id
            return s
        q = self.quirks
        if not q.irqcontrol_signals_nonmonitored:
            raise KernelUnsupported(
                f"channel {relid} has no monitor id, and kernel {q.release} cannot signal it: "
                "uio_hv_generic signals non-monitored channels from kernel 6.10 on"
            )
        if subchannel and not q.irqcontrol_all_channels:
            raise KernelUnsupported(
                f"sub-channel {relid} has no monitor id, and kernel {q.release} can only signal the "
                "primary channel of a device: use kernel 6.16 or later (or fewer queues)"
            )
        s.int_page_send = self.int_page_send
        s.fd = self.endpoint.signal_fd
        s.fd_is_socket = 1 if self.endpoint.signal_fd_is_socket else 0
        return s

    # -- interrupts -------------------------------------------------------------
    def wait_interrupt(self, timeout: float | None) -> int | None:
        """Block until the device's event counter moves (any channel). None on timeout."""
        return self.endpoint.wait(timeout)

    def fileno(self) -> int:
        return self.endpoint.fileno()

    # -- sub-channels -----------------------------------------------------------
    def subchannel_rings(self, count: int, *, timeout: float = 10.0,
                         exclude: set[int] | None = None) -> list[SubchannelRing]:
        """Wait until ``count`` new sub-channels have a usable ``ring`` file, map them.

        Follows DPDK's discovery loop (§1.8): scan ``channels/``, skip known or
        primary relids and rings not yet accessible, retry every 10 ms."""
        known = set(exclude or ()) | {self.relid}
        found: dict[int, SubchannelRing] = {}
        deadline = time.monotonic() + timeout
        while True:
            for ch in self.device.channels():
                if ch.relid in known or ch.relid in found or not ch.subchannel_id:
                    continue
                if not ch.ring_path or not os.access(ch.ring_path, os.R_OK | os.W_OK):
                    continue
                ring = self._map_ring_file(ch.relid, ch.subchannel_id, ch.monitor_id, ch.ring_path)
                if ring is not None:
                    found[ch.relid] = ring
            if len(found) >= count:
                return sorted(found.values(), key=lambda r: r.subchannel_id)[:count] if count else []
            if time.monotonic() >= deadline:
                for r in found.values():
                    r.mm.close()
                raise NotFound(
                    f"{self.device.device_id}: only {len(found)} of {count} sub-channel ring files "
                    f"appeared within {timeout:.1f} s"
                )
            time.sleep(SUBCHANNEL_POLL_INTERVAL)

    def _map_ring_file(self, relid: int, subid: int, monitor_id: int | None, path: str) -> SubchannelRing | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % 4096:
                return None          # not ready yet (DPDK: "ring mmap not found (yet)")
            per_dir = size // 2
            if per_dir <= self.page_size or (per_dir - self.page_size) % 8:
                raise RingCorrupt(f"ring file {path} is {size} bytes: not two rings with "
                                  f"{self.page_size}-byte header pages", channel=f"relid {relid}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if exc.errno in (19, 5):   # ENODEV: channel not open (yet); EIO: gone
                return None
            raise
        finally:
            os.close(fd)
        return SubchannelRing(relid, subid, monitor_id, path, mm, per_dir)

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions = {}
        if getattr(self, "endpoint", None) is not None:
            self.endpoint.close()
        self._unlock()

    def _unlock(self) -> None:
        lk = getattr(self, "_lock", None)
        if lk is not None:
            self._lock = None
            lk.release()

    def __enter__(self) -> UioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _root_opt(bus: Bus) -> str:
    """`` --root R`` for hints when the bus is not the real one under /."""
    return "" if os.path.abspath(bus.root) == "/" else f" --root {bus.root}"


def open_uio(ref: str, root: str | os.PathLike[str] = "/", *, lock: bool = True,
             timeout: float = OPEN_TIMEOUT) -> UioDevice:
    """Open the device ``ref`` (GUID, prefix or class name) under ``root`` (``lock``,
    ``timeout``: see :class:`UioDevice`)."""
    bus = Bus(root)
    return UioDevice(bus, bus.device(ref), lock=lock, timeout=timeout)

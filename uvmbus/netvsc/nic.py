"""The netvsc driver: bring-up, queues, control plane, teardown (netvsc.md §3–§7).

:func:`open` returns a :class:`Nic`.  Bring-up follows §3 exactly: NVSP INIT from 6.1 down
to 1 (40-byte messages), NDIS config (MTU + 14, capabilities), NDIS version, receive and
send buffers connected with the GPADL handles the kernel put in the uio map names, RNDIS
INITIALIZE, packet filter 0, OID queries (maximum frame size, MAC, offload capabilities,
media connect status, link speed, RSS capabilities), offload parameters, sub-channels +
RSS parameters for more than one queue, then the packet filter DIRECTED | MULTICAST |
BROADCAST.  Link-status indications are handled whenever they arrive.

Copy-only: every control message and every frame travels through send-buffer sections,
so the driver needs neither hugepages nor CAP_SYS_ADMIN.  Frames larger than a section
(jumbo MTU) go GPA-direct through bounce slots in DMA memory when it is available
(``uvmbus.dma``; the simulator's guest RAM, or hugepages on a guest).

The data path is C (``native/netvsc.c``): one :class:`Queue` per channel, one owner thread
each; Python sees whole bursts (:class:`~uvmbus.netvsc.burst.RxBurst`,
:class:`~uvmbus.netvsc.burst.TxBatch`).  Queue 0 (the primary channel) also carries the
control plane; its calls are serialised with a lock, so control requests from another
thread are safe.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from uvmbus.channel import Channel, ChannelDevice, DeviceWaiter, open_device
from uvmbus.errors import (
    ChannelError,
    ChannelTimeout,
    ConfigError,
    DeviceBusy,
    FrameRejected,
    KernelUnsupported,
    MacChangeRefused,
    NegotiationError,
    NetError,
    ProtocolError,
    QueueInvalidated,
    ReinitFailed,
    RequestFailed,
    ResourceError,
    RingCorrupt,
    UvmbusError,
)
from uvmbus.native import ffi, lib
from uvmbus.netvsc import protocol as P
from uvmbus.netvsc.burst import RxBurst, TxBatch
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_INBAND, PKT_XFER_PAGES, Packet
from uvmbus.uio import MappedRegion

__all__ = ["DEFAULT_TIMEOUT", "Nic", "NicInfo", "Queue", "QueueSpec", "VfInfo", "attach_queue", "open"]

log = logging.getLogger("uvmbus.netvsc")

DEFAULT_TIMEOUT = 10.0
MAX_BURST = 1024
MIN_SECTION = 68
MIN_SUB_ALLOC = 68
MAX_QUEUES = 64
#: §3 step 15 (Linux, DPDK): DIRECTED | ALL_MULTICAST | BROADCAST (0x0D).  MULTICAST (0x2)
#: would pass only the multicast list, which this driver never sets (the host allows 0)
#: the largest RNDIS control message copied out of the receive buffer (the C path's cap)
CONTROL_MESSAGE_MAX = 64 * 1024
FILTER_DEFAULT = P.FILTER_DIRECTED | P.FILTER_ALL_MULTICAST | P.FILTER_BROADCAST
GPA_SLOTS = 64
#: bounce slots per queue when they must hold large sends (≈ 68 KiB each)
LSO_GPA_SLOTS = 32
#: the largest frame a large send can be (the data path's frame limit, UVB_NVSC_MAX_FRAME)
LSO_FRAME_MAX = lib.UVB_NVSC_MAX_FRAME
#: RNDIS PACKET header + room for the PPIs the driver adds (checksum/LSO + VLAN)
TX_HEADROOM = 44 + 32
_CTRL_BUF = 65536


#: FrameRejected.reason by the C data path's UVB_NVSC_BAD_* code
_BAD_REASONS = {
    lib.UVB_NVSC_BAD_SIZE: "size", lib.UVB_NVSC_BAD_LSO_OFF: "lso-not-negotiated",
    lib.UVB_NVSC_BAD_LSO_HDR: "lso-not-tcp", lib.UVB_NVSC_BAD_LSO_MSS: "lso-mss",
    lib.UVB_NVSC_BAD_LSO_SIZE: "lso-too-large", lib.UVB_NVSC_BAD_LSO_SEGS: "lso-too-few-segments",
}

_EMPTY = memoryview(b"")
#: copy buffers need no zeroing: C writes every byte a frame view shows
_ALLOC = ffi.new_allocator(should_clear_after_alloc=False)


def _now() -> float:
    return time.monotonic()


@dataclass
class VfInfo:
    """The accelerated-networking VF the host associated with this NIC (docs/netvsc.md,
    "Accelerated networking VF").  ``allocated``/``serial`` are the last
    SEND_VF_ASSOCIATION's fields (``serial`` is None while no VF is allocated); ``data_path``
    is where the host sends this NIC's traffic: "synthetic" (always, unless
    :meth:`Nic.switch_data_path` asked for "vf"); ``pci`` the matching PCI functions
    (addresses), found like Linux does: the vPCI slot named after the serial, else a PCI
    network interface with the NIC's MAC address."""

    supported: bool                 # NVSP >= 5 and SR-IOV advertised (the host may announce one)
    mac: str = ""                   # the VF carries the NIC's permanent address (Linux pairs by it)
    allocated: bool = False
    serial: int | None = None
    data_path: str = "synthetic"
    associations: int = 0           # VF_ASSOCIATION messages received this session
    host_switches: int = 0          # SWITCH_DATA_PATH sent by the host (back to synthetic)
    switch_backs: int = 0           # switches to "vf" undone because the VF went away
    pci: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NicInfo:
    """What bring-up learned (``uvmbus net info``)."""

    device_id: str
    mac: str
    mtu: int
    link_up: bool
    link_speed_bps: int
    nvsp_version: str
    ndis_version: str
    queues: int
    requested_queues: int
    rss_queues_offered: int
    max_pkt_per_msg: int
    pkt_alignment: int
    recv_buffer: int
    sub_alloc_size: int
    sub_allocs: int
    send_buffer: int
    section_size: int
    sections: int
    gpa_direct: bool
    offloads: dict[str, Any] = field(default_factory=dict)
    send_table: list[int] = field(default_factory=list)
    permanent_mac: str = ""
    packet_filter: int = 0
    packet_filter_names: list[str] = field(default_factory=list)
    promiscuous: bool = False
    all_multicast: bool = False
    multicast: list[str] = field(default_factory=list)
    vf: dict[str, Any] = field(default_factory=dict)
    #: LSOv2 as negotiated: largest large send per IP version (0 = off), minimum segments
    lso: dict[str, int] = field(default_factory=dict)
    rsc_requested: bool = False
    rsc: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QueueSpec:
    """Everything another process needs to drive one queue on its own (shared-nothing):
    pass it (it pickles) and call :func:`attach_queue` there."""

    device_id: str
    root: str
    index: int
    relid: int
    section_first: int
    section_count: int
    section_size: int
    max_pkt_per_msg: int
    pkt_align: int
    max_xfer: int
    max_frame: int
    #: GPA-direct for frames larger than a send section, as :func:`open`'s ``gpa``: None =
    #: when DMA memory is available (the attaching process allocates its own slots)
    gpa: bool | None = None
    #: the owner's generation when exported: the queue is valid while the owner's lease file
    #: (``lease``, :mod:`uvmbus.netvsc.lease`) still shows it
    generation: int = 0
    lease: str = ""
    #: LSOv2 as the owner negotiated it (largest large send per IP version, 0 = off; minimum
    #: segments): the attached queue makes large sends too, from its own bounce slots
    lso4_max: int = 0
    lso6_max: int = 0
    lso_min_segs: int = 0


def _gpa_slot_size(max_frame: int) -> int:
    """Bytes of one GPA-direct bounce slot: RNDIS header + PPIs + frame, in whole 4 KiB pages."""
    return (ffi.sizeof("struct rndis_packet") + 32 + max_frame + 4095) // 4096 * 4096


def _needs_gpa(max_frame: int, section_size: int) -> bool:
    """True when a frame of ``max_frame`` bytes does not fit one send section."""
    return ffi.sizeof("struct rndis_packet") + 32 + max_frame > section_size


def _alloc_gpa(dma: Any, max_frame: int, name: str, slots: int = GPA_SLOTS) -> tuple[Any, int, int]:
    """A region of ``slots`` bounce slots from ``dma``: (region, slot size, slots)."""
    slot = _gpa_slot_size(max_frame)
    region = dma.alloc_region(slot * slots, name=name)
    return (region, slot, region.size // slot)


class Queue:
    """One NIC queue (= one VMBus channel).  Owned by one thread; see ``docs/netvsc.md``."""

    def __init__(self, index: int, channel: Channel, waiter: DeviceWaiter, recv: MappedRegion,
                 send: MappedRegion, *, section_size: int, section_first: int, section_count: int,
                 max_pkt_per_msg: int, pkt_align: int, max_xfer: int, max_frame: int,
                 gpa: Any = None, strict: bool = False, copy_frames: int = MAX_BURST):
        self.index = index
        self.channel = channel
        self.waiter = waiter
        self.strict = strict
        self._recv = recv
        self._send = send
        self._gpa = gpa                       # (DmaRegion, slot_size, slots) or None
        raw = ffi.new("struct uvb_nvsc_queue *")
        raw.tx = channel.tx.raw
        raw.rx = channel.rx.raw
        raw.sig = channel.signal
        raw.recv_buf = recv.ptr
        raw.recv_size = recv.size
        raw.send_buf = send.ptr
        raw.send_size = send.size
        raw.section_size = section_size
        raw.section_first = section_first
        raw.section_count = section_count
        raw.max_pkt_per_msg = max_pkt_per_msg
        raw.pkt_align = pkt_align
        raw.max_xfer = max_xfer
        raw.recv_buf_id = P.RECV_BUF_ID
        raw.queue_id = index
        raw.max_frame = max_frame
        raw.ack_size = 8
        if gpa is not None:
            region, slot_size, slots = gpa
            raw.gpa_base = region.ptr
            raw.gpa_pfns = region.pfn_table
            raw.gpa_slot_size = slot_size
            raw.gpa_slots = slots
        raw.tx_reject = 1                     # tx_burst raises on frames that can never be sent
        rc = lib.uvb_nvsc_queue_init(raw)
        if rc:
            raise ConfigError(f"netvsc queue {index}: data path set-up refused ({rc}): "
                              f"sections {section_first}+{section_count} of {section_size} bytes")
        self.raw = raw
        self._frames = ffi.new("struct uvb_nvsc_frame[]", MAX_BURST)
        # Copied bursts are the caller's: C copies frames into a chunk that is only ever
        # appended to (never rewritten), and each burst keeps its chunk alive; a full chunk
        # is replaced by a new one, freed once no burst or frame of it is left.
        self._copy_cap = copy_frames * (max_frame + 8)
        self._frame_room = max_frame + 8
        self._chunk: Any = None
        self._chunk_view: memoryview | None = None
        self._chunk_pos = self._copy_cap
        self._recv_view = memoryview(recv.mm)[recv.offset:recv.offset + recv.size]
        self._rsc_mv: memoryview | None = None      # C's reassembly buffer (zero-copy RSC frames)
        self._frame_size = ffi.sizeof("struct uvb_nvsc_frame")
        #: the zero-copy burst whose frames the host lent us (invalid after the next rx_burst)
        self._lent: RxBurst | None = None
        self._seen_errors = 0
        self._seen_ctrl = 0
        self.last_host_error = ""
        self.on_ctrl: Callable[[Queue], None] | None = None
        self.lock: threading.RLock | None = None      # queue 0: shared with the control plane
        self.spin_us = 0
        #: kernels before 6.16 cannot take a sub-channel interrupt (uio_vmbus.md §1.6: NULL
        #: device_obj in hv_uio_channel_cb): such queues stay masked and are polled
        self.poll_only = False
        self.closed = False
        #: why this queue is no longer valid (set when its NIC was re-initialised or closed)
        self.invalid_reason = ""

    def _check(self) -> None:
        if self.closed:
            if self.invalid_reason:
                raise QueueInvalidated(self.invalid_reason)
            raise NetError(f"queue {self.index} is closed")

    # -- errors ------------------------------------------------------------------------------
    def _fail(self, rc: int) -> None:
        for r, name in ((self.channel.rx, "RX"), (self.channel.tx, "TX")):
            if r.dead:
                raise RingCorrupt(f"{name} ring: {r.error_message}", channel=self.channel.name)
        if rc == lib.UVB_EIO:
            raise ChannelError("signalling the host failed: the device was rescinded", channel=self.channel.name)
        raise NetError(f"queue {self.index}: data path error {rc} ({ffi.string(lib.uvb_strerror(rc)).decode()})")

    def _after(self) -> None:
        raw = self.raw
        if raw.host_errors != self._seen_errors:
            n = raw.host_errors - self._seen_errors
            self._seen_errors = raw.host_errors
            msg = ffi.string(raw.errmsg).decode(errors="replace")
            self.last_host_error = msg
            log.warning("netvsc queue %d: %d malformed host packet(s), last: %s", self.index, n, msg)
            if self.strict:
                raise ProtocolError(f"queue {self.index}: host sent a malformed packet: {msg}")
        if raw.rx_ctrl != self._seen_ctrl:
            self._seen_ctrl = raw.rx_ctrl
            if self.on_ctrl is not None:
                self.on_ctrl(self)

    # -- RX -----------------------------------------------------------------------------------
    def rx_burst(self, max_frames: int = 256, timeout: float = 0.0, *, copy: bool = True) -> RxBurst:
        """Up to ``max_frames`` frames; waits up to ``timeout`` seconds for the first one."""
        self._check()
        n = min(max_frames, MAX_BURST)
        lent = self._lent
        if lent is not None:                  # C gives its frames back to the host now
            self._lent = None
            lent._invalidate()
        lk = self.lock
        if lk is not None:
            lk.acquire()
        try:
            got = self._rx_once(n, copy)
            if got == 0 and timeout > 0:
                deadline = _now() + timeout
                while got == 0:
                    remaining = deadline - _now()
                    if remaining <= 0:
                        break
                    if not lib.uvb_nvsc_rx_pending(self.raw):
                        if lk is not None:
                            lk.release()
                        try:
                            self._sleep(remaining)
                        finally:
                            if lk is not None:
                                lk.acquire()
                    got = self._rx_once(n, copy)
        finally:
            if lk is not None:
                lk.release()
        if copy:
            # the caller's own copy: frames and descriptors survive the next rx_burst
            if not got:
                return RxBurst(_EMPTY, None, self._frames, 0, zero_copy=False)
            last = self._frames[got - 1]
            pos = self._chunk_pos
            end = pos + last.offset + last.len
            self._chunk_pos = (end + 7) & ~7
            arr = ffi.new("struct uvb_nvsc_frame[]", got)
            ffi.memmove(arr, self._frames, got * self._frame_size)
            assert self._chunk_view is not None
            return RxBurst(self._chunk_view[pos:end], self._chunk + pos, arr, got, zero_copy=False,
                           owner=self._chunk)
        rsc = self._rsc_view() if got and self.raw.rsc_in_burst else None
        b = RxBurst(self._recv_view, self._recv.ptr, self._frames, got, zero_copy=True, queue=self, rsc=rsc)
        self._lent = b
        return b

    def _rsc_view(self) -> memoryview | None:
        raw = self.raw
        if self._rsc_mv is None and raw.rsc_buf != ffi.NULL:
            self._rsc_mv = memoryview(ffi.buffer(raw.rsc_buf, raw.rsc_size))
        return self._rsc_mv

    def _rx_once(self, n: int, copy: bool) -> int:
        if copy:
            room = self._copy_cap - self._chunk_pos
            if room < min(n * self._frame_room, self._copy_cap):     # may not hold this burst
                self._chunk = _ALLOC("uint8_t[]", self._copy_cap)
                self._chunk_view = memoryview(ffi.buffer(self._chunk))
                self._chunk_pos = 0
                room = self._copy_cap
            got = lib.uvb_nvsc_rx_burst(self.raw, self._frames, n, self._chunk + self._chunk_pos, room)
        else:
            got = lib.uvb_nvsc_rx_burst(self.raw, self._frames, n, ffi.NULL, 0)
        if got < 0:
            self._fail(got)
        self._after()
        return int(got)

    def _sleep(self, timeout: float) -> bool:
        if self.spin_us:
            end = time.perf_counter() + self.spin_us / 1e6
            while time.perf_counter() < end:
                if lib.uvb_nvsc_rx_pending(self.raw):
                    return True
        if self.poll_only:
            end = _now() + timeout
            while _now() < end:
                if lib.uvb_nvsc_rx_pending(self.raw):
                    return True
                time.sleep(0.0001)
            return False
        return self.waiter.wait([self.channel], timeout)

    def _release(self, burst: RxBurst | None = None) -> None:
        if burst is not None:
            if self._lent is not burst:
                return                         # an older burst: already given back
            self._lent = None
        lk = self.lock
        if lk is not None:
            with lk:
                rc = lib.uvb_nvsc_rx_release(self.raw)
        else:
            rc = lib.uvb_nvsc_rx_release(self.raw)
        if rc < 0:
            self._fail(rc)

    def wait(self, timeout: float | None) -> bool:
        """Block until something arrived on this queue (True) or the timeout (False)."""
        self._check()
        if lib.uvb_nvsc_rx_pending(self.raw):
            return True
        return self._sleep(1e9 if timeout is None else timeout)

    # -- TX -------------------------------------------------------------------------------------
    def tx_burst(self, frames: RxBurst | TxBatch | Iterable[bytes | bytearray | memoryview], *,
                 timeout: float = 0.0, rejected: list[int] | None = None,
                 mss: int | Sequence[int | None] | None = None, vnet: bool = False) -> int:
        """Send frames; returns how many were really queued (fewer than given when send-buffer
        sections or ring space ran out: back-pressure, send the rest later).  With ``timeout``
        > 0, wait for space until every frame is queued or the time is up.

        ``mss`` (one value for every frame, or one per frame with None for ordinary frames)
        sends TCP segments larger than the MTU as LSOv2 large sends: the host cuts each into
        MSS-sized segments (docs/netvsc.md "Large send offload"); for a :class:`TxBatch`,
        give ``mss`` to the batch instead.

        A frame that can never be sent (shorter than 14 bytes, longer than MTU + 14, or larger
        than a send section when there is no GPA-direct memory; a large send that is not
        Ethernet + IPv4/IPv6 + TCP, with MSS 0, larger than the negotiated maximum, or while
        LSO is not negotiated) raises :class:`~uvmbus.errors.FrameRejected` (the frames before
        it are queued: its ``queued``; ``reason`` says why).  With a list as ``rejected``,
        such frames are skipped instead and their positions in the burst appended to it;
        frames consumed = return value + the number of positions appended.

        ``vnet=True``: each frame starts with the 10-byte ``struct virtio_net_hdr`` a TAP
        opened with IFF_VNET_HDR gives (``uvmbus net bridge``): GSO TCP frames become large
        sends with MSS = gso_size, partial checksums (NEEDS_CSUM) are completed — in C, one
        call per burst (``uvb_nvsc_vnet_prep``)."""
        self._check()
        batch: Any
        if (mss is not None or vnet) and isinstance(frames, (RxBurst, TxBatch)):
            raise ConfigError("tx_burst(mss=..., vnet=...) takes a list of frames; for a TxBatch pass "
                              "mss to TxBatch(frames, mss=...)")
        if isinstance(frames, RxBurst):
            frames._check()
            batch = frames
            if frames.has_rsc_copies:
                # coalesced frames of a zero-copy burst live in the reassembly buffer, not
                # at base + offset: send a copy (keeping the VLAN tags)
                batch = TxBatch(frames.frames(), vlan=[m.vlan for m in frames.metas()])
        elif isinstance(frames, TxBatch):
            batch = frames
        else:
            batch = TxBatch(frames, mss=mss)
            if vnet:
                lib.uvb_nvsc_vnet_prep(self.raw, batch.base, batch.descriptors, len(batch))
        n = len(batch)
        if n == 0:
            return 0
        base, arr = batch.base, batch.descriptors
        raw = self.raw
        pos = queued = 0
        deadline = 0.0
        lk = self.lock
        if lk is not None:
            lk.acquire()
        try:
            while True:
                got = self._tx_once(base, arr, pos, n)
                pos += got
                queued += got
                if raw.tx_bad_hit:            # C stopped in front of a frame that cannot go
                    raw.tx_bad_hit = 0
                    if rejected is None:
                        raise self._rejected(pos, int(raw.tx_bad_len), queued, int(raw.tx_bad_why),
                                             batch)
                    rejected.append(pos)
                    pos += 1
                    if pos < n:
                        continue
                if pos >= n or timeout <= 0:
                    break
                if not deadline:
                    deadline = _now() + timeout
                remaining = deadline - _now()
                if remaining <= 0:
                    break
                if lib.uvb_nvsc_reap(raw) == 0:
                    if lk is not None:
                        lk.release()
                    try:
                        self._sleep(min(remaining, 0.05))
                    finally:
                        if lk is not None:
                            lk.acquire()
        finally:
            if lk is not None:
                lk.release()
        return queued

    def _rejected(self, index: int, length: int, queued: int, why: int = 0, batch: Any = None) -> FrameRejected:
        mf = int(self.raw.max_frame)
        r = self.raw
        reason = _BAD_REASONS.get(why, "size")
        mss = 0
        if batch is not None and why not in (0, lib.UVB_NVSC_BAD_SIZE):
            mss = int(batch.descriptors[index].mss)
        if why == lib.UVB_NVSC_BAD_LSO_OFF:
            if not (r.lso4_max or r.lso6_max):
                why_text = ("a large send (mss given), but LSO is not negotiated on this queue (the host "
                            "offers no LSOv2, or the NIC was opened with lso=False): send MTU-sized "
                            "frames without mss")
            else:
                why_text = ("a large send for an IP version the host did not enable LSO for "
                            f"(IPv4 {'on' if r.lso4_max else 'off'}, IPv6 {'on' if r.lso6_max else 'off'}): "
                            "send MTU-sized frames without mss")
        elif why == lib.UVB_NVSC_BAD_LSO_HDR:
            why_text = ("a large send that is not Ethernet + IPv4/IPv6 (no extension headers) + TCP with "
                        "a complete TCP header: only TCP can be segmented; send it without mss")
        elif why == lib.UVB_NVSC_BAD_LSO_MSS:
            why_text = (f"a large send with MSS {mss}: it must be 1..{lib.LSO_V2_MAX_MSS} and headers + MSS "
                        f"must fit the MTU ({mf} bytes with the Ethernet header)")
        elif why == lib.UVB_NVSC_BAD_LSO_SIZE:
            why_text = (f"larger than the largest large send this queue may make (IPv4 {int(r.lso4_max)}, "
                        f"IPv6 {int(r.lso6_max)} bytes: the host's maximum, capped by one send's room); "
                        "split it")
        elif why == lib.UVB_NVSC_BAD_LSO_SEGS:
            why_text = (f"a large send of fewer segments at MSS {mss} than the host's minimum "
                        f"({int(r.lso_min_segs)}): send it as an ordinary frame (no mss)")
        elif length < 14:
            why_text = "shorter than an Ethernet header (14 bytes)"
        elif length > mf:
            why_text = (f"longer than this NIC sends ({mf} bytes = MTU {mf - 14} + 14; see set_mtu, or "
                        "pass mss= for a TCP large send)")
        else:
            why_text = ("larger than a send section and the NIC has no GPA-direct memory for it "
                        "(see docs/netvsc.md, jumbo frames)")
        return FrameRejected(f"frame {index} of the burst is {length} bytes: {why_text}; {queued} frame(s) "
                             "before it were queued. Fix or drop it, or pass rejected=[] to skip "
                             "such frames", index=index, length=length, queued=queued, reason=reason)

    def _tx_once(self, base: Any, arr: Any, start: int, n: int) -> int:
        rc = lib.uvb_nvsc_tx_burst(self.raw, base, arr + start, n - start)
        if rc < 0:
            self._fail(rc)
        self._after()
        return int(rc)

    def forward(self, burst: RxBurst) -> int:
        """Send the frames of a zero-copy burst received on any queue (no copy in Python)."""
        return self.tx_burst(burst)

    def reap(self) -> None:
        """Collect TX completions now (frees sections)."""
        self._check()
        lk = self.lock
        if lk is not None:
            with lk:
                rc = lib.uvb_nvsc_reap(self.raw)
        else:
            rc = lib.uvb_nvsc_reap(self.raw)
        if rc < 0:
            self._fail(rc)

    @property
    def tx_inflight(self) -> int:
        return int(lib.uvb_nvsc_tx_inflight(self.raw))

    # -- stats --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        r = self.raw
        keys = ("rx_packets", "rx_bytes", "rx_xfer", "rx_acks", "rx_drops", "rx_ctrl", "tx_packets",
                "tx_bytes", "tx_msgs", "tx_gpa", "tx_lso", "tx_completions", "tx_failed", "tx_drops",
                "tx_ring_full", "tx_no_section", "host_errors", "ctrl_dropped", "rx_rsc_frames",
                "rx_rsc_frags", "rx_rsc_errors")
        s = {k: int(getattr(r, k)) for k in keys}
        s["drops"] = s["rx_drops"] + s["tx_drops"]
        s["ring_full"] = s["tx_ring_full"]
        s["no_section"] = s["tx_no_section"]
        s["signals"] = int(self.channel.signal.count)
        s["tx_inflight"] = self.tx_inflight
        return s

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._lent is not None:
            self._lent._invalidate()
            self._lent = None
        if self._rsc_mv is not None:
            try:
                self._rsc_mv.release()
            except BufferError:
                pass
            self._rsc_mv = None
        lib.uvb_nvsc_queue_fini(self.raw)
        self._chunk = self._chunk_view = None       # bursts still out keep their chunks
        self._recv_view.release()


class Nic:
    """A synthetic NIC driven from userspace.  Use :func:`open`."""

    def __init__(self, device: str, root: str | os.PathLike[str] = "/", *, queues: int = 1,
                 mtu: int = 1500, timeout: float = DEFAULT_TIMEOUT, strict: bool = False,
                 gpa: bool | None = None, versions: Sequence[int] = P.NVSP_VERSIONS,
                 hash_info: int = P.LINUX_HASH_INFO, spin_us: int = 0,
                 rx_copy_frames: int = MAX_BURST, lock: bool = True, record: Any = None,
                 sriov: bool = True, lso: bool | None = None,
                 rsc: bool = False):
        if not 1 <= queues <= MAX_QUEUES:
            raise ConfigError(f"queues must be 1..{MAX_QUEUES}")
        if not 68 <= mtu <= 9202:
            raise ConfigError(f"MTU {mtu}: this NIC accepts 68..9202 (NDIS frame ≤ 9216)")
        self.device_ref = device
        self.root = str(root)
        self.requested_queues = queues
        self.timeout = timeout
        self.strict = strict
        self.gpa_wanted = gpa
        #: LSOv2: None = use it when the host offers it, False = never, True = required
        self.lso_wanted = lso
        self.versions = tuple(versions)
        self.hash_info = hash_info
        self.spin_us = spin_us
        self.rx_copy_frames = rx_copy_frames
        self.lock_device = lock
        #: RSC wanted by the user (opt-in, see docs/netvsc.md "RSC"); ``self.rsc``: in force
        self.rsc_requested = bool(rsc)
        self.rsc = False
        self._mtu_wanted = mtu
        self._link_cbs: list[Callable[[bool], None]] = []
        self._vf_cbs: list[Callable[[VfInfo], None]] = []
        #: advertise SR-IOV in the NDIS config (NVSP >= 5, like Linux and DPDK) so the host
        #: announces its VF; False: the host never sends a VF association
        self.sriov_wanted = bool(sriov)
        # receive filter wanted by the user (kept across re-initialisation) and last sent
        self._promiscuous = False
        self._all_multicast = False
        self._multicast: list[bytes] = []
        self._mac_wanted: bytes | None = None
        self._filter_custom = False
        self.packet_filter = 0
        self.permanent_mac = b""
        self._lock = threading.RLock()
        #: completed re-initialisations (set_mtu, set_queues): queues and specs of an older
        #: generation are invalid
        self.generation = 0
        #: the lease file telling attached queues of other processes when they become invalid
        #: (made by the first export_queue, :mod:`uvmbus.netvsc.lease`)
        self._lease: Any = None
        self._req_ids = itertools.count(1)
        self._tids = itertools.count(1 << 48)
        self.closed = True
        from uvmbus.trace import as_recorder

        #: the trace recorder of every channel (``record=`` a path or a Recorder), or None
        self.recorder, self._owns_recorder = as_recorder(record, side="guest")
        try:
            self._bring_up()
        except BaseException:
            self._close_recorder()
            raise

    def _close_recorder(self) -> None:
        if self.recorder is not None and self._owns_recorder:
            rec, self.recorder = self.recorder, None
            rec.close()

    # ==== bring-up (§3) ===============================================================
    def _bring_up(self) -> None:
        self.queues: list[Queue] = []
        self._responses: dict[int, P.RndisMessage] = {}
        self._completions: dict[int, bytes] = {}
        self._send_failures = 0
        self.send_table: list[int] = []
        self.link_up = True
        #: a MEDIA_CONNECT/DISCONNECT indication arrived during bring-up: it, not the
        #: MEDIA_CONNECT_STATUS query (which the reference host always answers "connected",
        #: netvsc.md §10.1), says what the link is
        self._link_indicated = False
        self.link_speed = 0
        self.events: dict[str, int] = {"link_changes": 0, "unknown_messages": 0, "vf_associations": 0,
                                       "offload_indications": 0, "network_changes": 0,
                                       "vf_host_switches": 0, "vf_switch_backs": 0}
        # the VF of this session: the host announces it again after every (re)initialisation
        # (on_vf_change hears of the reset, so add/remove calls stay paired)
        had_vf = getattr(self, "vf_allocated", False) or getattr(self, "data_path", 0) == P.DATA_PATH_VF
        self.sriov = False
        self.vf_allocated = False
        self.vf_serial: int | None = None
        self.data_path = P.DATA_PATH_SYNTHETIC
        self._async_tids: set[int] = set()       # our own switch-backs sent from the dispatcher
        self._switch_back_owed = False
        if had_vf:
            self._fire_vf()
        self._gpa_regions: list[Any] = []
        self._dma: Any = None
        #: LSOv2 as negotiated: largest large send per IP version (0 = off), minimum segments;
        #: None until the offload parameters were sent
        self.lso_max: dict[str, int] | None = None
        self.lso_min_segs = 0
        self.max_pkt_per_msg = 1          # until RNDIS INITIALIZE_CMPLT says more
        self.pkt_align = 8
        self.max_xfer = 0
        self.last_host_error = ""
        self.cd: ChannelDevice = open_device(self.device_ref, self.root, lock=self.lock_device,
                                             record=self.recorder, timeout=self.timeout)
        self.closed = False
        try:
            self._negotiate()
            self._connect_buffers()
            self._make_queue0()
            self._rndis_bring_up()
        except BaseException:
            self._close_quietly()
            raise

    def _negotiate(self) -> None:
        ch = self.cd.primary
        chosen = None
        for v in self.versions:
            r = ch.request(P.nvsp_init(v), timeout=self.timeout)
            m = P.parse_nvsp(r.payload)
            if m.type != P.MSG_INIT_COMPLETE:
                raise ProtocolError(f"INIT answered with NVSP message {m.name}")
            if m["status"] == P.STATUS_SUCCESS:
                chosen = v
                break
            log.debug("host refused NVSP version %s (status %d)", P.VERSION_NAMES.get(v), m["status"])
        if chosen is None:
            raise NegotiationError("the host accepted none of the NVSP versions "
                                   f"{', '.join(P.VERSION_NAMES.get(v, hex(v)) for v in self.versions)}")
        self.nvsp_version = chosen
        self.mtu = self._mtu_wanted
        if chosen >= P.NVSP_V2:
            caps = P.CAP_IEEE8021Q
            if chosen >= P.NVSP_V5:
                caps |= P.CAP_TEAMING      # "needed to receive link speed updates" (§2.4)
                if self.sriov_wanted:      # as Linux negotiate_nvsp_ver and DPDK hn_nvs_conf_ndis
                    caps |= P.CAP_SRIOV
                    self.sriov = True
            if chosen >= P.NVSP_V61:
                caps |= P.CAP_RSC          # Linux declares RSC from 6.1 (L-c negotiate_nvsp_ver)
            ch.send(P.nvsp_ndis_config(self.mtu + 14, caps))
        elif self.mtu > 1500:
            raise ConfigError(f"MTU {self.mtu}: NVSP version 1 has no NDIS config message (MTU 1500 only)")
        self.ndis_version = P.ndis_version_for(chosen)
        ch.send(P.nvsp_ndis_version(*self.ndis_version))

    def _connect_buffers(self) -> None:
        ch = self.cd.primary
        uio = self.cd.uio
        self._recv = uio.buffer("recv")
        self._send = uio.buffer("send")
        if self._recv.gpadl is None or self._send.gpadl is None:
            raise ConfigError("the uio recv/send maps carry no GPADL handle in their names")
        r = ch.request(P.nvsp_send_recv_buf(self._recv.gpadl, P.RECV_BUF_ID), timeout=self.timeout)
        m = P.parse_nvsp(r.payload)
        if m.type != P.MSG_SEND_RECV_BUF_COMPLETE or m["status"] != P.STATUS_SUCCESS:
            raise RequestFailed(f"host refused the receive buffer (GPADL {self._recv.gpadl:#x}): "
                                f"{m.name} status {m.get('status')}", status=m.get("status"))
        sec = m["section"]
        if m["num_sections"] != 1 or sec["offset"] != 0:
            raise ProtocolError(f"receive buffer answered with {m['num_sections']} sections at offset "
                                f"{sec['offset']} (exactly one at 0 is the protocol)")
        if sec["sub_alloc_size"] < MIN_SUB_ALLOC or sec["sub_alloc_size"] * sec["num_sub_allocs"] > self._recv.size:
            raise ProtocolError(f"receive buffer sub-allocations {sec['num_sub_allocs']} x "
                                f"{sec['sub_alloc_size']} do not fit {self._recv.size} bytes")
        self.sub_alloc_size = sec["sub_alloc_size"]
        self.sub_allocs = sec["num_sub_allocs"]
        r = ch.request(P.nvsp_send_send_buf(self._send.gpadl, P.SEND_BUF_ID), timeout=self.timeout)
        m = P.parse_nvsp(r.payload)
        if m.type != P.MSG_SEND_SEND_BUF_COMPLETE or m["status"] != P.STATUS_SUCCESS:
            raise RequestFailed(f"host refused the send buffer (GPADL {self._send.gpadl:#x}): "
                                f"{m.name} status {m.get('status')}", status=m.get("status"))
        size = m["section_size"]
        if size < MIN_SECTION or size % 4:
            raise ProtocolError(f"send buffer section size {size} (must be ≥ {MIN_SECTION}, a multiple of 4)")
        self.section_size = size
        self.sections = self._send.size // size
        self.cd.trace_buffers(pagesets=[(P.RECV_BUF_ID, self._recv.ptr, self._recv.size)],
                              send=(self._send.ptr, self._send.size, size))
        self.max_xfer = size
        self._early_packets(ch.poll())

    def _early_packets(self, pkts: list[Packet]) -> None:
        """Packets the host sent while the primary channel was still driven from Python
        (before queue 0 exists).  Once both buffers are connected the host is Ready and may
        send control messages, e.g. a link indication (netvsc.md §10.1): handle them as
        queue 0 would, and ack every transfer-page packet (§6: one completion each; a
        control buffer the guest never acks is lost to the host, which has only 16)."""
        ch = self.cd.primary
        rb = self._recv
        for p in pkts:
            if p.type == PKT_XFER_PAGES:
                status = P.STATUS_SUCCESS
                h, payload = bytes(p.header), bytes(p.payload)
                pageset, count = struct.unpack_from("<H", h)[0], struct.unpack_from("<I", h, 4)[0]
                if len(payload) < 8 or P.nvsp_type(payload) != P.MSG_SEND_RNDIS_PKT or pageset != P.RECV_BUF_ID:
                    status = P.STATUS_FAIL
                    self._host_problem(f"transfer-page packet (tid {p.trans_id}) during bring-up: NVSP "
                                       f"type {P.nvsp_type(payload)}, page set {pageset:#x}")
                else:
                    control = struct.unpack_from("<I", payload, 4)[0] == P.CHANNEL_TYPE_CONTROL
                    for i in range(count):
                        size, off = struct.unpack_from("<II", h, 8 + 8 * i)
                        if off + size > rb.size:
                            status = P.STATUS_FAIL
                            self._host_problem(f"transfer-page range [{off:#x}, +{size}) outside the "
                                               "receive buffer during bring-up")
                        elif control and size > CONTROL_MESSAGE_MAX:
                            status = P.STATUS_FAIL      # as the C path: never copy host-sized blobs
                            self._host_problem(f"control message of {size} bytes during bring-up "
                                               f"(more than {CONTROL_MESSAGE_MAX})")
                        elif control:
                            self._rndis_event(bytes(rb.mm[rb.offset + off:rb.offset + off + size]))
                ch.send(struct.pack("<II", P.MSG_SEND_RNDIS_PKT_COMPLETE, status), trans_id=p.trans_id,
                        type=PKT_COMP)
            elif p.type == PKT_INBAND:
                self._inband_event(bytes(p.payload), p.trans_id)
            else:
                log.warning("netvsc: unexpected packet type %d (tid %#x) from the host during bring-up "
                            "ignored", p.type, p.trans_id)

    def _queue_params(self) -> dict[str, Any]:
        return {"section_size": self.section_size, "max_pkt_per_msg": self.max_pkt_per_msg,
                "pkt_align": self.pkt_align, "max_xfer": self.max_xfer, "max_frame": self.mtu + 14,
                "strict": self.strict, "copy_frames": self.rx_copy_frames}

    def _make_queue0(self, nq: int = 1) -> None:
        first, count = self._slice(0, nq)
        q = Queue(0, self.cd.primary, self.cd.waiter, self._recv, self._send, section_first=first,
                  section_count=count, gpa=self._gpa_for(0), **self._queue_params())
        q.lock = self._lock
        q.on_ctrl = self._dispatch
        q.spin_us = self.spin_us
        self._apply_lso(q)
        if self.queues:
            self.queues[0] = q
        else:
            self.queues.append(q)

    def _slice(self, index: int, nq: int) -> tuple[int, int]:
        per = self.sections // nq
        return index * per, per

    def _lso_possible(self) -> bool:
        """Large sends may be used on queues made now: before the negotiation, unless the
        user said lso=False; after it, when it enabled LSO for some IP version."""
        if self.lso_max is None:
            return self.lso_wanted is not False
        return any(self.lso_max.values())

    def _gpa_for(self, index: int) -> Any:
        """Bounce slots for frames that do not fit a send section (jumbo MTU, large sends)."""
        frame = self.mtu + 14
        jumbo = _needs_gpa(frame, self.section_size)
        lso = self._lso_possible()
        if not jumbo and not lso:
            return None
        if self.gpa_wanted is False:
            return None
        if self._dma is None:
            try:
                from uvmbus.dma import open_dma_memory
                self._dma = open_dma_memory(self.root)
            except UvmbusError as exc:
                if self.gpa_wanted:
                    raise
                if jumbo:
                    log.warning("netvsc: MTU %d frames exceed a %d-byte send section and no DMA memory "
                                "is available (%s): larger frames will be dropped", self.mtu,
                                self.section_size, exc)
                else:
                    log.info("netvsc: no DMA memory (%s): large sends are limited to a %d-byte send "
                             "section", exc, self.section_size)
                self.gpa_wanted = False
                return None
        if lso:
            frame = max(frame, LSO_FRAME_MAX)
        try:
            gpa = _alloc_gpa(self._dma, frame, f"netvsc-q{index}", LSO_GPA_SLOTS if lso else GPA_SLOTS)
        except UvmbusError as exc:
            if self.gpa_wanted:
                raise ResourceError(f"netvsc: no DMA memory for jumbo frames / large sends: {exc}") from exc
            log.warning("netvsc: no DMA memory for frames larger than a send section (%s)", exc)
            self.gpa_wanted = False
            return None
        self._gpa_regions.append(gpa[0])
        return gpa

    def _apply_lso(self, q: Queue) -> None:
        """Give a queue the negotiated LSO limits, capped by what one of its sends can hold
        (a GPA-direct slot, else a send section)."""
        lm = self.lso_max or {}
        room = (q._gpa[1] if q._gpa is not None else min(self.section_size, self.max_xfer or self.section_size))
        room = min(room - TX_HEADROOM, LSO_FRAME_MAX)
        q.raw.lso4_max = max(0, min(lm.get("ipv4", 0), room))
        q.raw.lso6_max = max(0, min(lm.get("ipv6", 0), room))
        q.raw.lso_min_segs = self.lso_min_segs

    # -- control plane -------------------------------------------------------------------------
    @property
    def _q0(self) -> Queue:
        return self.queues[0]

    def _dispatch(self, q: Queue) -> None:
        """Drain the control records of queue ``q`` (link events, responses, completions)."""
        rec = ffi.new("struct uvb_nvsc_ctrl *")
        buf = ffi.new("uint8_t[]", _CTRL_BUF)
        while True:
            n = lib.uvb_nvsc_ctrl_next(q.raw, rec, buf, _CTRL_BUF)
            if n <= 0:
                break
            data = bytes(ffi.buffer(buf, rec.len))
            kind = rec.kind
            if kind == lib.UVB_NVSC_CTRL_RNDIS:
                self._rndis_event(data)
            elif kind == lib.UVB_NVSC_CTRL_INBAND:
                self._inband_event(data, int(rec.trans_id))
            elif kind == lib.UVB_NVSC_CTRL_COMP:
                tid = int(rec.trans_id)
                if tid in self._async_tids:
                    self._async_tids.discard(tid)     # a switch-back nobody waits for
                else:
                    self._completions[tid] = data
            elif kind == lib.UVB_NVSC_CTRL_SENDFAIL:
                self._send_failures += 1

    def _rndis_event(self, data: bytes) -> None:
        try:
            m = P.parse_rndis(data)
        except ProtocolError as exc:
            self._host_problem(f"malformed RNDIS control message: {exc}")
            return
        if m.type == P.RNDIS_INDICATE:
            self._indication(m)
        elif m.type & lib.RNDIS_MSG_COMPLETION:
            self._responses[m.req_id] = m
        else:
            self._host_problem(f"unexpected RNDIS message {m.name} from the host")

    def _indication(self, m: P.RndisMessage) -> None:
        st = m.status
        if st in (P.ST_MEDIA_CONNECT, P.ST_MEDIA_DISCONNECT):
            up = st == P.ST_MEDIA_CONNECT
            changed = up != self.link_up
            self.link_up = up
            self._link_indicated = True
            self.events["link_changes"] += 1
            log.info("netvsc %s: link %s", self.device_id[:8], "up" if up else "down")
            if changed:
                self._fire_link(up)
        elif st == P.ST_LINK_SPEED_CHANGE and len(m.info) >= 4:
            self.link_speed = struct.unpack_from("<I", m.info)[0] * 100
        elif st == P.ST_NETWORK_CHANGE:
            self.events["network_changes"] += 1
            self._fire_link(self.link_up)
        elif st == P.ST_TASK_OFFLOAD_CURRENT_CONFIG:
            self.events["offload_indications"] += 1
        else:
            log.debug("netvsc: indication %#x ignored", st)

    def _fire_link(self, up: bool) -> None:
        for cb in list(self._link_cbs):
            try:
                cb(up)
            except Exception:  # a user callback must not break the data path
                log.exception("netvsc: link-change callback failed")

    def _inband_event(self, data: bytes, tid: int) -> None:
        t = P.nvsp_type(data)
        if t == P.MSG_SEND_INDIRECTION_TABLE:
            try:
                self.send_table = P.send_table_from(data, self.nvsp_version)
            except ProtocolError as exc:
                self._host_problem(str(exc))
        elif t == P.MSG_VF_ASSOCIATION:
            self._vf_association(data)
        elif t == P.MSG_SWITCH_DATA_PATH:
            self._host_switch(data)
        else:
            self._host_problem(f"unknown in-band NVSP message type {t} from the host")

    # -- accelerated-networking VF (docs/netvsc.md) ------------------------------------------
    def _vf_association(self, data: bytes) -> None:
        """SEND_VF_ASSOCIATION {allocated, serial} — at any time, also while traffic runs
        (Linux netvsc_send_vf, DPDK hn_nvs_handle_vfassoc).  A VF that goes away while the
        data path is on it: switch back to synthetic at once (DPDK hn_vf_remove_unlocked)."""
        if self.nvsp_version < P.NVSP_V4 or len(data) < ffi.sizeof("struct nvsp_vf_association"):
            self._host_problem(f"VF association of {len(data)} bytes in NVSP "
                               f"{P.VERSION_NAMES.get(self.nvsp_version, hex(self.nvsp_version))} ignored")
            return
        m = P.parse_nvsp(data)
        allocated = m["allocated"] != 0
        self.events["vf_associations"] += 1
        self.vf_allocated = allocated
        self.vf_serial = int(m["serial"]) if allocated else None
        log.info("netvsc %s: VF serial %s %s", self.device_id[:8], m["serial"],
                 "added" if allocated else "removed")
        if not allocated and self.data_path == P.DATA_PATH_VF:
            self.data_path = P.DATA_PATH_SYNTHETIC
            self.events["vf_switch_backs"] += 1
            self._switch_back_owed = True
            self._send_switch_back()
        self._fire_vf()

    def _host_switch(self, data: bytes) -> None:
        """SWITCH_DATA_PATH from the host (OpenVMM sends {SYNTHETIC} when the VF disappears,
        before the association with allocated = 0): the data path is synthetic again.  Like
        Linux and DPDK, no completion is sent."""
        if self.nvsp_version < P.NVSP_V4 or len(data) < ffi.sizeof("struct nvsp_switch_data_path"):
            self._host_problem(f"SWITCH_DATA_PATH of {len(data)} bytes from the host ignored")
            return
        m = P.parse_nvsp(data)
        self.events["vf_host_switches"] += 1
        if m["active_datapath"] != P.DATA_PATH_VF and self.data_path == P.DATA_PATH_VF:
            self.data_path = P.DATA_PATH_SYNTHETIC
            self._fire_vf()

    def _send_switch_back(self) -> None:
        """SWITCH_DATA_PATH {SYNTHETIC} from the dispatcher (queue 0's lock is held): sent with
        a completion request, not waited for (its completion is consumed when it comes).
        A full ring leaves it owed: the next control poll sends it."""
        if not self._switch_back_owed or self.closed:
            return
        tid = next(self._tids)
        msg = P.nvsp_switch_data_path(P.DATA_PATH_SYNTHETIC)
        rc = lib.uvb_nvsc_send_inband(self._q0.raw, msg, len(msg), tid, FLAG_COMPLETION_REQUESTED)
        if rc == lib.UVB_EAGAIN:
            return
        if rc:
            self._q0._fail(rc)
        self._switch_back_owed = False
        self._async_tids.add(tid)

    def _fire_vf(self) -> None:
        if not self._vf_cbs:
            return
        info = self._vf_info(resolve=False)
        for cb in list(self._vf_cbs):
            try:
                cb(info)
            except Exception:  # a user callback must not break the data path
                log.exception("netvsc: VF callback failed")

    def _vf_info(self, resolve: bool = True) -> VfInfo:
        pci: list[str] = []
        if resolve and self.vf_allocated:
            pci = [f.name for f in self.vf_functions()]
        return VfInfo(supported=self.sriov, mac=_mac_text(self.permanent_mac), allocated=self.vf_allocated,
                      serial=self.vf_serial,
                      data_path=P.DATA_PATH_NAMES.get(self.data_path, str(self.data_path)),
                      associations=self.events["vf_associations"],
                      host_switches=self.events["vf_host_switches"],
                      switch_backs=self.events["vf_switch_backs"], pci=pci)

    @property
    def vf(self) -> VfInfo:
        """The VF the host associated with this NIC, as far as the driver has heard (a
        snapshot, :class:`VfInfo`; host messages are read while receiving on queue 0, by
        :meth:`poll_events` and :meth:`wait_vf`)."""
        return self._vf_info()

    def on_vf_change(self, callback: Callable[[VfInfo], None]) -> None:
        """Call ``callback(VfInfo)`` when the host adds or removes the VF or moves the data
        path (from the thread that receives on queue 0 or calls :meth:`poll_events`)."""
        self._vf_cbs.append(callback)

    def wait_vf(self, allocated: bool, timeout: float) -> bool:
        """Wait until the host has (True) / has not (False) a VF associated; False on timeout."""
        return self._wait_event(lambda: self.vf_allocated == allocated, timeout)

    def vf_functions(self) -> list[Any]:
        """The PCI functions of the associated VF (:class:`uvmbus.vfio.pci.PciFunction`), found
        as Linux does (netvsc_drv.c get_netvsc_byslot): pci-hyperv names the vPCI slot after
        the VF's serial (pci-hyperv.c hv_pci_assign_slots), so ``sys/bus/pci/slots/<serial>``
        holds its address; when no slot matches, a PCI network interface whose permanent
        address is this NIC's MAC (Linux's fallback).  Empty when no VF is allocated or its
        PCI device has not appeared (yet)."""
        if not self.vf_allocated or self.vf_serial is None:
            return []
        from uvmbus.vfio.pci import PciBus
        bus = PciBus(self.root)
        return bus.by_slot(str(self.vf_serial)) or bus.by_mac(self.permanent_mac)

    def switch_data_path(self, path: str, *, timeout: float | None = None) -> VfInfo:
        """Ask the host to send this NIC's traffic through the VF (``"vf"``) or the synthetic
        path (``"synthetic"``): SWITCH_DATA_PATH with a completion request, waited for, as
        Linux netvsc_switch_datapath does.  The synthetic path stays the default: a userspace
        driver does not own the VF, and after ``"vf"`` the host delivers unicast frames to
        the VF, not to this NIC's queues.  A VF that goes away undoes the switch by itself."""
        want = {"vf": P.DATA_PATH_VF, "synthetic": P.DATA_PATH_SYNTHETIC}.get(str(path).lower())
        if want is None:
            raise ConfigError(f"data path {path!r}: use 'vf' or 'synthetic'")
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        vname = P.VERSION_NAMES.get(self.nvsp_version, hex(self.nvsp_version))
        if self.nvsp_version < P.NVSP_V4:
            raise NetError(f"NIC {self.device_ref} negotiated NVSP {vname}: VF association and "
                           "data path switching need NVSP 4 or later; this host has no VF "
                           "protocol — the synthetic path is the only one")
        self.poll_events()
        if want == P.DATA_PATH_VF and not self.vf_allocated:
            why = ("SR-IOV was not advertised (NVSP < 5, as Linux, or open(sriov=False))"
                   if not self.sriov else
                   "the host has not associated a VF with this NIC (on Azure: enable "
                   "accelerated networking on the VM's network interface; during host "
                   "servicing the VF is away for a while)")
            raise NetError(f"NIC {self.device_ref} has no VF to switch to: {why}; the synthetic "
                           "path keeps working")
        deadline = _now() + (self.timeout if timeout is None else timeout)
        msg = P.nvsp_switch_data_path(want)
        tid = next(self._tids)
        with self._lock:
            self._request_q0(msg, tid, deadline, "completion of SWITCH_DATA_PATH")
            # the VF may have gone while the request was in flight: the data path stays synthetic
            if want == P.DATA_PATH_VF and not self.vf_allocated:
                self._switch_back_owed = True
                self._send_switch_back()
                raise NetError(f"NIC {self.device_ref}: the VF went away while switching to it; "
                               "the data path is synthetic")
            self.data_path = want
        self._fire_vf()
        return self._vf_info()

    def _host_problem(self, msg: str) -> None:
        self.events["unknown_messages"] += 1
        self.last_host_error = msg
        log.warning("netvsc %s: %s", self.device_id[:8], msg)
        if self.strict:
            raise ProtocolError(msg)

    def _wait_q0(self, deadline: float, what: str) -> None:
        remaining = deadline - _now()
        if remaining <= 0:
            raise ChannelTimeout(f"no {what} from the host within {self.timeout:.1f} s",
                                 channel=self.cd.primary.name)
        self._lock.release()
        try:
            self.cd.waiter.wait([self.cd.primary], min(remaining, 0.5))
        finally:
            self._lock.acquire()

    def _poll_q0(self) -> None:
        rc = lib.uvb_nvsc_poll_ctrl(self._q0.raw)
        if rc < 0:
            self._q0._fail(rc)
        self._q0._after()
        self._dispatch(self._q0)
        if self._switch_back_owed:
            self._send_switch_back()

    def _send_ctrl(self, msg: bytes, deadline: float) -> None:
        while True:
            rc = lib.uvb_nvsc_send_ctrl(self._q0.raw, msg, len(msg))
            if rc == 0:
                return
            if rc != lib.UVB_EAGAIN:
                self._q0._fail(rc)
            self._poll_q0()
            self._wait_q0(deadline, "free send section for a control message")

    def request(self, msg: bytes, req_id: int, expect: int, timeout: float | None = None) -> P.RndisMessage:
        """Send an RNDIS request and wait for its completion (matched by request id)."""
        deadline = _now() + (self.timeout if timeout is None else timeout)
        with self._lock:
            fails = self._send_failures
            self._send_ctrl(msg, deadline)
            while True:
                self._poll_q0()
                m = self._responses.pop(req_id, None)
                if m is not None:
                    if m.type != expect:
                        raise ProtocolError(f"RNDIS request {req_id} answered with {m.name}")
                    return m
                if self._send_failures != fails:
                    raise RequestFailed("the host completed an RNDIS control request with a failure "
                                        "status (it rejected the message)", status=P.STATUS_FAIL)
                self._wait_q0(deadline, f"answer to RNDIS request {req_id}")

    def query(self, oid: int, data: bytes = b"", *, timeout: float | None = None) -> bytes:
        rid = next(self._req_ids)
        m = self.request(P.rndis_query(rid, oid, data), rid, P.RNDIS_QUERY_C, timeout)
        if m.status != P.ST_SUCCESS:
            raise RequestFailed(f"OID {oid:#010x} query failed with RNDIS status {m.status:#x}", status=m.status)
        return m.info

    def set(self, oid: int, data: bytes, *, timeout: float | None = None) -> None:
        rid = next(self._req_ids)
        m = self.request(P.rndis_set(rid, oid, data), rid, P.RNDIS_SET_C, timeout)
        if m.status != P.ST_SUCCESS:
            raise RequestFailed(f"OID {oid:#010x} set failed with RNDIS status {m.status:#x}", status=m.status)

    def nvsp_request(self, msg: bytes, timeout: float | None = None) -> P.NvspMessage:
        """An NVSP request on the primary channel after bring-up (completion by transaction id)."""
        deadline = _now() + (self.timeout if timeout is None else timeout)
        tid = next(self._tids)
        with self._lock:
            return P.parse_nvsp(self._request_q0(msg, tid, deadline,
                                                 f"completion of NVSP message {P.nvsp_type(msg)}"))

    def _request_q0(self, msg: bytes, tid: int, deadline: float, what: str) -> bytes:
        """Send ``msg`` on the primary channel with a completion request (waiting for ring
        space) and wait for completion ``tid``; its payload.  The caller holds ``_lock``."""
        while True:
            rc = lib.uvb_nvsc_send_inband(self._q0.raw, msg, len(msg), tid, FLAG_COMPLETION_REQUESTED)
            if rc == 0:
                break
            if rc != lib.UVB_EAGAIN:
                self._q0._fail(rc)
            self._poll_q0()
            self._wait_q0(deadline, "ring space")
        while True:
            self._poll_q0()
            data = self._completions.pop(tid, None)
            if data is not None:
                return data
            self._wait_q0(deadline, what)

    def nvsp_send(self, msg: bytes) -> None:
        with self._lock:
            rc = lib.uvb_nvsc_send_inband(self._q0.raw, msg, len(msg), 0, 0)
            if rc:
                self._q0._fail(rc)

    def _rndis_bring_up(self) -> None:
        rid = next(self._req_ids)
        m = self.request(P.rndis_init(rid), rid, P.RNDIS_INIT_C)
        f = m.fields
        if m.status != P.ST_SUCCESS:
            raise RequestFailed(f"RNDIS INITIALIZE failed with status {m.status:#x}", status=m.status)
        self.max_pkt_per_msg = max(1, f["max_pkt_per_msg"])
        self.pkt_align = max(4, 1 << min(f["pkt_alignment_factor"], 12))
        self.max_xfer = min(f["max_xfer_size"] or self.section_size, self.section_size)
        q0 = self._q0.raw
        q0.max_pkt_per_msg = self.max_pkt_per_msg
        q0.pkt_align = self.pkt_align
        q0.max_xfer = self.max_xfer
        # some hosts leave a non-zero filter after INITIALIZE (§3 step 7)
        self.set(P.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0))
        self.packet_filter = 0
        maxframe = struct.unpack_from("<I", self.query(P.OID_GEN_MAXIMUM_FRAME_SIZE).ljust(4, b"\0"))[0]
        if maxframe and maxframe < self.mtu:
            log.info("netvsc: host maximum frame %d < MTU %d: MTU lowered", maxframe, self.mtu)
            self.mtu = maxframe
            for q in self.queues:
                q.raw.max_frame = self.mtu + 14
        mac = self.query(P.OID_802_3_PERMANENT_ADDRESS)
        if len(mac) < 6:
            raise ProtocolError(f"permanent address of {len(mac)} bytes")
        self.mac_bytes = self.permanent_mac = bytes(mac[:6])
        if self._mac_wanted is not None and self._mac_wanted != self.permanent_mac:
            self._send_mac(self._mac_wanted)     # a re-initialisation keeps the user's address
        self.offloads = P.OffloadCaps()
        try:
            caps = self.query(P.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES, P.ndis_offload_query_input(self.nvsp_version))
            self.offloads = P.parse_ndis_offload(caps)
        except RequestFailed:
            log.info("netvsc: host reports no offload capabilities")
        o = self.offloads
        v4 = self.nvsp_version <= P.NVSP_V4
        # LSOv2 the way Linux negotiates it (L-r rndis_netdev_set_hwcaps): enabled for IPv4
        # when the host offers TCP/IPv4 checksums and 802.3 LSOv2, for IPv6 when it also
        # offers both IPv6 options; the limit is min(host maximum, 64 KiB)
        use4 = o.lso4 and self.lso_wanted is not False
        use6 = o.lso6 and self.lso_wanted is not False
        if self.lso_wanted and not (use4 or use6):
            raise NegotiationError("LSO was required (lso=True) but the host offers no LSOv2 "
                                   "(OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES): open with lso=None")

        def lso_value(offered: bool, use: bool) -> int:
            # enabled, disabled when the user turned it off, else "no change" (like Linux)
            return P.LSO_ENABLED if use else (P.LSO_DISABLED if offered else 0)

        rsc = self._rsc_param()
        params = P.build_offload_params(self.nvsp_version, tcp4=4 if o.tx_tcp4 else 1,
                                        udp4=0 if v4 else (4 if o.tx_udp4 else 1),
                                        tcp6=4 if o.tx_tcp6 else 1, udp6=0 if v4 else (4 if o.tx_udp6 else 1),
                                        lso4=lso_value(o.lso4, use4), lso6=lso_value(o.lso6, use6), rsc=rsc)
        try:
            self.set(P.OID_TCP_OFFLOAD_PARAMETERS, params)
            self.rsc = rsc == P.RSC_ENABLED
        except RequestFailed as exc:
            log.info("netvsc: offload parameters refused: %s", exc)
            self.rsc = False
            use4 = use6 = False
            if self.lso_wanted:
                raise NegotiationError(f"LSO was required (lso=True) but the host refused the offload "
                                       f"parameters: {exc}") from exc
        self.lso_max = {"ipv4": min(o.lso4_max, P.LSO_LEGACY_MAX) if use4 else 0,
                        "ipv6": min(o.lso6_max, P.LSO_LEGACY_MAX) if use6 else 0}
        self.lso_min_segs = max(o.lso4_min_segs if use4 else 0, o.lso6_min_segs if use6 else 0)
        for q in self.queues:
            self._apply_lso(q)
        state = self.query(P.OID_GEN_MEDIA_CONNECT_STATUS)
        if not self._link_indicated:
            self.link_up = len(state) >= 4 and struct.unpack_from("<I", state)[0] == lib.NDIS_MEDIA_STATE_CONNECTED
        self.rss_queues_offered = 1
        nq = 1
        if self.nvsp_version >= P.NVSP_V5:
            speed = self.query(P.OID_GEN_LINK_SPEED)
            if len(speed) >= 4:
                self.link_speed = struct.unpack_from("<I", speed)[0] * 100
            if self.ndis_version >= (6, 20):
                try:
                    rss = P.parse_rss_caps(self.query(P.OID_GEN_RECEIVE_SCALE_CAPABILITIES))
                    self.rss_queues_offered = rss.num_queues
                except (RequestFailed, ProtocolError) as exc:
                    log.info("netvsc: no RSS capabilities (%s): one queue", exc)
            if self.rss_queues_offered >= 2:
                nq = min(self.requested_queues, self.rss_queues_offered, MAX_QUEUES)
        elif self.requested_queues > 1:
            log.info("netvsc: NVSP %s has no sub-channels: one queue", P.VERSION_NAMES[self.nvsp_version])
        if nq > 1:
            self._setup_queues(nq)
        # on open Linux sends DIRECTED | ALL_MULTICAST | BROADCAST (rndis_filter_open_device);
        # after the user changed the filter, a re-initialisation restores the user's one
        self._send_filter(self._wanted_filter() if self._filter_custom else FILTER_DEFAULT)

    def _rsc_param(self) -> int:
        """rsc_ip_v4/v6 of the offload parameters, as Linux decides them
        (rndis_netdev_set_hwcaps): only when the host offers RSC for IPv4 and IPv6 (and NVSP
        6.1, where RSC exists) — then enabled or disabled as wanted — else 0, no change."""
        if not (self.nvsp_version >= P.NVSP_V61 and self.offloads.rsc):
            if self.rsc_requested:
                log.warning("netvsc: RSC requested but the host does not offer it (NVSP %s, host "
                            "RSC IPv4 %d IPv6 %d): frames arrive uncoalesced",
                            P.VERSION_NAMES.get(self.nvsp_version, hex(self.nvsp_version)),
                            self.offloads.rsc_ip4, self.offloads.rsc_ip6)
            return 0
        return P.RSC_ENABLED if self.rsc_requested else P.RSC_DISABLED

    def _setup_queues(self, nq: int) -> None:
        m = self.nvsp_request(P.nvsp_subchannel_request(nq - 1))
        if m.type != P.MSG_SUBCHANNEL:
            raise ProtocolError(f"SUBCHANNEL answered with {m.name}")
        status, granted = struct.unpack_from("<II", m.raw.ljust(12, b"\0"), 4)
        if status != P.STATUS_SUCCESS or granted == 0:
            log.info("netvsc: host granted no sub-channels (status %d): one queue", status)
            return
        if granted > nq - 1:
            raise ProtocolError(f"host granted {granted} sub-channels, {nq - 1} were requested")
        nq = 1 + granted
        try:
            chans = self.cd.open_subchannels(granted, timeout=max(self.timeout, 10.0))
        except KernelUnsupported as exc:
            # the host granted them, but this kernel cannot signal them: stay on one queue
            # (RSS stays off, so the host steers everything to queue 0)
            log.warning("netvsc: %s; using one queue", exc)
            return
        poll_only = not self.cd.uio.quirks.irqcontrol_all_channels
        with self._lock:
            old = self.queues[0]
            self._poll_q0()
            if old.tx_inflight:
                deadline = _now() + self.timeout
                while old.tx_inflight:
                    self._poll_q0()
                    self._wait_q0(deadline, "completion of control messages")
            self._make_queue0(nq)
            old.close()
        for i, ch in enumerate(chans, start=1):
            first, count = self._slice(i, nq)
            q = Queue(i, ch, self.cd.new_waiter(), self._recv, self._send, section_first=first,
                      section_count=count, gpa=self._gpa_for(i), **self._queue_params())
            q.on_ctrl = self._dispatch
            q.spin_us = self.spin_us
            q.poll_only = poll_only
            self._apply_lso(q)
            self.queues.append(q)
        table = [i % nq for i in range(lib.NDIS_RSS_TABLE_ENTRIES)]
        self.set(P.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 P.build_rss_params(table, hash_info=self.hash_info, flags=P.RSS_FLAG_DISABLE))
        self.set(P.OID_GEN_RECEIVE_SCALE_PARAMETERS, P.build_rss_params(table, hash_info=self.hash_info))
        self.rss_table = table

    # ==== public API =====================================================================
    @property
    def device_id(self) -> str:
        return self.cd.device.device_id

    @property
    def mac(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac_bytes)

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def queue(self, index: int) -> Queue:
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        try:
            return self.queues[index]
        except IndexError:
            raise ConfigError(f"queue {index}: this NIC has {len(self.queues)} queue(s)") from None

    def rx_burst(self, queue: int = 0, max_frames: int = 256, timeout: float = 0.0, *,
                 copy: bool = True) -> RxBurst:
        """Receive up to ``max_frames`` frames on ``queue`` (see :meth:`Queue.rx_burst`)."""
        return self.queue(queue).rx_burst(max_frames, timeout, copy=copy)

    def tx_burst(self, frames: RxBurst | TxBatch | Iterable[bytes | bytearray | memoryview],
                 queue: int = 0, *, timeout: float = 0.0, rejected: list[int] | None = None,
                 mss: int | Sequence[int | None] | None = None, vnet: bool = False) -> int:
        """Send frames on ``queue``; returns how many were really queued (see
        :meth:`Queue.tx_burst`: back-pressure, frames that can never be sent, ``mss`` for
        TCP large sends, ``vnet`` for frames with a virtio-net header)."""
        return self.queue(queue).tx_burst(frames, timeout=timeout, rejected=rejected, mss=mss, vnet=vnet)

    def poll_events(self) -> None:
        """Process pending control messages (link indications) without receiving frames."""
        if self.closed:
            return
        if self._lock.acquire(blocking=False):
            try:
                self._poll_q0()
            finally:
                self._lock.release()

    def on_link_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(up)`` when the host reports a link change (from the thread that
        receives on queue 0 or calls :meth:`poll_events`)."""
        self._link_cbs.append(callback)

    def wait_link(self, up: bool, timeout: float) -> bool:
        """Wait until the link is ``up`` (True) / down (False); False on timeout."""
        return self._wait_event(lambda: self.link_up == up, timeout)

    def _wait_event(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read host messages until ``done()`` holds (True) or ``timeout`` runs out (False)."""
        deadline = _now() + timeout
        while True:
            self.poll_events()
            if done():
                return True
            remaining = deadline - _now()
            if remaining <= 0:
                return False
            self.cd.waiter.wait([self.cd.primary], min(remaining, 0.1))

    def stats(self) -> dict[str, Any]:
        qs = [q.stats() for q in self.queues]
        total: dict[str, int] = {}
        for s in qs:
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return {"queues": qs, "total": total, "events": dict(self.events), "link_up": self.link_up}

    def info(self) -> NicInfo:
        return NicInfo(
            device_id=self.device_id, mac=self.mac, mtu=self.mtu, link_up=self.link_up,
            link_speed_bps=self.link_speed, nvsp_version=P.VERSION_NAMES.get(self.nvsp_version, hex(self.nvsp_version)),
            ndis_version=f"{self.ndis_version[0]}.{self.ndis_version[1]}", queues=len(self.queues),
            requested_queues=self.requested_queues, rss_queues_offered=self.rss_queues_offered,
            max_pkt_per_msg=self.max_pkt_per_msg, pkt_alignment=self.pkt_align, recv_buffer=self._recv.size,
            sub_alloc_size=self.sub_alloc_size, sub_allocs=self.sub_allocs, send_buffer=self._send.size,
            section_size=self.section_size, sections=self.sections, gpa_direct=bool(self._gpa_regions),
            offloads=self.offloads.to_dict(), send_table=list(self.send_table),
            permanent_mac=_mac_text(self.permanent_mac), packet_filter=self.packet_filter,
            packet_filter_names=P.filter_names(self.packet_filter), promiscuous=self._promiscuous,
            all_multicast=self._all_multicast, multicast=[_mac_text(m) for m in self._multicast],
            vf=self._vf_info().to_dict(), lso=self.lso_limits(), rsc_requested=self.rsc_requested,
            rsc=self.rsc)

    def lso_limits(self) -> dict[str, int]:
        """What ``tx_burst(..., mss=...)`` accepts on queue 0: the largest large send for
        IPv4 / IPv6 in bytes (0 = LSO off for it; the host's maximum capped by one send's
        room) and the host's minimum segment count."""
        if not self.queues:
            return {"ipv4_max": 0, "ipv6_max": 0, "min_segments": 0}
        r = self.queues[0].raw
        return {"ipv4_max": int(r.lso4_max), "ipv6_max": int(r.lso6_max), "min_segments": int(r.lso_min_segs)}

    # ==== filters, MAC address, host statistics (docs/netvsc.md) ============================
    def _wanted_filter(self) -> int:
        return P.kernel_filter(promiscuous=self._promiscuous, all_multicast=self._all_multicast,
                               multicast=bool(self._multicast))

    def _send_filter(self, value: int) -> None:
        # like Linux (rndis_filter_set_packet_filter), an unchanged filter is not sent again
        if value != self.packet_filter:
            self.set(P.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", value))
            self.packet_filter = value

    def _apply_filter(self) -> None:
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        self._filter_custom = True
        self._send_filter(self._wanted_filter())

    def set_promiscuous(self, on: bool) -> None:
        """Receive every frame the host passes: the packet filter becomes PROMISCUOUS alone,
        as Linux sends it; off restores DIRECTED | BROADCAST (| ALL_MULTICAST).  Hyper-V
        passes other stations' frames only where the VM may spoof MAC addresses."""
        self._promiscuous = bool(on)
        self._apply_filter()

    def set_all_multicast(self, on: bool) -> None:
        """Receive all multicast frames (filter DIRECTED | ALL_MULTICAST | BROADCAST)."""
        self._all_multicast = bool(on)
        self._apply_filter()

    def set_multicast_list(self, addresses: Iterable[str | bytes]) -> None:
        """Join these multicast groups.  Hyper-V hosts keep no multicast list (they report
        OID_802_3_MAXIMUM_LIST_SIZE 0 and the reference host refuses OID_802_3_MULTICAST_LIST),
        so, like the Linux driver, a non-empty list turns ALL_MULTICAST on and an empty one
        turns it off again (unless ``set_all_multicast(True)``); frames are not filtered by
        group.  Each address must be a multicast MAC (lowest bit of the first octet set)."""
        macs = []
        for a in addresses:
            m = _parse_mac(a)
            if not m[0] & 1:
                raise ConfigError(f"{_mac_text(m)} is not a multicast address (the first octet's "
                                  "lowest bit must be set, e.g. 01:00:5e:00:00:01)")
            if m not in macs:
                macs.append(m)
        self._multicast = macs
        self._apply_filter()

    def set_mac(self, mac: str | bytes) -> None:
        """Change the NIC's MAC address the way Linux does (SET OID_GEN_RNDIS_CONFIG_PARAMETER
        "NetworkAddress" = 12 hex digits), then check OID_802_3_CURRENT_ADDRESS.  Raises
        :class:`MacChangeRefused` when the host refuses it or keeps the old address (Hyper-V
        needs MAC address spoofing allowed for the VM's adapter; the reference host, OpenVMM,
        accepts the parameter and ignores it)."""
        m = _parse_mac(mac)
        if m[0] & 1 or m == bytes(6):
            raise ConfigError(f"{_mac_text(m)} cannot be a NIC address: use a unicast, non-zero "
                              "MAC (first octet's lowest bit clear, e.g. 02:00:00:00:00:01)")
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        self._send_mac(m)
        self._mac_wanted = None if m == self.permanent_mac else m

    def _send_mac(self, m: bytes) -> None:
        try:
            self.set(P.OID_GEN_RNDIS_CONFIG_PARAMETER, P.mac_config_parameter(m))
        except RequestFailed as exc:
            raise MacChangeRefused(
                f"the host refused MAC address {_mac_text(m)} (RNDIS status {exc.status or 0:#x}): on "
                "Hyper-V allow MAC address spoofing for this VM's network adapter "
                "(Set-VMNetworkAdapter -MacAddressSpoofing On), or keep the address the host "
                f"assigned ({_mac_text(self.permanent_mac)})", status=exc.status) from None
        try:
            current = bytes(self.query(P.OID_802_3_CURRENT_ADDRESS)[:6])
        except RequestFailed:
            current = m          # a host without CURRENT_ADDRESS: trust the SET's success
        if current != m:
            raise MacChangeRefused(
                f"the host accepted MAC address {_mac_text(m)} but still reports "
                f"{_mac_text(current)} as the current address (it does not apply NetworkAddress; "
                "OpenVMM-based hosts never do): frames from the new address would not be "
                "delivered — keep the assigned address")
        self.mac_bytes = m

    def host_stats(self) -> dict[str, int | None]:
        """The host's own counters (OID_GEN_XMIT_OK, RCV_OK, ..., OID_802_3 error counters),
        by name (``protocol.STATS_OIDS``); None where the host does not answer that OID (the
        reference host answers only the three OID_802_3 counters, with 0)."""
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        out: dict[str, int | None] = {}
        for name, oid in P.STATS_OIDS.items():
            try:
                data = self.query(oid)
            except RequestFailed:
                out[name] = None
                continue
            if len(data) >= 8:
                out[name] = int(struct.unpack_from("<Q", data)[0])
            elif len(data) >= 4:
                out[name] = int(struct.unpack_from("<I", data)[0])
            else:
                raise ProtocolError(f"host answered statistics OID {oid:#010x} with {len(data)} bytes")
        return out

    def set_mtu(self, mtu: int) -> None:
        """Change the MTU: a full NVSP/RNDIS re-initialisation, as Linux does (§3); see
        :meth:`set_queues` for what happens to queues and on failure."""
        if not 68 <= mtu <= 9202:
            raise ConfigError(f"MTU {mtu}: this NIC accepts 68..9202")
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        self._reinit("set_mtu", mtu=mtu)

    def set_queues(self, queues: int, *, timeout: float | None = None) -> int:
        """Change the number of queues while running; returns how many the NIC now has.

        A full re-initialisation, as Linux (``netvsc_set_channels``) and DPDK
        (``hn_dev_configure``) do it, because a host takes one SUBCHANNEL request per NVSP
        session: stop the queues (packet filter 0, every send completion collected), RNDIS
        HALT, REVOKE_RECV_BUF / REVOKE_SEND_BUF, close the sub-channels and the primary
        channel; then open it again and redo NVSP + RNDIS bring-up with the new count (the
        sub-channel request, the RSS indirection table ``i % queues``).  MAC address, receive
        filter and MTU are kept; the GPADLs of the receive/send buffers stay (the kernel owns
        them).  Frames in flight during the change are lost, as on Linux.

        Every :class:`Queue` obtained before raises :class:`~uvmbus.errors.QueueInvalidated`
        from then on: get them again with :meth:`queue`.  Queues attached in other processes
        (:func:`attach_queue`) are told through the lease file: their next call raises
        ``QueueInvalidated`` and closes them; this waits (up to ``timeout``, default the NIC's)
        until they let go, else raises :class:`~uvmbus.errors.DeviceBusy` with the NIC
        unchanged (those queues stay invalid).

        More than the host offers (its RSS capabilities, or NVSP < 5: one queue) is refused
        before anything changes (:class:`~uvmbus.errors.ConfigError`), as Linux and DPDK do.
        A host that grants fewer sub-channels at re-initialisation gives fewer queues (the
        return value), as on Linux.  If the re-initialisation fails, the NIC is brought up
        again with its previous settings (Linux's rollback) and
        :class:`~uvmbus.errors.ReinitFailed` is raised with ``usable=True``; if that fails
        too, the NIC is closed (``usable=False``)."""
        if not 1 <= queues <= MAX_QUEUES:
            raise ConfigError(f"queues must be 1..{MAX_QUEUES}, not {queues}")
        if self.closed:
            raise NetError(f"NIC {self.device_ref} is closed")
        if queues > 1 and self.nvsp_version < P.NVSP_V5:
            raise ConfigError(f"{queues} queues: NVSP {P.VERSION_NAMES.get(self.nvsp_version)} has no "
                              "sub-channels (NVSP 5 or later is needed); this NIC has one queue")
        if queues > self.rss_queues_offered:
            raise ConfigError(f"{queues} queues: the host offers at most {self.rss_queues_offered} "
                              "(OID_GEN_RECEIVE_SCALE_CAPABILITIES); nothing was changed")
        self._reinit("set_queues", queues=queues, timeout=timeout)
        if len(self.queues) < queues:
            log.warning("netvsc %s: %d queue(s) asked, the host granted %d", self.device_ref, queues,
                        len(self.queues))
        return len(self.queues)

    # ==== re-initialisation ====================================================================
    def _invalidate(self, reason: str) -> None:
        """Every queue handed out so far is void from now on (local and attached)."""
        self.generation += 1
        if self._lease is not None:
            self._lease.set_generation(self.generation, reason)
        why = {"set_queues": "its NIC changed its number of queues (set_queues)",
               "set_mtu": "its NIC changed its MTU (set_mtu)", "close": "its NIC was closed"}[reason]
        for q in self.queues:
            q.invalid_reason = (f"queue {q.index}: {why}; get the queue again with nic.queue({q.index})"
                                if reason != "close" else f"queue {q.index}: {why}")

    def _release_exports(self, reason: str, timeout: float) -> None:
        """Invalidate every queue and wait until no other process has one attached."""
        self._invalidate(reason)
        lease = self._lease
        if lease is None:
            return
        if not lease.wait_released(timeout):
            held = ", ".join(f"queue {k} in pid {pid}" for k, pid in sorted(lease.holders().items()))
            raise DeviceBusy(f"{reason}: {held or 'a queue'} is still attached in another process "
                             f"after {timeout:.1f} s (its next call raises QueueInvalidated and closes "
                             f"it; a process that never calls it must close it): nothing was changed, "
                             f"exported queues stay invalid; try again once they are closed")

    def _reinit(self, reason: str, *, queues: int | None = None, mtu: int | None = None,
                timeout: float | None = None) -> None:
        from uvmbus.bus.lock import hold_device

        self._release_exports(reason, self.timeout if timeout is None else timeout)
        old = (self.requested_queues, self._mtu_wanted)
        # keep the device's lock across close + re-open: no other process can slip in
        hold = hold_device(self.cd.device, what=reason) if self.lock_device else contextlib.nullcontext()
        with hold:
            self._teardown()
            if queues is not None:
                self.requested_queues = queues
            if mtu is not None:
                self._mtu_wanted = mtu
            try:
                self._bring_up()
                return
            except UvmbusError as exc:
                first = exc
            # Linux (netvsc_set_channels, netvsc_change_mtu): attach again with the old settings
            log.warning("netvsc %s: %s failed (%s); re-initialising with the previous settings",
                        self.device_ref, reason, first)
            self.requested_queues, self._mtu_wanted = old
            try:
                self._bring_up()
            except UvmbusError as exc:
                if self._lease is not None:         # nothing can attach to a closed NIC
                    self._lease.close()
                    self._lease = None
                raise ReinitFailed(f"{reason} failed: {first}; bringing the NIC up again with its previous "
                                   f"settings failed too ({exc}): the NIC is closed — open it again "
                                   "(uvmbus.netvsc.open)", usable=False) from exc
        raise ReinitFailed(f"{reason} failed: {first}; the NIC was brought up again with its previous "
                           f"settings ({len(self.queues)} queue(s), MTU {self.mtu}) and is usable: get "
                           "its queues again with nic.queue(i)", usable=True) from first

    def export_queue(self, index: int) -> QueueSpec:
        """Hand queue ``index`` (≥ 1) to another process: this process stops using it."""
        if index == 0:
            raise ConfigError("queue 0 carries the control plane and stays with the Nic")
        q = self.queue(index)
        q._check()                   # exported or invalid already
        if self._lease is None:
            from uvmbus.netvsc.lease import Lease

            self._lease = Lease(self.device_id)
            self._lease.set_generation(self.generation, "")
        spec = QueueSpec(self.device_id, self.root, index, q.channel.relid, int(q.raw.section_first),
                         int(q.raw.section_count), self.section_size, self.max_pkt_per_msg, self.pkt_align,
                         self.max_xfer, self.mtu + 14, gpa=self.gpa_wanted, generation=self.generation,
                         lease=self._lease.path, lso4_max=int((self.lso_max or {}).get("ipv4", 0)),
                         lso6_max=int((self.lso_max or {}).get("ipv6", 0)), lso_min_segs=self.lso_min_segs)
        q.invalid_reason = f"queue {index} was exported to another process (export_queue)"
        q.close()
        # its bounce slots go back: the attaching process allocates its own (no sharing)
        if q._gpa is not None:
            region = q._gpa[0]
            q._gpa = None
            if region in self._gpa_regions:
                self._gpa_regions.remove(region)
            region.close()
        return spec

    # ==== teardown ==========================================================================
    def _teardown(self) -> None:
        if self.closed:
            return
        try:
            with self._lock:
                self.set(P.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0), timeout=2.0)
                self.packet_filter = 0
                self._drain(2.0)
                rid = next(self._req_ids)
                self._send_ctrl(P.rndis_halt(rid), _now() + 2.0)
                self._drain(2.0)
                self.nvsp_send(P.nvsp_revoke(P.MSG_REVOKE_RECV_BUF, P.RECV_BUF_ID))
                self.nvsp_send(P.nvsp_revoke(P.MSG_REVOKE_SEND_BUF, P.SEND_BUF_ID))
                self._await_host_read(2.0)
        except UvmbusError as exc:
            log.warning("netvsc %s: teardown incomplete (%s); closing anyway", self.device_ref, exc)
        finally:
            self._close_quietly()

    def _await_host_read(self, timeout: float) -> None:
        """Wait until the host has read everything on the primary channel (the revokes) before
        the channel is closed: a close travels by another path than the ring and could
        overtake them (DPDK lingers after its disconnect messages for the same reason).
        Polls the ring's read index: no signal."""
        ring = self._q0.raw.tx
        deadline = _now() + timeout
        while lib.uvb_out_free(ring) < ring.dsize - 8 and not ring.error:
            if _now() >= deadline:
                log.info("netvsc %s: the host did not read the revoke messages within %.1f s",
                         self.device_ref, timeout)
                return
            self._lock.release()
            try:
                time.sleep(0.001)
            finally:
                self._lock.acquire()

    def _drain(self, timeout: float) -> None:
        """Wait for every send completion; discard what is still being received."""
        deadline = _now() + timeout
        for q in self.queues:
            if q.closed:
                continue
            while True:
                if q is self._q0:
                    self._poll_q0()
                else:
                    q.reap()
                while lib.uvb_nvsc_rx_burst(q.raw, q._frames, MAX_BURST, ffi.NULL, 0) > 0:
                    lib.uvb_nvsc_rx_release(q.raw)
                lib.uvb_nvsc_rx_release(q.raw)
                if not q.tx_inflight or _now() >= deadline:
                    break
                self._lock.release()
                try:
                    q._sleep(0.02)
                finally:
                    self._lock.acquire()

    def _close_quietly(self) -> None:
        for q in getattr(self, "queues", []):
            q.close()
            if q.waiter is not self.cd.waiter:
                q.waiter.close()
        self.queues = []
        for r in getattr(self, "_gpa_regions", []):
            try:
                r.close()
            except UvmbusError:
                pass
        self._gpa_regions = []
        if getattr(self, "_dma", None) is not None:
            self._dma.close()
            self._dma = None
        if not self.closed:
            self.cd.close()
        self.closed = True

    def close(self) -> None:
        """Clean teardown: filter 0, drain, RNDIS HALT, revoke the buffers, close the channels.
        Queues attached in other processes are told first (their next call raises
        QueueInvalidated); closing waits up to 2 s for them to let go, then goes on."""
        try:
            if not self.closed:
                try:
                    self._release_exports("close", 2.0)
                except DeviceBusy as exc:
                    log.warning("netvsc %s: %s; closing anyway", self.device_ref, exc)
            self._teardown()
        finally:
            if self._lease is not None:
                self._lease.close()
                self._lease = None
            self._close_recorder()

    def __enter__(self) -> Nic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"mac {self.mac} mtu {self.mtu} queues {len(self.queues)}"
        return f"<Nic {self.device_ref} {state}>"


def open(device: str, root: str | os.PathLike[str] = "/", *, queues: int = 1, mtu: int = 1500,
         **options: Any) -> Nic:
    """Bring up the synthetic NIC ``device`` (GUID, prefix or "netvsc") bound to
    uio_hv_generic under ``root``.  Options: ``timeout``, ``strict`` (malformed host packets
    raise :class:`ProtocolError` instead of being dropped and counted), ``gpa`` (GPA-direct
    for frames larger than a send section: None = when DMA memory is available),
    ``versions``, ``hash_info``, ``spin_us``, ``sriov`` (default True: advertise SR-IOV from
    NVSP 5, as Linux, so the host announces its VF: :attr:`Nic.vf`), ``lock`` (default True:
    hold the device's lock while open, so another process opening it fails at once with
    :class:`~uvmbus.errors.DeviceBusy`; False for experts sharing the device on purpose),
    ``record`` (a ``*.pcapng`` path or a :class:`uvmbus.trace.Recorder`: record every VMBus
    packet of every channel, docs/trace.md), ``rsc`` (default False: ask the host to coalesce
    received TCP segments of a flow into frames up to 64 KiB, NVSP 6.1; ``Nic.rsc`` says
    whether it is in force; docs/netvsc.md "RSC")."""
    return Nic(device, root, queues=queues, mtu=mtu, **options)


class _AttachedQueue(Queue):
    """A queue driven by another process (:func:`attach_queue`): owns its mappings."""

    def __init__(self, spec: QueueSpec):
        from uvmbus.bus import Bus
        from uvmbus.netvsc.lease import LeaseHolder
        from uvmbus.ring import RingPair
        from uvmbus.uio import UioDevice, open_endpoint

        # first the lease: a spec from before a set_queues/set_mtu/close fails here, clearly
        self._lease = LeaseHolder(spec.lease, spec.generation, spec.index) if spec.lease else None
        bus = Bus(spec.root)
        try:
            dev = bus.device(spec.device_id)
            self._uio = UioDevice(bus, dev, lock=False)      # the owner process holds the lock
        except BaseException:
            if self._lease is not None:
                self._lease.close()
            raise
        try:
            info = next((c for c in dev.channels() if c.relid == spec.relid), None)
            if info is None or not info.ring_path:
                raise ConfigError(f"queue {spec.index}: sub-channel relid {spec.relid} has no ring file")
            fd = os.open(info.ring_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            ring_bytes = size // 2
            pair = RingPair.attach(mm, ring_bytes, self._uio.page_size, own=True,
                                   name=f"netvsc/{spec.relid}")
            ch = Channel(pair, relid=spec.relid, subchannel_id=info.subchannel_id or 0, monitor_id=info.monitor_id,
                         signal=self._uio.make_signal(spec.relid, info.monitor_id, subchannel=True),
                         name=f"netvsc/{spec.relid}")
            if not dev.uio_dev_path:
                raise ConfigError(f"{spec.device_id} is not bound to uio_hv_generic")
            waiter = DeviceWaiter(open_endpoint(dev.uio_dev_path), owns_endpoint=True)
            gpa = self._own_gpa(spec)
            super().__init__(spec.index, ch, waiter, self._uio.buffer("recv"), self._uio.buffer("send"),
                             section_size=spec.section_size, section_first=spec.section_first,
                             section_count=spec.section_count, max_pkt_per_msg=spec.max_pkt_per_msg,
                             pkt_align=spec.pkt_align, max_xfer=spec.max_xfer, max_frame=spec.max_frame,
                             gpa=gpa)
            # the owner's LSO limits, capped by what one send of this queue can hold (as the
            # owner's Nic._apply_lso does for its own queues)
            room = gpa[1] if gpa is not None else min(spec.section_size, spec.max_xfer or spec.section_size)
            room = min(room - TX_HEADROOM, LSO_FRAME_MAX)
            self.raw.lso4_max = max(0, min(spec.lso4_max, room))
            self.raw.lso6_max = max(0, min(spec.lso6_max, room))
            self.raw.lso_min_segs = spec.lso_min_segs
            self.poll_only = not self._uio.quirks.irqcontrol_all_channels
        except BaseException:
            self._free_gpa()
            self._uio.close()
            if self._lease is not None:
                self._lease.close()
            raise

    def _check(self) -> None:
        super()._check()
        lease = self._lease
        if lease is not None and not lease.valid():
            err = lease.error()
            self.invalid_reason = str(err)
            self.close()
            raise err

    def _sleep(self, timeout: float) -> bool:
        # wait in slices so that a re-initialisation by the owner is noticed within ~0.1 s
        # even while blocked here (the owner waits for this queue to let go)
        if self._lease is None:
            return super()._sleep(timeout)
        deadline = _now() + timeout
        while True:
            self._check()
            remaining = deadline - _now()
            if remaining <= 0:
                return False
            if super()._sleep(min(remaining, 0.1)):
                return True

    def _own_gpa(self, spec: QueueSpec) -> Any:
        """This process's own GPA-direct bounce slots when frames can exceed a send section:
        DMA memory allocated here (the simulator's guest RAM is shared by an allocation table
        with per-process ownership; hugepages are per process), so no slot or page is ever
        shared with the owner or another attached queue; the slots' transaction ids are
        per channel and this process owns the channel."""
        self._dma: Any = None
        lso = bool(spec.lso4_max or spec.lso6_max)
        if spec.gpa is False or not (lso or _needs_gpa(spec.max_frame, spec.section_size)):
            return None
        from uvmbus.dma import open_dma_memory
        frame = max(spec.max_frame, LSO_FRAME_MAX) if lso else spec.max_frame
        try:
            self._dma = open_dma_memory(spec.root)
            return _alloc_gpa(self._dma, frame, f"netvsc-q{spec.index}-pid{os.getpid()}",
                              LSO_GPA_SLOTS if lso else GPA_SLOTS)
        except UvmbusError as exc:
            self._free_gpa()
            if spec.gpa:
                raise ResourceError(f"queue {spec.index}: no DMA memory for frames larger than a "
                                    f"{spec.section_size}-byte send section in this process: {exc}") from exc
            log.warning("netvsc queue %d: no DMA memory in this process (%s): frames larger than a "
                        "send section will be refused", spec.index, exc)
            return None

    def _free_gpa(self) -> None:
        gpa, self._gpa = getattr(self, "_gpa", None), None
        if gpa is not None:
            gpa[0].close()
        dma, self._dma = getattr(self, "_dma", None), None
        if dma is not None:
            dma.close()

    def close(self) -> None:
        if self.closed:
            return
        if not self.channel.rx.dead:
            # the host may still read a bounce slot or a send section: collect the completions
            # before freeing them and before the owner may revoke the buffers
            deadline = _now() + 2.0
            while self.tx_inflight and _now() < deadline:
                if lib.uvb_nvsc_reap(self.raw) <= 0:
                    Queue._sleep(self, 0.02)
        super().close()
        self.waiter.close()
        self.channel.close()
        self._free_gpa()
        self._uio.close()
        if self._lease is not None:
            self._lease.close()         # last: the owner may tear the channels down now

    def __enter__(self) -> _AttachedQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_queue(spec: QueueSpec) -> Queue:
    """In another process: drive the queue described by ``spec`` (from
    :meth:`Nic.export_queue`) — its sub-channel ring file, the shared buffers, its own slice
    of send sections and its own endpoint file for interrupts.  Nothing is shared with the
    owning process but the memory the host also sees."""
    return _AttachedQueue(spec)


def _parse_mac(value: str | bytes) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise ConfigError(f"a MAC address has 6 bytes, not {len(value)}")
        return bytes(value)
    text = str(value).strip().lower().replace("-", ":")
    parts = text.split(":") if ":" in text else [text[i:i + 2] for i in range(0, len(text), 2)]
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"{value!r} is not a MAC address (expected e.g. 02:00:00:00:00:01)") from None


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


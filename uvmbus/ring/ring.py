"""Python face of the native ring fast path.

An :class:`OutRing` writes one direction of a VMBus channel ring, an
:class:`InRing` reads one.  Both wrap a ``struct uvb_ring`` (native/ring.h);
every index/mask access, copy and validation happens in C.  The API is
burst-oriented: put many packets then :meth:`OutRing.commit` once; read a
batch with :meth:`InRing.read` then :meth:`InRing.commit` once.  Commits return
whether the peer must be signalled (the ring protocol's transitions, §2.6);
signalling itself belongs to the channel layer.

:class:`RingPair` attaches both directions to a mapping laid out like uio map
0 or a sub-channel ``ring`` file: ``[TX header][TX data][RX header][RX data]``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from uvmbus.errors import ConfigError, RingCorrupt, WouldBlock
from uvmbus.native import buffer_pointer, errmsg, ffi, lib, release

PKT_INBAND = lib.VMBUS_PKT_INBAND
PKT_XFER_PAGES = lib.VMBUS_PKT_XFER_PAGES
PKT_GPA_DIRECT = lib.VMBUS_PKT_GPA_DIRECT
PKT_COMP = lib.VMBUS_PKT_COMP
FLAG_COMPLETION_REQUESTED = lib.VMBUS_PKT_FLAG_COMPLETION_REQUESTED

#: bytes a packet occupies in the ring besides its payload: descriptor + trailer (+ padding)
TRAILER = 8
DESCRIPTOR = 16


def packet_ring_bytes(payload_len: int, ext_len: int = 0) -> int:
    """Ring bytes used by a packet: descriptor + ext header + payload, 8-aligned, + trailer."""
    return ((DESCRIPTOR + ext_len + payload_len + 7) & ~7) + TRAILER


@dataclass(slots=True)
class Packet:
    """One packet copied out of a ring.

    ``payload`` is ``(len8 - offset8) * 8`` bytes (it includes the sender's
    padding; the inner protocol carries the true length).  ``header`` holds the
    type-specific extended header (transfer-page or GPA ranges), already
    validated against the packet size.
    """

    type: int
    flags: int
    trans_id: int
    payload: memoryview
    header: memoryview

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)


class PacketBatch:
    """Packets from one :meth:`InRing.read`, stored contiguously in one buffer.

    The views are valid until the next ``read`` on the same ring (the buffer is
    reused) unless the batch was read with ``copy=True``.
    """

    __slots__ = ("_buf", "_view", "_pkts", "count")

    def __init__(self, buf: Any, pkts: Any, count: int):
        self._buf = buf
        self._view = memoryview(buf)
        self._pkts = pkts
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Packet:
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(i)
        p = self._pkts[i]
        v = self._view
        return Packet(p.type, p.flags, p.trans_id,
                      v[p.data_offset:p.data_offset + p.data_len],
                      v[p.pkt_offset + DESCRIPTOR:p.data_offset])

    def __iter__(self) -> Iterator[Packet]:
        for i in range(self.count):
            yield self[i]

    def payloads(self) -> list[bytes]:
        """Every payload as bytes (copies)."""
        v = self._view
        return [bytes(v[p.data_offset:p.data_offset + p.data_len])
                for p in (self._pkts[i] for i in range(self.count))]

    @property
    def infos(self) -> Any:
        """The raw ``struct uvb_pkt[]`` array (for code that hands it to C)."""
        return self._pkts

    @property
    def buffer(self) -> Any:
        return self._buf


class _Ring:
    """Common part of both directions."""

    kind: int
    name: str
    _commit: Any

    def __init__(self, mem: Any, offset: int, ring_bytes: int, header_bytes: int, *, name: str = ""):
        if offset < 0 or ring_bytes <= 0:
            raise ConfigError(f"ring at offset {offset} with size {ring_bytes} is invalid")
        self._ptr = buffer_pointer(mem)
        if offset + ring_bytes > len(self._ptr):
            release(self._ptr)
            raise ConfigError(
                f"ring [{offset:#x}, {offset + ring_bytes:#x}) lies outside the {len(self._ptr):#x}-byte mapping"
            )
        self._mem = mem
        self.name = name or ("tx" if self.kind == lib.UVB_RING_OUT else "rx")
        self.ring_bytes = ring_bytes
        self.header_bytes = header_bytes
        self._r = ffi.new("struct uvb_ring *")
        rc = lib.uvb_ring_attach(self._r, self._ptr + offset, ring_bytes, header_bytes, self.kind)
        if rc == lib.UVB_ECORRUPT:
            msg = errmsg(self._r)
            release(self._ptr)
            raise RingCorrupt(msg, channel=self.name)
        if rc:
            msg = errmsg(self._r)
            release(self._ptr)
            raise ConfigError(f"{self.name}: {msg}")
        self.header = self._ptr + offset  # header page (uint8_t *)

    # -- state ------------------------------------------------------------
    @property
    def raw(self) -> Any:
        """The ``struct uvb_ring *`` for C fast paths (netvsc/storvsc/host)."""
        return self._r

    @property
    def data_size(self) -> int:
        return int(self._r.dsize)

    @property
    def dead(self) -> bool:
        return self._r.error != 0

    @property
    def error_message(self) -> str:
        return errmsg(self._r) if self._r.error else ""

    def _fail(self, rc: int) -> None:
        """Raise the exception for a negative native return code."""
        if rc == lib.UVB_ECORRUPT:
            raise RingCorrupt(errmsg(self._r), channel=self.name)
        if rc == lib.UVB_EAGAIN:
            raise WouldBlock("ring full", channel=self.name)
        if rc == lib.UVB_EINVAL:
            raise ConfigError(f"{self.name}: invalid request (packet too large for the ring, or bad arguments)")
        raise RingCorrupt(ffi.string(lib.uvb_strerror(rc)).decode(), channel=self.name)

    def _put_result(self, rc: int) -> bool:
        """A put's return code: True queued, False ring full (would block), else raise."""
        if rc == 0:
            return True
        if rc == lib.UVB_EAGAIN:
            return False
        self._fail(rc)
        return False

    def commit(self) -> bool:
        """Publish (the write index of an OutRing, the read index of an InRing). True when
        the peer must be signalled: the reader after a write, a blocked writer after a read."""
        rc = self._commit(self._r)
        if rc < 0:
            self._fail(rc)
        return rc == 1

    def stats(self) -> dict[str, int]:
        r = self._r
        return {"packets": r.packets, "bytes": r.bytes, "commits": r.commits,
                "signals": r.signals, "full": r.full}

    def control(self) -> dict[str, int]:
        """Snapshot of the shared control fields (for diagnostics and tests)."""
        h = self.header
        return {name: lib.uvb_ring_load(h, i) for i, name in enumerate(
            ("write_index", "read_index", "interrupt_mask", "pending_send_sz", "feature_bits"))}

    def close(self) -> None:
        if self._ptr is not None:
            release(self._ptr)
            self._ptr = None
            self._mem = None


class OutRing(_Ring):
    """The writing side of one ring direction."""

    kind = lib.UVB_RING_OUT

    def __init__(self, mem: Any, offset: int, ring_bytes: int, header_bytes: int, *, name: str = ""):
        super().__init__(mem, offset, ring_bytes, header_bytes, name=name)
        self._burst = lib.uvb_out_inband_burst
        self._inband = lib.uvb_out_inband
        self._commit = lib.uvb_out_commit
        self._iov = ffi.new("struct uvb_iov[]", 16)

    @property
    def free(self) -> int:
        """Largest packet (ring bytes incl. trailer) that can be written right now.

        Raises :class:`RingCorrupt` on a dead ring (C returns 0 there, which would
        look like "full" forever to a caller waiting for space)."""
        f = int(lib.uvb_out_free(self._r))
        if self._r.error:
            self._fail(self._r.error)
        return f

    @property
    def max_payload(self) -> int:
        return int(lib.uvb_out_max_payload(self._r, 0))

    def put(self, payload: Any, *, trans_id: int = 0, flags: int = 0, type: int = PKT_INBAND) -> bool:
        """Queue one in-band (or completion) packet. False when the ring is full."""
        rc = self._inband(self._r, type, flags, trans_id, ffi.from_buffer(payload), len(payload))
        return self._put_result(rc)

    def put_completion(self, payload: Any, trans_id: int) -> bool:
        return self.put(payload, trans_id=trans_id, type=PKT_COMP)

    def put_burst(self, buf: Any, lengths: Any, *, trans_ids: Any = None, tid_base: int = 0,
                  flags: int = 0, type: int = PKT_INBAND) -> int:
        """Queue many in-band packets whose payloads lie back to back in ``buf``.

        ``lengths`` is an ``array('I')`` (or any uint32 buffer) of payload sizes;
        ``trans_ids`` an optional ``array('Q')``, else ids are ``tid_base + i``.
        Returns how many were queued (fewer than asked when the ring filled).
        """
        n = len(lengths)
        lens = ffi.from_buffer("uint32_t[]", lengths)
        tids = ffi.NULL if trans_ids is None else ffi.from_buffer("uint64_t[]", trans_ids)
        rc = self._burst(self._r, type, flags, ffi.from_buffer(buf), lens, tids, tid_base, n)
        if rc < 0:
            self._fail(rc)
        return rc

    def put_gather(self, parts: Sequence[Any], *, trans_id: int = 0, flags: int = 0,
                   type: int = PKT_INBAND, ext: bytes = b"") -> bool:
        """Queue one packet whose payload is the concatenation of ``parts`` (gather)."""
        iov, keep = self._iovs(parts)
        extp = ffi.from_buffer(ext) if ext else ffi.NULL
        rc = lib.uvb_out_put(self._r, type, flags, trans_id, extp, len(ext), iov, len(parts))
        del keep
        return self._put_result(rc)

    def put_gpa_direct(self, ranges: Sequence[tuple[int, int, Sequence[int]]], parts: Sequence[Any] | Any,
                       *, trans_id: int = 0, flags: int = FLAG_COMPLETION_REQUESTED) -> bool:
        """Queue a GPA-direct packet (type 9).

        ``ranges`` is a list of ``(byte_count, byte_offset, pfns)``; pfns are
        Hyper-V 4 KiB page numbers, ``ceil((offset + count) / 4096)`` of them.
        ``parts`` is the in-band payload (bytes-like or list of them).
        """
        if not isinstance(parts, (list, tuple)):
            parts = [parts]
        g = ffi.new("struct uvb_gpa[]", len(ranges))
        pfns: list[int] = []
        for i, (count, offset, pf) in enumerate(ranges):
            g[i].byte_count = count
            g[i].byte_offset = offset
            pfns.extend(pf)
        pf_arr = ffi.new("uint64_t[]", pfns)
        iov, keep = self._iovs(parts)
        rc = lib.uvb_out_gpa_direct(self._r, flags, trans_id, g, len(ranges), pf_arr, len(pfns), iov, len(parts))
        del keep
        return self._put_result(rc)

    def put_xfer_pages(self, pageset_id: int, ranges: Sequence[tuple[int, int]], payload: Any, *,
                       trans_id: int = 0, flags: int = FLAG_COMPLETION_REQUESTED,
                       sender_owns: bool = False) -> bool:
        """Queue a transfer-page packet (type 7): ``ranges`` = ``[(byte_count, byte_offset)]``."""
        rg = ffi.new("struct vmtransfer_page_range[]", len(ranges))
        for i, (count, offset) in enumerate(ranges):
            rg[i].byte_count = count
            rg[i].byte_offset = offset
        rc = lib.uvb_out_xfer_pages(self._r, flags, trans_id, pageset_id, 1 if sender_owns else 0,
                                    rg, len(ranges), ffi.from_buffer(payload), len(payload))
        return self._put_result(rc)

    def rollback(self) -> None:
        """Forget packets queued since the last commit."""
        lib.uvb_out_rollback(self._r)

    def send(self, payload: Any, *, trans_id: int = 0, flags: int = 0, type: int = PKT_INBAND) -> bool:
        """Put one packet and commit it (one call per packet). Raises WouldBlock when full."""
        rc = self._inband(self._r, type, flags, trans_id, ffi.from_buffer(payload), len(payload))
        if rc:
            self._fail(rc)
        rc = self._commit(self._r)
        if rc < 0:
            self._fail(rc)
        return rc == 1

    def want_space(self, nbytes: int) -> bool:
        """Ask the reader to signal when ``nbytes`` ring bytes are free (pending_send_sz).

        Returns True if the space is already there (nothing was requested)."""
        rc = lib.uvb_out_want_space(self._r, nbytes)
        if rc < 0:
            self._fail(rc)
        return rc == 1

    def clear_want(self) -> None:
        lib.uvb_out_clear_want(self._r)

    def reset_pending(self) -> None:
        """Clear ``pending_send_sz`` unconditionally (e.g. a stale value left by a
        previous user of the ring)."""
        lib.uvb_ring_store(self.header, 3, 0)
        self._r.pending_wanted = 0

    def _iovs(self, parts: Sequence[Any]) -> tuple[Any, list[Any]]:
        n = len(parts)
        iov = self._iov if n <= 16 else ffi.new("struct uvb_iov[]", n)
        keep = []
        for i, p in enumerate(parts):
            c = ffi.from_buffer(p)
            keep.append(c)
            iov[i].base = c
            iov[i].len = len(p)
        return iov, keep


class InRing(_Ring):
    """The reading side of one ring direction."""

    kind = lib.UVB_RING_IN

    def __init__(self, mem: Any, offset: int, ring_bytes: int, header_bytes: int, *, name: str = "",
                 scratch: int = 0, max_burst: int = 1024):
        super().__init__(mem, offset, ring_bytes, header_bytes, name=name)
        # The scratch buffer must hold at least the largest possible packet.
        size = max(scratch, min(self.data_size, 1 << 20), 65536)
        self._scratch = bytearray(size)
        self._sp = ffi.from_buffer("uint8_t[]", self._scratch)
        self._pkts = ffi.new("struct uvb_pkt[]", max_burst)
        self._max_burst = max_burst
        self._read = lib.uvb_in_read
        self._commit = lib.uvb_in_commit
        self.signal_pending = False

    @property
    def avail(self) -> int:
        """Bytes published by the writer and not yet read (packets + trailers)."""
        rc = lib.uvb_in_avail(self._r)
        if rc < 0:
            self._fail(rc)
        return rc

    @property
    def empty(self) -> bool:
        return self.avail == 0

    def peek(self) -> tuple[int, int, int, int] | None:
        """``(type, flags, trans_id, payload_len)`` of the next packet, or None."""
        p = ffi.new("struct uvb_pkt *")
        rc = lib.uvb_in_peek(self._r, p)
        if rc < 0:
            self._fail(rc)
        if rc == 0:
            return None
        return (p.type, p.flags, p.trans_id, p.data_len)

    def read(self, max_packets: int | None = None, *, copy: bool = False) -> PacketBatch:
        """Copy up to ``max_packets`` packets out (validated) and advance the private cursor.

        Call :meth:`commit` to publish the read index.  The batch views a reused
        buffer unless ``copy`` is true.
        """
        n = self._max_burst if max_packets is None else min(max_packets, self._max_burst)
        rc = self._read(self._r, self._sp, len(self._scratch), self._pkts, n)
        if rc < 0:
            if rc == lib.UVB_ENOBUFS:
                self._grow()
                return self.read(max_packets, copy=copy)
            self._fail(rc)
        if copy:
            used = 0
            if rc:
                last = self._pkts[rc - 1]
                used = last.pkt_offset + last.pkt_len
            pk = ffi.new("struct uvb_pkt[]", max(rc, 1))
            ffi.memmove(pk, self._pkts, ffi.sizeof("struct uvb_pkt") * rc)
            return PacketBatch(bytes(self._scratch[:used]), pk, rc)
        return PacketBatch(self._scratch, self._pkts, rc)

    def read_into(self, buf: Any, pkts: Any, max_packets: int) -> int:
        """Batch read into caller-owned storage: ``buf`` (writable buffer) and
        ``pkts`` (a ``struct uvb_pkt[]``). Returns the number of packets."""
        rc = self._read(self._r, ffi.from_buffer(buf), len(buf), pkts, max_packets)
        if rc == lib.UVB_ENOBUFS:
            raise ConfigError(f"{self.name}: the next packet needs {int(pkts[0].pkt_len)} bytes, "
                              f"the buffer has {len(buf)}")
        if rc < 0:
            self._fail(rc)
        return rc

    def read_one(self) -> Packet | None:
        """One packet (copied), or None when empty. Does not commit."""
        b = self.read(1)
        if not b.count:
            return None
        p = b[0]
        return Packet(p.type, p.flags, p.trans_id, memoryview(bytes(p.payload)), memoryview(bytes(p.header)))

    def recv(self) -> Packet | None:
        """Read one packet and publish the read index (one call per packet).

        If the writer must be signalled, :attr:`signal_pending` becomes True."""
        p = self.read_one()
        if p is not None and self.commit():
            self.signal_pending = True
        return p

    def rollback(self) -> None:
        lib.uvb_in_rollback(self._r)

    @property
    def masked(self) -> bool:
        return bool(lib.uvb_in_mask(self._r))

    def mask(self) -> None:
        """Tell the writer not to interrupt us (we are polling / draining)."""
        lib.uvb_in_set_mask(self._r, 1)

    def arm(self) -> bool:
        """Unmask interrupts, then re-check: True means data arrived, do not sleep.

        Reads must be committed first."""
        rc = lib.uvb_in_arm(self._r)
        if rc < 0:
            if rc == lib.UVB_EINVAL:
                raise ConfigError(f"{self.name}: commit reads before arming the interrupt")
            self._fail(rc)
        return rc == 1

    def _grow(self) -> None:
        need = int(self._pkts[0].pkt_len)
        self._scratch = bytearray(max(need, 2 * len(self._scratch)))
        self._sp = ffi.from_buffer("uint8_t[]", self._scratch)


class RingPair:
    """Both directions of one channel ring, as seen by the guest or by the host.

    ``mem`` is laid out ``[TX header][TX data][RX header][RX data]`` starting at
    ``offset``; each direction is ``ring_bytes`` long with a ``header_bytes``
    header page (the guest page size).  The guest writes TX and reads RX; the
    host (``role="host"``) writes RX and reads TX.
    """

    def __init__(self, tx: OutRing, rx: InRing, *, mapping: Any = None):
        self.out = tx
        self.inp = rx
        self._mapping = mapping  # closed with the pair when owned

    @classmethod
    def attach(cls, mem: Any, ring_bytes: int, header_bytes: int, *, role: str = "guest",
               offset: int = 0, name: str = "", own: bool = False) -> RingPair:
        """Attach to ``mem``; with ``own=True`` closing the pair also closes ``mem`` (an mmap)."""
        if role not in ("guest", "host"):
            raise ConfigError(f"role must be 'guest' or 'host', not {role!r}")
        first, second = offset, offset + ring_bytes
        prefix = f"{name} " if name else ""
        if role == "guest":
            out = OutRing(mem, first, ring_bytes, header_bytes, name=f"{prefix}tx")
            inp = InRing(mem, second, ring_bytes, header_bytes, name=f"{prefix}rx")
        else:
            out = OutRing(mem, second, ring_bytes, header_bytes, name=f"{prefix}rx(host)")
            inp = InRing(mem, first, ring_bytes, header_bytes, name=f"{prefix}tx(host)")
        return cls(out, inp, mapping=mem if own else None)

    @classmethod
    def open_file(cls, path: str | os.PathLike[str], *, header_bytes: int | None = None,
                  ring_bytes: int | None = None, role: str = "guest", name: str = "") -> RingPair:
        """Map a ring file (e.g. ``channels/<relid>/ring``) and attach to it.

        The per-direction size defaults to half the file size (fstat), the header
        page to the system page size."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            rb = ring_bytes if ring_bytes is not None else size // 2
            if rb <= 0 or 2 * rb > size:
                raise ConfigError(f"{path}: {size} bytes cannot hold two {rb}-byte rings")
            mm = mmap.mmap(fd, 2 * rb, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            return cls.attach(mm, rb, header_bytes or mmap.PAGESIZE, role=role, name=name, own=True)
        except BaseException:
            mm.close()
            raise

    @staticmethod
    def init_memory(mem: Any, ring_bytes: int, *, offset: int = 0) -> None:
        """Do what the kernel does at channel open: zero indices, set feature bits.

        For owners of fresh memory only (the simulated host, tests)."""
        p = buffer_pointer(mem)
        try:
            lib.uvb_ring_reset(p + offset)
            lib.uvb_ring_reset(p + offset + ring_bytes)
        finally:
            release(p)

    @classmethod
    def create_file(cls, path: str | os.PathLike[str], ring_bytes: int) -> None:
        """Create a zeroed ring file of two ``ring_bytes`` directions with fresh headers."""
        with open(path, "wb") as f:
            f.truncate(2 * ring_bytes)
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 2 * ring_bytes)
            try:
                cls.init_memory(mm, ring_bytes)
            finally:
                mm.close()

    def close(self) -> None:
        self.out.close()
        self.inp.close()
        if isinstance(self._mapping, mmap.mmap):
            try:
                self._mapping.close()
            except BufferError:
                pass
        self._mapping = None

    def __enter__(self) -> RingPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

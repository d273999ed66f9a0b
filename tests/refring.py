"""Independent pure-Python reference implementation of one VMBus ring direction.

Written only from the protocol text (../shared/reference/uio_vmbus.md §2 and §3), never from
``native/ring.c``, so that differential tests between the two can catch a misunderstanding that
is not shared.  Deliberately simple and slow: every shared-memory access goes through
``struct`` on a writable buffer (memoryview, bytearray or mmap).

Layout of one direction (§2.1, §2.2)::

    [0, header_size)                 header: write_index@0, read_index@4, interrupt_mask@8,
                                     pending_send_sz@12, feature_bits@64 (bit 0 =
                                     feat_pending_send_sz)
    [header_size, header_size+dsize) data area, dsize = ring bytes - header_size

Every packet occupies ``len8*8`` bytes followed by an 8-byte trailer ``start_index << 32``
(§2.3); all of it may wrap at the end of the data area.  The ring is never filled completely:
a write of ``total`` bytes (packet + trailer) needs ``bytes_to_write > total`` (strictly).

Semantics mirror the native API: each side keeps a *private* cursor; ``put_*``/``read`` move
only the cursor, ``commit`` publishes it and answers "signal the peer?" per §2.6.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

# --- constants from §2.1 / §3.1 -------------------------------------------------------------

OFF_WRITE_INDEX = 0
OFF_READ_INDEX = 4
OFF_INTERRUPT_MASK = 8
OFF_PENDING_SEND_SZ = 12
OFF_FEATURE_BITS = 64
FEAT_PENDING_SEND_SZ = 1

DESC_SIZE = 16
TRAILER_SIZE = 8
HV_PAGE = 4096
MAX_LEN8 = 0xFFFF

PKT_DATA_INBAND = 6
PKT_DATA_USING_XFER_PAGES = 7
PKT_DATA_USING_GPA_DIRECT = 9
PKT_COMP = 11
KNOWN_TYPES = frozenset({PKT_DATA_INBAND, PKT_DATA_USING_XFER_PAGES,
                         PKT_DATA_USING_GPA_DIRECT, PKT_COMP})
FLAG_COMPLETION_REQUESTED = 1

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class RefRingCorrupt(Exception):
    """The peer broke the ring protocol; the message names the offending field."""


class RefRingDead(RefRingCorrupt):
    """Raised by every call after a corruption was detected."""


def _round8(n: int) -> int:
    return (n + 7) & ~7


def bytes_to_read(w: int, r: int, dsize: int) -> int:
    """§2.3: bytes published and not yet consumed (0 = empty)."""
    return w - r if w >= r else dsize - r + w


def bytes_to_write(w: int, r: int, dsize: int) -> int:
    """§2.3: free bytes (= dsize - bytes_to_read)."""
    return dsize - (w - r) if w >= r else r - w


def idx_add(i: int, n: int, dsize: int) -> int:
    """§2.3: single-wrap index advance."""
    return i + n - dsize if i + n >= dsize else i + n


def gpa_pfn_count(byte_count: int, byte_offset: int) -> int:
    """§3.4: n = ceil((byte_offset + byte_count) / 4096)."""
    return (byte_offset + byte_count + HV_PAGE - 1) // HV_PAGE


def packet_ring_bytes(ext_len: int, payload_len: int) -> int:
    """Ring bytes (incl. trailer) a packet with this ext header and payload consumes."""
    return DESC_SIZE + _round8(ext_len) + _round8(payload_len) + TRAILER_SIZE


# --- packets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpaRange:
    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]


@dataclass(frozen=True)
class RefPacket:
    """One packet as read from (or destined to) the ring.  ``payload`` includes padding."""

    type: int
    flags: int
    trans_id: int
    offset8: int
    len8: int
    ext: bytes                      # bytes [16, offset8*8): type-specific extended header
    payload: bytes                  # bytes [offset8*8, len8*8)
    xfer_pageset_id: int | None = None
    xfer_sender_owns: int | None = None
    xfer_ranges: tuple[tuple[int, int], ...] = ()      # (byte_count, byte_offset)
    gpa_ranges: tuple[GpaRange, ...] = ()
    start_index: int = 0            # data-area offset of the descriptor (informational)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def build_packet(ptype: int, flags: int, trans_id: int, ext: bytes, payload: bytes) -> bytes:
    """Descriptor + 8-aligned ext header + payload + zero padding (no trailer)."""
    ext_p = ext + b"\0" * (_round8(len(ext)) - len(ext))
    pay_p = payload + b"\0" * (_round8(len(payload)) - len(payload))
    offset8 = (DESC_SIZE + len(ext_p)) // 8
    len8 = offset8 + len(pay_p) // 8
    if len8 > MAX_LEN8:
        raise ValueError(f"packet of {len8 * 8} bytes exceeds len8 max {MAX_LEN8}")
    if not 0 <= trans_id <= _U64:
        raise ValueError("trans_id must be a u64")
    desc = struct.pack("<HHHHQ", ptype, offset8, len8, flags, trans_id)
    return desc + ext_p + pay_p


def xfer_ext(pageset_id: int, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...],
             sender_owns: int = 0) -> bytes:
    """§3.3 header after the descriptor: id, sender_owns_set, reserved, range_cnt, ranges."""
    out = struct.pack("<HBBI", pageset_id, sender_owns, 0, len(ranges))
    for count, off in ranges:
        out += struct.pack("<II", count, off)
    return out


def gpa_ext(ranges: list[GpaRange] | tuple[GpaRange, ...]) -> bytes:
    """§3.4 header after the descriptor: reserved, range_count, {count, offset, pfn[n]}."""
    if not ranges:
        raise ValueError("a GPA-direct packet needs at least one range")
    out = struct.pack("<II", 0, len(ranges))
    for r in ranges:
        if r.byte_count == 0 or not 0 <= r.byte_offset < HV_PAGE:
            raise ValueError(f"bad GPA range {r}")
        if len(r.pfns) != gpa_pfn_count(r.byte_count, r.byte_offset):
            raise ValueError(f"GPA range {r} needs {gpa_pfn_count(r.byte_count, r.byte_offset)} PFNs")
        out += struct.pack("<II", r.byte_count, r.byte_offset)
        out += b"".join(struct.pack("<Q", p) for p in r.pfns)
    return out


def parse_packet(raw: bytes, start_index: int = 0) -> RefPacket:
    """Validate and decode one packet (``raw`` = exactly ``len8*8`` private bytes, §3.5)."""
    ptype, offset8, len8, flags, trans_id = struct.unpack_from("<HHHHQ", raw, 0)
    if len(raw) != len8 * 8:
        raise RefRingCorrupt("internal: raw length does not match len8")
    hlen = offset8 * 8
    ext = raw[DESC_SIZE:hlen]
    payload = raw[hlen:]
    if ptype == PKT_DATA_USING_XFER_PAGES:
        if hlen < 24:
            raise RefRingCorrupt(f"transfer-page packet offset8 {offset8} too small for its header")
        pageset, owns, _res, cnt = struct.unpack_from("<HBBI", raw, 16)
        if 24 + 8 * cnt > hlen:
            raise RefRingCorrupt(
                f"transfer-page range count {cnt} does not fit header of offset8 {offset8}")
        ranges = tuple(struct.unpack_from("<II", raw, 24 + 8 * i) for i in range(cnt))
        return RefPacket(ptype, flags, trans_id, offset8, len8, ext, payload,
                         xfer_pageset_id=pageset, xfer_sender_owns=owns,
                         xfer_ranges=ranges, start_index=start_index)
    if ptype == PKT_DATA_USING_GPA_DIRECT:
        if hlen < 24:
            raise RefRingCorrupt(f"GPA-direct packet offset8 {offset8} too small for its header")
        _res, cnt = struct.unpack_from("<II", raw, 16)
        if cnt == 0:
            raise RefRingCorrupt("GPA-direct range count is 0")
        pos = 24
        granges = []
        for i in range(cnt):
            if pos + 8 > hlen:
                raise RefRingCorrupt(f"GPA range {i} of {cnt} does not fit header (offset8 {offset8})")
            bc, bo = struct.unpack_from("<II", raw, pos)
            if bc == 0:
                raise RefRingCorrupt(f"GPA range {i} has byte_count 0")
            if bo >= HV_PAGE:
                raise RefRingCorrupt(f"GPA range {i} byte_offset {bo} >= 4096")
            n = gpa_pfn_count(bc, bo)
            if pos + 8 + 8 * n > hlen:
                raise RefRingCorrupt(f"GPA range {i} needs {n} PFNs that do not fit header")
            pfns = struct.unpack_from(f"<{n}Q", raw, pos + 8)
            granges.append(GpaRange(bc, bo, tuple(pfns)))
            pos += 8 + 8 * n
        return RefPacket(ptype, flags, trans_id, offset8, len8, ext, payload,
                         gpa_ranges=tuple(granges), start_index=start_index)
    return RefPacket(ptype, flags, trans_id, offset8, len8, ext, payload,
                     start_index=start_index)


# --- shared header + data area ----------------------------------------------------------------

class RefRing:
    """One ring direction over a writable buffer of ``header_size + dsize`` bytes."""

    def __init__(self, buf: Any, header_size: int = 4096) -> None:
        self.mem = memoryview(buf).cast("B")
        if self.mem.readonly:
            raise ValueError("ring buffer must be writable")
        if header_size < 4096 or header_size % 4096:
            raise ValueError("header size must be a multiple of 4096")
        self.header_size = header_size
        self.dsize = len(self.mem) - header_size
        if self.dsize <= 0 or self.dsize % 8:
            raise ValueError(f"bad data area size {self.dsize}")

    # header fields (u32 little endian)
    def _get(self, off: int) -> int:
        return struct.unpack_from("<I", self.mem, off)[0]

    def _set(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.mem, off, value & _U32)

    write_index = property(lambda s: s._get(OFF_WRITE_INDEX),
                           lambda s, v: s._set(OFF_WRITE_INDEX, v))
    read_index = property(lambda s: s._get(OFF_READ_INDEX),
                          lambda s, v: s._set(OFF_READ_INDEX, v))
    interrupt_mask = property(lambda s: s._get(OFF_INTERRUPT_MASK),
                              lambda s, v: s._set(OFF_INTERRUPT_MASK, v))
    pending_send_sz = property(lambda s: s._get(OFF_PENDING_SEND_SZ),
                               lambda s, v: s._set(OFF_PENDING_SEND_SZ, v))
    feature_bits = property(lambda s: s._get(OFF_FEATURE_BITS),
                            lambda s, v: s._set(OFF_FEATURE_BITS, v))

    def check_index(self, value: int, name: str) -> int:
        """§2.2: indices are multiples of 8 and < dsize (peer-controlled values)."""
        if value >= self.dsize:
            raise RefRingCorrupt(f"{name} {value} >= data size {self.dsize}")
        if value % 8:
            raise RefRingCorrupt(f"{name} {value} is not 8-byte aligned")
        return value

    def copy_out(self, index: int, n: int) -> bytes:
        """Copy n bytes starting at data offset ``index`` (wrapping once)."""
        base = self.header_size
        first = min(n, self.dsize - index)
        out = bytes(self.mem[base + index: base + index + first])
        if first < n:
            out += bytes(self.mem[base: base + n - first])
        return out

    def copy_in(self, index: int, data: bytes) -> None:
        base = self.header_size
        n = len(data)
        first = min(n, self.dsize - index)
        self.mem[base + index: base + index + first] = data[:first]
        if first < n:
            self.mem[base: base + n - first] = data[first:]

    def reset(self, index: int = 0) -> None:
        """Test helper: empty ring with both indices at ``index`` (any 8-aligned offset)."""
        self.write_index = index
        self.read_index = index


class _Side:
    def __init__(self, ring: RefRing) -> None:
        self.ring = ring
        self.dead: str | None = None

    def _alive(self) -> None:
        if self.dead is not None:
            raise RefRingDead(f"ring is dead: {self.dead}")

    def _corrupt(self, exc: RefRingCorrupt) -> RefRingCorrupt:
        self.dead = str(exc)
        return exc


class RefWriter(_Side):
    """Producer side (§2.3 writes, §2.6 writer signalling)."""

    def __init__(self, ring: RefRing, *, set_feature: bool = True) -> None:
        super().__init__(ring)
        self.published = ring.check_index(ring.write_index, "write_index")
        self.cursor = self.published
        if set_feature:
            ring.feature_bits = ring.feature_bits | FEAT_PENDING_SEND_SZ

    def _peer_read_index(self) -> int:
        try:
            return self.ring.check_index(self.ring.read_index, "read_index")
        except RefRingCorrupt as exc:
            raise self._corrupt(exc) from None

    def free_bytes(self) -> int:
        """Free bytes as seen from the private cursor (a write needs strictly more)."""
        self._alive()
        return bytes_to_write(self.cursor, self._peer_read_index(), self.ring.dsize)

    def put_raw(self, packet: bytes) -> bool:
        """Write one built packet (see :func:`build_packet`) + trailer; False = would block."""
        self._alive()
        total = len(packet) + TRAILER_SIZE
        if len(packet) % 8 or len(packet) < DESC_SIZE:
            raise ValueError("packet must be >= 16 bytes and 8-aligned")
        r = self._peer_read_index()
        if bytes_to_write(self.cursor, r, self.ring.dsize) <= total:
            return False
        start = self.cursor
        self.ring.copy_in(start, packet)
        trailer_at = idx_add(start, len(packet), self.ring.dsize)
        self.ring.copy_in(trailer_at, struct.pack("<Q", start << 32))
        self.cursor = idx_add(start, total, self.ring.dsize)
        return True

    def put(self, ptype: int, payload: bytes = b"", *, trans_id: int = 0, flags: int = 0,
            ext: bytes = b"") -> bool:
        return self.put_raw(build_packet(ptype, flags, trans_id, ext, payload))

    def put_inband(self, payload: bytes, trans_id: int = 0, flags: int = 0) -> bool:
        return self.put(PKT_DATA_INBAND, payload, trans_id=trans_id, flags=flags)

    def put_completion(self, payload: bytes, trans_id: int) -> bool:
        return self.put(PKT_COMP, payload, trans_id=trans_id)

    def put_gpa_direct(self, ranges: list[GpaRange] | tuple[GpaRange, ...], payload: bytes,
                       trans_id: int, flags: int = FLAG_COMPLETION_REQUESTED) -> bool:
        return self.put(PKT_DATA_USING_GPA_DIRECT, payload, trans_id=trans_id, flags=flags,
                        ext=gpa_ext(ranges))

    def put_xfer_pages(self, pageset_id: int, ranges: list[tuple[int, int]], payload: bytes,
                       trans_id: int, flags: int = 0, sender_owns: int = 0) -> bool:
        return self.put(PKT_DATA_USING_XFER_PAGES, payload, trans_id=trans_id, flags=flags,
                        ext=xfer_ext(pageset_id, ranges, sender_owns))

    def pending_bytes(self) -> int:
        """Bytes written to the private cursor but not yet published."""
        return bytes_to_read(self.cursor, self.published, self.ring.dsize)

    def commit(self) -> bool:
        """Publish the cursor; True = signal the reader (§2.6 writer rule)."""
        self._alive()
        old = self.published
        if self.cursor == old:
            return False
        self.ring.write_index = self.cursor
        self.published = self.cursor
        if self.ring.interrupt_mask:
            return False
        return old == self.ring.read_index

    def want_space(self, nbytes: int) -> None:
        """Ask the reader to signal once more than ``nbytes`` are free (0 clears)."""
        self._alive()
        self.ring.pending_send_sz = nbytes


class RefReader(_Side):
    """Consumer side (§2.3/§2.4 reads, §3.5 validation, §2.6 reader signalling)."""

    def __init__(self, ring: RefRing) -> None:
        super().__init__(ring)
        self.published = ring.check_index(ring.read_index, "read_index")
        self.cursor = self.published

    def _peer_write_index(self) -> int:
        try:
            return self.ring.check_index(self.ring.write_index, "write_index")
        except RefRingCorrupt as exc:
            raise self._corrupt(exc) from None

    def available(self) -> int:
        self._alive()
        return bytes_to_read(self._peer_write_index(), self.cursor, self.ring.dsize)

    def read_one(self) -> RefPacket | None:
        """Copy, validate and consume (privately) one packet; None when empty."""
        self._alive()
        w = self._peer_write_index()
        avail = bytes_to_read(w, self.cursor, self.ring.dsize)
        if avail == 0:
            return None
        try:
            return self._read_at(avail)
        except RefRingCorrupt as exc:
            raise self._corrupt(exc) from None

    def _read_at(self, avail: int) -> RefPacket:
        dsize = self.ring.dsize
        if avail < DESC_SIZE + TRAILER_SIZE:
            raise RefRingCorrupt(
                f"only {avail} bytes published: less than a descriptor + trailer")
        desc = self.ring.copy_out(self.cursor, DESC_SIZE)
        ptype, offset8, len8, flags, _tid = struct.unpack("<HHHHQ", desc)
        # Validate the copied descriptor first (a length is needed to copy the rest) ...
        if offset8 < 2:
            raise RefRingCorrupt(f"offset8 {offset8} < 2")
        if len8 < offset8:
            raise RefRingCorrupt(f"len8 {len8} < offset8 {offset8}")
        if len8 * 8 + TRAILER_SIZE > avail:
            raise RefRingCorrupt(
                f"packet len8 {len8} ({len8 * 8}+8 bytes) exceeds the {avail} published bytes")
        # ... then copy the whole packet once and decode only from the private copy.
        raw = self.ring.copy_out(self.cursor, len8 * 8)
        ptype, offset8, len8, flags, _tid = struct.unpack_from("<HHHHQ", raw)
        if offset8 < 2 or len8 < offset8 or len8 * 8 + TRAILER_SIZE > avail:
            raise RefRingCorrupt(f"descriptor changed while reading (offset8 {offset8}, len8 {len8})")
        if flags & ~FLAG_COMPLETION_REQUESTED:
            raise RefRingCorrupt(f"unknown flags 0x{flags:x}")
        if ptype not in KNOWN_TYPES:
            raise RefRingCorrupt(f"unknown packet type {ptype}")
        pkt = parse_packet(raw, self.cursor)
        self.cursor = idx_add(self.cursor, len8 * 8 + TRAILER_SIZE, dsize)
        return pkt

    def read(self, max_packets: int | None = None) -> list[RefPacket]:
        out: list[RefPacket] = []
        while max_packets is None or len(out) < max_packets:
            p = self.read_one()
            if p is None:
                break
            out.append(p)
        return out

    def consumed_bytes(self) -> int:
        """Bytes consumed privately but not yet published."""
        return bytes_to_read(self.cursor, self.published, self.ring.dsize)

    def commit(self) -> bool:
        """Publish the read cursor; True = signal the writer (§2.6 reader rule)."""
        self._alive()
        bytes_read = self.consumed_bytes()
        self.ring.read_index = self.cursor
        self.published = self.cursor
        if not self.ring.feature_bits & FEAT_PENDING_SEND_SZ:
            return False
        pending = self.ring.pending_send_sz
        if pending == 0:
            return False
        w = self._peer_write_index()
        cur = bytes_to_write(w, self.cursor, self.ring.dsize)
        # u32 arithmetic as in the kernel: free space before this commit.
        if ((cur - bytes_read) & _U32) > pending:
            return False        # writer was not blocked
        if cur <= pending:
            return False        # still not enough ("exactly full" is not enough)
        return True

    def mask(self) -> None:
        self._alive()
        self.ring.interrupt_mask = 1

    def arm(self) -> bool:
        """Clear interrupt_mask; True = data already present (raced), process again."""
        self._alive()
        if self.cursor != self.published:
            raise RuntimeError("arm() with uncommitted reads")
        self.ring.interrupt_mask = 0
        return self.available() > 0

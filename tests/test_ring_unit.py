"""Unit tests of the native ring (native/ring.c through uvmbus.ring.OutRing/InRing/RingPair).

Most tests attach a writer and a reader to the SAME single ring direction in a bytearray, so
every byte the C writer produces is read back by the C reader; layout checks decode the shared
memory independently with ``struct`` (helpers from tests/refring.py).
"""

from __future__ import annotations

import mmap
import struct
from array import array

import pytest
from refring import (
    HV_PAGE,
    GpaRange,
    RefRing,
    bytes_to_read,
    gpa_ext,
    xfer_ext,
)

from uvmbus.errors import ConfigError, RingCorrupt, WouldBlock
from uvmbus.native import lib
from uvmbus.ring import (
    FLAG_COMPLETION_REQUESTED,
    PKT_COMP,
    PKT_GPA_DIRECT,
    PKT_INBAND,
    PKT_XFER_PAGES,
    InRing,
    OutRing,
    RingPair,
    packet_ring_bytes,
)

W, R, MASK, PENDING, FEATURES = range(5)


def pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


class One:
    """A single ring direction with a C writer and a C reader attached to it."""

    def __init__(self, dsize: int = 4096, header: int = 4096, start: int = 0,
                 features: int = 1) -> None:
        self.mem = bytearray(header + dsize)
        self.header = header
        self.dsize = dsize
        self.ref = RefRing(self.mem, header)          # used only to peek at raw memory
        self.ref.write_index = start
        self.ref.read_index = start
        self.ref.feature_bits = features
        self.out = OutRing(self.mem, 0, len(self.mem), header)
        self.inp = InRing(self.mem, 0, len(self.mem), header)

    def load(self, field: int) -> int:
        return int(lib.uvb_ring_load(self.out.header, field))

    def store(self, field: int, value: int) -> None:
        lib.uvb_ring_store(self.out.header, field, value)

    def used(self) -> int:
        return bytes_to_read(self.load(W), self.load(R), self.dsize)

    def free(self) -> int:
        return self.dsize - self.used()

    def raw(self, index: int, n: int) -> bytes:
        return self.ref.copy_out(index % self.dsize, n)

    def put_total(self, total: int, **kw: object) -> bool:
        """Put an in-band packet that occupies exactly ``total`` ring bytes (incl. trailer)."""
        assert total % 8 == 0 and total >= 24
        return self.out.put(bytes(total - 24), **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.out.close()
        self.inp.close()


@pytest.fixture
def one() -> One:
    r = One()
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 100, 1000])
@pytest.mark.parametrize("ptype", [PKT_INBAND, PKT_COMP])
def test_inband_and_completion_roundtrip(one: One, size: int, ptype: int) -> None:
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))
    tid = 0xFEDCBA9876543210 + size
    flags = FLAG_COMPLETION_REQUESTED if ptype == PKT_INBAND else 0
    assert one.out.put(payload, trans_id=tid, flags=flags, type=ptype)
    assert one.out.commit()
    # independent layout check of what sits in shared memory
    len8 = (16 + size + 7) // 8
    desc = one.raw(0, 16)
    assert struct.unpack("<HHHHQ", desc) == (ptype, 2, len8, flags, tid)
    assert one.raw(16, len8 * 8 - 16) == pad8(payload)
    assert one.raw(len8 * 8, 8) == struct.pack("<Q", 0 << 32)
    assert one.load(W) == len8 * 8 + 8
    batch = one.inp.read()
    assert len(batch) == 1
    p = batch[0]
    assert (p.type, p.flags, p.trans_id) == (ptype, flags, tid)
    assert bytes(p.payload) == pad8(payload)          # payload includes the sender's padding
    assert bytes(p.header) == b""
    assert p.completion_requested == bool(flags)
    assert one.inp.commit() is False
    assert one.load(R) == one.load(W)


def test_trans_id_extremes(one: One) -> None:
    for tid in (0, 1, 2**63, 2**64 - 1):
        assert one.out.put(b"x", trans_id=tid)
    one.out.commit()
    assert [p.trans_id for p in one.inp.read()] == [0, 1, 2**63, 2**64 - 1]


def test_gpa_direct_roundtrip(one: One) -> None:
    ranges = [
        (1, 0, [0x1234]),                                    # one byte
        (4096, 0, [0x10]),                                   # exactly one page
        (4096, 1, [0x20, 0x21]),                             # straddles into a 2nd page
        (10000, 4095, [1, 2, 3, 4]),                         # ceil((4095+10000)/4096) = 4
        (8192, 4088, [2**52 - 1, 5, 6]),
    ]
    parts = [b"hello ", b"", b"gpa world!"]
    assert one.out.put_gpa_direct(ranges, parts, trans_id=77)
    assert one.out.commit()
    p = one.inp.read()[0]
    assert p.type == PKT_GPA_DIRECT
    assert p.flags == FLAG_COMPLETION_REQUESTED                  # the default
    assert p.trans_id == 77
    assert bytes(p.payload) == pad8(b"hello gpa world!")
    expected = gpa_ext([GpaRange(c, o, tuple(pf)) for c, o, pf in ranges])
    assert bytes(p.header) == expected
    reserved, cnt = struct.unpack_from("<II", p.header)
    assert (reserved, cnt) == (0, len(ranges))
    desc = struct.unpack("<HHHHQ", one.raw(0, 16))
    assert desc[1] == (16 + len(expected)) // 8                 # offset8 = header length / 8


def test_gpa_direct_single_payload_and_flags(one: One) -> None:
    assert one.out.put_gpa_direct([(100, 200, [9])], b"abc", trans_id=1, flags=0)
    one.out.commit()
    p = one.inp.read()[0]
    assert (p.type, p.flags, bytes(p.payload)) == (PKT_GPA_DIRECT, 0, pad8(b"abc"))
    assert bytes(p.header) == gpa_ext([GpaRange(100, 200, (9,))])


@pytest.mark.parametrize("ranges", [
    [],                                   # no range at all
    [(0, 0, [])],                         # empty range
    [(0, 0, [1])],
    [(10, 4096, [1, 2])],                 # byte_offset must be < 4096
    [(4096, 1, [1])],                     # needs 2 PFNs
    [(10, 0, [1, 2])],                    # too many PFNs
])
def test_gpa_direct_writer_rejects_bad_ranges(one: One, ranges: list) -> None:
    with pytest.raises(ConfigError):
        one.out.put_gpa_direct(ranges, b"x", trans_id=1)
    assert not one.out.dead
    assert one.out.commit() is False      # nothing was queued
    assert one.load(W) == 0


@pytest.mark.parametrize("nranges", [0, 1, 3, 40])
def test_xfer_pages_roundtrip(one: One, nranges: int) -> None:
    ranges = [(100 + i, 4096 * i + 8) for i in range(nranges)]
    assert one.out.put_xfer_pages(0xBEEF, ranges, b"meta", trans_id=99, sender_owns=True)
    assert one.out.commit()
    p = one.inp.read()[0]
    assert (p.type, p.flags, p.trans_id) == (PKT_XFER_PAGES, FLAG_COMPLETION_REQUESTED, 99)
    assert bytes(p.payload) == pad8(b"meta")
    assert bytes(p.header) == xfer_ext(0xBEEF, ranges, 1)
    ptype, offset8, len8, _f, _t = struct.unpack("<HHHHQ", one.raw(0, 16))
    assert offset8 == 3 + nranges                                    # §3.3
    pageset, owns, _res, cnt = struct.unpack_from("<HBBI", p.header)
    assert (pageset, owns, cnt) == (0xBEEF, 1, nranges)
    assert [struct.unpack_from("<II", p.header, 8 + 8 * i) for i in range(cnt)] == ranges


def test_gather_write_with_ext_header(one: One) -> None:
    parts = [b"ab", b"", b"cdefghij", bytes(range(30))]
    ext = b"EXTHDR01" + b"extra..."
    assert one.out.put_gather(parts, trans_id=5, flags=1, ext=ext)
    # more than 16 parts takes the allocated-iov path
    many = [bytes([i]) * (i % 5) for i in range(40)]
    assert one.out.put_gather(many, trans_id=6, type=PKT_COMP)
    assert one.out.commit()
    a, b = one.inp.read()
    assert (a.type, a.flags, a.trans_id, bytes(a.header)) == (PKT_INBAND, 1, 5, ext)
    assert bytes(a.payload) == pad8(b"".join(parts))
    assert struct.unpack("<HHHHQ", one.raw(0, 16))[1] == 2 + len(ext) // 8
    assert (b.type, b.trans_id, bytes(b.header)) == (PKT_COMP, 6, b"")
    assert bytes(b.payload) == pad8(b"".join(many))


def test_gather_ext_must_be_aligned(one: One) -> None:
    with pytest.raises(ConfigError):
        one.out.put_gather([b"x"], ext=b"12345")


def test_put_burst_explicit_and_implicit_trans_ids(one: One) -> None:
    lens = array("I", [0, 1, 9, 31, 64])
    buf = b"".join(bytes([i + 1]) * n for i, n in enumerate(lens))
    tids = array("Q", [10, 2**64 - 1, 0, 5, 5])
    assert one.out.put_burst(buf, lens, trans_ids=tids, flags=1) == 5
    assert one.out.put_burst(buf, lens, tid_base=1000, type=PKT_COMP) == 5
    assert one.out.commit()
    batch = one.inp.read()
    assert len(batch) == 10
    off = 0
    for i, n in enumerate(lens):
        a, b = batch[i], batch[5 + i]
        want = pad8(buf[off:off + n])
        off += n
        assert (a.type, a.flags, a.trans_id, bytes(a.payload)) == (PKT_INBAND, 1, tids[i], want)
        assert (b.type, b.flags, b.trans_id, bytes(b.payload)) == (PKT_COMP, 0, 1000 + i, want)


def test_put_burst_stops_when_full(one: One) -> None:
    # 4096-byte data area, 64-byte packets (40 payload + 16 + 8 trailer): 63 fit (63*64 = 4032
    # leaves 64 free, a 64-byte write needs > 64) ... the 64th would fill the ring exactly.
    n = 100
    lens = array("I", [40] * n)
    buf = bytes(40 * n)
    got = one.out.put_burst(buf, lens, tid_base=0)
    assert got == 63
    one.out.commit()
    assert one.free() == 64
    assert one.out.put_burst(buf, lens) == 0             # nothing fits now: 0, not an error
    assert len(one.inp.read()) == 63


# ---------------------------------------------------------------------------------------------
# full ring, exact fit

def test_exact_fit_boundary(one: One) -> None:
    assert one.put_total(1000)
    one.out.commit()
    free = one.free()
    assert free == one.dsize - 1000
    assert one.out.free == free - 8                  # largest writable total
    # would leave 0 free bytes: refused (ring must never be exactly full)
    assert one.put_total(free) is False
    assert one.out.stats()["full"] >= 1
    # leaves 8 free bytes: accepted
    assert one.put_total(free - 8)
    one.out.commit()
    assert one.free() == 8
    assert one.load(W) != one.load(R)
    assert one.out.free == 0
    assert one.out.put(b"") is False                 # even the smallest packet (24) does not fit
    with pytest.raises(WouldBlock):
        one.out.send(b"")
    assert [len(p.payload) for p in one.inp.read()] == [1000 - 24 + 0, free - 8 - 24]


def test_exact_fit_on_empty_ring_is_invalid_not_wouldblock(one: One) -> None:
    # a packet as large as the whole data area can never fit: caller error, not back-pressure
    with pytest.raises(ConfigError):
        one.put_total(one.dsize)
    assert not one.out.dead
    assert one.out.max_payload == one.dsize - 32
    assert one.out.put(bytes(one.out.max_payload))      # total = dsize - 8: the largest
    one.out.commit()
    assert one.free() == 8
    p = one.inp.read()[0]
    assert len(p.payload) == one.dsize - 32


def test_fill_never_completely_full(one: One) -> None:
    for size in (0, 8, 13, 40, 100, 333):
        one.store(W, 0)
        one.store(R, 0)
        out = OutRing(one.mem, 0, len(one.mem), one.header)
        inp = InRing(one.mem, 0, len(one.mem), one.header)
        n = 0
        while out.put(bytes([n & 0xFF]) * size, trans_id=n):
            n += 1
            assert n < 1000
        out.commit()
        total = packet_ring_bytes(size)
        assert n * total < one.dsize
        assert one.free() <= total                   # the next one really did not fit
        assert one.free() > 0
        got = inp.read()
        assert [p.trans_id for p in got] == list(range(n))
        assert all(bytes(p.payload) == pad8(bytes([i & 0xFF]) * size) for i, p in enumerate(got))
        inp.commit()
        out.close()
        inp.close()


# ---------------------------------------------------------------------------------------------
# wrap-around at every 8-byte offset

@pytest.mark.parametrize("header", [4096, 65536])
def test_wrap_at_every_offset(header: int) -> None:
    dsize = 4096 if header == 4096 else 1024
    sizes = [0, 5, 40, 200, 1000 if dsize > 2048 else 300, 3]
    for start in range(0, dsize, 8):
        one = One(dsize=dsize, header=header, start=start)
        pos = start
        for i, n in enumerate(sizes):
            payload = bytes(((start + i * 31 + k) & 0xFF) for k in range(n))
            assert one.out.put(payload, trans_id=start * 100 + i)
            len8 = (16 + n + 7) // 8
            # descriptor, payload and trailer at the (wrapped) places
            assert struct.unpack("<HHHHQ", one.raw(pos, 16))[:3] == (PKT_INBAND, 2, len8)
            assert one.raw(pos + 16, n) == payload
            assert one.raw(pos + len8 * 8, 8) == struct.pack("<Q", pos << 32)
            pos = (pos + len8 * 8 + 8) % dsize
        one.out.commit()
        assert one.load(W) == pos
        batch = one.inp.read()
        assert [p.trans_id for p in batch] == [start * 100 + i for i in range(len(sizes))]
        for i, (p, n) in enumerate(zip(batch, sizes, strict=True)):
            assert bytes(p.payload)[:n] == bytes(((start + i * 31 + k) & 0xFF) for k in range(n))
        one.inp.commit()
        assert one.load(R) == pos
        one.close()


def test_wrap_with_ext_headers_every_offset() -> None:
    dsize = 512
    for start in range(0, dsize, 8):
        one = One(dsize=dsize, start=start)
        assert one.out.put_gpa_direct([(5000, 100, [1, 2])], [b"g" * 21], trans_id=1)
        assert one.out.put_xfer_pages(3, [(1, 2), (3, 4)], b"x" * 17, trans_id=2)
        assert one.out.put_gather([b"a" * 9, b"b" * 12], ext=b"E" * 16, trans_id=3)
        one.out.commit()
        a, b, c = one.inp.read()
        assert bytes(a.header) == gpa_ext([GpaRange(5000, 100, (1, 2))])
        assert bytes(a.payload) == pad8(b"g" * 21)
        assert bytes(b.header) == xfer_ext(3, [(1, 2), (3, 4)], 0)
        assert bytes(b.payload) == pad8(b"x" * 17)
        assert (bytes(c.header), bytes(c.payload)) == (b"E" * 16, pad8(b"a" * 9 + b"b" * 12))
        one.inp.commit()
        one.close()


# ---------------------------------------------------------------------------------------------
# signalling decisions

def test_writer_signals_only_on_empty_to_nonempty(one: One) -> None:
    assert one.out.commit() is False                 # nothing queued
    one.out.put(b"a")
    one.out.put(b"b")
    assert one.out.commit() is True                  # empty -> non-empty
    one.out.put(b"c")
    assert one.out.commit() is False                 # reader has not consumed
    one.out.put(b"d")
    assert one.out.commit() is False
    assert len(one.inp.read(1)) == 1
    one.inp.commit()                                 # partially consumed: still non-empty
    one.out.put(b"e")
    assert one.out.commit() is False
    one.inp.read()                                   # consumed privately, not published
    one.out.put(b"f")
    assert one.out.commit() is False
    one.inp.commit()
    assert len(one.inp.read()) == 1                  # 'f'
    one.inp.commit()                                 # now empty
    one.out.put(b"g")
    assert one.out.commit() is True
    assert one.out.stats()["signals"] == 2


def test_writer_no_signal_when_reader_masked(one: One) -> None:
    one.inp.mask()
    assert one.inp.masked
    assert one.load(MASK) == 1
    one.out.put(b"a")
    assert one.out.commit() is False
    one.inp.read()
    one.inp.commit()
    assert one.inp.arm() is False                    # empty: safe to sleep
    assert one.load(MASK) == 0
    one.out.put(b"b")
    assert one.out.commit() is True


def test_rollback(one: One) -> None:
    one.out.put(b"a", trans_id=1)
    one.out.commit()
    one.out.put(b"b", trans_id=2)
    one.out.rollback()
    assert one.out.commit() is False
    assert [p.trans_id for p in one.inp.read()] == [1]
    one.inp.rollback()                               # un-read: the same packet again
    assert [p.trans_id for p in one.inp.read()] == [1]
    assert one.inp.commit() is False


def test_peek_does_not_consume(one: One) -> None:
    assert one.inp.peek() is None
    one.out.put(b"12345", trans_id=9, flags=1, type=PKT_COMP)
    one.out.commit()
    assert one.inp.peek() == (PKT_COMP, 1, 9, 8)
    assert one.inp.peek() == (PKT_COMP, 1, 9, 8)
    assert one.inp.read_one().trans_id == 9
    assert one.inp.peek() is None


def _reader_signal(pending: int, *, used_packets: int = 10, read_packets: int = 1,
                   features: int = 1) -> tuple[bool, int, int]:
    """Fill with 256-byte packets, set pending_send_sz, read some, return (signal, f0, f1)."""
    one = One(dsize=4096, features=features)
    for _ in range(used_packets):
        assert one.put_total(256)
    one.out.commit()
    f0 = one.free()
    one.store(PENDING, pending)
    assert len(one.inp.read(read_packets)) == read_packets
    sig = one.inp.commit()
    f1 = one.free()
    assert f1 == f0 + 256 * read_packets
    one.close()
    return sig, f0, f1


def test_reader_pending_send_sz_crossing() -> None:
    f0 = 4096 - 2560
    f1 = f0 + 256
    # signal iff free before <= pending < free after ("exactly pending" is not enough)
    assert _reader_signal(f1 - 8) == (True, f0, f1)
    assert _reader_signal(f1)[0] is False             # exactly full for the writer: not enough
    assert _reader_signal(f1 + 8)[0] is False
    assert _reader_signal(f0)[0] is True              # writer was blocked at exactly f0
    assert _reader_signal(f0 + 1)[0] is True
    assert _reader_signal(f0 - 8)[0] is False         # writer already had enough: not blocked
    assert _reader_signal(0)[0] is False              # no request
    # several packets at once: crossing anywhere inside the freed span counts
    assert _reader_signal(f0 + 700, read_packets=3)[0] is True
    assert _reader_signal(f0 + 768, read_packets=3)[0] is False


def test_reader_never_signals_without_feature_bit() -> None:
    f0 = 4096 - 2560
    for pending in (f0, f0 + 8, f0 + 255, 1):
        assert _reader_signal(pending, features=0)[0] is False
        assert _reader_signal(pending, features=2)[0] is False    # only bit 0 counts


def test_reader_commit_without_reading_never_signals(one: One) -> None:
    one.put_total(256)
    one.out.commit()
    one.store(PENDING, 8)
    assert one.inp.commit() is False


def test_want_space_sets_and_clears_pending(one: One) -> None:
    d = one.dsize
    assert one.out.want_space(100) is True                  # plenty of room: nothing asked
    assert one.load(PENDING) == 0
    while one.out.put(bytes(200)):
        pass
    one.out.commit()
    free = one.free()
    assert one.out.want_space(free - 8) is True             # free > want: fits
    assert one.out.want_space(free) is False                # blocked: asks the reader
    pend = one.load(PENDING)
    assert pend >= free - 7 and pend % 8 == 0
    assert pend >= d // 4                                   # C policy: at least a quarter
    one.out.clear_want()
    assert one.load(PENDING) == 0
    # a large request is recorded (8-aligned, not beyond the data area)
    assert one.out.want_space(d - 8) is False
    assert 0 < one.load(PENDING) < d
    # the reader frees space: signals exactly when crossing, then the request is cleared by a
    # successful want_space
    assert one.out.want_space(1500) is False
    assert one.load(PENDING) == 1496
    signals = []
    while True:
        got = one.inp.read(1)
        if not got:
            break
        signals.append((one.inp.commit(), one.free()))
    assert [s for s, _f in signals].count(True) == 1
    first_true = next(f for s, f in signals if s)
    assert first_true > 1496 and first_true - 208 <= 1496
    assert one.out.want_space(1500) is True
    assert one.load(PENDING) == 0


def test_blocked_writer_is_woken_end_to_end(one: One) -> None:
    n = 0
    while one.out.put(bytes(100), trans_id=n):
        n += 1
    one.out.commit()
    total = packet_ring_bytes(100)
    assert one.out.want_space(total) is False
    woke = False
    while not woke:
        assert one.inp.read(1)
        woke = one.inp.commit()
    assert one.out.put(bytes(100))                          # the signal means it fits now
    one.out.clear_want()
    assert one.load(PENDING) == 0


def test_arm(one: One) -> None:
    one.inp.mask()
    assert one.inp.arm() is False
    assert not one.inp.masked
    one.out.put(b"x")
    one.out.commit()
    one.inp.mask()
    assert one.inp.arm() is True                            # data raced in: don't sleep
    assert not one.inp.masked
    one.inp.read()
    with pytest.raises(ConfigError):
        one.inp.arm()                                       # uncommitted reads
    one.inp.commit()
    assert one.inp.arm() is False


# ---------------------------------------------------------------------------------------------
# corruption

def _desc_patch(one: One, **fields: int) -> None:
    names = ("type", "offset8", "len8", "flags", "trans_id")
    vals = dict(zip(names, struct.unpack_from("<HHHHQ", one.mem, one.header), strict=True))
    vals.update(fields)
    struct.pack_into("<HHHHQ", one.mem, one.header, *(vals[n] for n in names))


def _corrupt_write_index_big(one: One) -> None:
    one.store(W, one.dsize)


def _corrupt_write_index_unaligned(one: One) -> None:
    one.store(W, one.load(W) + 4)


def _corrupt_short_publish(one: One) -> None:
    one.store(W, 16)           # fewer bytes than descriptor + trailer


def _gpa_patch(one: One, off: int, value: int) -> None:
    struct.pack_into("<I", one.mem, one.header + off, value)


def _gpa_one_range(one: One, count: int, offset: int) -> None:
    _desc_patch(one, type=PKT_GPA_DIRECT, offset8=6)
    _gpa_patch(one, 20, 1)
    _gpa_patch(one, 24, count)
    _gpa_patch(one, 28, offset)


CORRUPTIONS = {
    "write_index >= size": (_corrupt_write_index_big, "write_index"),
    "write_index unaligned": (_corrupt_write_index_unaligned, "write_index"),
    "offset8 < 2": (lambda o: _desc_patch(o, offset8=1), "offset8"),
    "offset8 = 0": (lambda o: _desc_patch(o, offset8=0), "offset8"),
    "len8 < offset8": (lambda o: _desc_patch(o, offset8=3, len8=2), "len8"),
    "len8 beyond published": (lambda o: _desc_patch(o, len8=200), "published"),
    "len8 = published without trailer": (lambda o: _desc_patch(o, len8=9), "published"),
    "short publish": (_corrupt_short_publish, "published"),
    "unknown flag": (lambda o: _desc_patch(o, flags=2), "flags"),
    "unknown flag high": (lambda o: _desc_patch(o, flags=0x8001), "flags"),
    "unknown type 0": (lambda o: _desc_patch(o, type=0), "type"),
    "unknown type 8": (lambda o: _desc_patch(o, type=8), "type"),
    "unknown type 12": (lambda o: _desc_patch(o, type=12), "type"),
    "xfer range count": (lambda o: (_desc_patch(o, type=PKT_XFER_PAGES, offset8=4),
                                    _gpa_patch(o, 20, 2)), "range"),
    "xfer header too short": (lambda o: _desc_patch(o, type=PKT_XFER_PAGES, offset8=2), "transfer-page"),
    "gpa no ranges": (lambda o: (_desc_patch(o, type=PKT_GPA_DIRECT, offset8=5),
                                 _gpa_patch(o, 20, 0)), "range"),
    "gpa byte_count 0": (lambda o: (_desc_patch(o, type=PKT_GPA_DIRECT, offset8=5),
                                    _gpa_patch(o, 20, 1), _gpa_patch(o, 24, 0)), "range"),
    # header of 48 bytes holds the range and the 2 PFNs it needs: only byte_offset is wrong
    "gpa byte_offset 4096": (lambda o: _gpa_one_range(o, 1, 4096), "offset"),
    "gpa byte_offset max": (lambda o: _gpa_one_range(o, 1, 0xFFFFFFFF), "offset"),
    "gpa pfns beyond header": (lambda o: (_desc_patch(o, type=PKT_GPA_DIRECT, offset8=5),
                                          _gpa_patch(o, 20, 1), _gpa_patch(o, 24, 4097),
                                          _gpa_patch(o, 28, 0)), "PFN"),
    "gpa range outside header": (lambda o: (_desc_patch(o, type=PKT_GPA_DIRECT, offset8=4),
                                            _gpa_patch(o, 20, 2), _gpa_patch(o, 24, 8),
                                            _gpa_patch(o, 28, 0)), "range"),
    "gpa header too short": (lambda o: _desc_patch(o, type=PKT_GPA_DIRECT, offset8=2), "GPA"),
}


def _assert_in_dead(one: One) -> None:
    inp = one.inp
    assert inp.dead and inp.error_message
    for call in (lambda: inp.read(), lambda: inp.read(copy=True), lambda: inp.avail,
                 lambda: inp.empty, inp.peek, inp.commit, inp.arm, inp.read_one, inp.recv):
        with pytest.raises(RingCorrupt):
            call()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_reader_corruption_is_named_and_fatal(case: str) -> None:
    fn, word = CORRUPTIONS[case]
    one = One(dsize=4096)
    # a packet with a 64-byte payload (len8 = 10, 88 bytes published), header room for patches
    assert one.out.put(bytes(range(64)), trans_id=1)
    one.out.commit()
    fn(one)
    with pytest.raises(RingCorrupt) as ei:
        one.inp.read()
    assert word.lower() in str(ei.value).lower(), str(ei.value)
    _assert_in_dead(one)
    # repairing the memory does not resurrect the ring
    one.store(W, 88)
    _desc_patch(one, type=PKT_INBAND, offset8=2, len8=10, flags=0)
    _assert_in_dead(one)
    one.close()


def test_gpa_range_limits_accepted(one: One) -> None:
    """Controls for the GPA corruption cases: the same patches with legal values are read."""
    assert one.out.put(bytes(range(64)), trans_id=1)
    one.out.commit()
    _gpa_one_range(one, 4097, 4095)          # ceil((4095 + 4097) / 4096) = 2 PFNs: fits
    p = one.inp.read()[0]
    assert p.type == PKT_GPA_DIRECT
    assert struct.unpack_from("<IIII", p.header) == (0x03020100, 1, 4097, 4095)
    assert len(p.header) == 32 and len(p.payload) == 32


def test_corruption_after_valid_packets_in_same_batch(one: One) -> None:
    one.out.put(b"good", trans_id=1)
    one.out.put(b"bad!", trans_id=2)
    one.out.commit()
    struct.pack_into("<H", one.mem, one.header + 32, 99)      # type of the 2nd packet
    with pytest.raises(RingCorrupt, match="type"):
        one.inp.read()
    _assert_in_dead(one)


@pytest.mark.parametrize("bad", [4096, 4104, 12, 0xFFFFFFF8])
def test_writer_corrupt_read_index(one: One, bad: int) -> None:
    one.store(R, bad)
    with pytest.raises(RingCorrupt, match="read_index"):
        one.out.put(b"x")
    out = one.out
    assert out.dead
    for call in (lambda: out.put(b"x"), lambda: out.put_burst(b"", array("I", [0])),
                 lambda: out.put_gather([b"x"]), out.commit, lambda: out.send(b"x"),
                 lambda: out.put_gpa_direct([(1, 0, [1])], b""),
                 lambda: out.put_xfer_pages(1, [], b""), lambda: out.want_space(8),
                 lambda: out.free):
        with pytest.raises(RingCorrupt):
            call()
    one.store(R, 0)
    with pytest.raises(RingCorrupt):
        out.put(b"x")


def test_free_on_corrupt_read_index_raises(one: One) -> None:
    one.store(R, 3)
    with pytest.raises(RingCorrupt, match="read_index"):
        _ = one.out.free


def test_attach_validates_indices_and_sizes() -> None:
    mem = bytearray(4096 + 1024)
    RefRing(mem).write_index = 1024
    with pytest.raises(RingCorrupt, match="write_index"):
        OutRing(mem, 0, len(mem), 4096)
    InRing(mem, 0, len(mem), 4096).close()       # the reader attaches at read_index
    RefRing(mem).read_index = 9
    with pytest.raises(RingCorrupt, match="read_index"):
        InRing(mem, 0, len(mem), 4096)
    with pytest.raises(ConfigError):
        OutRing(bytearray(4096 + 64), 0, 4096 + 64, 4096)         # no usable data area
    with pytest.raises(ConfigError):
        OutRing(bytearray(12288 * 2), 0, 12288 * 2, 12288)        # header not a power of two
    with pytest.raises(ConfigError):
        OutRing(bytearray(8192), 0, 8196, 4096)                   # beyond the mapping


def test_copy_before_validate(one: One) -> None:
    one.out.put(b"A" * 24, trans_id=11)
    one.out.put_xfer_pages(7, [(10, 20)], b"B" * 8, trans_id=12)
    one.out.commit()
    batch = one.inp.read()
    snap = [(p.type, p.flags, p.trans_id, bytes(p.payload), bytes(p.header)) for p in batch]
    # the peer scribbles over everything it published after we read it
    for i in range(one.header, one.header + 200):
        one.mem[i] = 0xEE
    assert [(p.type, p.flags, p.trans_id, bytes(p.payload), bytes(p.header)) for p in batch] == snap
    assert snap[0] == (PKT_INBAND, 0, 11, b"A" * 24, b"")
    assert snap[1][:4] == (PKT_XFER_PAGES, 1, 12, b"B" * 8)
    assert not one.inp.dead
    one.inp.commit()


def test_copy_true_survives_next_read(one: One) -> None:
    one.out.put(b"first", trans_id=1)
    one.out.commit()
    kept = one.inp.read(copy=True)
    one.inp.commit()
    one.out.put(b"second!", trans_id=2)
    one.out.commit()
    one.inp.read()
    assert bytes(kept[0].payload) == pad8(b"first") and kept[0].trans_id == 1


# ---------------------------------------------------------------------------------------------
# header page sizes and ring files

@pytest.mark.parametrize("header", [4096, 65536])
def test_header_page_size_layout(header: int) -> None:
    one = One(dsize=8192, header=header)
    one.out.put(b"payload!", trans_id=3)
    assert one.out.commit()
    assert bytes(one.mem[68:header]) == bytes(header - 68)          # reserved area untouched
    assert struct.unpack_from("<I", one.mem, 0)[0] == 32            # write_index at offset 0
    assert struct.unpack_from("<HHHHQ", one.mem, header) == (PKT_INBAND, 2, 3, 0, 3)
    assert bytes(one.mem[header + 16:header + 24]) == b"payload!"
    assert one.inp.read()[0].trans_id == 3
    one.inp.commit()
    assert struct.unpack_from("<I", one.mem, 4)[0] == 32            # read_index at offset 4
    assert one.out.data_size == 8192
    one.close()


@pytest.mark.parametrize("header", [4096, 65536])
def test_ring_pair_files(tmp_path, header: int) -> None:
    ring_bytes = header + 16384
    path = tmp_path / "ring"
    RingPair.create_file(path, ring_bytes)
    assert path.stat().st_size == 2 * ring_bytes
    raw = path.read_bytes()
    for base in (0, ring_bytes):
        assert struct.unpack_from("<4I", raw, base) == (0, 0, 0, 0)
        assert struct.unpack_from("<I", raw, base + 64)[0] & 1      # feature bit set
    guest = RingPair.open_file(path, header_bytes=header)
    host = RingPair.open_file(path, header_bytes=header, role="host")
    try:
        assert guest.out.data_size == host.inp.data_size == 16384
        # guest -> host on the TX half
        assert guest.out.put(b"to host", trans_id=1)
        assert guest.out.commit()
        assert [bytes(p.payload) for p in host.inp.read()] == [pad8(b"to host")]
        host.inp.commit()
        # host -> guest on the RX half
        assert host.out.put_xfer_pages(1, [(2, 3)], b"to guest", trans_id=2)
        assert host.out.commit()
        p = guest.inp.read()[0]
        assert (p.type, bytes(p.payload)) == (PKT_XFER_PAGES, pad8(b"to guest"))
        guest.inp.commit()
        raw = path.read_bytes()
        assert struct.unpack_from("<HHHHQ", raw, header)[0] == PKT_INBAND           # TX data
        assert struct.unpack_from("<HHHHQ", raw, ring_bytes + header)[0] == PKT_XFER_PAGES
        assert struct.unpack_from("<2I", raw, 0) == (32, 32)
    finally:
        guest.close()
        host.close()


def test_ring_pair_file_defaults_and_errors(tmp_path) -> None:
    path = tmp_path / "ring"
    ring_bytes = mmap.PAGESIZE + 8192
    RingPair.create_file(path, ring_bytes)
    with RingPair.open_file(path) as pair:                 # half the file, system page header
        assert pair.out.ring_bytes == ring_bytes
        assert pair.out.header_bytes == mmap.PAGESIZE
        assert pair.out.data_size == 8192
    with pytest.raises(ConfigError):
        RingPair.open_file(path, ring_bytes=ring_bytes + 4096)
    with pytest.raises(ConfigError):
        RingPair.open_file(path, role="peer")
    small = tmp_path / "small"
    small.write_bytes(b"")
    with pytest.raises(ConfigError):
        RingPair.open_file(small)


def test_ring_pair_attach_roles() -> None:
    ring_bytes = 4096 + 2048
    mem = bytearray(2 * ring_bytes)
    RingPair.init_memory(mem, ring_bytes)
    g = RingPair.attach(mem, ring_bytes, 4096)
    h = RingPair.attach(mem, ring_bytes, 4096, role="host")
    for i in range(50):
        assert g.out.put(struct.pack("<I", i), trans_id=i)
        assert h.out.put(struct.pack("<I", i + 1000), trans_id=i)
        g.out.commit()
        h.out.commit()
        assert h.inp.read()[0].trans_id == i
        assert bytes(g.inp.read()[0].payload)[:4] == struct.pack("<I", i + 1000)
        h.inp.commit()
        g.inp.commit()
    g.close()
    h.close()


def test_large_packet_grows_scratch() -> None:
    one = One(dsize=1 << 20)
    inp = InRing(one.mem, 0, len(one.mem), one.header, scratch=0)
    big = bytes(range(256)) * 2000                           # 512000 bytes, len8 close to max
    assert one.out.put(big, trans_id=1)
    one.out.commit()
    p = inp.read()[0]
    assert bytes(p.payload)[:len(big)] == big
    inp.close()
    with pytest.raises(ConfigError):
        one.out.put(bytes(0xFFFF * 8))                        # len8 would exceed 65535
    one.close()


def test_hv_page_constant() -> None:
    assert HV_PAGE == lib.HV_HYP_PAGE_SIZE == 4096


def test_reader_no_signal_when_writer_already_used_the_freed_space() -> None:
    """Simulated race inside the reader's commit: the read_index store becomes visible, the
    writer (which was blocked: free 256 <= pending 256) immediately writes 512 bytes into the
    freed space, and only then does the reader load write_index.  The free space before the
    commit as computed by §2.6 (cur - bytes_read = 768 - 1024) underflows; with the kernel's u32
    arithmetic that means "the writer was not blocked" and there must be no signal.  The writer
    demonstrably ran after the publish, so a signal would be one the host counts as unnecessary.
    """
    from refring import RefReader

    one = One(dsize=4096)
    for _ in range(15):
        assert one.put_total(256)
    one.out.commit()
    assert one.free() == 256
    one.store(PENDING, 256)
    ref_mem = bytearray(one.mem)
    ref = RefReader(RefRing(ref_mem, one.header))
    assert len(one.inp.read(4)) == 4
    assert len(ref.read(4)) == 4
    for mem in (one.mem, ref_mem):
        struct.pack_into("<I", mem, 4, 1024)          # the publish, seen by the writer first
    one.out.close()
    for mem in (one.mem, ref_mem):
        w = OutRing(mem, 0, len(mem), one.header)
        assert w.put(bytes(256 - 24)) and w.put(bytes(256 - 24))
        w.commit()
        w.close()
    assert one.free() == 768 > 256
    assert ref.commit() is False
    assert one.inp.commit() is False

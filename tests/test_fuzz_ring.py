"""Hostile-host fuzzing, shared harness + the channel layer (native/ring.c through
uvmbus.channel.Channel), without the simulator.

The host is untrusted (uio_vmbus.md §3.5): whatever it writes into the shared ring, the guest
must copy, validate, and either deliver packets that lie inside what was published or end the
channel with :class:`RingCorrupt` naming the problem — never crash, never read outside the
mapping, never raise anything but a uvmbus error, never hang.

Harness: every shared buffer (ring pair, receive/send buffers) is an anonymous mapping with
PROT_NONE guard pages on both sides, the buffer flush against the trailing guard, so a read or
write one byte past a map faults at once instead of passing silently.  The test plays the host
with a second ``RingPair`` (``role="host"``) attached to the same memory, or by writing raw bytes.

Example counts: FAST runs in the default suite; ``@pytest.mark.slow`` variants take
``UVMBUS_FUZZ_EXAMPLES`` examples (default 400; CI runs them as part of `make test`).
FAST example counts can be raised with ``UVMBUS_FUZZ_FAST``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import random
import struct
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refring import RefReader, RefRing, RefRingCorrupt

from uvmbus.channel import Channel, PollingWaiter
from uvmbus.errors import ChannelTimeout, RingCorrupt, UvmbusError
from uvmbus.native import ffi
from uvmbus.ring import PKT_COMP, PKT_GPA_DIRECT, PKT_INBAND, PKT_XFER_PAGES, RingPair

pytestmark = pytest.mark.timeout(120)

PAGE = mmap.PAGESIZE
HEADER = 4096
SLOW_EXAMPLES = int(os.environ.get("UVMBUS_FUZZ_EXAMPLES", "400"))
_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
FAST = settings(max_examples=int(os.environ.get("UVMBUS_FUZZ_FAST", "150")), deadline=None,
                suppress_health_check=_HC)
SLOW = settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=_HC)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


class Guarded:
    """``size`` bytes of anonymous shared memory between two PROT_NONE guard pages; the
    buffer ends exactly at the trailing guard.  ``mm``/``offset`` locate it for Python,
    ``ptr`` is a ``uint8_t *`` to its first byte, ``view`` a memoryview of it."""

    def __init__(self, size: int):
        span = -(-size // PAGE) * PAGE
        self.size = size
        self.mm = mmap.mmap(-1, span + 2 * PAGE)
        self._all = ffi.from_buffer("uint8_t[]", self.mm)
        base = int(ffi.cast("uintptr_t", self._all))
        for at in (base, base + PAGE + span):
            if _libc.mprotect(at, PAGE, 0) != 0:          # PROT_NONE
                raise OSError(ctypes.get_errno(), "mprotect")
        self.offset = PAGE + span - size
        self.ptr = self._all + self.offset
        self.view = memoryview(self.mm)[self.offset:self.offset + size]

    def close(self) -> None:
        self.view.release()
        ffi.release(self._all)
        try:
            self.mm.close()
        except BufferError:          # something still exports it: leave it to the GC
            pass


class Wire:
    """A channel's ring pair in guarded memory: the guest side wrapped in a real
    :class:`Channel`, the host side as a second RingPair on the same bytes."""

    def __init__(self, dsize: int = 64 * 1024):
        self.dsize = dsize
        self.rb = HEADER + dsize
        self.mem = Guarded(2 * self.rb)
        RingPair.init_memory(self.mem.mm, self.rb, offset=self.mem.offset)
        guest = RingPair.attach(self.mem.mm, self.rb, HEADER, offset=self.mem.offset, name="fuzz")
        self.host = RingPair.attach(self.mem.mm, self.rb, HEADER, offset=self.mem.offset,
                                    role="host", name="fuzz")
        self.ch = Channel(guest, relid=7, name="fuzz", waiter=PollingWaiter())

    # -- the host's side ----------------------------------------------------------------------
    def host_commit(self) -> None:
        self.host.out.commit()

    def host_read(self) -> list[Any]:
        """Every packet the guest published on TX (copied), committed."""
        out: list[Any] = []
        while True:
            b = self.host.inp.read(copy=True)
            if not b.count:
                break
            out.extend(b)
            self.host.inp.commit()
        return out

    def rx_data_offset(self) -> int:
        """Offset in ``mem.view`` of the guest RX data area."""
        return self.rb + HEADER

    def store_rx_write_index(self, value: int) -> None:
        struct.pack_into("<I", self.mem.view, self.rb, value)

    def close(self) -> None:
        self.ch.close()
        self.host.close()
        self.mem.close()


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def hostile_int(bits: int = 32) -> st.SearchStrategy[int]:
    """Integers that break offset/length arithmetic: small, around powers of two, the top."""
    top = (1 << bits) - 1
    return st.one_of(
        st.integers(0, 64),
        st.sampled_from([top, top - 7, top - 8, 1 << (bits - 1), (1 << (bits - 1)) - 8,
                         0x10000, 0xFFFF, 0xFFF8, 4096, 4095]),
        st.integers(0, top),
    )


# =============================================================================================
# the channel layer against a hostile ring

def _raw_garbage(w: Wire, garbage: bytes, windex: int, seed: int) -> None:
    rng = random.Random(seed)
    base = w.rx_data_offset()
    for i in range(w.dsize):
        w.mem.view[base + i] = garbage[(i + rng.randrange(3)) % len(garbage)]
    w.store_rx_write_index(windex)


def _reference(w: Wire) -> tuple[list[tuple], bool]:
    """What tests/refring.py's reader (written from uio_vmbus.md, not from ring.c) makes of a
    private copy of the guest RX ring: the packets, and whether it ends corrupt."""
    mem = bytearray(w.mem.view[w.rb:2 * w.rb])
    reader = RefReader(RefRing(mem, HEADER))
    pkts: list[tuple] = []
    try:
        while (p := reader.read_one()) is not None:
            pkts.append((p.type, p.flags, p.trans_id, p.ext, p.payload))
    except RefRingCorrupt:
        return pkts, True
    return pkts, False


def _channel_outcome(w: Wire) -> None:
    """Drive the channel's receive entry points on a hostile ring: exactly the reference's
    packets, or (if the reference finds the ring corrupt) RingCorrupt naming the problem — and
    then the channel stays dead.  Nothing else may escape."""
    ch = w.ch
    want, corrupt = _reference(w)
    try:
        got = ch.poll()
    except RingCorrupt as exc:
        assert corrupt, f"C reader declared {exc} where the reference read {len(want)} packets"
        assert str(exc).startswith("fuzz"), exc                      # names the channel
        assert any(k in str(exc) for k in ("offset8", "len8", "type", "flags", "published",
                                           "write_index", "transfer-page", "GPA-direct")), exc
        assert ch.dead
        with pytest.raises(RingCorrupt):                             # stays dead
            ch.poll()
        with pytest.raises(RingCorrupt):
            ch.wait(0.0)
        return
    assert not corrupt or len(want) >= 1024, f"reference found corruption after {want}"
    assert [(p.type, p.flags, p.trans_id, bytes(p.header), bytes(p.payload)) for p in got] == want


@st.composite
def hostile_stream(draw: Any) -> tuple[list[tuple], list[tuple], tuple[str, int] | None]:
    """A valid packet stream the host writes, then a few descriptor/ext-header fields or
    bytes broken, and maybe the write index."""
    pkts = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["inband", "comp", "xfer", "xfer", "gpa", "gpa"]))
        payload = draw(st.binary(max_size=40))
        tid = draw(st.integers(0, 2**64 - 1))
        flags = draw(st.sampled_from([0, 1]))
        if kind == "xfer":
            extra: Any = draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                                       max_size=3))
        elif kind == "gpa":
            extra = draw(st.lists(st.tuples(st.integers(1, 9000), st.integers(0, 4095)),
                                  min_size=1, max_size=2))
        else:
            extra = None
        pkts.append((kind, payload, tid, flags, extra))
    corrupt = draw(st.lists(st.tuples(
        st.integers(0, 7),                                     # which packet
        st.sampled_from([0, 2, 4, 6, 16, 20, 20, 20, 24, 24, 28, 28, 32]),   # descriptor, ext
        st.sampled_from([1, 2, 4]),
        st.one_of(hostile_int().map(lambda v: ("set", v)),     # a wild value, or off by a little
                  st.sampled_from([-2, -1, 1, 2, 8]).map(lambda d: ("add", d)))), max_size=2))
    windex = None
    if draw(st.integers(0, 99)) < 20:
        windex = draw(st.one_of(hostile_int().map(lambda v: ("set", v)),
                                st.integers(-4, 4).map(lambda d: ("move", 8 * d)),
                                st.sampled_from([-4, 4, 1]).map(lambda d: ("move", d))))
    return pkts, corrupt, windex


def _write_stream(w: Wire, pkts: list[tuple], corrupt: list[tuple],
                  windex: tuple[str, int] | None) -> None:
    out = w.host.out
    starts = []
    for kind, payload, tid, flags, extra in pkts:
        at = int(out.raw.cursor)
        if kind == "inband":
            ok = out.put(payload, trans_id=tid, flags=flags)
        elif kind == "comp":
            ok = out.put(payload, trans_id=tid, type=PKT_COMP)
        elif kind == "xfer":
            ok = out.put_xfer_pages(0xCAFE, extra, payload, trans_id=tid, flags=flags)
        else:
            ok = out.put_gpa_direct([(c, o, list(range(-(-(o + c) // 4096)))) for c, o in extra],
                                    payload, trans_id=tid, flags=flags)
        if not ok:
            break
        starts.append(at)
    out.commit()
    base = w.rx_data_offset()
    for which, off, width, (how, v) in corrupt:
        if not starts:
            break
        at = starts[which % len(starts)] + off
        old = int.from_bytes(bytes(w.mem.view[base + (at + k) % w.dsize] for k in range(width)),
                             "little")
        value = v if how == "set" else old + v
        for k in range(width):
            w.mem.view[base + (at + k) % w.dsize] = (value >> (8 * k)) & 0xFF
    if windex is not None:
        how, v = windex
        cur = struct.unpack_from("<I", w.mem.view, w.rb)[0]
        w.store_rx_write_index(v if how == "set" else (cur + v) % (1 << 32))


@FAST
@given(hostile_stream())
def test_fuzz_channel_hostile_ring(case) -> None:
    w = Wire(dsize=4096)
    try:
        _write_stream(w, *case)
        _channel_outcome(w)
    finally:
        w.close()


@pytest.mark.slow
@SLOW
@given(hostile_stream())
def test_fuzz_channel_hostile_ring_slow(case) -> None:
    w = Wire(dsize=4096)
    try:
        _write_stream(w, *case)
        _channel_outcome(w)
    finally:
        w.close()


@FAST
@given(st.binary(min_size=1, max_size=256), hostile_int(), st.integers(0, 1000))
def test_fuzz_channel_garbage_ring(garbage: bytes, windex: int, seed: int) -> None:
    w = Wire(dsize=4096)
    try:
        _raw_garbage(w, garbage, windex, seed)
        _channel_outcome(w)
    finally:
        w.close()


@FAST
@given(st.sampled_from([PKT_XFER_PAGES, PKT_GPA_DIRECT]), st.binary(max_size=96).map(pad8),
       st.binary(max_size=64))
def test_fuzz_channel_extended_headers(ptype: int, ext: bytes, payload: bytes) -> None:
    """Arbitrary transfer-page / GPA-direct extended headers (range counts, PFN lists): the
    reader checks them against the packet before anyone indexes with them."""
    w = Wire(dsize=4096)
    try:
        assert w.host.out.put_gather([payload], type=ptype, ext=ext, trans_id=5)
        w.host_commit()
        try:
            (p,) = w.ch.poll()
        except RingCorrupt as exc:
            assert "transfer-page" in str(exc) or "GPA-direct" in str(exc), exc
            return
        hdr = bytes(p.header)
        assert hdr == ext                      # exactly what was written, nothing beyond
        cnt = struct.unpack_from("<I", hdr, 4)[0] if len(hdr) >= 8 else None
        if ptype == PKT_XFER_PAGES:
            assert cnt is not None and 8 + 8 * cnt <= len(hdr)
        else:
            assert cnt
            off = 8
            for _ in range(cnt):
                count, offset = struct.unpack_from("<II", hdr, off)
                assert count and offset < 4096
                off += 8 + 8 * -(-(offset + count) // 4096)
            assert off <= len(hdr)
    finally:
        w.close()


def test_request_against_a_flooding_host_times_out_cleanly() -> None:
    """A host that answers a request with nothing but unrelated packets: a ChannelTimeout,
    the unrelated packets kept for recv, no other exception, bounded time."""
    w = Wire(dsize=16 * 1024)
    try:
        for i in range(40):
            w.host.out.put(struct.pack("<I", i), trans_id=1000 + i, type=PKT_INBAND)
            w.host.out.put(b"x" * 8, trans_id=2000 + i, type=PKT_COMP)     # not our tid
        w.host_commit()
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout, match="completion of transaction"):
            w.ch.request(b"ping", trans_id=99, timeout=0.2)
        assert time.monotonic() - t0 < 5
        assert len(w.ch.poll()) == 80
    finally:
        w.close()


def test_request_times_out_while_a_host_floods_the_ring() -> None:
    """Another process keeps the RX ring busy with packets that never match: the request must
    still end with ChannelTimeout near its deadline (a reader that drains before it checks
    the clock would spin — and buffer — for as long as the host keeps writing)."""
    w = Wire(dsize=64 * 1024)
    flag = mmap.mmap(-1, 4096)                     # shared with the child: "stop"
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - the flooding host
        try:
            end = time.monotonic() + 120.0     # far past any scheduling delay; ends on flag
            i = 0
            while flag[0] == 0 and time.monotonic() < end:
                if w.host.out.put(struct.pack("<Q", i), trans_id=1_000_000 + i, type=PKT_INBAND):
                    i += 1
                    if i % 16 == 0:
                        w.host.out.commit()
                else:
                    w.host.out.commit()
        finally:
            os._exit(0)
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout):
            w.ch.request(b"ping", trans_id=7, timeout=0.3)
        elapsed = time.monotonic() - t0
        assert elapsed < 60.0, f"request(timeout=0.3) took {elapsed:.1f} s under a flood"
    finally:
        flag[0] = 1
        os.waitpid(pid, 0)
        flag.close()
        w.close()


def test_guard_pages_fault_past_the_end() -> None:
    """The harness itself: a byte past a Guarded buffer is unmapped (checked in a child, which
    dies with SIGSEGV), so the fuzz tests really would catch an overrun."""
    g = Guarded(5000)
    try:
        g.view[4999] = 1
        pid = os.fork()
        if pid == 0:                                            # pragma: no cover - child
            faulthandler.disable()                              # the fault is expected
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            ffi.cast("uint8_t *", g.ptr)[5000]
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), status
    finally:
        g.close()


def test_harness_errors_are_uvmbus_errors() -> None:
    assert issubclass(RingCorrupt, UvmbusError) and issubclass(ChannelTimeout, UvmbusError)

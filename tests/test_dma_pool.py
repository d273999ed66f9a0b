"""DmaPool, DmaRegion and DmaBuffer (over simulated guest RAM with small chunks)."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uvmbus.dma import (
    DmaBuffer,
    DmaPool,
    GuestRam,
    SimGuestMemory,
    create_guest_ram,
)
from uvmbus.errors import ConfigError, ResourceError

CHUNK = 64 * 1024
BASE = 0x200000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    create_guest_ram(tmp_path, 4 * 1024 * 1024, base_pfn=BASE, chunk=CHUNK)
    return tmp_path


@pytest.fixture
def mem(root: Path) -> Iterator[SimGuestMemory]:
    m = SimGuestMemory(root)
    yield m
    m.close()


@pytest.fixture
def ram(root: Path) -> Iterator[GuestRam]:
    g = GuestRam(root)
    yield g
    g.close()


def test_fixed_pool_exhaustion_and_reuse(mem: SimGuestMemory) -> None:
    pool = DmaPool(mem, buffer_size=20000, max_regions=2, name="t")
    assert pool.capacity == 6                    # 20480-byte slots, 3 per 64 KiB region
    bufs = [pool.alloc() for _ in range(6)]
    assert all(b.size == 20000 and len(b.view) == 20000 for b in bufs)
    assert len(pool.regions) == 2
    with pytest.raises(ResourceError, match=r"exhausted.*6 buffers of 20000 bytes.*max_regions"):
        pool.alloc()
    slot = (bufs[4].region, bufs[4].offset)
    bufs[4].free()
    again = pool.alloc(100)                     # smaller than buffer_size is fine
    assert (again.region, again.offset) == slot and again.size == 100
    with pytest.raises(ConfigError):
        pool.alloc(20001)
    assert pool.in_use == 6
    pool.close()


def test_double_free_and_foreign_buffer(mem: SimGuestMemory) -> None:
    a = DmaPool(mem, buffer_size=4096, max_regions=1, name="a")
    b = DmaPool(mem, buffer_size=4096, max_regions=1, name="b")
    buf = a.alloc()
    with pytest.raises(ConfigError, match="not a live buffer"):
        b.free(buf)
    buf.free()
    assert buf.freed
    with pytest.raises(ConfigError, match="freed twice"):
        a.free(buf)
    with pytest.raises(ConfigError, match="freed"):
        buf.gpa_range()
    a.close()
    b.close()


@pytest.mark.parametrize("align", [8, 512, 4096, 16384])
def test_variable_pool_alignment_no_overlap_no_straddle(mem: SimGuestMemory, ram: GuestRam,
                                                       align: int) -> None:
    rng = random.Random(align)
    pool = DmaPool(mem, max_regions=4, align=align, name="var")
    live: list[tuple[DmaBuffer, bytes]] = []
    for step in range(400):
        if live and (rng.random() < 0.45 or pool.in_use_bytes > 3 * CHUNK):
            buf, tag = live.pop(rng.randrange(len(live)))
            assert bytes(buf.view) == tag        # nobody else wrote into it
            buf.free()
            continue
        size = rng.choice([1, 7, 100, 4095, 4096, 4097, 10000, 30000, CHUNK - align, CHUNK])
        try:
            buf = pool.alloc(size)
        except ResourceError:
            continue
        assert buf.size == size and buf.offset % align == 0
        assert buf.offset + buf.size <= buf.region.size        # never straddles
        nbytes, off, pfns = buf.gpa_range()
        assert (pfns[0] * 4096 + off) % align == 0             # the GPA is aligned too
        tag = bytes([step % 251 + 1]) * size
        buf.view[:] = tag
        assert ram.read(pfns, off, nbytes) == tag
        live.append((buf, tag))
        spans = sorted((b.region.name, b.offset, b.offset + b.size) for b, _ in live)
        for (r1, _, e1), (r2, s2, _) in zip(spans, spans[1:], strict=False):
            assert r1 != r2 or e1 <= s2, "overlapping buffers"
    for buf, tag in live:
        assert bytes(buf.view) == tag
        buf.free()
    assert pool.in_use == 0 and pool.in_use_bytes == 0
    # free extents coalesced: every region can hand out one whole-region buffer again
    whole = [pool.alloc(CHUNK) for _ in range(len(pool.regions))]
    assert len({id(b.region) for b in whole}) == len(whole)
    pool.close()


def test_variable_pool_limits(mem: SimGuestMemory) -> None:
    pool = DmaPool(mem, max_regions=2, name="v")
    with pytest.raises(ConfigError, match="exceed the region size"):
        pool.alloc(CHUNK + 1)
    with pytest.raises(ConfigError):
        pool.alloc(0)
    big = [pool.alloc(CHUNK - 4096) for _ in range(2)]
    small = [pool.alloc(1), pool.alloc(4096)]
    with pytest.raises(ResourceError, match="exhausted"):
        pool.alloc(1)
    small[0].free()
    pool.alloc(4096)
    for b in big:
        b.free()
    pool.close()


def test_bad_pool_parameters(mem: SimGuestMemory) -> None:
    with pytest.raises(ConfigError):
        DmaPool(mem, align=3000)
    with pytest.raises(ConfigError):
        DmaPool(mem, buffer_size=CHUNK + 1)
    with pytest.raises(ConfigError):
        DmaPool(mem, max_regions=0)


@pytest.mark.parametrize("buffer_size", [8192, None])
def test_pool_threads_never_share_a_buffer(mem: SimGuestMemory, buffer_size: int | None) -> None:
    # fixed: 8 slots in one region, variable: 3..4 KiB extents; 4 threads x 2 buffers each
    pool = DmaPool(mem, buffer_size=buffer_size, max_regions=1, align=64, name="mt")
    errors: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        for i in range(300):
            a = pool.alloc(None if buffer_size else rng.randrange(3000, 4097))
            b = pool.alloc(None if buffer_size else rng.randrange(3000, 4097))
            ta, tb = bytes([tid, i % 256, 1]) * 100, bytes([tid, i % 256, 2]) * 100
            a.view[:300] = ta
            b.view[:300] = tb
            if bytes(a.view[:300]) != ta or bytes(b.view[:300]) != tb:
                errors.append(f"thread {tid} iteration {i}: buffer shared")
            a.free()
            b.free()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors
    assert pool.in_use == 0 and pool.in_use_bytes == 0
    assert len(pool.regions) == 1
    pool.close()


@pytest.mark.parametrize("buffer_size,align,stride", [(20000, 4096, 20480), (1000, 512, 1024),
                                                      (1000, 8, 1000), (4096, 16384, 16384)])
def test_fixed_pool_alignment(mem: SimGuestMemory, buffer_size: int, align: int,
                              stride: int) -> None:
    pool = DmaPool(mem, buffer_size=buffer_size, align=align, max_regions=1)
    bufs = [pool.alloc() for _ in range(CHUNK // stride)]
    with pytest.raises(ResourceError):
        pool.alloc()
    offsets = sorted(b.offset for b in bufs)
    assert offsets == list(range(0, CHUNK // stride * stride, stride))
    for b in bufs:
        nbytes, off, pfns = b.gpa_range()
        assert (pfns[0] * 4096 + off) % align == 0 and b.offset + b.size <= CHUNK
    pool.close()


# gpa_range: (buffer start in region, slice offset, slice length)
CASES = [
    (0, 0, 1), (0, 0, 4096), (0, 1, 4096), (0, 4095, 2), (4000, 0, 8192), (4000, 96, 8192),
    (123, 4000, 97), (8191, 0, 1), (8191, 0, 2), (0, 0, CHUNK), (4096, 4096, 3 * 4096 + 1),
    (1, 0, CHUNK - 1),
]


@pytest.mark.parametrize("start,off,length", CASES)
def test_gpa_range_odd_offsets(mem: SimGuestMemory, ram: GuestRam, start: int, off: int,
                               length: int) -> None:
    region = mem.alloc_region(CHUNK)
    buf = DmaBuffer(region, start, CHUNK - start)
    count, byte_offset, pfns = buf.gpa_range(off, length)
    assert count == length
    assert byte_offset == (start + off) % 4096
    assert len(pfns) == -(-(byte_offset + length) // 4096)
    assert pfns[0] == region.pfn_of(start + off)
    assert pfns == [region.pfn_of((start + off) // 4096 * 4096 + 4096 * k)
                    for k in range(len(pfns))]
    data = bytes(random.Random(length).randbytes(length))
    buf.view[off:off + length] = data
    # the host, through the PFN list alone, sees exactly these bytes
    assert ram.read(pfns, byte_offset, length) == data
    # and what it writes lands at the same place
    ram.write(pfns, byte_offset, bytes(length))
    assert bytes(buf.view[off:off + length]) == bytes(length)
    # pfn_ptr/page_offset give C the same description
    assert buf.page_offset == start % 4096 and int(buf.pfn_ptr[0]) == region.pfn_of(start)
    del buf
    region.close()


def test_gpa_range_rejects_bad_slices(mem: SimGuestMemory) -> None:
    pool = DmaPool(mem, buffer_size=10000, name="g")
    buf = pool.alloc()
    assert buf.gpa_range()[0] == 10000
    for off, length in [(0, 0), (0, 10001), (-1, 10), (9999, 2), (10000, None)]:
        with pytest.raises(ConfigError):
            buf.gpa_range(off, length)
    pool.close()


def test_region_accessors(mem: SimGuestMemory) -> None:
    region = mem.alloc_region(1)
    assert region.size == CHUNK and region.npages == CHUNK // 4096
    assert region.pfn_of(0) >= BASE and region.pfn_of(CHUNK - 1) == region.pfn_of(0) + 15
    assert region.pfns(2, 3) == [region.pfn_of(0) + k for k in (2, 3, 4)]
    assert region.address % 4096 == 0
    for bad in (-1, CHUNK):
        with pytest.raises(ConfigError):
            region.pfn_of(bad)
    region.close()
    assert region.closed


def test_close_with_live_views(mem: SimGuestMemory, root: Path) -> None:
    pool = DmaPool(mem, buffer_size=4096, name="c")
    buf = pool.alloc()
    kept = buf.view[0:16]                 # a view the caller derived from the buffer
    with pytest.raises(ResourceError, match="still in use"):
        pool.close()                      # buffers invalidated, but `kept` pins the mapping
    assert buf.freed
    region = mem.regions[0]
    assert not region.closed
    kept.release()
    region.close()
    assert region.closed and not mem.regions
    table = (root / "sim" / "guest-ram.alloc").read_bytes()
    assert table == bytes(len(table))     # chunk given back


def test_context_managers(mem: SimGuestMemory) -> None:
    with DmaPool(mem, buffer_size=4096, name="cm") as pool:
        with pool.alloc() as buf:
            buf.view[:2] = b"ok"
        assert buf.freed and pool.in_use == 0
        keep = pool.alloc()
    assert keep.freed
    with pytest.raises(ConfigError, match="closed"):
        pool.alloc()

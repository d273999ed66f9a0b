"""The NVMe queue-pair fast path (native/nvme.c) against a scripted controller in memory:
SQE building, PRP1/PRP2/PRP lists, one doorbell per batch, phase-tag wrap, validation of
what the controller posts (it is not trusted), and waits that end with a clear error
instead of hanging."""

from __future__ import annotations

import mmap
import struct
from typing import Any

import pytest

from uvmbus.dma import DmaMemory, DmaPool, DmaRegion
from uvmbus.errors import ConfigError, ControllerFatal, DeviceRemoved
from uvmbus.native import ffi, lib
from uvmbus.nvme.queue import QueuePair, status_text

BASE_PFN = 0x12340


class FakeMemory(DmaMemory):
    """Plain memory with made-up DMA page numbers (consecutive from BASE_PFN per region)."""

    kind = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.next = BASE_PFN

    @property
    def granularity(self) -> int:
        return 2 << 20

    def _alloc(self, size: int, name: str) -> DmaRegion:
        pfns = range(self.next, self.next + size // 4096)
        self.next += size // 4096 + 1000          # regions are not contiguous with each other
        return DmaRegion(mmap.mmap(-1, size), pfns, on_close=self._forget, name=name)


class FakeOwner:
    def __init__(self, *, timeout: float = 0.3) -> None:
        self.bar = ffi.new("uint8_t[]", 0x2000)
        self.bar_ptr = self.bar
        self.dstrd = 0
        self.timeout = timeout
        self.spin_us = 0
        self.alive_error: Exception | None = None
        self.failed: list[int] = []

    def check_alive(self) -> None:
        if self.alive_error is not None:
            raise self.alive_error

    def _queue_failed(self, q: QueuePair, rc: int) -> None:
        self.failed.append(rc)
        raise ControllerFatal(q.errmsg())

    def doorbell(self, qid: int, cq: bool = False) -> int:
        return int(lib.uvb_mmio_read32(self.bar, 0x1000 + (2 * qid + int(cq)) * 4))


@pytest.fixture
def setup() -> Any:
    owner = FakeOwner()
    pool = DmaPool(FakeMemory(), region_size=2 << 20, max_regions=8)
    q = QueuePair(owner, 1, 8, pool, max_pages=129, vector=None, efd=None)
    yield owner, pool, q
    q.free()
    pool.close()


def sqe(q: QueuePair, i: int) -> Any:
    return ffi.cast("struct uvb_nvme_sqe *", q.sq_buf.ptr)[i]


def post(q: QueuePair, slot: int, cid: int, status: int = 0, phase: int = 1, sq_head: int = 0) -> None:
    raw = struct.pack("<IIHHHH", 0, 0, sq_head, q.qid, cid, (status << 1) | phase)
    q.cq_buf.view[slot * 16:(slot + 1) * 16] = raw


def io(pool: DmaPool, kind: int, length: int, *, tag: int, slba: int = 0, offset: int = 0) -> Any:
    buf = pool.alloc(length + offset + 4096)
    r = ffi.new("struct uvb_nvme_io *")
    r.tag, r.kind, r.nsid, r.slba, r.nlb, r.length = tag, kind, 1, slba, length // 512, length
    start = buf.offset + offset
    r.pfns = buf.region.pfn_table + (start >> 12)
    r.byte_offset = start & 4095
    return r, buf


def test_prps_and_one_doorbell_per_batch(setup: Any) -> None:
    owner, pool, q = setup
    reqs = ffi.new("struct uvb_nvme_io[]", 3)
    bufs = []
    for i, (n, off) in enumerate([(4096, 0), (8192, 512), (16384, 0)]):
        r, b = io(pool, lib.UVB_NVME_IO_READ if i != 1 else lib.UVB_NVME_IO_WRITE, n,
                  tag=100 + i, slba=1000 * i, offset=off)
        reqs[i] = r[0]
        bufs.append((b, off))
    assert lib.uvb_nvme_submit(q.q, reqs, 3) == 3
    assert owner.doorbell(1) == 3 and int(q.q.sq_doorbells) == 1
    e0, e1, e2 = sqe(q, 0), sqe(q, 1), sqe(q, 2)
    b0 = QueuePair.dma_addr(bufs[0][0])
    assert (e0.opc, e0.nsid, e0.cdw10, e0.cdw12, e0.prp1, e0.prp2) == (2, 1, 0, 7, b0, 0)
    # 8 KiB starting 512 bytes into a page: three pages, so PRP2 points at the PRP list
    b1 = QueuePair.dma_addr(bufs[1][0], 512)
    assert (e1.opc, e1.cdw10, e1.cdw12, e1.prp1) == (1, 1000, 15, b1)
    list1 = e1.prp2
    cid1 = e1.cid
    assert list1 == int(q.q.prp_dma) + cid1 * 4096
    entries = ffi.cast("uint64_t *", q.prp_buf.ptr + cid1 * 4096)
    assert [int(entries[k]) for k in range(2)] == [(b1 & ~4095) + 4096, (b1 & ~4095) + 8192]
    b2 = QueuePair.dma_addr(bufs[2][0])
    assert e2.prp1 == b2 and e2.prp2 == int(q.q.prp_dma) + e2.cid * 4096
    assert len({e0.cid, e1.cid, e2.cid}) == 3
    # completions in another order, one CQ doorbell
    post(q, 0, e2.cid)
    post(q, 1, e0.cid, status=0x81 | (2 << 8))
    post(q, 2, e1.cid)
    assert q.reap() == 3
    assert [int(q.tags[i]) for i in range(3)] == [102, 100, 101]
    assert [int(q.status[i]) for i in range(3)] == [0, 0x281, 0]
    assert owner.doorbell(1, cq=True) == 3 and int(q.q.cq_doorbells) == 1
    assert q.inflight == 0
    assert "unrecovered read error" in status_text(0x281)


def test_phase_wraps_and_queue_full(setup: Any) -> None:
    owner, pool, q = setup
    r, _b = io(pool, lib.UVB_NVME_IO_READ, 4096, tag=1)
    slot = 0
    phase = 1
    for rnd in range(5):
        reqs = ffi.new("struct uvb_nvme_io[]", 7)
        for i in range(7):
            reqs[i] = r[0]
            reqs[i].tag = rnd * 10 + i
        assert lib.uvb_nvme_submit(q.q, reqs, 7) == 7       # depth 8: 7 in flight at most
        assert lib.uvb_nvme_submit(q.q, reqs, 1) == 0       # full
        cids = [int(sqe(q, (rnd * 7 + i) % 8).cid) for i in range(7)]
        for c in cids:
            post(q, slot, c, phase=phase)
            slot += 1
            if slot == 8:
                slot, phase = 0, phase ^ 1
        got = []
        while len(got) < 7:
            n = q.reap()
            assert n > 0
            got += [int(q.tags[i]) for i in range(n)]
        assert sorted(got) == [rnd * 10 + i for i in range(7)]
        assert q.reap() == 0                               # stale phase entries are not reread


def test_invalid_completion_kills_the_queue(setup: Any) -> None:
    owner, pool, q = setup
    r, _b = io(pool, lib.UVB_NVME_IO_READ, 4096, tag=1)
    assert lib.uvb_nvme_submit(q.q, r, 1) == 1
    post(q, 0, 5)                                          # a command id that is not in flight
    with pytest.raises(ControllerFatal, match="command id 5"):
        q.reap()
    assert owner.failed == [lib.UVB_NVME_ECQE]
    assert lib.uvb_nvme_submit(q.q, r, 1) == lib.UVB_NVME_EDEAD


def test_malformed_requests_are_refused(setup: Any) -> None:
    owner, pool, q = setup
    r, _b = io(pool, lib.UVB_NVME_IO_READ, 4096, tag=1, offset=2)     # not dword aligned
    assert lib.uvb_nvme_submit(q.q, r, 1) == lib.UVB_NVME_EREQ
    assert "dword" in q.errmsg() and q.inflight == 0 and int(q.q.sq_doorbells) == 0
    r, _b = io(pool, lib.UVB_NVME_IO_READ, 130 * 4096, tag=1)          # over max_pages
    assert lib.uvb_nvme_submit(q.q, r, 1) == lib.UVB_NVME_EREQ
    assert "more than 129" in q.errmsg()


def test_waits_end_with_clear_errors(setup: Any) -> None:
    owner, pool, q = setup
    r, _b = io(pool, lib.UVB_NVME_IO_READ, 4096, tag=1)
    assert lib.uvb_nvme_submit(q.q, r, 1) == 1
    assert q.wait(0.05) == 0                               # an explicit timeout: nothing yet
    with pytest.raises(ControllerFatal, match="no completion for 0.3 s"):
        q.wait(None)                                       # the command timeout: an error
    owner.alive_error = DeviceRemoved("gone")
    with pytest.raises(DeviceRemoved):
        q.wait(None)


def test_depth_limits(setup: Any) -> None:
    owner, pool, _q = setup
    with pytest.raises(ConfigError):
        QueuePair(owner, 2, 1, pool, max_pages=2, vector=None, efd=None)

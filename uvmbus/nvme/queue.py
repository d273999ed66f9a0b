"""One NVMe submission/completion queue pair, driven by the C fast path (native/nvme.c).

Python allocates the queue memory, the per-command-id PRP list pages and tables, fills a
``struct uvb_nvme_qp`` and from then on calls C once per batch: ``uvb_nvme_submit`` (SQEs +
one doorbell), ``uvb_nvme_reap`` (validated completions + one doorbell).  Waiting: spin for
``spin_us``, then sleep on the queue's MSI-X eventfd (when the controller has one for it) or
poll with a short sleep; every wait also watches the controller's fatal status and the VFIO
request IRQ (surprise removal), so nothing hangs.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, Protocol

from uvmbus.dma import DmaBuffer, DmaPool
from uvmbus.errors import ConfigError, ControllerFatal, NvmeError
from uvmbus.native import ffi, lib

__all__ = ["QueuePair", "REAP_BATCH", "status_text"]

REAP_BATCH = 256

_GENERIC = {0x00: "success", 0x01: "invalid command opcode", 0x02: "invalid field in command",
            0x03: "command id conflict", 0x04: "data transfer error",
            0x05: "commands aborted due to power loss", 0x06: "internal error",
            0x07: "command abort requested", 0x08: "command aborted (SQ deleted)",
            0x0B: "invalid namespace or format", 0x0D: "invalid SGL descriptor",
            0x13: "invalid PRP offset", 0x80: "LBA out of range", 0x81: "capacity exceeded",
            0x82: "namespace not ready", 0x83: "reservation conflict"}
_MEDIA = {0x80: "write fault", 0x81: "unrecovered read error", 0x82: "end-to-end guard check",
          0x86: "access denied", 0x87: "deallocated or unwritten logical block"}


class QueueOwner(Protocol):
    """What a queue pair needs from its controller (uvmbus.nvme.controller.Controller)."""

    dstrd: int
    bar_ptr: Any
    timeout: float
    spin_us: int

    def check_alive(self) -> None: ...

    def _queue_failed(self, q: QueuePair, rc: int) -> None: ...


def status_text(status: int) -> str:
    """Human text for a 15-bit NVMe status field (phase bit removed)."""
    sc, sct = status & 0xFF, (status >> 8) & 0x7
    if sct == 0:
        name = _GENERIC.get(sc, "generic error")
    elif sct == 1:
        name = "command specific error"
    elif sct == 2:
        name = _MEDIA.get(sc, "media or data integrity error")
    else:
        name = "vendor specific / path error"
    dnr = " (do not retry)" if status & 0x4000 else ""
    return f"{name} [SCT {sct:#x} SC {sc:#04x}]{dnr}"


class QueuePair:
    """See the module docstring.  ``qid`` 0 is the admin queue."""

    def __init__(self, ctl: QueueOwner, qid: int, depth: int, pool: DmaPool, *,
                 max_pages: int, vector: int | None, efd: int | None) -> None:
        if not 2 <= depth <= lib.UVB_NVME_MAX_DEPTH:
            raise ConfigError(f"NVMe queue depth {depth} outside 2..{lib.UVB_NVME_MAX_DEPTH}")
        self.ctl = ctl
        self.qid = qid
        self.depth = depth
        self.vector = vector
        self.efd = efd
        self._bufs: list[DmaBuffer] = []
        self.sq_buf = self._alloc(pool, depth * 64)
        self.cq_buf = self._alloc(pool, depth * 16)
        self.prp_buf = self._alloc(pool, depth * 4096)
        for b in (self.sq_buf, self.cq_buf):
            b.view[:] = bytes(b.size)
        q = ffi.new("struct uvb_nvme_qp *")
        self.q = q
        q.sq = ffi.cast("struct uvb_nvme_sqe *", self.sq_buf.ptr)
        q.cq = ffi.cast("struct uvb_nvme_cqe *", self.cq_buf.ptr)
        self._cid_tag = ffi.new("uint64_t[]", depth)
        self._cid_busy = ffi.new("uint8_t[]", depth)
        self._free = ffi.new("uint16_t[]", depth)
        q.cid_tag, q.cid_busy, q.free_cids = self._cid_tag, self._cid_busy, self._free
        q.prp_va = ffi.cast("uint64_t *", self.prp_buf.ptr)
        q.prp_dma = self.dma_addr(self.prp_buf)
        q.depth = depth
        q.max_pages = max_pages
        q.qid = qid
        stride = 4 << ctl.dstrd
        q.sq_db = ffi.cast("uint32_t *", ctl.bar_ptr + lib.UVB_NVME_REG_DBS + (2 * qid) * stride)
        q.cq_db = ffi.cast("uint32_t *", ctl.bar_ptr + lib.UVB_NVME_REG_DBS + (2 * qid + 1) * stride)
        lib.uvb_nvme_qp_reset(q)
        self.tags = ffi.new("uint64_t[]", REAP_BATCH)
        self.status = ffi.new("uint16_t[]", REAP_BATCH)
        self.dw0 = ffi.new("uint32_t[]", REAP_BATCH)
        self.spin_us = ctl.spin_us
        self.interrupts = 0

    @staticmethod
    def _alloc(pool: DmaPool, size: int) -> DmaBuffer:
        return pool.alloc(size)

    @staticmethod
    def dma_addr(buf: DmaBuffer, offset: int = 0) -> int:
        """DMA address of byte ``offset`` of ``buf`` (contiguous within one 4 KiB page)."""
        off = buf.offset + offset
        return (int(buf.region.pfn_table[off >> 12]) << 12) | (off & 4095)

    @property
    def inflight(self) -> int:
        return int(self.q.inflight)

    @property
    def free_slots(self) -> int:
        return int(self.q.nfree)

    def errmsg(self) -> str:
        return ffi.string(self.q.errmsg).decode(errors="replace")

    # -- completions -----------------------------------------------------------------------------
    def reap(self, max_n: int = REAP_BATCH) -> int:
        n = lib.uvb_nvme_reap(self.q, self.tags, self.status, self.dw0, min(max_n, REAP_BATCH))
        if n < 0:
            self.ctl._queue_failed(self, n)
        return int(n)

    def wait(self, timeout: float | None) -> int:
        """Reap, waiting up to ``timeout`` seconds (None: the controller's command timeout)
        for at least one completion.  Returns the count (0 only when nothing is in flight or
        ``timeout`` is 0).  Raises ControllerFatal / DeviceRemoved / NvmeError on timeout."""
        n = self.reap()
        if n or timeout == 0 or not self.inflight:
            return n
        limit = self.ctl.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if self.spin_us:
            spin_end = time.perf_counter() + self.spin_us / 1e6
            while time.perf_counter() < spin_end:
                n = self.reap()
                if n:
                    return n
        nap = 0.00005
        while True:
            self.ctl.check_alive()
            n = self.reap()
            if n:
                return n
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.efd is not None:
                r, _, _ = select.select([self.efd], [], [], min(remaining, 0.05))
                if r:
                    try:
                        os.read(self.efd, 8)
                        self.interrupts += 1
                    except BlockingIOError:
                        pass
            else:
                time.sleep(min(nap, remaining))
                nap = min(nap * 2, 0.002)
        self.ctl.check_alive()
        if timeout is not None:
            return 0
        raise ControllerFatal(f"NVMe queue {self.qid}: no completion for {limit:g} s with "
                              f"{self.inflight} command(s) in flight; the controller is not "
                              "answering (reset it: close and reopen, or `uvmbus unbind` and "
                              "rebind the function)")

    def command_error(self, status: int, what: str) -> NvmeError:
        return NvmeError(f"{what}: {status_text(status)}", sct=(status >> 8) & 7, sc=status & 0xFF)

    def free(self) -> None:
        for b in (self.sq_buf, self.cq_buf, self.prp_buf):
            if not b.freed:
                b.free()

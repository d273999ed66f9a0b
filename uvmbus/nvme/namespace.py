"""An NVMe namespace as a block device: the same API as :class:`uvmbus.storvsc.Disk`.

Byte offsets and lengths must be multiples of :attr:`Namespace.block_size` and stay inside
the namespace.  Synchronous calls claim one I/O queue of the controller for their duration
(one queue per thread), split at the controller's maximum transfer, keep every piece in
flight at once and copy through DMA bounce buffers (zero copy with a DmaBuffer).
:meth:`Namespace.batch` gives the array-based interface (:class:`NvmeBatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uvmbus.block.interface import ByteIO, check_range, piece_buffer
from uvmbus.block.slots import SlotBatch
from uvmbus.dma import DmaBuffer
from uvmbus.errors import ConfigError, IllegalRequest, StorageError
from uvmbus.native import ffi, lib
from uvmbus.nvme.queue import REAP_BATCH, QueuePair

#: the owning uvmbus.nvme.controller.Controller (not imported: the controller imports us)
Controller = Any

__all__ = ["Namespace", "NvmeBatch"]


class Namespace(ByteIO):
    """One active namespace (see the module docstring)."""

    def __init__(self, controller: Controller, nsid: int, blocks: int, block_size: int, *,
                 nguid: str = "", eui64: str = "", dlfeat: int = 0) -> None:
        self.controller = controller
        self.nsid = nsid
        self.blocks = blocks
        self.block_size = block_size
        self.nguid = nguid
        self.eui64 = eui64
        self.dlfeat = dlfeat
        self.gone = False

    @classmethod
    def from_identify(cls, ctl: Controller, nsid: int, data: bytes) -> Namespace:
        idn = ffi.cast("struct uvb_nvme_id_ns *", ffi.from_buffer(data))
        fmt = idn.flbas & 0xF | ((idn.flbas >> 1) & 0x30)
        if fmt > idn.nlbaf:
            raise StorageError(f"namespace {nsid}: FLBAS {fmt} > NLBAF {idn.nlbaf}")
        lbads = int(idn.lbaf[fmt].lbads)
        if not 9 <= lbads <= 16:
            raise StorageError(f"namespace {nsid}: LBA data size 2^{lbads} is not supported")
        if idn.lbaf[fmt].ms and not idn.flbas & 0x10:
            raise StorageError(f"namespace {nsid}: formatted with separate metadata, not supported")
        return cls(ctl, nsid, int(idn.nsze), 1 << lbads,
                   nguid=bytes(idn.nguid).hex(), eui64=bytes(idn.eui64).hex(),
                   dlfeat=int(idn.dlfeat))

    # ==== identity (Disk names) ==================================================================
    @property
    def lun(self) -> int:
        return self.nsid

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    @property
    def unmap_supported(self) -> bool:
        return bool(self.controller.oncs & lib.UVB_NVME_ONCS_DSM)

    @property
    def write_zeroes_supported(self) -> bool:
        return bool(self.controller.oncs & lib.UVB_NVME_ONCS_WRITE_ZEROES)

    def describe(self) -> dict[str, Any]:
        c = self.controller
        return {"lun": self.nsid, "nsid": self.nsid, "size": self.size,
                "block_size": self.block_size, "blocks": self.blocks, "vendor": "NVMe",
                "product": c.model, "revision": c.firmware, "serial": c.serial,
                "nguid": self.nguid, "eui64": self.eui64, "unmap": self.unmap_supported,
                "write_zeroes": self.write_zeroes_supported, "volatile_write_cache": c.vwc,
                "rotation_rate": 1}

    def __repr__(self) -> str:
        return f"<Namespace {self.nsid} of {self.controller.fn.name}: {self.size} bytes>"

    # ==== checks ====================================================================================
    def _check(self, offset: int, length: int, what: str) -> None:
        self.controller.check_alive()
        check_range(what, offset, length, self.block_size, self.size, f"namespace {self.nsid}")

    # ==== synchronous I/O ============================================================================
    def _run(self, q: QueuePair, reqs: Any, n: int, what: str) -> None:
        """Submit ``reqs[0:n]`` and wait for all; raise the first error."""
        sent = done = 0
        first_err: Exception | None = None
        while done < n:
            if sent < n:
                rc = lib.uvb_nvme_submit(q.q, reqs + sent, n - sent)
                if rc < 0:
                    self.controller._queue_failed(q, rc)
                sent += rc
            got = q.wait(None)
            for i in range(got):
                st = int(q.status[i])
                if st and first_err is None:
                    first_err = q.command_error(st, f"{what} on namespace {self.nsid} "
                                                    f"(request {int(q.tags[i])})")
            done += got
        if first_err is not None:
            raise first_err

    def _io(self, write: bool, offset: int, view: memoryview | None, dma: DmaBuffer | None,
            length: int, fua: bool) -> int:
        what = "write" if write else "read"
        self._check(offset, length, what)
        if length == 0:
            return 0
        ctl = self.controller
        chunk = ctl.max_transfer - ctl.max_transfer % self.block_size
        pieces = [(off, min(chunk, length - off)) for off in range(0, length, chunk)]
        q = ctl.claim_queue()
        try:
            window = max(1, min(64, q.depth - 1))
            for w in range(0, len(pieces), window):
                part = pieces[w:w + window]
                reqs = ffi.new("struct uvb_nvme_io[]", len(part))
                bounce: list[DmaBuffer] = []
                try:
                    for j, (off, n) in enumerate(part):
                        buf, boff = piece_buffer(ctl.alloc_buffer, dma, view, off, n, write, bounce)
                        r = reqs[j]
                        start = buf.offset + boff
                        r.tag = j
                        r.kind = lib.UVB_NVME_IO_WRITE if write else lib.UVB_NVME_IO_READ
                        r.flags = lib.UVB_NVME_IO_FUA if fua else 0
                        r.nsid = self.nsid
                        r.slba = (offset + off) // self.block_size
                        r.nlb = n // self.block_size
                        r.length = n
                        r.pfns = buf.region.pfn_table + (start >> 12)
                        r.byte_offset = start & 4095
                    self._run(q, reqs, len(part), what)
                    if not write and dma is None:
                        assert view is not None
                        for (off, n), b in zip(part, bounce, strict=True):
                            view[off:off + n] = b.view[:n]
                finally:
                    if q.inflight == 0:
                        for b in bounce:
                            b.free()
        finally:
            ctl.release_queue(q)
        return length

    def _simple(self, kind: int, what: str, *, slba: int = 0, nlb: int = 0,
                data: DmaBuffer | None = None, count: int = 0) -> None:
        ctl = self.controller
        q = ctl.claim_queue()
        try:
            r = ffi.new("struct uvb_nvme_io[]", 1)
            r[0].kind, r[0].nsid, r[0].slba, r[0].nlb = kind, self.nsid, slba, nlb
            if data is not None:
                r[0].length = count * 16
                r[0].pfns = data.region.pfn_table + (data.offset >> 12)
                r[0].byte_offset = data.offset & 4095
            self._run(q, r, 1, what)
        finally:
            ctl.release_queue(q)

    def flush(self) -> None:
        """FLUSH: everything written is on stable storage."""
        self._check(0, 0, "flush")
        self._simple(lib.UVB_NVME_IO_FLUSH, "FLUSH")

    def discard(self, offset: int, length: int) -> None:
        """Dataset Management (deallocate) of ``[offset, offset + length)``."""
        self._check(offset, length, "discard")
        if not self.unmap_supported:
            raise IllegalRequest(f"{self.controller.fn.name} does not support Dataset "
                                 "Management (ONCS bit 2)")
        bs = self.block_size
        lba, blocks = offset // bs, length // bs
        ranges = []
        while blocks:
            n = min(blocks, 0xFFFFFFFF)
            ranges.append((lba, n))
            lba += n
            blocks -= n
        buf = self.controller.alloc_buffer(4096)
        try:
            for i in range(0, len(ranges), 256):
                part = ranges[i:i + 256]
                arr = ffi.cast("struct uvb_nvme_dsm_range *", buf.ptr)
                for j, (s, n) in enumerate(part):
                    arr[j].attributes, arr[j].nlb, arr[j].slba = 0, n, s
                self._simple(lib.UVB_NVME_IO_DSM, "DSM deallocate", nlb=len(part), data=buf,
                             count=len(part))
        finally:
            buf.free()

    def write_zeroes(self, offset: int, length: int) -> None:
        """WRITE ZEROES over ``[offset, offset + length)`` (no data transfer)."""
        self._check(offset, length, "write zeroes")
        if not self.write_zeroes_supported:
            raise IllegalRequest(f"{self.controller.fn.name} does not support Write Zeroes "
                                 "(ONCS bit 3)")
        bs = self.block_size
        lba, blocks = offset // bs, length // bs
        while blocks:
            n = min(blocks, 65536)
            self._simple(lib.UVB_NVME_IO_ZEROES, "WRITE ZEROES", slba=lba, nlb=n)
            lba += n
            blocks -= n

    # ==== batch ======================================================================================
    def batch(self, slots: int, size: int, *, write: bool = False, fua: bool = False) -> NvmeBatch:
        self._check(0, size, "batch")
        return NvmeBatch(self, slots, size, write=write, fua=fua)


class NvmeBatch(SlotBatch):
    """Array-based batch I/O on one claimed I/O queue: the same interface as
    :class:`uvmbus.storvsc.IoBatch` (``submit``/``reap``/``tags``/``ok``/``error``/``drain``)."""

    READ_KIND = lib.UVB_NVME_IO_READ
    WRITE_KIND = lib.UVB_NVME_IO_WRITE

    def __init__(self, ns: Namespace, slots: int, size: int, *, write: bool = False,
                 fua: bool = False) -> None:
        ctl = ns.controller
        bs = ns.block_size
        if slots <= 0 or size <= 0 or size % bs:
            raise ConfigError(f"NvmeBatch needs slots > 0 and a size that is a multiple of {bs}")
        if size > ctl.max_transfer:
            raise ConfigError(f"NvmeBatch size {size} exceeds the controller's maximum transfer "
                              f"{ctl.max_transfer}")
        self.disk = ns
        self.controller = ctl
        self.size = size
        self.queue = ctl.claim_queue()
        self.buffers: list[DmaBuffer] = []
        self._closed = False
        if slots > self.queue.depth - 1:
            ctl.release_queue(self.queue)
            self._closed = True
            raise ConfigError(f"NvmeBatch of {slots} slots exceeds the queue depth "
                              f"{self.queue.depth - 1}")
        self.nslots = slots
        try:
            self.buffers = [ctl.alloc_buffer(size) for _ in range(slots)]
        except BaseException:
            self.close()
            raise
        self.table: Any = ffi.new("struct uvb_nvme_io[]", slots)
        kind = lib.UVB_NVME_IO_WRITE if write else lib.UVB_NVME_IO_READ
        for i, b in enumerate(self.buffers):
            r = self.table[i]
            r.tag, r.kind, r.nsid = i, kind, ns.nsid
            r.flags = lib.UVB_NVME_IO_FUA if fua else 0
            r.nlb, r.length = size // bs, size
            r.pfns = b.region.pfn_table + (b.offset >> 12)
            r.byte_offset = b.offset & 4095
        self.blocks_per_slot = size // bs
        self.tags = self.queue.tags
        self.ok: Any = ffi.new("uint8_t[]", REAP_BATCH)
        self._init_slots(slots)
        self._status: list[int] = []
        self.inflight = 0
        self.completed = 0
        self.errors = 0

    def submit(self, slots: Sequence[int] | Any, lbas: Sequence[int] | Any, *, n: int | None = None,
               write: bool | None = None) -> int:
        count, sp, lp, kp = self._submit_args(slots, lbas, n, write)
        if count == 0:
            return 0
        rc = lib.uvb_nvme_submit_slots(self.queue.q, self.table, sp, lp, kp, count)
        if rc < 0:
            self.controller._queue_failed(self.queue, rc)
        self.inflight += rc
        return int(rc)

    def reap(self, timeout: float | None = 0.0) -> int:
        q = self.queue
        if not self.inflight:
            return 0
        n = q.wait(timeout if timeout is not None else None)
        bad = 0
        status = q.status
        for i in range(n):
            ok = status[i] == 0
            self.ok[i] = ok
            if not ok:
                bad += 1
        self.errors += bad
        self.inflight -= n
        self.completed += n
        return n

    def error(self, i: int) -> Exception:
        st = int(self.queue.status[i])
        slot = int(self.tags[i])
        return self.queue.command_error(st, f"batch slot {slot} LBA {int(self.table[slot].slba)} "
                                            f"on namespace {self.disk.nsid}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.inflight and self.controller.dead is None:
                self.drain()
        finally:
            if self.inflight == 0:
                for b in self.buffers:
                    if not b.freed:
                        b.free()
            self.controller.release_queue(self.queue)

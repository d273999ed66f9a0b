"""Array-based batch I/O: a fixed table of requests ("slots") resubmitted without Python
work per request.

An :class:`IoBatch` claims one queue (channel) of the controller for itself and owns
``slots`` DMA buffers of ``size`` bytes; slot ``i`` is a prebuilt READ(16)/WRITE(16) of its
buffer.  :meth:`IoBatch.submit` sends any set of slots at new LBAs in one C call;
:meth:`IoBatch.reap` returns the completed slots and a success flag for each, in arrays,
from one C call.  This is what ``uvmbus blk bench`` drives, and what an application with
its own buffer management (an NBD server, a database) would use for queue depth::

    with disk.batch(slots=32, size=4096) as b:
        b.submit(range(32), [lba * 8 for lba in some_lbas])
        while ...:
            n = b.reap(timeout=1.0)
            for i in range(n):
                slot = b.tags[i]
                if not b.ok[i]:
                    raise b.error(i)
                ... b.buffers[slot].view ...

While a batch holds its queue, the controller's other commands use the remaining queues
(with a single channel, close the batch before synchronous I/O).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from uvmbus.dma import DmaBuffer
from uvmbus.errors import ConfigError, ProtocolError, StorageError
from uvmbus.native import ffi, lib
from uvmbus.storvsc import scsi
from uvmbus.storvsc.command import BlockLun, Command
from uvmbus.storvsc.queue import REAP_BATCH, IoQueue

__all__ = ["IoBatch"]


class IoBatch:
    """See the module docstring."""

    def __init__(self, disk: BlockLun, slots: int, size: int, *, queue: IoQueue | None = None,
                 write: bool = False, fua: bool = False) -> None:
        ctl = disk.controller
        bs = disk.block_size
        if slots <= 0 or size <= 0 or size % bs:
            raise ConfigError(f"IoBatch needs slots > 0 and a size that is a multiple of {bs}")
        limit = disk.max_transfer
        if size > limit:
            raise ConfigError(f"IoBatch size {size} exceeds the maximum transfer of {limit} bytes "
                              f"of LUN {disk.lun} (host and VPD 0xB0 limits); use smaller slots")
        self.disk = disk
        self.controller = ctl
        self.size = size
        self.queue = ctl.claim_queue(queue)
        if slots > self.queue.depth:
            ctl.release_queue(self.queue)
            raise ConfigError(f"IoBatch of {slots} slots exceeds the queue depth {self.queue.depth}")
        self.nslots = slots
        self.buffers: list[DmaBuffer] = []
        try:
            self.buffers = [ctl.alloc_buffer(size) for _ in range(slots)]
        except BaseException:
            self.close()
            raise
        self.table: Any = ffi.new("struct uvb_stor_req[]", slots)
        kind = lib.UVB_STOR_WRITE16 if write else lib.UVB_STOR_READ16
        for i, b in enumerate(self.buffers):
            r = self.table[i]
            r.tag = i
            r.kind = kind
            r.flags = lib.UVB_STOR_FUA if fua else 0
            r.lun = disk.lun
            r.length = size
            r.blocks = size // bs
            r.pfns = b.region.pfn_table + (b.offset >> 12)
            r.byte_offset = b.offset & 4095
        self.blocks_per_slot = size // bs
        #: filled by :meth:`reap`: slot of each completion, 1 if it succeeded
        self.tags: Any = ffi.new("uint64_t[]", REAP_BATCH)
        self.ok: Any = ffi.new("uint8_t[]", REAP_BATCH)
        self._nbad = ffi.new("uint32_t *")
        self._slots = ffi.new("uint64_t[]", slots)
        self._lbas = ffi.new("uint64_t[]", slots)
        self._kinds = ffi.new("uint8_t[]", slots)
        self.inflight = 0
        self.completed = 0
        self.errors = 0
        self._closed = False

    # -- submission -------------------------------------------------------------------------
    def submit(self, slots: Sequence[int] | Any, lbas: Sequence[int] | Any, *, n: int | None = None,
               write: bool | None = None) -> int:
        """Send ``slots[i]`` at ``lbas[i]`` for i < n (default len(slots)); Python sequences
        or ``uint64_t[]`` cdata.  ``write`` switches the slots' direction (None: keep).
        Returns how many went out (fewer if the ring filled; resubmit the rest later)."""
        count = len(slots) if n is None else n
        if count == 0:
            return 0
        sp = slots if isinstance(slots, ffi.CData) else self._fill(self._slots, slots, count)
        lp = lbas if isinstance(lbas, ffi.CData) else self._fill(self._lbas, lbas, count)
        kp = ffi.NULL
        if write is not None:
            k = lib.UVB_STOR_WRITE16 if write else lib.UVB_STOR_READ16
            for i in range(count):
                self._kinds[i] = k
            kp = self._kinds
        rc = lib.uvb_stor_submit_slots(self.queue.q, self.table, sp, lp, kp, count)
        if rc < 0:
            if rc in (lib.UVB_STOR_EFULL, lib.UVB_EAGAIN):
                return 0
            self.queue._fail(rc, "submitting a batch")
        self.inflight += rc
        return rc

    @staticmethod
    def _fill(arr: Any, values: Sequence[int], n: int) -> Any:
        for i in range(n):
            arr[i] = values[i]
        return arr

    def random_lbas(self, out: Any, n: int, state: Any, *, span_blocks: int | None = None) -> None:
        """Fill ``out[0:n]`` with random slot-aligned LBAs inside the disk (C; ``state`` is
        a ``uint64_t *`` seed/state)."""
        span = self.disk.blocks if span_blocks is None else span_blocks
        lib.uvb_stor_random_lbas(out, n, span // self.blocks_per_slot, self.blocks_per_slot, 0, state)

    # -- completion -------------------------------------------------------------------------
    def reap(self, timeout: float | None = 0.0) -> int:
        """Completions into :attr:`tags` / :attr:`ok`; waits up to ``timeout`` (None: until
        one arrives) when there are none.  Unsolicited host packets go to the controller."""
        q = self.queue
        deadline = None
        while True:
            n = lib.uvb_stor_reap_tags(q.q, q.cpls, self.tags, self.ok, REAP_BATCH, self._nbad)
            if n < 0:
                q._fail(n, "reading completions")
            if n and self._nbad[0]:
                n = self._sort_out(n)
            if n:
                self.inflight -= n
                self.completed += n
                return n
            if timeout == 0.0 or self.inflight == 0:
                return 0
            remaining = None
            if timeout is not None:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout
                remaining = deadline - now
                if remaining <= 0:
                    return 0
            # wake-ups can be spurious (an interrupt for completions already reaped): loop
            self.controller._wait_queue(q, remaining)

    def _sort_out(self, n: int) -> int:
        """Handle the non-success entries: unsolicited packets to the controller (removed
        from the arrays), failed requests stay with ok = 0."""
        cpls = self.queue.cpls
        keep = 0
        for i in range(n):
            c = cpls[i]
            if c.kind == lib.UVB_STOR_CPL_DONE:
                if not self.ok[i]:
                    self.errors += 1
                if keep != i:
                    self.tags[keep] = self.tags[i]
                    self.ok[keep] = self.ok[i]
                    ffi.memmove(ffi.addressof(cpls, keep), ffi.addressof(cpls, i),
                                ffi.sizeof("struct uvb_stor_cpl"))
                keep += 1
            else:
                self.controller._foreign_cpl(self.queue, c)
        return keep

    def error(self, i: int) -> Exception:
        """The exception for completion ``i`` of the last :meth:`reap` with ``ok[i] == 0``."""
        c = self.queue.cpls[i]
        slot = int(self.tags[i])
        r = self.table[slot]
        cmd = Command(kind=int(r.kind), lun=self.disk.lun, length=self.size,
                               lba=int(r.lba), what=f"batch slot {slot} LBA {int(r.lba)}")
        if c.error:
            return ProtocolError(f"{cmd.what}: malformed completion from the host (error {c.error})")
        cmd.status, cmd.srb_status, cmd.scsi_status = int(c.status), int(c.srb_status), int(c.scsi_status)
        sense = scsi.parse_sense(bytes(ffi.buffer(c.sense, c.sense_len))) if c.sense_len else None
        return self.controller._error_for(cmd, cmd.srb_status & 0x3F, sense)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait for every request in flight."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageError(f"IoBatch: {self.inflight} requests still in flight after {timeout} s")
            self.reap(remaining)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.inflight:
                self.drain()
        finally:
            for b in self.buffers:
                if not b.freed:
                    b.free()
            self.controller.release_queue(self.queue)

    def __enter__(self) -> IoBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


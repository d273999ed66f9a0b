"""Array-based batch I/O: a fixed table of requests ("slots") resubmitted without Python
work per request.

An :class:`IoBatch` claims ``channels`` queues (channels; default one) of the controller for
itself and owns ``slots`` DMA buffers of ``size`` bytes; slot ``i`` is a prebuilt READ(16)/WRITE(16) of its
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

While a batch holds its queues, the controller's other commands use the remaining queues
(when the batch holds them all, close it before synchronous I/O).

Several channels: slot ``i`` always goes to claimed channel ``i % channels`` (a fixed
spread, as the kernel maps each CPU to one channel, storvsc_drv.c ``get_og_chn``); one
:meth:`IoBatch.submit` groups the slots per channel in C and sends each group with one call
(one signal decision per channel), :meth:`IoBatch.reap` takes the completions of one channel
per call, visiting the channels in turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from uvmbus.block.slots import SlotBatch
from uvmbus.dma import DmaBuffer
from uvmbus.errors import ConfigError, ProtocolError
from uvmbus.native import ffi, lib
from uvmbus.storvsc import scsi
from uvmbus.storvsc.command import BlockLun, Command
from uvmbus.storvsc.queue import REAP_BATCH, IoQueue

__all__ = ["IoBatch"]


class IoBatch(SlotBatch):
    """See the module docstring."""

    READ_KIND = lib.UVB_STOR_READ16
    WRITE_KIND = lib.UVB_STOR_WRITE16

    def __init__(self, disk: BlockLun, slots: int, size: int, *, queue: IoQueue | None = None,
                 write: bool = False, fua: bool = False, channels: int = 1) -> None:
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
        if channels < 1 or (queue is not None and channels != 1):
            raise ConfigError(f"IoBatch channels must be >= 1 (and 1 with an explicit queue), "
                              f"not {channels}")
        if channels > slots:
            raise ConfigError(f"IoBatch of {slots} slots cannot use {channels} channels "
                              "(at least one slot per channel)")
        self.queues: list[IoQueue] = []
        try:
            for _ in range(channels):
                self.queues.append(ctl.claim_queue(queue))
        except ConfigError as exc:
            for q in self.queues:
                ctl.release_queue(q)
            raise ConfigError(f"IoBatch over {channels} channel(s): {exc}") from None
        self.queues.sort(key=lambda x: x.index)
        #: the first claimed queue; :attr:`last_queue` is the one of the last reap
        self.queue = self.last_queue = self.queues[0]
        per = -(-slots // channels)
        if per > self.queue.depth:
            for q in self.queues:
                ctl.release_queue(q)
            raise ConfigError(f"IoBatch of {slots} slots over {channels} channel(s) needs {per} per "
                              f"channel, more than the queue depth {self.queue.depth}")
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
        self._init_slots(slots)
        nq = len(self.queues)
        self._rslots = ffi.new("uint64_t[]", slots)
        self._rlbas = ffi.new("uint64_t[]", slots)
        self._rkinds = ffi.new("uint8_t[]", slots)
        self._counts = ffi.new("uint32_t[]", nq)
        self._next = 0
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
        count, sp, lp, kp = self._submit_args(slots, lbas, n, write)
        if count == 0:
            return 0
        if len(self.queues) == 1:
            rc = lib.uvb_stor_submit_slots(self.queue.q, self.table, sp, lp, kp, count)
            if rc < 0:
                if rc in (lib.UVB_STOR_EFULL, lib.UVB_EAGAIN):
                    return 0
                self.queue._fail(rc, "submitting a batch")
            self.inflight += rc
            return rc
        return self._submit_spread(sp, lp, kp, count)

    def _submit_spread(self, sp: Any, lp: Any, kp: Any, count: int) -> int:
        """Several channels: group per channel (C), one submit call per channel.  If a ring
        fills, the entries of ``sp``/``lp`` are reordered so that the first ``rc`` went out
        (the same contract as with one channel)."""
        nq = len(self.queues)
        rs, rl, rk, counts = self._rslots, self._rlbas, self._rkinds, self._counts
        lib.uvb_stor_route_slots(sp, lp, kp, count, nq, rs, rl, rk if kp != ffi.NULL else ffi.NULL,
                                 counts)
        total = 0
        off = 0
        sent: list[tuple[int, int, int]] = []       # (offset, sent, routed) per channel
        for k, q in enumerate(self.queues):
            c = int(counts[k])
            rc = 0
            if c:
                rc = lib.uvb_stor_submit_slots(q.q, self.table, rs + off,
                                               rl + off if lp != ffi.NULL else ffi.NULL,
                                               rk + off if kp != ffi.NULL else ffi.NULL, c)
                if rc < 0:
                    if rc not in (lib.UVB_STOR_EFULL, lib.UVB_EAGAIN):
                        self.inflight += total
                        q._fail(rc, "submitting a batch")
                    rc = 0
            sent.append((off, rc, c))
            total += rc
            off += c
        self.inflight += total
        if total < count:       # partial: the sent ones first, then the rest, in sp/lp
            order = [i for o, r, _ in sent for i in range(o, o + r)] + \
                    [i for o, r, c in sent for i in range(o + r, o + c)]
            for j, i in enumerate(order):
                sp[j] = rs[i]
                if lp != ffi.NULL:
                    lp[j] = rl[i]
        return total

    # -- completion -------------------------------------------------------------------------
    def reap(self, timeout: float | None = 0.0) -> int:
        """Completions into :attr:`tags` / :attr:`ok`; waits up to ``timeout`` (None: until
        one arrives) when there are none.  Unsolicited host packets go to the controller."""
        queues = self.queues
        nq = len(queues)
        deadline = None
        while True:
            n = 0
            for _ in range(nq):
                q = queues[self._next]
                self._next = (self._next + 1) % nq if nq > 1 else 0
                n = lib.uvb_stor_reap_tags(q.q, q.cpls, self.tags, self.ok, REAP_BATCH, self._nbad)
                if n < 0:
                    q._fail(n, "reading completions")
                if n:
                    self.last_queue = q
                    if self._nbad[0]:
                        n = self._sort_out(n)
                    if n:
                        break
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
            self.controller._wait_queues(queues, remaining)

    def _sort_out(self, n: int) -> int:
        """Handle the non-success entries: unsolicited packets to the controller (removed
        from the arrays), failed requests stay with ok = 0."""
        q = self.last_queue
        cpls = q.cpls
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
                self.controller._foreign_cpl(q, c)
        return keep

    def error(self, i: int) -> Exception:
        """The exception for completion ``i`` of the last :meth:`reap` with ``ok[i] == 0``."""
        c = self.last_queue.cpls[i]
        slot = int(self.tags[i])
        r = self.table[slot]
        cmd = Command(kind=int(r.kind), lun=self.disk.lun, length=self.size,
                               lba=int(r.lba), what=f"batch slot {slot} LBA {int(r.lba)}")
        if c.error:
            return ProtocolError(f"{cmd.what}: malformed completion from the host (error {c.error})")
        cmd.status, cmd.srb_status, cmd.scsi_status = int(c.status), int(c.srb_status), int(c.scsi_status)
        sense = scsi.parse_sense(bytes(ffi.buffer(c.sense, c.sense_len))) if c.sense_len else None
        return self.controller._error_for(cmd, cmd.srb_status & 0x3F, sense)

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
            for q in self.queues:
                self.controller.release_queue(q)


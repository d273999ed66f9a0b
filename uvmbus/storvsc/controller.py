"""The synthetic SCSI controller (HBA) seen from the guest: negotiation, queues, commands.

:class:`Controller` opens the device's channels, negotiates VSTOR (storvsc_ic.md §2.8),
creates sub-channels (§4), puts one :class:`~uvmbus.storvsc.queue.IoQueue` on every
channel, scans the LUNs and runs every SCSI command through one engine:

* commands are queued in order and handed to C in batches (the least busy queue first);
* completions are reaped in batches, matched by transaction id in C, then decoded here:
  SRB/SCSI status and sense become the exceptions of :mod:`uvmbus.errors`
  (:class:`MediumError`, :class:`IllegalRequest`, :class:`UnitAttention` - retried
  automatically -, :class:`DataProtect`, :class:`NotReady`, :class:`LunGone`), a malformed
  completion becomes a :class:`ProtocolError` for its command;
* a command without an answer within ``timeout`` triggers recovery: RESET_LUN, then
  RESET_BUS; the expired commands fail with :class:`ChannelTimeout` and their DMA buffers
  stay quarantined until a late completion arrives (the host may still write them);
* ENUMERATE_BUS / REMOVE_DEVICE from the host schedule a rescan (TEST UNIT READY to every
  known LUN, REPORT LUNS, INQUIRY of new ones), reported in :attr:`Controller.changes`.

The controller belongs to one thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uvmbus.channel import ChannelDevice, open_device
from uvmbus.dma import DmaBuffer, DmaMemory, DmaPool, open_dma_memory
from uvmbus.errors import (
    ChannelTimeout,
    ConfigError,
    LunGone,
    NegotiationError,
    NotFound,
    ProtocolError,
    RequestFailed,
    ReservationConflict,
    RingCorrupt,
    ScsiError,
    StorageError,
    UnitAttention,
    UvmbusError,
)
from uvmbus.native import ffi, lib
from uvmbus.storvsc import protocol as P
from uvmbus.storvsc import scsi
from uvmbus.storvsc.command import Command, ScsiResult
from uvmbus.storvsc.queue import HOST_QUEUE_DEPTH, REAP_BATCH, IoQueue

if TYPE_CHECKING:
    from uvmbus.bus import SystemView
    from uvmbus.storvsc.disk import Disk

__all__ = ["Command", "Controller", "LunChange", "ScsiResult", "open"]

RING_CHECK_S = 0.5        # longest wait without looking at the TX ring's read index
log = logging.getLogger("uvmbus.storvsc")

#: trans_id of every initialization request (Linux VMBUS_RQST_INIT = U64_MAX - 2)
RQST_INIT = 0xFFFFFFFFFFFFFFFD
INIT_TIMEOUT = 5.0
RESET_TIMEOUT = 5.0
UA_RETRIES = 4
MAX_BOUNCE_WINDOW = 64

_DONE = lib.UVB_STOR_CPL_DONE
_UNSOLICITED = lib.UVB_STOR_CPL_UNSOLICITED
_LATE = lib.UVB_STOR_CPL_LATE
_CPL_ERRORS = {
    lib.UVB_STOR_ESHORT: "payload shorter than the 64-byte VSTOR packet",
    lib.UVB_STOR_EOP: "operation is not COMPLETE_IO",
    lib.UVB_STOR_ETYPE: "not a VMBus completion packet (type 11)",
    lib.UVB_STOR_ETID: "transaction id of no outstanding request",
}
_GONE_SRB = {P.SrbStatus.INVALID_LUN, P.SrbStatus.NO_DEVICE, P.SrbStatus.INVALID_TARGET_ID,
             P.SrbStatus.SELECTION_TIMEOUT}


@dataclass(frozen=True)
class LunChange:
    """What one rescan found: LUNs added and removed."""

    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    resized: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.resized)


@dataclass
class ControllerInfo:
    device_id: str
    version: int
    properties: P.ChannelProperties
    channels: int
    queue_depth: int
    dma: str
    luns: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "protocol": P.version_name(self.version),
                "max_channels": self.properties.max_channel_count,
                "multi_channel": self.properties.multi_channel,
                "max_transfer_bytes": self.properties.max_transfer_bytes,
                "channels": self.channels, "queue_depth": self.queue_depth, "dma": self.dma,
                "luns": self.luns}


class Controller:
    """An open synthetic SCSI controller (see the module docstring).

    ``subchannels``: None asks for ``min(cpus - 1, host maximum)`` as Linux does, 0 for none.
    ``queue_depth``: per channel (at most the host's 256).  ``timeout``: seconds before a
    command counts as lost.  ``versions``: protocol versions to propose, newest first.
    """

    def __init__(self, device: ChannelDevice, *, root: str | os.PathLike[str] = "/",
                 subchannels: int | None = None, queue_depth: int = HOST_QUEUE_DEPTH,
                 timeout: float = 30.0, versions: Sequence[int] = P.GUEST_VERSIONS,
                 dma: DmaMemory | None = None, spin_us: int = 0, scan: bool = True) -> None:
        if not 1 <= queue_depth <= HOST_QUEUE_DEPTH:
            raise ConfigError(f"queue_depth must be 1..{HOST_QUEUE_DEPTH} (the host's per-channel "
                              f"limit), not {queue_depth}")
        self.device = device
        self.root = root
        self.timeout = timeout
        #: seconds to wait for a RESET_LUN / RESET_BUS answer during recovery
        self.reset_timeout = RESET_TIMEOUT
        self.spin_us = spin_us
        self.queue_depth = queue_depth
        self.queues: list[IoQueue] = []
        self._claimed: set[int] = set()
        self._rr = 0
        self.version = 0
        self.properties = P.ChannelProperties(0, 0, 0)
        self._pending: dict[int, Command] = {}
        self._backlog: deque[Command] = deque()
        self._completed: deque[Command] = deque()
        self._quarantine: dict[int, Command] = {}
        self._next_tag = 1
        self._disks: dict[int, Disk] = {}
        self._rescan_needed = False
        self._refresh: set[int] = set()
        self._in_api = 0
        self.changes: list[LunChange] = []
        self.on_change: Callable[[LunChange], None] | None = None
        self.counters: dict[str, int] = {"bogus_completions": 0, "malformed_completions": 0,
                                         "late_completions": 0, "timeouts": 0, "lun_resets": 0,
                                         "bus_resets": 0, "unit_attention_retries": 0,
                                         "rescans": 0, "enumerate_bus": 0,
                                         # sleeps in the wait loop (spurious ones included)
                                         "waits": 0}
        self.last_protocol_error: str | None = None
        self._failed: Exception | None = None
        self._closed = False
        self._own_dma = dma is None
        self.dma: DmaMemory | None = dma
        self.pool: DmaPool | None = None
        try:
            self._negotiate(versions)
            self._open_channels(subchannels)
            if self.dma is None:
                self.dma = open_dma_memory(root)
            self.pool = DmaPool(self.dma, buffer_size=None, region_size=4 << 20, max_regions=64,
                                name=f"storvsc-{device.device.device_id[:8]}")
            if scan:
                self.scan()
        except BaseException:
            self._teardown()
            raise

    # ==== negotiation (§2.8) ==================================================================
    def _init_request(self, op: int, body: bytes = b"", what: str = "") -> P.VstorPacket:
        pkt = P.build_packet(op, body=body)
        try:
            reply = self.device.primary.request(pkt, trans_id=RQST_INIT, timeout=INIT_TIMEOUT)
        except ChannelTimeout as exc:
            raise ChannelTimeout(f"storvsc {what or P.op_name(op)}: no completion within "
                                 f"{INIT_TIMEOUT:.0f} s (host not answering)",
                                 channel=self.device.primary.name) from exc
        if len(reply.payload) < P.PACKET_SIZE:
            raise ProtocolError(f"storvsc {what or P.op_name(op)}: completion of "
                                f"{len(reply.payload)} bytes, expected 64 (the host sizes replies "
                                "to requests; storvsc_ic.md §5.1)")
        return P.parse_packet(reply.payload)

    def _negotiate(self, versions: Sequence[int]) -> None:
        r = self._init_request(P.Op.BEGIN_INITIALIZATION)
        if not r.ok:
            raise NegotiationError(f"BEGIN_INITIALIZATION failed: operation {r.op_name}, status "
                                   f"{P.ntstatus_name(r.status)}")
        refused = []
        for v in versions:
            r = self._init_request(P.Op.QUERY_PROTOCOL_VERSION, P.version_body(v))
            if r.operation != P.Op.COMPLETE_IO:
                raise ProtocolError(f"QUERY_PROTOCOL_VERSION: reply operation {r.op_name}")
            if r.status == P.NtStatus.SUCCESS:
                self.version = v
                break
            refused.append(f"{P.version_name(v)} ({P.ntstatus_name(r.status)})")
        else:
            raise NegotiationError("the host accepted none of the storage protocol versions "
                                   f"proposed: {', '.join(refused)}")
        r = self._init_request(P.Op.QUERY_PROPERTIES)
        if not r.ok:
            raise NegotiationError(f"QUERY_PROPERTIES failed: {P.ntstatus_name(r.status)}")
        self.properties = r.properties()
        if self.properties.max_transfer_bytes < 4096:
            raise ProtocolError(f"host reports max_transfer_bytes {self.properties.max_transfer_bytes}"
                                " (< one page)")
        r = self._init_request(P.Op.END_INITIALIZATION)
        if not r.ok:
            raise NegotiationError(f"END_INITIALIZATION failed: {P.ntstatus_name(r.status)}")

    def _open_channels(self, subchannels: int | None) -> None:
        props = self.properties
        want = 0
        if props.multi_channel and props.max_channel_count:
            want = max(0, (os.cpu_count() or 1) - 1) if subchannels is None else subchannels
            want = min(want, props.max_channel_count)
        elif subchannels:
            log.info("storvsc: host does not offer multi-channel (protocol %s); using one channel",
                     P.version_name(self.version))
        if want:
            r = self._init_request(P.Op.CREATE_SUB_CHANNELS, P.sub_channel_body(want))
            if not r.ok:
                raise RequestFailed(f"CREATE_SUB_CHANNELS({want}) failed: "
                                    f"{P.ntstatus_name(r.status)}", status=r.status)
            self.device.open_subchannels(want)
        # anything the host sent meanwhile (ENUMERATE_BUS) is in the channel's backlog
        for p in self.device.primary.poll():
            self._unsolicited_packet(p.trans_id, bytes(p.payload))
        for i, ch in enumerate(self.device.channels):
            self.queues.append(IoQueue(ch, self.queue_depth, index=i))

    def _unsolicited_packet(self, trans_id: int, payload: bytes) -> None:
        op = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else 0
        if trans_id == 0 and op in (P.Op.ENUMERATE_BUS, P.Op.REMOVE_DEVICE):
            self.counters["enumerate_bus"] += 1
            self._rescan_needed = True

    # ==== info =================================================================================
    @property
    def max_transfer(self) -> int:
        """Largest data length of one request (the host's max_transfer_bytes, page aligned)."""
        return self.properties.max_transfer_bytes & ~4095

    @property
    def channels(self) -> int:
        return len(self.queues)

    @property
    def luns(self) -> list[Disk]:
        """The disks found by the last scan, by LUN."""
        self._api_entry()
        return [self._disks[k] for k in sorted(self._disks)]

    def disk(self, lun: int = 0) -> Disk:
        self._api_entry()
        d = self._disks.get(lun)
        if d is None:
            raise NotFound(f"no disk at LUN {lun}; LUNs: {sorted(self._disks)}")
        return d

    def info(self) -> ControllerInfo:
        return ControllerInfo(self.device.device.device_id, self.version, self.properties,
                              len(self.queues), self.queue_depth, getattr(self.dma, "kind", "?"),
                              sorted(self._disks))

    @property
    def inflight(self) -> int:
        return len(self._pending) + len(self._backlog)

    def stats(self) -> dict[str, Any]:
        qs = [q.stats() for q in self.queues]
        return {"counters": dict(self.counters), "queues": qs,
                "signals": sum(q["signals"] for q in qs),
                "submitted": sum(q["submitted"] for q in qs),
                "completed": sum(q["completed"] for q in qs)}

    # ==== DMA buffers ===========================================================================
    def alloc_buffer(self, size: int) -> DmaBuffer:
        """A DMA buffer from the controller's pool (for the batch interface)."""
        if self.pool is None:
            raise ConfigError("controller is closed")
        return self.pool.alloc(size)

    def _free_buffer(self, buf: DmaBuffer | None) -> None:
        if buf is not None and not buf.freed:
            buf.free()

    # ==== queues claimed by IoBatch ==============================================================
    def claim_queue(self, queue: IoQueue | None = None) -> IoQueue:
        """Reserve a queue for exclusive use (an :class:`~uvmbus.storvsc.batch.IoBatch`)."""
        self._check_usable()
        free = [q for q in self.queues if q.index not in self._claimed and q.inflight == 0]
        if queue is not None:
            if queue not in free:
                raise ConfigError(f"queue {queue.name} is busy or already claimed")
            free = [queue]
        if not free:
            raise ConfigError("no idle, unclaimed queue left (close an IoBatch, or open the "
                              "controller with more sub-channels)")
        q = max(free, key=lambda x: x.index)       # keep the primary for commands if we can
        self._claimed.add(q.index)
        return q

    def release_queue(self, queue: IoQueue) -> None:
        self._claimed.discard(queue.index)

    def _active_queues(self) -> list[IoQueue]:
        qs = [q for q in self.queues if q.index not in self._claimed]
        if not qs:
            raise ConfigError("every queue is claimed by an IoBatch: close it before running "
                              "other commands")
        return qs

    def _spin(self, queues: list[IoQueue]) -> bool:
        """Poll for completions for ``spin_us`` (in C, yielding the CPU between polls)."""
        if not self.spin_us:
            return False
        arr = ffi.new("struct uvb_stor_queue *[]", [q.q for q in queues])
        rc = lib.uvb_stor_spin(arr, len(queues), self.spin_us * 1000)
        if rc < 0:
            queues[0]._fail(rc, "polling for completions")
        return rc == 1

    def _wait_queue(self, q: IoQueue, timeout: float | None) -> None:
        """Wait for completions on one queue (IoBatch)."""
        self._wait_queues([q], timeout)

    def _wait_queues(self, queues: list[IoQueue], timeout: float | None) -> None:
        """Wait for completions on any of ``queues`` (an IoBatch over several channels).
        The rings are checked before and after, and a wait lasts at most RING_CHECK_S: the
        host's interrupt after breaking an index may have been taken by an earlier poll
        (callers loop on early returns, as on spurious wake-ups)."""
        self._check_rings(queues)
        if not self._spin(queues):
            self.counters["waits"] += 1
            self.device.wait([q.channel for q in queues],
                             RING_CHECK_S if timeout is None else min(timeout, RING_CHECK_S))
        self._check_rings(queues)

    def _check_rings(self, queues: Sequence[IoQueue]) -> None:
        """After a wake-up: a host that broke our TX ring's read_index (and stopped serving)
        is otherwise seen only by the next write, so requests in flight would wait for their
        timeout.  Loading and validating read_index costs one read per queue; a corrupt ring
        fails the controller with RingCorrupt now (every pending command gets the error)."""
        try:
            for q in queues:
                _ = q.channel.tx.free       # validates read_index; raises RingCorrupt
                q.channel.raise_if_dead()
        except RingCorrupt as exc:
            if self._failed is None:
                self._failed = exc
                for cmd in list(self._pending.values()):
                    self._abandon(cmd)
                    self._complete(cmd, exc)
            raise

    def _foreign_cpl(self, q: IoQueue, c: Any) -> None:
        """A non-completion packet seen by an IoBatch's reap."""
        if c.kind == _UNSOLICITED and c.operation in (P.Op.ENUMERATE_BUS, P.Op.REMOVE_DEVICE):
            self.counters["enumerate_bus"] += 1
            self._rescan_needed = True
        elif c.kind == _LATE:
            self.counters["late_completions"] += 1
        else:
            self._bogus(q, c, _CPL_ERRORS.get(c.error, f"unsolicited operation {c.operation}"))

    # ==== the command engine ===================================================================
    def _check_usable(self) -> None:
        if self._closed:
            raise ConfigError("storvsc controller is closed")
        if self._failed is not None:
            raise StorageError(f"storvsc controller failed earlier and must be reopened: "
                               f"{self._failed}")

    def submit(self, cmds: Iterable[Command], *, batch: bool = True) -> None:
        """Queue commands; batch ones come back from :meth:`reap`."""
        self._check_usable()
        cmds = list(cmds)
        for cmd in cmds:                      # validate all before queueing any
            if cmd.kind == lib.UVB_STOR_CDB and not 1 <= len(cmd.cdb) <= P.MAX_CDB_LEN:
                raise ConfigError(f"{cmd.what}: a CDB has 1..16 bytes, not {len(cmd.cdb)}")
            if cmd.kind in (lib.UVB_STOR_READ16, lib.UVB_STOR_WRITE16) and not (
                    cmd.blocks and cmd.length):
                raise ConfigError(f"{cmd.what}: a READ/WRITE needs blocks and a length")
            if cmd.length > self.max_transfer:
                raise ConfigError(f"{cmd.what}: {cmd.length} bytes exceed the host's maximum "
                                  f"transfer of {self.max_transfer} bytes; split it")
            if cmd.length and cmd.buffer is None:
                raise ConfigError(f"{cmd.what}: {cmd.length} data bytes but no DMA buffer")
            if cmd.buffer is not None and cmd.buf_offset + cmd.length > cmd.buffer.size:
                raise ConfigError(f"{cmd.what}: {cmd.length} bytes at {cmd.buf_offset} exceed the "
                                  f"{cmd.buffer.size}-byte DMA buffer")
        for cmd in cmds:
            cmd.tag = self._next_tag
            self._next_tag += 1
            cmd.batch = batch
            cmd.done = False
            self._backlog.append(cmd)
        self._pump()

    def _fill(self, r: Any, cmd: Command) -> None:
        r.tag = cmd.tag
        r.kind = cmd.kind
        r.lun = cmd.lun
        r.path_id = 0
        r.target_id = 0
        r.length = cmd.length
        r.flags = lib.UVB_STOR_FUA if cmd.fua else 0
        if cmd.length:
            buf = cmd.buffer
            assert buf is not None
            start = buf.offset + cmd.buf_offset
            r.pfns = buf.region.pfn_table + (start >> 12)
            r.byte_offset = start & 4095
        else:
            r.pfns = ffi.NULL
            r.byte_offset = 0
        if cmd.kind == lib.UVB_STOR_CDB:
            r.cdb_length = len(cmd.cdb)
            r.cdb[0:len(cmd.cdb)] = cmd.cdb
            r.data_in = cmd.data_in
        elif cmd.kind == lib.UVB_STOR_VSTOR_OP:
            r.operation = cmd.operation
        else:
            r.lba = cmd.lba
            r.blocks = cmd.blocks

    def _pump(self) -> None:
        """Hand queued commands to the least busy queues."""
        backlog = self._backlog
        queues = self._active_queues() if backlog else self.queues
        nq = len(queues)
        share = -(-len(backlog) // nq)          # spread a burst over every channel
        while backlog:
            self._rr = (self._rr + 1) % nq      # rotate ties: single requests alternate
            q = max(queues[self._rr:] + queues[:self._rr], key=lambda x: x.free_slots)
            free = q.free_slots
            if free == 0:
                return
            n = min(len(backlog), free, share, q.max_batch)
            reqs = q.reqs
            for i in range(n):
                self._fill(reqs[i], backlog[i])
            sent = q.submit(reqs, n)
            now = lib.uvb_now_ns()
            pending = self._pending
            for _ in range(sent):
                cmd = backlog.popleft()
                cmd.queue = q
                cmd.submit_ns = now
                pending[cmd.tag] = cmd
            if sent < n:
                return          # ring full: completions first

    def _reap_all(self) -> int:
        total = 0
        for q in self.queues:
            if q.index in self._claimed:
                continue
            while True:
                n = q.reap()
                if not n:
                    break
                total += n
                self._handle_cpls(q, n)
                if n < REAP_BATCH:
                    break
        if total and self._backlog:
            self._pump()
        return total

    def _handle_cpls(self, q: IoQueue, n: int) -> None:
        cpls = q.cpls
        pending = self._pending
        for i in range(n):
            c = cpls[i]
            kind = c.kind
            if kind == _DONE:
                cmd = pending.pop(c.tag, None)
                if cmd is None:          # not ours (should not happen: C matched the slot)
                    self._bogus(q, c, "completion for an unknown tag")
                    continue
                self._finish(cmd, c)
            elif kind == _UNSOLICITED:
                if c.operation in (P.Op.ENUMERATE_BUS, P.Op.REMOVE_DEVICE):
                    self.counters["enumerate_bus"] += 1
                    self._rescan_needed = True
                else:
                    self._bogus(q, c, f"unsolicited operation {P.op_name(c.operation)}")
            elif kind == _LATE:
                self.counters["late_completions"] += 1
                cmd = self._quarantine.pop(c.tag, None)
                if cmd is not None:
                    self._free_buffer(cmd.buffer)
            else:
                self._bogus(q, c, _CPL_ERRORS.get(c.error, f"error {c.error}"))

    def _bogus(self, q: IoQueue, c: Any, why: str) -> None:
        self.counters["bogus_completions"] += 1
        msg = (f"{q.name}: ignored a host packet: {why} (trans_id {int(c.trans_id):#x}, "
               f"operation {P.op_name(c.operation)}, {c.payload_len} bytes)")
        self.last_protocol_error = msg
        log.warning("storvsc: %s", msg)

    def _finish(self, cmd: Command, c: Any) -> None:
        cmd.latency_ns = int(c.latency_ns)
        if c.error:
            self.counters["malformed_completions"] += 1
            msg = (f"{cmd.what}: malformed completion from the host: "
                   f"{_CPL_ERRORS.get(c.error, c.error)} (operation {P.op_name(c.operation)}, "
                   f"{c.payload_len} bytes, trans_id {int(c.trans_id):#x})")
            self.last_protocol_error = msg
            self._complete(cmd, ProtocolError(msg))
            return
        cmd.status = int(c.status)
        cmd.srb_status = int(c.srb_status)
        cmd.scsi_status = int(c.scsi_status)
        if cmd.kind == lib.UVB_STOR_VSTOR_OP:
            err: Exception | None = None if cmd.status == 0 else RequestFailed(
                f"{cmd.what} failed: {P.ntstatus_name(cmd.status)}", status=cmd.status)
            self._complete(cmd, err)
            return
        srb = cmd.srb_status & P.SRB_STATUS_MASK
        if srb == P.SrbStatus.SUCCESS:
            cmd.transferred = min(int(c.transferred), cmd.length)
            if self.device.recorder is not None and cmd.transferred and cmd.buffer is not None:
                self._record_read(cmd, int(c.trans_id))
            self._complete(cmd, None)
            return
        sense = None
        if cmd.srb_status & P.SRB_AUTOSENSE_VALID and c.sense_len:
            sense = scsi.parse_sense(bytes(ffi.buffer(c.sense, c.sense_len)))
        cmd.sense = sense
        err = self._error_for(cmd, srb, sense)
        if isinstance(err, UnitAttention) and cmd.retries < UA_RETRIES:
            # the device state changed (capacity, reset): refresh and retry, as Linux does
            cmd.retries += 1
            self.counters["unit_attention_retries"] += 1
            if sense is not None and sense.asc == 0x2A:
                self._refresh.add(cmd.lun)
            self._backlog.append(cmd)
            return
        if isinstance(err, LunGone):
            self._rescan_needed = True
        self._complete(cmd, err)

    def _record_read(self, cmd: Command, trans_id: int) -> None:
        """Recording (docs/trace.md): put the bytes a read brought into the trace, so a replay
        can give them back (the driver parses INQUIRY, READ CAPACITY, VPD pages...)."""
        is_read = cmd.kind == lib.UVB_STOR_READ16 or (
            cmd.kind == lib.UVB_STOR_CDB and cmd.data_in == P.DataIn.READ)
        port = self.device.trace_port(cmd.queue.channel) if is_read and cmd.queue is not None else None
        if port is not None and cmd.buffer is not None:
            view = cmd.buffer.view
            port.read_data(trans_id, view[cmd.buf_offset:cmd.buf_offset + cmd.transferred], cmd.transferred)

    def _error_for(self, cmd: Command, srb: int, sense: scsi.Sense | None) -> Exception:
        if cmd.scsi_status == P.ScsiStatus.RESERVATION_CONFLICT:
            return ReservationConflict(
                f"{cmd.what} on LUN {cmd.lun}: RESERVATION CONFLICT: a persistent reservation "
                "held through another initiator forbids it, or this initiator has not registered "
                "the key it gave; see disk.pr_read_reservation() / `uvmbus blk pr DEVICE read`",
                srb_status=cmd.srb_status, scsi_status=cmd.scsi_status)
        if srb in _GONE_SRB:
            self._rescan_needed = True
            return LunGone(f"{cmd.what}: LUN {cmd.lun} does not exist (SRB "
                           f"{P.srb_status_name(cmd.srb_status)}): the host removed it or never "
                           "had it; other LUNs are unaffected, and the next API call rescans "
                           "(hba.changes, hba.luns)")
        if sense is not None and sense.key != scsi.SenseKey.NO_SENSE:
            return scsi.sense_exception(sense, f"{cmd.what} on LUN {cmd.lun}",
                                        srb_status=cmd.srb_status, scsi_status=cmd.scsi_status)
        return ScsiError(f"{cmd.what} on LUN {cmd.lun} failed: SRB "
                         f"{P.srb_status_name(cmd.srb_status)}, SCSI status {cmd.scsi_status:#04x}, "
                         f"{P.ntstatus_name(cmd.status)}", srb_status=cmd.srb_status,
                         scsi_status=cmd.scsi_status)

    def _complete(self, cmd: Command, err: Exception | None) -> None:
        cmd.error = err
        cmd.done = True
        if cmd.batch:
            self._completed.append(cmd)

    # -- waiting --------------------------------------------------------------------------------
    def _wait_io(self, timeout: float | None) -> None:
        """Spin briefly, then sleep until a completion (or anything) arrives."""
        queues = [q for q in self.queues if q.index not in self._claimed]
        if not self._spin(queues):
            self.counters["waits"] += 1
            self.device.wait([q.channel for q in queues], timeout)
        self._check_rings(queues)

    def _wait(self, done: Callable[[], bool], timeout: float | None, *, recover: bool = True) -> bool:
        """Reap until ``done()`` or the timeout; recover lost commands on the way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_check = time.monotonic()
        while True:
            self._reap_all()
            if done():
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if recover and now - last_check >= min(1.0, self.timeout / 4):
                last_check = now
                self._check_timeouts()
                if done():
                    return True
            wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - now))
            self._wait_io(wait)

    def wait(self, cmds: Sequence[Command], timeout: float | None = None) -> None:
        """Block until every command in ``cmds`` completed (errors stay in the commands)."""
        if not self._wait(lambda: all(c.done for c in cmds), timeout):
            raise ChannelTimeout(f"{sum(not c.done for c in cmds)} of {len(cmds)} commands still "
                                 f"pending after {timeout} s")

    def reap(self, min_completions: int = 1, timeout: float | None = None) -> list[Command]:
        """Completed batch commands (at least ``min_completions`` unless the timeout passes;
        never more than were submitted)."""
        self._check_usable()
        want = min(min_completions, len(self._completed) + self._batch_inflight())
        self._wait(lambda: len(self._completed) >= want, timeout)
        out = list(self._completed)
        self._completed.clear()
        return out

    def poll(self) -> list[Command]:
        """Non-blocking :meth:`reap`."""
        self._reap_all()
        out = list(self._completed)
        self._completed.clear()
        return out

    def _batch_inflight(self) -> int:
        return sum(1 for c in self._pending.values() if c.batch) + sum(1 for c in self._backlog if c.batch)

    # -- timeouts and recovery --------------------------------------------------------------------
    def _check_timeouts(self) -> None:
        now = lib.uvb_now_ns()
        limit = int(self.timeout * 1e9)
        expired = [c for c in self._pending.values()
                   if c.kind != lib.UVB_STOR_VSTOR_OP and now - c.submit_ns > limit]
        if expired:
            self._recover(expired)

    def _reset(self, op: int, lun: int, what: str) -> bool:
        cmd = Command(kind=lib.UVB_STOR_VSTOR_OP, operation=op, lun=lun, what=what)
        self.submit([cmd], batch=False)
        ok = self._wait(lambda: cmd.done, self.reset_timeout, recover=False)
        if not ok:
            self._abandon(cmd)
            return False
        return cmd.error is None

    def _abandon(self, cmd: Command) -> None:
        if cmd.queue is not None and self._pending.pop(cmd.tag, None) is not None:
            cmd.queue.abandon(cmd.tag)
            if cmd.buffer is not None:
                self._quarantine[cmd.tag] = cmd     # freed when (if) a late completion comes

    def _recover(self, expired: list[Command]) -> None:
        """Lost commands: RESET_LUN each LUN, then RESET_BUS; fail the commands (§2.9)."""
        self.counters["timeouts"] += len(expired)
        ok = True
        for lun in sorted({c.lun for c in expired}):
            self.counters["lun_resets"] += 1
            if not self._reset(P.Op.RESET_LUN, lun, f"RESET_LUN {lun}"):
                ok = False
                break
        if not ok:
            self.counters["bus_resets"] += 1
            ok = self._reset(P.Op.RESET_BUS, 0, "RESET_BUS")
        for cmd in expired:
            if cmd.done:
                continue
            self._abandon(cmd)
            self._complete(cmd, ChannelTimeout(
                f"{cmd.what} on LUN {cmd.lun}: no completion within {self.timeout:.1f} s; "
                + ("the LUN was reset" if ok else "the host answers no reset either"),
                channel=cmd.queue.name if cmd.queue else None))
        if not ok:
            self._failed = ChannelTimeout("the host answers neither I/O nor RESET_LUN/RESET_BUS "
                                          "(its channel worker may have stopped)")
            for cmd in list(self._pending.values()):
                if cmd.kind != lib.UVB_STOR_VSTOR_OP:
                    self._abandon(cmd)
                    self._complete(cmd, self._failed)

    # ==== synchronous commands =================================================================
    def _api_entry(self) -> None:
        """Run deferred work (rescan after ENUMERATE_BUS, capacity refresh) at API entry."""
        if self._in_api or self._closed:
            return
        if self._rescan_needed or self._refresh:
            self._in_api += 1
            try:
                if self._rescan_needed:
                    self.rescan()
                for lun in list(self._refresh):
                    self._refresh.discard(lun)
                    d = self._disks.get(lun)
                    if d is not None:
                        d.refresh()
            finally:
                self._in_api -= 1

    def run(self, cmds: list[Command], timeout: float | None = None) -> None:
        """Submit ``cmds`` and wait for all of them (errors stay in the commands)."""
        self.submit(cmds, batch=False)
        limit = None if timeout is None else timeout
        if not self._wait(lambda: all(c.done for c in cmds), limit):
            for c in cmds:
                if not c.done:
                    self._abandon(c)
                    self._complete(c, ChannelTimeout(f"{c.what}: no completion within {timeout} s"))

    def execute(self, lun: int, cdb: bytes, *, data_in: int = 0, data_out: bytes | None = None,
                what: str | None = None, timeout: float | None = None, check: bool = True,
                buffer_len: int | None = None) -> ScsiResult:
        """Run one SCSI command and wait.  ``data_in``: bytes to read; ``data_out``: bytes to
        write; ``buffer_len`` overrides the buffer (and data_transfer_length) size.  With
        ``check`` a failure raises; otherwise the status is in the result."""
        self._check_usable()
        if data_in and data_out is not None:
            raise ConfigError("a command moves data in one direction only")
        length = buffer_len if buffer_len is not None else (data_in or len(data_out or b""))
        direction = P.DataIn.READ if data_in else (P.DataIn.WRITE if data_out is not None else P.DataIn.NONE)
        buf = self.alloc_buffer(length) if length else None
        name = what or f"SCSI {cdb[0]:#04x}"
        cmd = Command(kind=lib.UVB_STOR_CDB, lun=lun, cdb=bytes(cdb), data_in=direction,
                      buffer=buf, length=length, what=name)
        try:
            if buf is not None and data_out is not None:
                buf.view[:len(data_out)] = data_out
            self.run([cmd], timeout)
            data = b""
            if cmd.error is None and buf is not None and direction == P.DataIn.READ:
                data = bytes(buf.view[:cmd.transferred])
        finally:
            if buf is not None and cmd.tag not in self._quarantine:
                buf.free()
        if check and cmd.error is not None:
            raise cmd.error
        return ScsiResult(data, cmd.transferred, cmd.srb_status, cmd.scsi_status, cmd.sense)

    # ==== LUN discovery ==========================================================================
    def report_luns(self) -> list[int]:
        """REPORT LUNS through LUN 0 (the controller answers for any LUN, §5.3)."""
        alloc = 8 + 8 * 256
        res = self.execute(0, scsi.report_luns(alloc), data_in=alloc, what="REPORT LUNS")
        if res.transferred < 8:
            raise ProtocolError(f"REPORT LUNS returned {res.transferred} bytes (< 8-byte header)")
        return scsi.parse_report_luns(res.data)

    def _probe(self, lun: int) -> Disk | None:
        from uvmbus.storvsc.disk import Disk

        inq = scsi.parse_inquiry(self.execute(lun, scsi.inquiry(255), data_in=255,
                                              what="INQUIRY").data)
        if not inq.present or inq.device_type != 0:
            return None
        self.execute(lun, scsi.test_unit_ready(), what="TEST UNIT READY")
        disk = Disk(self, lun, inq)
        disk.refresh()
        disk.read_vpd()
        disk.read_write_protect()
        return disk

    def scan(self) -> LunChange:
        """Discover the LUNs (REPORT LUNS, then INQUIRY / TEST UNIT READY / READ CAPACITY(16) /
        VPD of each new one)."""
        self._in_api += 1
        try:
            return self._scan()
        finally:
            self._in_api -= 1

    def _scan(self) -> LunChange:
        self._rescan_needed = False
        self.counters["rescans"] += 1
        removed, resized = [], []
        for lun, d in list(self._disks.items()):      # TUR: gone LUNs answer INVALID_LUN
            try:
                self.execute(lun, scsi.test_unit_ready(), what="TEST UNIT READY")
            except LunGone:
                removed.append(lun)
            except ScsiError:
                pass
            else:
                before = d.size
                d.refresh()
                self._refresh.discard(lun)
                if d.size != before:
                    resized.append(lun)
        present = set(self.report_luns())
        removed += [lun for lun in self._disks if lun not in present and lun not in removed]
        for lun in removed:
            self._disks.pop(lun).gone = True
        added = []
        for lun in sorted(present - set(self._disks)):
            try:
                disk = self._probe(lun)
            except LunGone:
                continue
            if disk is not None:
                self._disks[lun] = disk
                added.append(lun)
        change = LunChange(tuple(added), tuple(sorted(removed)), tuple(resized))
        if change:
            self.changes.append(change)
            if self.on_change is not None:
                self.on_change(change)
        return change

    def rescan(self) -> LunChange:
        return self.scan()

    def wait_for_change(self, timeout: float = 10.0) -> LunChange:
        """Wait for the host to announce a LUN change (ENUMERATE_BUS), rescan, return it."""
        deadline = time.monotonic() + timeout
        while not self._rescan_needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelTimeout(f"no ENUMERATE_BUS from the host within {timeout} s")
            self._wait(lambda: self._rescan_needed, remaining)
        return self.scan()

    # ==== lifetime ================================================================================
    def drain(self, timeout: float = 5.0) -> bool:
        return self._wait(lambda: not self._pending and not self._backlog, timeout)

    def _teardown(self) -> None:
        if self.pool is not None:
            try:
                self.pool.close()
            except UvmbusError as exc:
                log.warning("storvsc: closing the DMA pool: %s", exc)
            self.pool = None
        if self._own_dma and self.dma is not None:
            try:
                self.dma.close()
            except UvmbusError as exc:
                log.warning("storvsc: closing DMA memory: %s", exc)
            self.dma = None
        self.device.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failed is None and (self._pending or self._backlog):
                try:
                    self.drain()
                except UvmbusError:
                    pass
        finally:
            self._closed = True
            for d in self._disks.values():
                d.gone = True
            self._teardown()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<storvsc Controller {self.device.device.device_id} protocol "
                f"{P.version_name(self.version)} {len(self.queues)} channel(s), LUNs {sorted(self._disks)}>")


def open(device: str, root: str | os.PathLike[str] = "/", *, bind: bool = False,
         force: bool = False, system: SystemView | None = None, lock: bool = True,
         record: Any = None, **options: Any) -> Controller:
    """Open the synthetic SCSI controller ``device`` (GUID, unique prefix, or "storvsc" when
    there is one) under ``root`` and return a ready :class:`Controller`.

    The device must be bound to uio_hv_generic; with ``bind`` it is bound here, after the
    bus layer's safety check (which refuses the controller holding the OS disk unless
    ``force``; ``system`` replaces the live-system queries of that check, for tests).
    ``lock`` (default True) holds the device's lock while it is open: another process
    opening it fails at once with :class:`~uvmbus.errors.DeviceBusy` naming the holder
    (False: for experts sharing the device on purpose).
    ``record``: a ``*.pcapng`` path or a :class:`uvmbus.trace.Recorder` recording every VMBus
    packet of every channel (docs/trace.md); a path is closed with the controller.
    ``options`` go to :class:`Controller`."""
    from uvmbus.bus import Bus, bind_uio

    if bind:
        bind_uio(Bus(root), device, force=force, system=system)
    open_timeout = options.get("timeout")          # also bounds a stopped simulator's answer
    cd = open_device(device, root, spin_us=0, lock=lock, record=record,
                     **({} if open_timeout is None else {"timeout": float(open_timeout)}))
    try:
        return Controller(cd, root=root, **options)
    except BaseException:
        cd.close()
        raise

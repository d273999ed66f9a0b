"""One I/O queue per channel: the Python face of ``struct uvb_stor_queue`` (native/storvsc.c).

While I/O runs, the queue owns its channel's rings: packets are built, committed and
signalled in C (:meth:`IoQueue.submit`), completions are read, matched to their slot by
transaction id, validated and committed in C (:meth:`IoQueue.reap`).  Python sees arrays of
``struct uvb_stor_req`` / ``struct uvb_stor_cpl`` and never touches individual packets.
"""

from __future__ import annotations

from typing import Any

from uvmbus.channel import Channel
from uvmbus.errors import ChannelRevoked, ConfigError, ProtocolError, RingCorrupt
from uvmbus.native import ffi, lib

__all__ = ["IoQueue", "HOST_QUEUE_DEPTH", "REAP_BATCH"]

#: in-flight requests a host worker takes per channel (OpenVMM io_queue_depth, §2.11)
HOST_QUEUE_DEPTH = 256
#: completions read per reap call
REAP_BATCH = 256
_RXBUF = 256 * 1024


class IoQueue:
    """The request table of one channel (see the module docstring)."""

    def __init__(self, channel: Channel, depth: int = HOST_QUEUE_DEPTH, *, index: int = 0,
                 tagged: bool = True, timeout_s: int = 60, max_batch: int = 1024) -> None:
        if not 1 <= depth <= lib.UVB_STOR_MAX_DEPTH:
            raise ConfigError(f"queue depth {depth} outside 1..{lib.UVB_STOR_MAX_DEPTH}")
        self.channel = channel
        self.index = index
        self.depth = depth
        self.q: Any = ffi.new("struct uvb_stor_queue *")
        self._slots = ffi.new("struct uvb_stor_slot[]", depth)
        self._free = ffi.new("uint32_t[]", depth)
        self._pkts = ffi.new("struct uvb_pkt[]", REAP_BATCH)
        self._rxbuf = ffi.new("uint8_t[]", _RXBUF)
        rc = lib.uvb_stor_queue_init(self.q, channel.tx.raw, channel.rx.raw, channel.signal,
                                     self._slots, self._free, depth, self._pkts, REAP_BATCH,
                                     self._rxbuf, _RXBUF)
        if rc:
            raise ConfigError(f"{channel.name}: {ffi.string(self.q.errmsg).decode()}")
        if tagged:   # tagged queueing, as Linux sets for devices that support it (§2.9)
            self.q.srb_flags = lib.SRB_FLAGS_QUEUE_ACTION_ENABLE | lib.SRB_FLAGS_NO_QUEUE_FREEZE
        self.q.timeout_s = timeout_s
        #: reusable request array (callers may use their own)
        self.reqs: Any = ffi.new("struct uvb_stor_req[]", max_batch)
        self.max_batch = max_batch
        #: completion array filled by :meth:`reap`
        self.cpls: Any = ffi.new("struct uvb_stor_cpl[]", REAP_BATCH)
        self._submit = lib.uvb_stor_submit
        self._reap = lib.uvb_stor_reap

    # -- state ------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self.depth - int(self.q.nfree)

    @property
    def free_slots(self) -> int:
        return int(self.q.nfree)

    @property
    def name(self) -> str:
        return self.channel.name

    def has_completions(self) -> bool:
        rc = lib.uvb_in_avail(self.channel.rx.raw)
        if rc < 0:
            self._fail(rc, "reading completions")
        return rc > 0

    def oldest_ns(self) -> int:
        """uvb_now_ns() of the oldest submission still in flight (0: none)."""
        return int(lib.uvb_stor_oldest(self.q))

    def stats(self) -> dict[str, int]:
        q = self.q
        return {"submitted": q.submitted, "completed": q.completed, "bogus": q.bogus,
                "unsolicited": q.unsolicited, "submit_calls": q.submit_calls,
                "reap_calls": q.reap_calls, "signals": q.signals, "ring_full": q.ring_full,
                "inflight": self.inflight, "depth": self.depth}

    # -- errors -----------------------------------------------------------------------------
    def _fail(self, rc: int, what: str) -> None:
        ch = self.channel
        if rc == lib.UVB_EIO:
            raise ChannelRevoked(f"{what}: signalling the host failed (device rescinded)",
                                 channel=ch.name)
        if rc == lib.UVB_ECORRUPT:
            for r in (ch.rx, ch.tx):
                if r.dead:
                    raise RingCorrupt(r.error_message, channel=ch.name)
            raise RingCorrupt(f"{what}: ring corrupt", channel=ch.name)
        if rc == lib.UVB_ENOBUFS:
            raise ProtocolError(f"{ch.name}: {what}: the host sent a packet larger than "
                                f"{_RXBUF} bytes; storvsc completions are 80 bytes")
        if rc == lib.UVB_STOR_EREQ:
            raise ConfigError(f"{ch.name}: {ffi.string(self.q.errmsg).decode()}")
        raise RingCorrupt(f"{what}: {ffi.string(lib.uvb_strerror(rc)).decode()} ({rc})",
                          channel=ch.name)

    # -- data path --------------------------------------------------------------------------
    def submit(self, reqs: Any, n: int) -> int:
        """Queue ``reqs[0:n]``; returns how many went out (0 when the slots or the ring are
        full: reap, then retry the rest)."""
        if n <= 0:
            return 0
        rc = self._submit(self.q, reqs, n)
        if rc >= 0:
            return rc
        if rc in (lib.UVB_STOR_EFULL, lib.UVB_EAGAIN):
            return 0
        self._fail(rc, "submitting requests")
        return 0

    def reap(self, max_cpls: int = REAP_BATCH) -> int:
        """Read up to ``max_cpls`` host packets into :attr:`cpls`; returns the count."""
        rc = self._reap(self.q, self.cpls, min(max_cpls, REAP_BATCH))
        if rc < 0:
            self._fail(rc, "reading completions")
        return rc

    def abandon(self, tag: int, *, release: bool = False) -> bool:
        """Stop waiting for request ``tag`` (see uvb_stor_abandon)."""
        return lib.uvb_stor_abandon(self.q, tag, 1 if release else 0) == 0

    def __repr__(self) -> str:
        return f"<IoQueue {self.name} {self.inflight}/{self.depth} in flight>"

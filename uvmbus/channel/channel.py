"""A VMBus channel: one ring pair plus the way to signal the host and to wait.

The channel turns the ring layer's "signal?" answers into signals (through a
native ``struct uvb_signal``: monitor-page bit, or int-page bit + endpoint
write) and offers:

* ``send`` / ``send_gpa_direct`` — put + commit + signal-if-needed, waiting for
  ring space (pending_send_sz, §2.6) while draining the receive ring so a host
  that is blocked on our RX ring can make progress;
* ``request`` — send with a transaction id and wait for the matching
  completion (other packets are kept, in order, for ``recv``);
* ``poll`` / ``recv`` — batch receive with one read-index commit (and a
  signal only when the host is blocked on space);
* ``wait`` — busy-poll for a spin budget, then the interrupt pattern
  drain → unmask → re-check → block (§1.6, §2.6), which is correct whether or
  not the running kernel also touches the interrupt mask;
* ``fileno`` + ``prepare_wait`` for selectors/epoll users;
* statistics.

Hot data paths (netvsc/storvsc) use ``channel.tx.raw`` / ``channel.rx.raw`` /
``channel.signal`` directly from C; this class is their control plane.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from uvmbus.errors import ChannelError, ChannelRevoked, ChannelTimeout, RingCorrupt, WouldBlock
from uvmbus.native import ffi, lib
from uvmbus.ring import (
    FLAG_COMPLETION_REQUESTED,
    PKT_COMP,
    PKT_INBAND,
    InRing,
    OutRing,
    Packet,
    RingPair,
    packet_ring_bytes,
)

#: default time to wait for ring space or a completion
DEFAULT_TIMEOUT = 30.0
#: automatically allocated transaction ids start here, clear of driver-chosen ids
AUTO_TID_BASE = 1 << 48


class Waiter(Protocol):
    """Whatever can block until one of some channels has something to do."""

    def wait(self, channels: Sequence[Channel], timeout: float | None) -> bool: ...


class PollingWaiter:
    """A waiter for rings without an interrupt source (plain files, tests).

    Without interrupts there is no way to learn that TX space was freed, so it
    returns after at most ``max_sleep`` (a spurious wake-up, which callers
    tolerate: they re-check their condition)."""

    def __init__(self, interval: float = 0.0002, max_sleep: float = 0.005):
        self.interval = interval
        self.max_sleep = max_sleep

    def wait(self, channels: Sequence[Channel], timeout: float | None) -> bool:
        now = time.monotonic()
        stop = now + (self.max_sleep if timeout is None else min(timeout, self.max_sleep))
        while True:
            if any(ch.rx.avail for ch in channels):
                return True
            if time.monotonic() >= stop:
                return timeout is None or timeout > self.max_sleep
            time.sleep(self.interval)


class Channel:
    """One VMBus channel (primary or sub-channel) opened by the guest."""

    def __init__(
        self,
        rings: RingPair,
        *,
        relid: int,
        subchannel_id: int = 0,
        monitor_id: int | None = None,
        signal: Any = None,
        waiter: Waiter | None = None,
        name: str = "",
        spin_us: int = 0,
        on_close: Callable[[Channel], None] | None = None,
    ):
        self.rings = rings
        self.tx: OutRing = rings.out
        self.rx: InRing = rings.inp
        self.relid = relid
        self.subchannel_id = subchannel_id
        self.monitor_id = monitor_id
        self.name = name or f"channel {relid}"
        self.tx.name = f"{self.name} tx"
        self.rx.name = f"{self.name} rx"
        if signal is None:
            signal = ffi.new("struct uvb_signal *")
            signal.fd = -1
        self.signal = signal
        self._waiter: Waiter = waiter or PollingWaiter()
        self.spin_us = spin_us
        self._on_close = on_close
        self._backlog: deque[Packet] = deque()
        self._tids = itertools.count(AUTO_TID_BASE)
        self.closed = False
        self.wakeups = 0
        #: False when the host must never interrupt this channel (see DeviceWaiter)
        self.interrupts_ok = True
        # Explicit state at start: after a close/re-open the mask and pending size
        # keep whatever the previous user left (uio_vmbus.md §1.2). We are not
        # sleeping yet, and not waiting for TX space.
        self.rx.mask()
        self.tx.reset_pending()

    # -- errors -----------------------------------------------------------
    def _check(self, rc: int, ring: OutRing | InRing) -> None:
        if rc >= 0:
            return
        if rc == lib.UVB_EIO:
            raise ChannelRevoked("signalling the host failed: the device was rescinded", channel=self.name)
        ring._fail(rc)

    def _ensure_open(self) -> None:
        if self.closed:
            raise ChannelError("channel is closed", channel=self.name)

    # -- sending ----------------------------------------------------------
    def flush(self) -> bool:
        """Commit queued TX packets and signal the host if the ring protocol says so.
        Returns True when a signal was sent."""
        rc = lib.uvb_out_commit_signal(self.tx.raw, self.signal)
        self._check(rc, self.tx)
        return rc == 1

    def _wait_space(self, need: int, deadline: float | None) -> None:
        """Block until ``need`` ring bytes are free, draining RX meanwhile."""
        # publish what we already queued, so the host can consume it
        self.flush()
        while not self.tx.want_space(need):
            self._drain_into_backlog()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.tx.clear_want()
                raise WouldBlock(f"no ring space for a {need}-byte packet before the timeout "
                                 "(the host is not consuming)", channel=self.name)
            self._waiter.wait([self], remaining)
            self.wakeups += 1
        self.tx.clear_want()

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def send(self, payload: Any, *, trans_id: int = 0, flags: int = 0, type: int = PKT_INBAND,
             timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send one in-band (or completion) packet, waiting for space up to ``timeout``."""
        self._ensure_open()
        deadline = None
        while not self.tx.put(payload, trans_id=trans_id, flags=flags, type=type):
            if deadline is None:
                deadline = self._deadline(timeout)
            self._wait_space(packet_ring_bytes(len(payload)), deadline)
        self.flush()

    def send_completion(self, payload: Any, trans_id: int) -> None:
        self.send(payload, trans_id=trans_id, type=PKT_COMP)

    def send_gpa_direct(self, ranges: Sequence[tuple[int, int, Sequence[int]]], payload: Any, *,
                        trans_id: int = 0, flags: int = FLAG_COMPLETION_REQUESTED,
                        timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Send a GPA-direct packet (type 9): ``ranges`` of ``(byte_count, byte_offset, pfns)``."""
        self._ensure_open()
        deadline = None
        parts = payload if isinstance(payload, (list, tuple)) else [payload]
        while not self.tx.put_gpa_direct(ranges, parts, trans_id=trans_id, flags=flags):
            if deadline is None:
                deadline = self._deadline(timeout)
            ext = 8 + sum(8 + 8 * len(p) for _, _, p in ranges)
            self._wait_space(packet_ring_bytes(sum(len(p) for p in parts), ext), deadline)
        self.flush()

    def next_trans_id(self) -> int:
        return next(self._tids)

    def request(self, payload: Any, *, timeout: float | None = DEFAULT_TIMEOUT, trans_id: int | None = None,
                gpa: Sequence[tuple[int, int, Sequence[int]]] | None = None,
                accept: Callable[[Packet], bool] | None = None) -> Packet:
        """Send ``payload`` with completion requested and return the completion
        carrying the same transaction id.  Packets that arrive meanwhile are kept
        for :meth:`recv`.  ``accept`` may widen the match (e.g. a VSP that answers
        with an in-band packet)."""
        tid = self.next_trans_id() if trans_id is None else trans_id
        deadline = self._deadline(timeout)
        if gpa is not None:
            self.send_gpa_direct(gpa, payload, trans_id=tid, timeout=timeout)
        else:
            self.send(payload, trans_id=tid, flags=FLAG_COMPLETION_REQUESTED, timeout=timeout)
        match = accept or (lambda p: p.type == PKT_COMP and p.trans_id == tid)
        return self.wait_for(match, timeout=None if deadline is None else deadline - time.monotonic(),
                             what=f"completion of transaction {tid:#x}")

    def wait_for(self, match: Callable[[Packet], bool], *, timeout: float | None,
                 what: str = "a matching packet") -> Packet:
        """Return (and remove) the first received packet satisfying ``match``;
        other packets stay queued in order."""
        deadline = self._deadline(timeout)
        scanned = 0
        expired = False
        while True:
            for i in range(scanned, len(self._backlog)):
                if match(self._backlog[i]):
                    p = self._backlog[i]
                    del self._backlog[i]
                    return p
            scanned = len(self._backlog)
            if expired:
                raise ChannelTimeout(f"no {what} within the timeout", channel=self.name)
            drained = self._drain_into_backlog()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # scan what was just drained, then give up: a host that keeps the ring busy
                # with other packets must not keep us here past the deadline
                expired = True
                continue
            if drained:
                continue
            self.wait(remaining)

    # -- receiving --------------------------------------------------------
    def _read_batch(self, max_packets: int | None = None) -> list[Packet]:
        batch = self.rx.read(max_packets, copy=True)
        if batch.count:
            rc = lib.uvb_in_commit_signal(self.rx.raw, self.signal)
            self._check(rc, self.rx)
        return list(batch)

    def _drain_into_backlog(self) -> int:
        pkts = self._read_batch()
        self._backlog.extend(pkts)
        return len(pkts)

    def poll(self, max_packets: int | None = None) -> list[Packet]:
        """Non-blocking: packets already received (kept ones first), copied."""
        self._ensure_open()
        out: list[Packet] = []
        while self._backlog and (max_packets is None or len(out) < max_packets):
            out.append(self._backlog.popleft())
        if max_packets is None or len(out) < max_packets:
            out.extend(self._read_batch(None if max_packets is None else max_packets - len(out)))
        return out

    def recv(self, timeout: float | None = None, max_packets: int | None = None) -> list[Packet]:
        """Packets received, waiting up to ``timeout`` for at least one ([] on timeout)."""
        deadline = self._deadline(timeout)
        while True:
            got = self.poll(max_packets)
            if got:
                return got
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            self.wait(remaining)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the RX ring has data (True) or the timeout expires (False)."""
        self._ensure_open()
        if self._backlog or self.rx.avail:
            return True
        if self.spin_us:
            end = time.perf_counter() + self.spin_us / 1e6
            while time.perf_counter() < end:
                if self.rx.avail:
                    return True
        deadline = self._deadline(timeout)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._waiter.wait([self], remaining)   # may wake for other reasons
            self.wakeups += 1
            if self._backlog or self.rx.avail:
                return True

    def prepare_wait(self) -> bool:
        """For selectors/epoll users: arm the interrupt before waiting on
        :meth:`fileno`. Returns True if data is already there (don't sleep)."""
        if self._backlog:
            return True
        return self.rx.arm()

    def fileno(self) -> int:
        f = getattr(self._waiter, "fileno", None)
        if f is None:
            raise ChannelError("this channel has no interrupt source (polling only)", channel=self.name)
        return int(f())

    # -- state --------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return self.tx.dead or self.rx.dead

    def raise_if_dead(self) -> None:
        for r in (self.rx, self.tx):
            if r.dead:
                raise RingCorrupt(r.error_message, channel=self.name)

    def stats(self) -> dict[str, int]:
        t, r = self.tx.stats(), self.rx.stats()
        return {
            "tx_packets": t["packets"], "tx_bytes": t["bytes"], "tx_full": t["full"],
            "rx_packets": r["packets"], "rx_bytes": r["bytes"],
            "signals": int(self.signal.count), "tx_signal_needed": t["signals"],
            "rx_signal_needed": r["signals"], "wakeups": self.wakeups,
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rings.close()
        if self._on_close:
            self._on_close(self)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mon = "unmonitored" if self.monitor_id is None else f"monitor {self.monitor_id}"
        return f"<Channel {self.name} relid={self.relid} sub={self.subchannel_id} {mon}>"

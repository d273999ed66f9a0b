"""The host side of one open channel: a worker thread obeying the host contract (§2.6).

Per channel the host reads the guest's TX ring and writes the guest's RX ring with the native
ring code (``uvb_*``), and:

* sets the TX ``interrupt_mask`` while it drains, drains completely, clears the mask and
  re-checks before sleeping (a model's C pump may keep the mask set and busy-poll while work
  is in flight);
* interrupts the guest only when an RX commit answers "signal" (empty→non-empty with the RX
  mask clear) or when a TX read commit crosses the guest's ``pending_send_sz``;
* when the RX ring is full it sets RX ``pending_send_sz`` and sleeps until the guest signals;
* wakes on guest signals (monitor bit, irqcontrol write) delivered to its doorbell, and
  classifies each one: **needed** (a) if the TX ring became non-empty during an interval in
  which the host had its TX mask clear and this is the first signal for it, or (b) if the host
  waits for RX space and the space now exceeds its pending_send_sz; everything else is
  **needless**.  Signals the kernel sends on the guest's behalf to other channels (6.16+
  irqcontrol) are counted apart as **collateral**.

Device models see a :class:`HostChannel` in their hooks: ``send`` / ``complete`` /
``send_xfer_pages`` queue packets to the guest (flushed after each batch, blocking while the
RX ring is full), ``tx``/``rx``/``irq``/``kick`` are for C pumps.
"""

from __future__ import annotations

import os
import select
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from uvmbus.errors import ChannelError, RingCorrupt
from uvmbus.native import ffi, lib
from uvmbus.ring import (
    FLAG_COMPLETION_REQUESTED,
    PKT_COMP,
    PKT_INBAND,
    InRing,
    OutRing,
    Packet,
    packet_ring_bytes,
)
from uvmbus.sim.faults import DESCRIPTOR_FIELDS, Faults
from uvmbus.sim.memory import RingMemory

if TYPE_CHECKING:
    from uvmbus.sim.hostapi import HostDevice

__all__ = ["ChannelStopped", "HostChannel"]

_BAD_DESCRIPTOR_VALUE = {"type": 0x55, "offset8": 1, "len8": 0xFFFF, "flags": 0x8000}
_PY_BATCH = 256


class ChannelStopped(ChannelError):
    """Raised inside a worker when its channel is closed or rescinded (unwinds model code)."""


class HostChannel:
    """One channel (primary or sub-channel) as the simulated host serves it."""

    def __init__(self, device: HostDevice, relid: int, subchannel_id: int, monitor_id: int | None,
                 mem: RingMemory):
        self.device = device
        self.relid = relid
        self.subchannel_id = subchannel_id
        self.monitor_id = monitor_id
        self.mem = mem
        ps = mem.header_bytes
        name = f"relid {relid}"
        #: the guest's TX ring, read by the host
        self.tx = InRing(mem.mm, 0, mem.ring_bytes, ps, name=f"{name} guest-tx", max_burst=1024)
        #: the guest's RX ring, written by the host
        self.rx = OutRing(mem.mm, mem.ring_bytes, mem.ring_bytes, ps, name=f"{name} guest-rx")
        kernel = device.kernel
        self.irq: Any = ffi.new("struct uvb_host_irq *")
        self.irq.notify = device.notify
        self.irq.rx_header = mem.rx_header
        self.irq.set_mask = 1 if kernel.kernel_sets_mask else 0
        self.irq.crashes = 1 if (subchannel_id and kernel.subchannel_interrupt_crashes) else 0
        #: non-zero asks a running C pump to return (stop, fault change)
        self.kick: Any = ffi.new("uint32_t *")
        self._doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._sig_new = 0
        self._sig_collateral = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._armed = False
        self._arm_index = 0
        self._corrupted = False
        # Signals the guest is entitled to, one per episode, each with an expiry time:
        # (a) a TX-mask-clear interval in which the TX ring became non-empty. If the host
        #     slept through it, the guest saw the clear mask and an empty ring and MUST
        #     signal: the credit never expires. If the host's own re-check after clearing
        #     the mask found the data (a race the guest may or may not have seen), the guest
        #     may signal: the credit expires after the grace period.
        # (b) a store of RX pending_send_sz by the host: never expires while the host waits
        #     for space; once the host stops waiting, expires after the grace period.
        # Expiry is a heuristic only for the "may" cases, so load cannot turn a signal the
        # guest was obliged to send into a needless one.
        self._tx_credits: deque[float] = deque()
        self._rx_credits: deque[float] = deque()
        self._grace = max(device.config.signal_grace, 1000 * device.config.monitor_latency_us / 1e6)
        self._pending_sets = 0
        self._fault_gen = -1
        self.stats: dict[str, int] = {
            "relid": relid, "subchannel_id": subchannel_id,
            "guest_signals": 0, "needed_signals": 0, "needless_signals": 0,
            "collateral_signals": 0, "interrupts": 0, "kernel_oops": 0,
            "packets_from_guest": 0, "packets_to_guest": 0, "rx_full_waits": 0,
            "dropped_packets": 0, "duplicated_packets": 0, "corrupted_packets": 0,
            "model_errors": 0, "wakeups": 0, "pending_stores": 0,
        }
        self.error: str | None = None
        #: trace port (``uvmbus sim --record``): both rings record into it; events too
        self.trace: Any = None
        rec = getattr(device.config, "record", None)
        if rec is not None:
            from uvmbus.bus.classes import lookup_class

            cls = lookup_class(str(getattr(device, "class_id", "")))
            self.trace = rec.port(relid, subchan=subchannel_id,
                                  devclass=cls.name if cls else str(getattr(device, "kind", "vmbus")),
                                  instance=device.device_id)
            self.trace.attach(self.tx.raw, self.rx.raw)
            self.irq.rec = self.trace.raw      # interrupts (also from the C pumps) as events
            recv, send = device.buffer("recv"), device.buffer("send")
            if recv is not None:        # the section size is learnt from the trace itself
                self.trace.add_pageset(lib.NVSP_RECV_BUF_ID, recv.ptr, recv.size)
            if send is not None:
                self.trace.set_send_buffer(send.ptr, send.size, 0)

    def trace_event(self, code: int, arg0: int = 0, text: str = "", *, to_host: bool = True) -> None:
        """Record a host-side event (signal, interrupt, mask, fault) when recording."""
        if self.trace is not None:
            self.trace.event(code, arg0, 0, text, to_host=to_host)

    # -- properties for models ----------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self.device.faults

    @property
    def fast_path_allowed(self) -> bool:
        """False while packet-level faults need every packet to go through Python."""
        return not self.faults.packet_faults

    @property
    def spin_ns(self) -> int:
        return int(self.device.config.host_spin_us * 1000)

    @property
    def signal_grace(self) -> float:
        """Seconds a signal the guest *may* still send stays entitled (see ``_tx_credits``)."""
        return self._grace

    def has_signal_credit(self) -> bool:
        """True while the guest holds an entitlement to a signal not yet used (a snapshot:
        the worker thread owns the credits)."""
        return bool(self._tx_credits) or bool(self._rx_credits)

    @property
    def is_primary(self) -> bool:
        return self.subchannel_id == 0

    def __repr__(self) -> str:
        return f"<HostChannel {self.device.device_id} relid={self.relid} sub={self.subchannel_id}>"

    # -- signals from other threads --------------------------------------------------------
    def guest_signal(self, *, collateral: bool = False) -> None:
        """A guest→host signal reached this channel (monitor bit, irqcontrol)."""
        with self._lock:
            if collateral:
                self._sig_collateral += 1
            else:
                self._sig_new += 1
        self.trace_event(lib.UVB_TRACE_EV_SIGNAL, 1 if collateral else 0, "collateral" if collateral else "")
        self._ring()

    def poke(self) -> None:
        """Wake the worker and make a running C pump return (fault change, stop)."""
        self.kick[0] = 1
        self._ring()

    def _ring(self) -> None:
        try:
            os.eventfd_write(self._doorbell, 1)
        except OSError:
            pass

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        # Host-owned fields start in a known state before the guest can see the channel:
        # its RX pending_send_sz at 0 (a new writer) and its TX interrupt_mask at 1 (busy
        # until the worker has served the ring once and armed; memory left by a previous
        # user would otherwise invite a signal the host is not yet waiting for).
        lib.uvb_ring_store(self.mem.rx_header, 3, 0)
        lib.uvb_ring_store(self.mem.tx_header, 2, 1)
        self._thread = threading.Thread(target=self._run, name=f"sim-relid{self.relid}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (called from the simulator's event loop)."""
        self._stop = True
        self.poke()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                self.device.log(f"relid {self.relid}: worker did not stop within {timeout} s")
        self._account()

    def close(self) -> None:
        """Release the rings (after :meth:`stop`)."""
        if self.trace is not None:
            self.irq.rec = ffi.NULL
            self.trace.detach()
        self.tx.close()
        self.rx.close()
        if self._doorbell >= 0:
            os.close(self._doorbell)
            self._doorbell = -1

    def snapshot(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.stats)
        s["monitor_id"] = self.monitor_id
        s["interrupts"] = int(self.irq.count)
        s["kernel_oops"] = int(self.irq.oops)
        s["dropped_interrupts"] = int(self.irq.dropped)
        s["unused_signal_credits"] = len(self._tx_credits) + len(self._rx_credits)
        if self.error:
            s["error"] = self.error
        return s

    # -- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        model = self.device.model
        try:
            model.open(self)
            self._loop()
        except ChannelStopped:
            pass
        except RingCorrupt as exc:
            self.error = f"guest broke the ring protocol: {exc}"
            self.device.log(f"relid {self.relid}: {self.error}; channel stopped")
        except Exception:  # a model bug must not take the simulator down
            self.stats["model_errors"] += 1
            self.error = traceback.format_exc(limit=8)
            self.device.log(f"relid {self.relid}: worker failed:\n{self.error}")
        finally:
            try:
                model.close(self)
            except Exception:
                self.device.log(f"relid {self.relid}: model close failed:\n{traceback.format_exc()}")
            self._account()

    def _loop(self) -> None:
        while True:
            self.kick[0] = 0
            self._check_stop()
            self._account()
            self._apply_faults()
            if self.faults.stalled or self._corrupted:
                self._disarm()
                self._sleep(None if self._corrupted else self._stall_timeout())
                continue
            wait = self._tick()
            status = self._serve()
            if status == lib.UVB_HOST_RXFULL:
                self._wait_rx_space()
                continue
            if status != lib.UVB_HOST_IDLE:
                continue
            if self._rearm():
                continue
            self._sleep(wait)

    def _tick(self) -> float | None:
        """The model's host-initiated work (DeviceModel.tick); seconds until it is due again."""
        wait = self.device.model.tick(self)
        if wait is not None:          # a model with host-initiated work (others: no change)
            self.flush()
        return wait

    def _check_stop(self) -> None:
        if self._stop:
            raise ChannelStopped("channel closed", channel=f"relid {self.relid}")

    def _stall_timeout(self) -> float | None:
        until = self.faults.stall_until
        return None if until == float("inf") else max(0.0, until - time.monotonic())

    def _apply_faults(self) -> None:
        f = self.faults
        if f.generation == self._fault_gen and not f.pending_actions:
            return
        first = self._fault_gen < 0
        self._fault_gen = f.generation
        if self.trace is not None:
            # a FAULT event says what changed: the first look at a fault-free channel is none
            active = f.active()
            if active or f.pending_actions or not first:
                text = ", ".join(f"{k}={v}" for k, v in active.items())
                self.trace_event(lib.UVB_TRACE_EV_FAULT, f.generation,
                                 f"faults: {text}" if text else "faults cleared")
        self.irq.disabled = 1 if f.no_interrupts else 0
        if f.corrupt_index:
            which, f.corrupt_index = f.corrupt_index, ""
            if which == "rx":     # guest RX write_index: not 8-aligned
                lib.uvb_ring_store(self.mem.rx_header, 0, (self.rx.raw.committed + 4) % self.rx.data_size)
            else:                 # guest TX read_index: beyond the data area
                lib.uvb_ring_store(self.mem.tx_header, 1, self.tx.data_size + 8)
            self.stats["corrupted_packets"] += 1
            # A host that broke an index stops serving this channel: committing again would
            # overwrite the garbage before the guest had a chance to see it.
            self._corrupted = True
            self._interrupt()
        while f.spurious_interrupt > 0:
            f.spurious_interrupt -= 1
            self._interrupt()

    # -- sleeping and waking ----------------------------------------------------------------
    def _sleep(self, timeout: float | None) -> None:
        """Block until the doorbell rings (a guest signal, a poke) or the timeout."""
        self._check_stop()
        p = select.poll()
        p.register(self._doorbell, select.POLLIN)
        p.poll(-1 if timeout is None else int(timeout * 1000) + 1)
        try:
            os.eventfd_read(self._doorbell)
        except BlockingIOError:
            pass
        self.stats["wakeups"] += 1
        self._disarm()

    def _rearm(self) -> bool:
        """Clear the TX mask and re-check (§2.6). True if data raced in (keep serving)."""
        raw = self.tx.raw
        self._arm_index = raw.committed
        self._armed = True
        self.trace_event(lib.UVB_TRACE_EV_MASK, 0, "guest TX interrupt_mask cleared (host armed)")
        rc = lib.uvb_in_arm(raw)
        if rc < 0:
            self.tx._fail(rc)
        if rc == 1:
            self._disarm(raced=True)
            return True
        return False

    def _disarm(self, raced: bool = False) -> None:
        """Set the TX mask (we are busy). If the ring became non-empty while it was clear,
        the guest was entitled to one signal (``raced``: it may not have seen the clear mask)."""
        w = lib.uvb_host_disarm(self.tx.raw)
        if self._armed:
            self.trace_event(lib.UVB_TRACE_EV_MASK, 1, "guest TX interrupt_mask set (host busy)")
        if self._armed and w != self._arm_index:
            self._tx_credits.append(time.monotonic() + self._grace if raced else float("inf"))
        self._armed = False

    def _note_pending(self) -> None:
        """Count the host's stores of RX pending_send_sz since we last looked: the guest may
        answer each with one signal when its reads free more than that (credit b)."""
        sets = int(self.irq.pending_sets)
        new = min(sets - self._pending_sets, 64)
        self._pending_sets = sets
        self.stats["pending_stores"] += sets - self.stats["pending_stores"]
        waiting = bool(self.rx.raw.pending_wanted)
        # a store the host already took back (the guest raced it and freed the space at once)
        # may still have been seen by the guest: a "may" credit, like a raced TX re-check
        expiry = float("inf") if waiting else time.monotonic() + self._grace
        for _ in range(new):
            self._rx_credits.append(expiry)
        if waiting and not self._rx_credits:
            self._rx_credits.append(float("inf"))   # a pump used plain uvb_out_want_space

    def _stop_waiting_for_space(self) -> None:
        """The host no longer waits for RX space: outstanding (b) credits become "may"."""
        self.rx.clear_want()
        limit = time.monotonic() + self._grace
        self._rx_credits = deque(min(t, limit) for t in self._rx_credits)

    def _account(self) -> None:
        """Classify the guest signals that arrived since the last call."""
        self._note_pending()
        with self._lock:
            n, c = self._sig_new, self._sig_collateral
            self._sig_new = self._sig_collateral = 0
        if not (n or c):
            return
        st = self.stats
        st["guest_signals"] += n
        st["collateral_signals"] += c
        now = time.monotonic()
        self._tx_credits = deque(t for t in self._tx_credits if t >= now)
        self._rx_credits = deque(t for t in self._rx_credits if t >= now)
        for _ in range(n):
            if self._tx_credits:
                self._tx_credits.popleft()
                st["needed_signals"] += 1
            elif self._rx_credits:
                self._rx_credits.popleft()
                st["needed_signals"] += 1
            else:
                st["needless_signals"] += 1
                self.trace_event(lib.UVB_TRACE_EV_NOTE, 0, "needless guest signal")
                if st["needless_signals"] <= 3:
                    self.device.log(f"relid {self.relid}: needless guest signal #{st['needless_signals']} "
                                    f"(tx {self.tx.control()}, host armed={self._armed})", debug=True)

    def _wait_rx_space(self) -> None:
        """The RX ring is full and pending_send_sz is set: sleep until the guest frees it."""
        self.stats["rx_full_waits"] += 1
        self._note_pending()
        while True:
            wanted = int(self.rx.raw.pending_wanted)
            if not wanted or lib.uvb_host_out_space(self.rx.raw) > wanted:
                self._stop_waiting_for_space()
                return
            self._sleep(None)
            self._account()

    # -- serving ---------------------------------------------------------------------------
    def _serve(self) -> int:
        model = self.device.model
        if self.fast_path_allowed:
            rc = model.pump(self, self.spin_ns)
            if rc is not None:
                if rc < 0:
                    self.tx._fail(rc)
                if rc == lib.UVB_HOST_SLOWPATH:
                    self._serve_python(1)
                    return lib.UVB_HOST_KICKED
                return rc
        return self._serve_python(_PY_BATCH)

    def _serve_python(self, max_packets: int) -> int:
        batch = self.tx.read(max_packets)
        if not batch.count:
            deadline = time.perf_counter() + self.spin_ns / 1e9
            while time.perf_counter() < deadline and not self.kick[0]:
                if self.tx.avail:
                    return lib.UVB_HOST_KICKED
            return lib.UVB_HOST_IDLE
        model = self.device.model
        slow = self.faults.slow_us
        for pkt in batch:
            if slow:
                time.sleep(slow / 1e6)
            self.stats["packets_from_guest"] += 1
            try:
                model.packet(self, pkt)
            except (ChannelStopped, RingCorrupt):
                raise
            except Exception:
                self.stats["model_errors"] += 1
                self.device.log(f"relid {self.relid}: model failed on a packet:\n{traceback.format_exc(limit=6)}")
        self.flush()
        self._commit_tx()
        return lib.UVB_HOST_KICKED

    def _commit_tx(self) -> None:
        rc = lib.uvb_in_commit(self.tx.raw)
        if rc < 0:
            self.tx._fail(rc)
        if rc == 1:
            self._interrupt()

    def _interrupt(self) -> None:
        if lib.uvb_host_interrupt(self.irq) < 0 and self.irq.oops == 1:
            self.device.log(f"relid {self.relid}: GUEST KERNEL OOPS: interrupt on sub-channel "
                            f"{self.subchannel_id} (hv_uio_channel_cb NULL device_obj, kernels "
                            "< 6.16); the guest must keep sub-channel RX masked on this kernel")

    # -- API for device models ----------------------------------------------------------------
    def flush(self) -> None:
        """Publish queued packets; interrupt the guest if the ring protocol says so."""
        raw = self.rx.raw
        before = raw.committed
        rc = lib.uvb_out_commit(raw)
        if rc < 0:
            self.rx._fail(rc)
        if rc == 1 or (self.faults.ignore_rx_mask and raw.committed != before):
            self._interrupt()

    def send(self, payload: Any, *, trans_id: int = 0, flags: int = 0, type: int = PKT_INBAND) -> None:
        """Queue an in-band (or completion) packet for the guest; blocks while the RX ring
        is full (pending_send_sz protocol).  Flushed at the end of the current batch."""
        f = self.faults
        copies = 1
        if type == PKT_COMP:
            if f.take("drop_completions"):
                self.stats["dropped_packets"] += 1
                return
            if f.take("dup_completions"):
                copies = 2
                self.stats["duplicated_packets"] += 1
        elif f.take("drop_packets"):
            self.stats["dropped_packets"] += 1
            return
        need = packet_ring_bytes(len(payload))
        for _ in range(copies):
            self._put(lambda: self.rx.put(payload, trans_id=trans_id, flags=flags, type=type), need)

    def complete(self, trans_id: int, payload: Any = b"") -> None:
        """Queue a completion (type 11) for transaction ``trans_id``."""
        self.send(payload, trans_id=trans_id, type=PKT_COMP)

    def send_xfer_pages(self, pageset_id: int, ranges: Sequence[tuple[int, int]], payload: Any = b"", *,
                        trans_id: int = 0, flags: int = FLAG_COMPLETION_REQUESTED) -> None:
        """Queue a transfer-page packet (type 7): ``ranges`` = ``[(byte_count, byte_offset)]``
        into the buffer registered as ``pageset_id`` (netvsc: the receive buffer)."""
        if self.faults.take("drop_packets"):
            self.stats["dropped_packets"] += 1
            return
        need = packet_ring_bytes(len(payload), 8 + 8 * len(ranges))
        self._put(lambda: self.rx.put_xfer_pages(pageset_id, ranges, payload, trans_id=trans_id,
                                                 flags=flags), need)

    def _put(self, put: Any, need: int) -> None:
        self._check_stop()
        start = self.rx.raw.cursor
        while not put():
            self.flush()
            self._commit_tx()
            rc = lib.uvb_host_want_space(self.rx.raw, need, self.irq)
            if rc < 0:
                self.rx._fail(rc)
            if rc == 0:
                self._wait_rx_space()
            self._check_stop()
            start = self.rx.raw.cursor
        self.stats["packets_to_guest"] += 1
        if self.faults.take("corrupt_descriptor"):
            field = self.faults.corrupt_field
            lib.uvb_host_poke_desc(self.rx.raw, start, DESCRIPTOR_FIELDS[field], _BAD_DESCRIPTOR_VALUE[field])
            self.stats["corrupted_packets"] += 1

    def read_packet(self) -> Packet | None:
        """For models that pull packets themselves (rare): one packet, committed."""
        p = self.tx.read_one()
        if p is not None:
            self._commit_tx()
        return p

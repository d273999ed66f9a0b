"""A device with its channels open: the primary channel from uio map 0, sub-channels
from their ``ring`` files, and the interrupt wait shared by all of them.

There is ONE event counter per device (uio_vmbus.md §1.6): an interrupt for
any channel wakes every waiter of the device, so a waiter arms and scans all
the channels it serves.  Threads that wait independently (one queue each)
should each take their own waiter (:meth:`ChannelDevice.new_waiter`), which
opens its own endpoint file: each open file has its own "last seen" count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from uvmbus.bus import Bus, VmbusDevice
from uvmbus.channel.channel import Channel
from uvmbus.errors import ConfigError
from uvmbus.ring import RingPair
from uvmbus.uio import OPEN_TIMEOUT, Endpoint, UioDevice, open_endpoint


class DeviceWaiter:
    """Blocks until one of some channels of a device has data or an interrupt arrives.

    The pattern (§1.6, §2.6; openvmm's ReadState): while data is known to be
    present, RX interrupts stay masked; before sleeping, unmask every channel's
    RX ring and re-check; only then block on the endpoint.  On kernels that set
    the mask themselves on each interrupt (< 6.18), the unmask before every
    sleep keeps this correct; the re-check closes the lost-wakeup race.

    Channels whose ``interrupts_ok`` is False (sub-channels on kernels < 6.16,
    where an interrupt on a sub-channel crashes the guest kernel) are never
    unmasked: they are polled every ``poll_interval`` while waiting.
    """

    def __init__(self, endpoint: Endpoint, *, owns_endpoint: bool = False, poll_interval: float = 0.0005):
        self.endpoint = endpoint
        self._owns = owns_endpoint
        self.poll_interval = poll_interval
        self.interrupts = 0

    def wait(self, channels: Sequence[Channel], timeout: float | None) -> bool:
        """Return True when data is ready or an interrupt arrived, False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        armed = [ch for ch in channels if ch.interrupts_ok]
        polled = [ch for ch in channels if not ch.interrupts_ok]
        while True:
            ready = False
            for ch in armed:
                if ch.rx.arm():            # unmask + re-check
                    ready = True
            if not ready and polled:
                ready = any(ch.rx.avail for ch in polled)
            if ready:
                for ch in armed:
                    ch.rx.mask()
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                for ch in armed:
                    ch.rx.mask()
                return False
            if polled:
                remaining = self.poll_interval if remaining is None else min(remaining, self.poll_interval)
            count = self.endpoint.wait(remaining)
            for ch in armed:
                ch.rx.mask()
            if count is not None:
                self.interrupts += 1
                return True
            if polled and any(ch.rx.avail for ch in polled):
                return True

    def fileno(self) -> int:
        return self.endpoint.fileno()

    def close(self) -> None:
        if self._owns:
            self.endpoint.close()


class ChannelDevice:
    """A uio-bound VMBus device with its primary channel (and any sub-channels) open."""

    def __init__(self, uio: UioDevice, *, spin_us: int = 0, recorder: Any = None, owns_recorder: bool = False):
        self.uio = uio
        #: uvmbus.trace.Recorder recording every channel of this device, or None
        self.recorder = recorder
        self._owns_recorder = owns_recorder
        self._trace_ports: list[Any] = []
        self._trace_bufs: dict[str, Any] = {}
        self.device: VmbusDevice = uio.device
        self.spin_us = spin_us
        self.waiter = DeviceWaiter(uio.endpoint)
        self._extra_waiters: list[DeviceWaiter] = []
        dev, relid = self.device, uio.relid
        rings = RingPair.attach(uio.rings.mm, uio.primary_ring_bytes, uio.page_size,
                                offset=uio.rings.offset, name=f"{dev.class_name}/{relid}")
        self.primary = Channel(
            rings, relid=relid, subchannel_id=0, monitor_id=dev.monitor_id,
            signal=uio.make_signal(relid, dev.monitor_id), waiter=self.waiter,
            name=f"{dev.class_name}/{relid}", spin_us=spin_us,
        )
        self.subchannels: list[Channel] = []
        self._record(self.primary)

    # -- recording (uvmbus.trace) ----------------------------------------------------
    def _record(self, ch: Channel) -> None:
        if self.recorder is None:
            return
        port = self.recorder.port(ch.relid, subchan=ch.subchannel_id, devclass=self.device.class_name,
                                  instance=self.device.device_id)
        port.attach(ch.tx.raw, ch.rx.raw)
        self._trace_ports.append(port)
        self._apply_trace_buffers(port)

    def _apply_trace_buffers(self, port: Any) -> None:
        for pageset_id, ptr, size in self._trace_bufs.get("pagesets", ()):
            port.add_pageset(pageset_id, ptr, size)
        if "send" in self._trace_bufs:
            port.set_send_buffer(*self._trace_bufs["send"])

    def trace_buffers(self, *, pagesets: Sequence[tuple[int, Any, int]] = (),
                      send: tuple[Any, int, int] | None = None) -> None:
        """Tell the recorder (if any) which buffers packets refer to, so it attaches the bytes
        of transfer-page ranges (``pagesets``: (id, ptr, size)) and send-buffer sections
        (``send``: (ptr, size, section_size))."""
        if pagesets:
            self._trace_bufs["pagesets"] = list(pagesets)
        if send is not None:
            self._trace_bufs["send"] = send
        for port in self._trace_ports:
            self._apply_trace_buffers(port)

    def trace_port(self, channel: Channel) -> Any:
        """The recorder port of ``channel`` (None when not recording)."""
        for port in self._trace_ports:
            if int(port.raw.relid) == channel.relid:
                return port
        return None

    @property
    def channels(self) -> list[Channel]:
        return [self.primary, *self.subchannels]

    def open_subchannels(self, count: int, *, timeout: float = 10.0) -> list[Channel]:
        """Wait for ``count`` more sub-channel ring files (offered after a VSP-specific
        request), map them and return their channels, ordered by sub-channel id."""
        if count < 0:
            raise ConfigError("sub-channel count must be >= 0")
        known = {c.relid for c in self.channels}
        rings = self.uio.subchannel_rings(count, timeout=timeout, exclude=known)
        new = []
        for r in rings:
            pair = RingPair.attach(r.mm, r.ring_bytes, self.uio.page_size, own=True,
                                   name=f"{self.device.class_name}/{r.relid}")
            ch = Channel(
                pair, relid=r.relid, subchannel_id=r.subchannel_id, monitor_id=r.monitor_id,
                signal=self.uio.make_signal(r.relid, r.monitor_id, subchannel=True),
                waiter=self.waiter, name=f"{self.device.class_name}/{r.relid}", spin_us=self.spin_us,
            )
            ch.interrupts_ok = self.uio.quirks.subchannel_interrupts_safe
            new.append(ch)
            self._record(ch)
        self.subchannels.extend(new)
        self.subchannels.sort(key=lambda c: c.subchannel_id)
        return new

    def wait(self, channels: Sequence[Channel] | None = None, timeout: float | None = None) -> bool:
        """Wait for activity on any of ``channels`` (default: all of this device's)."""
        return self.waiter.wait(list(channels) if channels is not None else self.channels, timeout)

    def new_waiter(self) -> DeviceWaiter:
        """A waiter with its own endpoint file, for a thread that waits on its own queues."""
        w = DeviceWaiter(open_endpoint(self.uio.uio_path, timeout=self.uio.open_timeout),
                         owns_endpoint=True)
        self._extra_waiters.append(w)
        return w

    def fileno(self) -> int:
        return self.waiter.fileno()

    def close(self) -> None:
        for port in self._trace_ports:
            port.detach()
        self._trace_ports = []
        for ch in reversed(self.channels):
            ch.close()
        self.subchannels = []
        for w in self._extra_waiters:
            w.close()
        self._extra_waiters = []
        self.uio.close()
        if self.recorder is not None and self._owns_recorder:
            rec, self.recorder = self.recorder, None
            rec.close()

    def __enter__(self) -> ChannelDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(ref: str, root: str | os.PathLike[str] = "/", *, spin_us: int = 0,
                lock: bool = True, record: Any = None, timeout: float = OPEN_TIMEOUT) -> ChannelDevice:
    """Open device ``ref`` (GUID, unique prefix or class short name) bound to
    uio_hv_generic under ``root`` ("/" on a real guest, the simulator's root otherwise).
    ``lock`` (default True): hold the device's lock while it is open, so that another
    process opening it fails at once (:class:`~uvmbus.errors.DeviceBusy`); ``lock=False``
    is for experts sharing a device on purpose.
    ``record``: a trace file path or a :class:`uvmbus.trace.Recorder` recording every
    packet of every channel of the device (a path is closed with the device).
    ``timeout``: seconds the simulator's endpoint may take to answer the open (a stopped or
    hung ``uvmbus sim`` fails with :class:`~uvmbus.errors.ChannelTimeout` after it)."""
    from uvmbus.trace import as_recorder

    bus = Bus(root)
    uio = UioDevice(bus, bus.device(ref), lock=lock, timeout=timeout)
    try:
        rec, owned = as_recorder(record, side="guest")
    except BaseException:
        uio.close()
        raise
    try:
        return ChannelDevice(uio, spin_us=spin_us, recorder=rec, owns_recorder=owned)
    except BaseException:
        uio.close()
        if owned and rec is not None:
            rec.close()
        raise

"""Guest→host signals through the monitor page (uio_vmbus.md §1.7).

Hyper-V scans the monitor page's trigger groups periodically (``latency`` per id, in 100 ns
units; 50 µs by default) instead of taking an exit per signal.  One scanner thread per
simulated VM does the same in C with the GIL released (``uvb_host_monitor_wait``): every
``--monitor-latency-us`` it test-and-clears only the bits of monitored channels that are
open, and hands each fired bit to the channel as one guest signal.  The channel's int-page
bit (which the kernel's own ``vmbus_setevent`` also sets for monitored channels) is cleared
with it: it is part of the same signal.

An idle simulator should not cost a core's tenth: once no bit fired and no index of a
watched channel's rings moved for ``IDLE_AFTER_MS``, the scan interval doubles up to
``--monitor-idle-us`` (default 2000; 0 keeps Hyper-V's fixed interval), and returns to the
latency at once on a signal, a moving ring or a channel open/close.  Under load the rings
move, so the interval stays the latency.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from uvmbus.native import ffi, lib

if TYPE_CHECKING:
    from uvmbus.sim.channel import HostChannel

__all__ = ["IDLE_AFTER_MS", "MonitorScanner"]

#: back off after this long without a signal or a moving ring of a watched channel
IDLE_AFTER_MS = 20


class MonitorScanner:
    def __init__(self, monitor_page: Any, int_page_send: Any, latency_us: float,
                 honour_page_latency: bool = True, idle_us: float = 2000.0):
        self.m: Any = ffi.new("struct uvb_host_monitor *")
        self.m.page = monitor_page
        self.m.latency_ns = max(1000, int(latency_us * 1000))
        self.m.honour_page_latency = 1 if honour_page_latency else 0
        self.m.idle_ns = max(0, int(idle_us * 1000))
        self.m.idle_after_ns = IDLE_AFTER_MS * 1_000_000
        self._int_send = int_page_send
        self._fired: Any = ffi.new("uint32_t[4]")
        self._by_id: dict[int, HostChannel] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sim-monitor", daemon=True)
        self.signals = 0

    def start(self) -> None:
        self._thread.start()

    def watch(self, monitor_id: int, channel: HostChannel) -> None:
        # (the C side clears a bit left from a previous open: not a signal to this one)
        with self._lock:
            self._by_id[monitor_id] = channel
            lib.uvb_host_monitor_watch(self.m, monitor_id, channel.mem.tx_header, channel.mem.rx_header)

    def unwatch(self, monitor_id: int) -> None:
        with self._lock:
            self._by_id.pop(monitor_id, None)
            lib.uvb_host_monitor_unwatch(self.m, monitor_id)     # returns once its rings are unread

    def stop(self) -> None:
        lib.uvb_host_monitor_stop(self.m)
        self._thread.join(5)

    def _run(self) -> None:
        lib.uvb_host_set_timerslack(1000)
        m, fired = self.m, self._fired
        while not m.stop:
            if not lib.uvb_host_monitor_wait(m, 200_000_000, fired):
                continue
            for g in range(4):
                bits = fired[g]
                while bits:
                    b = (bits & -bits).bit_length() - 1
                    bits &= bits - 1
                    mid = 32 * g + b
                    with self._lock:
                        ch = self._by_id.get(mid)
                    if ch is None:
                        continue
                    self.signals += 1
                    lib.uvb_intpage_test_clear(self._int_send, ch.relid)
                    ch.guest_signal()

    def describe(self) -> dict[str, Any]:
        return {"latency_us": self.m.latency_ns / 1000, "idle_us": self.m.idle_ns / 1000,
                "scans": int(self.m.scans), "idle_scans": int(self.m.idle_scans),
                "hits": int(self.m.hits), "signals": self.signals}

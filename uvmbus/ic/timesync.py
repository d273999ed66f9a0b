"""Time synchronisation IC (type 4): host clock samples → the guest's offset (§7.6).

Every sample is answered (S_OK) and turned into a :class:`TimeSample`: the host's UTC time,
the guest's ``CLOCK_REALTIME`` when the sample was read, and their difference.  What to do
with it is a policy (:class:`TimeSyncService` ``apply=``):

* ``"none"`` (default) — report only (status, metrics);
* ``"chrony:PATH"`` — send each sample to chronyd's SOCK refclock on the datagram socket PATH
  (``refclock SOCK PATH`` in chrony.conf), which then disciplines the clock;
* ``"adjtimex"`` — a SYNC sample (after boot/restore) steps the clock when it is off by more
  than ``step_threshold``; other samples slew it with ``adjtime`` (needs CAP_SYS_TIME).

Version 4 samples carry ``vmreferencetime`` (the partition reference counter at sampling);
Linux adds ``now_ref - vmreferencetime`` to compensate the delivery delay.  Userspace has no
portable view of that counter, so this service uses ``parenttime`` as the time of receipt: the
ring delivery delay (micro- to milliseconds) is in the offset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from uvmbus.errors import ConfigError
from uvmbus.ic import wire
from uvmbus.ic.framework import IcService
from uvmbus.ic.wire import MsgType, Status

__all__ = ["TimeSample", "TimeSyncService", "WLTIMEDELTA", "filetime_to_unix", "unix_to_filetime"]

log = logging.getLogger("uvmbus.ic")

#: 1601-01-01 → 1970-01-01 in 100 ns units
WLTIMEDELTA = 116444736000000000
FLAG_SYNC = 1
FLAG_SAMPLE = 2
_CHRONY_MAGIC = 0x534F434B


def filetime_to_unix(ft: int) -> float:
    return (ft - WLTIMEDELTA) / 1e7


def unix_to_filetime(t: float) -> int:
    return int(round(t * 1e7)) + WLTIMEDELTA


@dataclass(frozen=True)
class TimeSample:
    host_time: float        # UTC seconds since the epoch
    guest_time: float       # this guest's CLOCK_REALTIME when the sample was read
    flags: int
    version: str

    @property
    def offset(self) -> float:
        """Seconds to add to the guest's clock to match the host's."""
        return self.host_time - self.guest_time

    @property
    def kind(self) -> str:
        return "sync" if self.flags & FLAG_SYNC else "sample" if self.flags & FLAG_SAMPLE else "probe"


class _Chrony:
    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, s: TimeSample) -> None:
        sec = int(s.guest_time)
        usec = int((s.guest_time - sec) * 1e6)
        # struct sock_sample: timeval, double offset, int pulse, int leap, int pad, int magic
        msg = struct.pack("<qqdiiii", sec, usec, s.offset, 0, 0, 0, _CHRONY_MAGIC)
        try:
            self.sock.sendto(msg, self.path)
        except OSError as exc:
            log.warning("timesync: chronyd socket %s: %s", self.path, exc)


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Adjtime:
    def __init__(self, step_threshold: float):
        self.step_threshold = step_threshold
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def __call__(self, s: TimeSample) -> None:
        off = s.offset
        if s.flags & FLAG_SYNC and abs(off) > self.step_threshold:
            time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + off)
            log.info("timesync: clock stepped by %+.6f s", off)
            return
        off = max(-0.5, min(0.5, off))      # slew at most half a second per sample
        tv = _Timeval(int(off), int((off - int(off)) * 1e6))
        if self.libc.adjtime(ctypes.byref(tv), None) != 0:
            err = ctypes.get_errno()
            log.warning("timesync: adjtime failed: errno %d (CAP_SYS_TIME?)", err)


def make_apply(spec: str, step_threshold: float = 1.0) -> Callable[[TimeSample], None] | None:
    """The callback for an ``apply=`` spec (see the module docstring)."""
    if spec in ("", "none"):
        return None
    if spec.startswith("chrony:"):
        return _Chrony(spec.split(":", 1)[1])
    if spec == "adjtimex":
        return _Adjtime(step_threshold)
    raise ConfigError(f"time sync apply {spec!r}: use none, adjtimex or chrony:/path/to/socket")


class TimeSyncService(IcService):
    name = "timesync"
    msgtype = MsgType.TIMESYNC
    message_versions = ((4, 0), (3, 0), (1, 0))
    min_body = wire.sizeof("ic_timesync")

    def __init__(self, apply: Callable[[TimeSample], None] | str | None = None,
                 clock: Callable[[], float] = time.time, step_threshold: float = 1.0) -> None:
        super().__init__()
        self.apply = make_apply(apply, step_threshold) if isinstance(apply, str) else apply
        self.clock = clock
        self.last: TimeSample | None = None

    def body_size(self) -> int:
        return wire.sizeof("ic_timesync_ref" if self.version >= (4, 0) else "ic_timesync")

    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        guest = self.clock()
        if self.version >= (4, 0):
            m = wire.load("ic_timesync_ref", body)
        else:
            m = wire.load("ic_timesync", body)
        sample = TimeSample(filetime_to_unix(int(m.parenttime)), guest, int(m.flags),
                            wire.version_str(self.version))
        self.last = sample
        self.counters[sample.kind] += 1
        apply = self.apply
        return int(Status.S_OK), (None if apply is None else (lambda: apply(sample)))

    def status(self) -> dict[str, object]:
        st = super().status()
        if self.last is not None:
            st["offset"] = round(self.last.offset, 6)
            st["last_kind"] = self.last.kind
        return st

"""Heartbeat IC (type 1): answer every beat with ``seq_num + 1`` (storvsc_ic.md §7.4).

Linux (hv_util.c) checks that the body holds the 8-byte sequence number, increments it and
leaves the rest as received; so does this service."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from uvmbus.ic.framework import IcService
from uvmbus.ic.wire import MsgType, Status

__all__ = ["HeartbeatService"]


class HeartbeatService(IcService):
    name = "heartbeat"
    msgtype = MsgType.HEARTBEAT
    message_versions = ((3, 0), (1, 0))
    min_body = 8

    def __init__(self) -> None:
        super().__init__()
        self.last_seq: int | None = None
        self.last_beat: float | None = None

    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        seq = struct.unpack_from("<Q", body, 0)[0]
        struct.pack_into("<Q", body, 0, (seq + 1) & 0xFFFFFFFFFFFFFFFF)
        self.last_seq = seq
        self.last_beat = time.monotonic()
        self.counters["beats"] += 1
        return int(Status.S_OK), None

    def status(self) -> dict[str, object]:
        st = super().status()
        st["last_seq"] = self.last_seq
        st["since_last_beat"] = None if self.last_beat is None else round(time.monotonic() - self.last_beat, 3)
        return st

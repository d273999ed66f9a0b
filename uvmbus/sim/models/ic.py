"""Host side of the integration components: heartbeat, shutdown, time sync, KVP, file copy.

Written from the host's point of view in the references, not from uvmbus's guest code (only
the wire layouts of ``native/ic_wire.h`` are shared, through cffi's ``ffi``/``lib``):

* framing and negotiation — OpenVMM ``hyperv_ic`` (``IcPipe::negotiate``): each message is one
  in-band packet, transaction id 0, no completion flag; ``vmbuspipe_hdr`` flags 1; the host
  offers framework versions ``[1.0, 3.0]`` and its message versions with flags
  ``TRANSACTION|REQUEST``; it accepts only a reply with counts 1/1 naming versions it offered,
  flags ``TRANSACTION|RESPONSE``, transaction id 0 and at least the body it asked about;
  afterwards it stamps every header with the negotiated versions (storvsc_ic.md §7.1-7.3);
* one outstanding transaction per IC ("request/response protocol guaranteed by the host",
  Linux hv_fcopy.c); a request not answered within ``reply_timeout`` counts as *missed*;
* heartbeat — a beat every ``interval`` s (Linux's comment: every 2 s), ``seq`` expected back
  as ``seq + 1`` (§7.4); shutdown — on request, flags FORCE/RESTART (≥3.1)/HIBERNATE (≥3.2),
  reason ``SHTDN_REASON_FLAG_PLANNED`` (§7.5); time sync — after negotiation one SYNC, then a
  SAMPLE every ``interval`` s (OpenVMM: 5 s), v4 ``ictimesync_ref_data`` or v1/v3
  ``ictimesync_data`` (§7.6); KVP — GET/SET/DELETE/ENUMERATE with UTF-16 keys and values whose
  sizes include the NUL, ENUMERATE until a non-zero status, GET_IP_INFO by MAC (§7.7, Linux
  uapi); fcopy — START_FILE_COPY, WRITE_TO_FILE in 6 KiB fragments, COMPLETE_FCOPY, or
  CANCEL_FCOPY after a failure (§7.9).

Options (``--device NAME:KEY=VAL,...``; lists separated by ``/``): ``versions=3.0/4.0`` (message
versions offered), ``fw=1.0/3.0``, ``reply_timeout=S``, ``interval=S`` (heartbeat, time sync),
``skew=S`` (time sync: the host clock's offset from this machine's).

Control (``uvmbus sim ctl ic DEVICE OP [KEY=VALUE...]``, or ``{"cmd": "model", "op": ...}``):
``status``; ``shutdown action=poweroff|reboot|hibernate [force=1]``; ``kvp_set pool= key=
value=``, ``kvp_get``, ``kvp_delete``, ``kvp_enumerate pool=``, ``kvp_ip mac=``;
``copy src=HOSTFILE|data=TEXT path=DIR name=FILE [overwrite=1] [create_path=1]
[cancel_after=N]``; ``renegotiate [versions=..] [fw=..]``; ``fault kind=truncate [size=N] |
bad_flags | oversized_name | bad_pipe``.  Operations that talk to the guest return a
``ticket``; ``result ticket=N`` reports it (``done``, ``status``, data).
"""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from uvmbus.errors import ConfigError
from uvmbus.native import ffi, lib
from uvmbus.ring import PKT_INBAND, Packet
from uvmbus.sim.channel import HostChannel
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel
from uvmbus.sim.models.null import IC_CLASSES

__all__ = ["IC_INSTANCE_IDS", "IcHostModel"]

#: fixed instance GUIDs (storvsc_ic.md §8: OpenVMM's, the fcopy daemon's); heartbeat: none known
IC_INSTANCE_IDS = {
    "shutdown": "b6650ff7-33bc-4840-8048-e0676786f393",
    "timesync": "2dd1ce17-079e-403c-b352-a1921ee207ee",
    "kvp": "242ff919-07db-4180-9c2e-b86cb68c8c55",
    "fcopy": "eb765408-105f-49b6-b4aa-c123b64d17d4",
}

_CLASS_IDS = dict(IC_CLASSES)
_PIPE = lib.IC_PIPE_HDR_SIZE
HDR_SIZE = lib.IC_HDR_SIZE
REQUEST_FLAGS = lib.IC_FLAG_TRANSACTION | lib.IC_FLAG_REQUEST
RESPONSE_FLAGS = lib.IC_FLAG_TRANSACTION | lib.IC_FLAG_RESPONSE
NEGOTIATE = lib.IC_MSGTYPE_NEGOTIATE
_STATUS_NAMES = {lib.IC_S_OK: "S_OK", lib.IC_E_FAIL: "E_FAIL", lib.IC_S_CONT: "S_CONT",
                 lib.IC_ERROR_ALREADY_EXISTS: "ALREADY_EXISTS", lib.IC_ERROR_DISK_FULL: "DISK_FULL",
                 lib.IC_ERROR_NOT_SUPPORTED: "NOT_SUPPORTED", lib.IC_INVALIDARG: "INVALIDARG"}


def _status_name(st: int) -> str:
    return _STATUS_NAMES.get(st, f"{st:#010x}")


def _vstr(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _parse_version(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    v = (int(major), int(minor or 0))
    if not (0 <= v[0] <= 0xFFFF and 0 <= v[1] <= 0xFFFF):
        raise ValueError(text)
    return v


def _offsetof(struct_name: str, field_name: str) -> int:
    return int(ffi.offsetof(f"struct {struct_name}", field_name))


_FILETIME_EPOCH = 116444736000000000
_SHTDN_REASON_PLANNED = 0x80000000
_KEY, _VALUE = 512, 2048
_MAX_PATH = 260


def _versions(text: Any, what: str) -> tuple[tuple[int, int], ...]:
    if isinstance(text, (list, tuple)):
        items = [str(t) for t in text]
    else:
        items = [t for t in str(text).replace(";", "/").replace(" ", "/").split("/") if t]
    try:
        return tuple(_parse_version(t) for t in items)
    except Exception as exc:
        raise ConfigError(f"{what}={text!r}: versions are MAJOR.MINOR separated by '/'") from exc


def _u16(text: str, limit: int) -> bytes:
    return (text.encode("utf-16-le") + b"\0\0")[:limit].ljust(limit, b"\0")


def _from_u16(raw: bytes) -> str:
    for i in range(0, len(raw) - 1, 2):
        if raw[i:i + 2] == b"\0\0":
            return raw[:i].decode("utf-16-le", "replace")
    return raw.decode("utf-16-le", "replace")


@dataclass
class _Txn:
    msgtype: int
    body: bytes
    on_reply: Callable[[int, bytes], None]
    on_missed: Callable[[], None] | None = None
    what: str = ""
    sent_at: float = 0.0
    sent_len: int = 0
    timeout: float | None = None       # None: the model's reply_timeout


@dataclass
class _Ticket:
    op: str
    done: bool = False
    status: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def finish(self, status: int | None, **data: Any) -> None:
        self.status = status
        self.data.update(data)
        self.done = True

    def describe(self) -> dict[str, Any]:
        st = self.status
        return {"op": self.op, "done": self.done, "status": st,
                "status_name": None if st is None else _status_name(st), **self.data}


class IcHostModel(DeviceModel):
    """What the Hyper-V host side of one IC does (see the module docstring)."""

    msgtype: ClassVar[int] = -1
    #: message versions the host offers (OpenVMM's lists where it has the IC)
    host_versions: ClassVar[tuple[tuple[int, int], ...]] = ()
    host_fw: ClassVar[tuple[tuple[int, int], ...]] = ((1, 0), (3, 0))
    kernel_driver: ClassVar[str | None] = "hv_utils"
    monitored: ClassVar[bool | None] = False
    periodic: ClassVar[bool] = False

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        self.offer_versions = _versions(options["versions"], "versions") if "versions" in options else self.host_versions
        self.offer_fw = _versions(options["fw"], "fw") if "fw" in options else self.host_fw
        self.reply_timeout = float(options.get("reply_timeout", 5.0))
        self.interval = float(options.get("interval", self.default_interval()))
        self._lock = threading.Lock()
        self._queue: deque[_Txn] = deque()
        self._current: _Txn | None = None
        self._next_periodic: float | None = None
        self._faults: deque[dict[str, Any]] = deque()
        self._tickets: dict[int, _Ticket] = {}
        self._ticket_ids = 0
        self.state = "closed"
        self.negotiated: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.counters: Counter[str] = Counter()
        self.last_error = ""
        self._lat_n = 0
        self._lat_sum = 0.0
        self._lat_max = 0.0

    def default_interval(self) -> float:
        return 0.0

    # ---- channel hooks ------------------------------------------------------------------------
    def open(self, channel: HostChannel) -> None:
        with self._lock:
            self._queue.clear()
            self._current = None
            self.negotiated = None
            self.state = "negotiating"
            self._queue.append(self._negotiate_txn(self.offer_fw, self.offer_versions))
            self._next_periodic = None

    def close(self, channel: HostChannel) -> None:
        with self._lock:
            self.state = "closed"
            for t in [*self._queue, *([self._current] if self._current else [])]:
                if t.on_missed is not None:
                    t.on_missed()
            self._queue.clear()
            self._current = None

    def reset(self) -> None:
        pass

    def tick(self, channel: HostChannel) -> float | None:
        """Send what is due; seconds until the next deadline (None: nothing scheduled)."""
        now = time.monotonic()
        with self._lock:
            cur = self._current
            if cur is not None and now - cur.sent_at > self._timeout(cur):
                self.counters["missed"] += 1
                self._error(f"no reply to {cur.what} within {self._timeout(cur):g} s")
                self._current = None
                if cur.on_missed is not None:
                    cur.on_missed()
            if self.state == "ready" and self.periodic and self.interval > 0:
                if self._next_periodic is None:
                    self._next_periodic = now
                if now >= self._next_periodic:
                    self._next_periodic = now + self.interval
                    t = self.periodic_txn()
                    if t is not None:
                        self._queue.append(t)
            if self._current is None and self._queue and self.state in ("ready", "negotiating"):
                t = self._queue.popleft()
                self._send(channel, t, now)
            deadlines = []
            if self._current is not None:
                deadlines.append(self._current.sent_at + self._timeout(self._current))
            if self._next_periodic is not None and self.state == "ready":
                deadlines.append(self._next_periodic)
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _timeout(self, t: _Txn) -> float:
        return self.reply_timeout if t.timeout is None else t.timeout

    def _error(self, msg: str) -> None:
        self.last_error = msg
        self.device.log(f"{self.name}: {msg}")

    def _send(self, channel: HostChannel, t: _Txn, now: float) -> None:
        fw, ver = self.negotiated if (self.negotiated and t.msgtype != NEGOTIATE) else ((0, 0), (0, 0))
        flags = REQUEST_FLAGS
        fault = self._faults.popleft() if self._faults and t.msgtype != NEGOTIATE else None
        pipe_flags = lib.IC_PIPE_TYPE_DATA
        body = t.body
        if fault and fault["kind"] == "bad_flags":
            flags = RESPONSE_FLAGS
        if fault and fault["kind"] == "bad_pipe":
            pipe_flags = 2
        hdr = struct.pack("<IIHHHHHHIBBH", pipe_flags, lib.IC_MSG_HDR_SIZE + len(body), fw[0], fw[1],
                          t.msgtype, ver[0], ver[1], len(body) & 0xFFFF, 0, 0, flags, 0)
        data = hdr + body
        if fault and fault["kind"] == "truncate":
            data = data[:int(fault.get("size", 20))]
            self.counters["faults_truncated"] += 1
        if fault and "timeout" in fault:         # the fault's request: give up sooner
            t.timeout = float(fault["timeout"])
        t.sent_at = now
        t.sent_len = len(data)
        self._current = t
        channel.send(data, trans_id=0)
        self.counters["requests"] += 1

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        if pkt.type != PKT_INBAND:
            self.counters["ignored"] += 1
            return
        data = bytes(pkt.payload)
        with self._lock:
            cur = self._current
            if cur is None:
                self.counters["unexpected_replies"] += 1
                self._error("a reply with no request outstanding (discarded)")
                return
            problem = self._check_reply(cur, data)
            if problem:
                self.counters["bad_replies"] += 1
                self._error(f"reply to {cur.what}: {problem}")
                return            # the request stays outstanding; it will be missed
            self._current = None
            status = struct.unpack_from("<I", data, _PIPE + 12)[0]
            self.counters["replies"] += 1
            ms = (time.monotonic() - cur.sent_at) * 1000
            self._lat_n += 1
            self._lat_sum += ms
            self._lat_max = max(self._lat_max, ms)
            cur.on_reply(status, data[HDR_SIZE:])

    def _check_reply(self, t: _Txn, data: bytes) -> str:
        if len(data) < HDR_SIZE:
            return f"{len(data)} bytes, shorter than the IC header"
        pipe_flags = struct.unpack_from("<I", data, 0)[0]
        if pipe_flags != lib.IC_PIPE_TYPE_DATA:
            return f"pipe header type {pipe_flags}, expected {lib.IC_PIPE_TYPE_DATA}"
        mtype = struct.unpack_from("<H", data, _PIPE + 4)[0]
        txid, flags = data[_PIPE + 16], data[_PIPE + 17]
        if mtype != t.msgtype:
            return f"message type {mtype}, expected {t.msgtype}"
        if txid != 0:
            return f"transaction id {txid}, expected 0"
        if flags & RESPONSE_FLAGS != RESPONSE_FLAGS:
            return f"flags {flags:#x} lack TRANSACTION|RESPONSE"
        if len(data) < t.sent_len:
            return f"{len(data)} bytes, shorter than the {t.sent_len}-byte request"
        return ""

    # ---- negotiation -----------------------------------------------------------------------
    def _negotiate_txn(self, fw: tuple[tuple[int, int], ...], vers: tuple[tuple[int, int], ...]) -> _Txn:
        body = struct.pack("<HHI", len(fw), len(vers), 0) + b"".join(struct.pack("<HH", *v) for v in (*fw, *vers))
        return _Txn(NEGOTIATE, body, lambda st, b: self._negotiated(st, b, fw, vers),
                    self._negotiate_missed, what="NEGOTIATE")

    def _negotiated(self, status: int, body: bytes, fw: tuple[tuple[int, int], ...],
                    vers: tuple[tuple[int, int], ...]) -> None:
        if len(body) < 16:
            self._fail_negotiation(f"negotiate reply body of {len(body)} bytes")
            return
        fc, mc = struct.unpack_from("<HH", body, 0)
        if (fc, mc) != (1, 1):
            self._fail_negotiation(f"guest answered counts {fc}/{mc}: no supported versions")
            return
        f = struct.unpack_from("<HH", body, 8)
        m = struct.unpack_from("<HH", body, 12)
        if f not in fw or m not in vers:
            self._fail_negotiation(f"guest chose {f[0]}.{f[1]}/{m[0]}.{m[1]}, which the host did not offer")
            return
        self.negotiated = (f, m)
        self.state = "ready"
        self.counters["negotiated"] += 1
        self.device.log(f"{self.name}: negotiated framework {f[0]}.{f[1]}, version {m[0]}.{m[1]}")
        self.on_ready()

    def _negotiate_missed(self) -> None:
        if self.state == "negotiating":
            self._fail_negotiation("no answer to NEGOTIATE")

    def _fail_negotiation(self, why: str) -> None:
        self.state = "failed"
        self.counters["negotiate_failed"] += 1
        self._error(f"version negotiation failed: {why}")
        while self._queue:
            t = self._queue.popleft()
            if t.on_missed is not None:
                t.on_missed()

    def on_ready(self) -> None:
        """Negotiation done (lock held): queue what the IC sends first."""

    def periodic_txn(self) -> _Txn | None:
        return None

    # ---- control ------------------------------------------------------------------------------
    def _ticket(self, op: str) -> tuple[int, _Ticket]:
        self._ticket_ids += 1
        t = _Ticket(op)
        self._tickets[self._ticket_ids] = t
        while len(self._tickets) > 256:
            self._tickets.pop(next(iter(self._tickets)))
        return self._ticket_ids, t

    def _enqueue(self, txns: list[_Txn]) -> None:
        if self.state != "ready":
            raise ConfigError(f"{self.name}: the channel is {self.state}: bind the device to "
                              "uio_hv_generic and start `uvmbus ic run` (negotiation must succeed) first")
        self._queue.extend(txns)
        primary = self.device.primary
        if primary is not None:
            primary.poke()

    def status(self) -> dict[str, Any]:
        n = self.negotiated
        return {"state": self.state, "framework": _vstr(n[0]) if n else None,
                "version": _vstr(n[1]) if n else None,
                "offered": [_vstr(v) for v in self.offer_versions],
                "offered_fw": [_vstr(v) for v in self.offer_fw],
                "counters": dict(self.counters), "last_error": self.last_error,
                "reply_ms": {"mean": round(self._lat_sum / self._lat_n, 3) if self._lat_n else None,
                             "max": round(self._lat_max, 3)},
                "pending": len(self._queue) + (1 if self._current else 0)}

    def describe(self) -> dict[str, Any]:
        return {"ic_state": self.state}

    def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if op == "status":
                return self.status()
            if op == "result":
                t = self._tickets.get(int(args.get("ticket", 0)))
                if t is None:
                    raise ConfigError(f"no ticket {args.get('ticket')!r}")
                return t.describe()
            if op == "renegotiate":
                fw = _versions(args["fw"], "fw") if "fw" in args else self.offer_fw
                vers = _versions(args["versions"], "versions") if "versions" in args else self.offer_versions
                if self.state == "closed":
                    raise ConfigError(f"{self.name}: the channel is closed")
                self.offer_fw, self.offer_versions = fw, vers
                self.state = "negotiating"
                self.negotiated = None
                self._queue.appendleft(self._negotiate_txn(fw, vers))
                primary = self.device.primary
                if primary is not None:
                    primary.poke()
                return {"queued": True}
            if op == "fault":
                kind = str(args.get("kind", ""))
                if kind not in ("truncate", "bad_flags", "bad_pipe", "oversized_name"):
                    raise ConfigError("fault kind must be truncate, bad_flags, bad_pipe or oversized_name")
                self._faults.append(dict(args))
                return {"queued": len(self._faults)}
            return self.ic_control(op, args)

    def ic_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise ConfigError(f"{self.name}: unknown operation {op!r}")


def _flag(args: dict[str, Any], key: str) -> bool:
    return str(args.get(key, "0")).lower() in ("1", "true", "yes", "on")


# ==== heartbeat ==========================================================================================

@register_model
class HeartbeatHost(IcHostModel):
    name = "heartbeat"
    class_id = _CLASS_IDS["heartbeat"]
    description = "heartbeat IC host: a beat every interval, expects seq + 1"
    msgtype = lib.IC_MSGTYPE_HEARTBEAT
    host_versions = ((1, 0), (3, 0))
    periodic = True

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        self.seq = int(options.get("seq", 1000))

    def default_interval(self) -> float:
        return 2.0

    def periodic_txn(self) -> _Txn | None:
        if self._current is not None and self._current.msgtype == lib.IC_MSGTYPE_HEARTBEAT:
            return None                    # the last beat is still outstanding
        seq = self.seq
        body = struct.pack("<Q", seq) + bytes(32)

        def reply(status: int, b: bytes) -> None:
            got = struct.unpack_from("<Q", b, 0)[0] if len(b) >= 8 else None
            if status != 0 or got != seq + 1:
                self.counters["bad_beats"] += 1
                self._error(f"heartbeat {seq}: status {status:#x}, sequence {got} (expected {seq + 1})")
            else:
                self.counters["beats"] += 1
                self.seq = got
        return _Txn(lib.IC_MSGTYPE_HEARTBEAT, body, reply, lambda: None, what=f"heartbeat {seq}")


# ==== shutdown ===========================================================================================

@register_model
class ShutdownHost(IcHostModel):
    name = "shutdown"
    class_id = _CLASS_IDS["shutdown"]
    description = "shutdown IC host: shutdown/reboot/hibernate requests on demand"
    msgtype = lib.IC_MSGTYPE_SHUTDOWN
    host_versions = ((1, 0), (3, 0), (3, 1), (3, 2))

    def ic_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op != "shutdown":
            raise ConfigError(f"shutdown: unknown operation {op!r} (shutdown, status, result, fault, renegotiate)")
        action = str(args.get("action", "poweroff"))
        flags = {"poweroff": 0, "shutdown": 0, "reboot": 2, "restart": 2, "hibernate": 4}.get(action)
        if flags is None:
            raise ConfigError("action must be poweroff, reboot or hibernate")
        if _flag(args, "force"):
            flags |= 1
        if "flags" in args:                          # raw flags, for fault tests
            flags = int(str(args["flags"]), 0)
        need = {2: (3, 1), 4: (3, 2)}.get(flags & 6)
        if need and self.negotiated and self.negotiated[1] < need:
            raise ConfigError(f"{action} needs shutdown version {need[0]}.{need[1]}; negotiated "
                              f"{_vstr(self.negotiated[1])}")
        msg = str(args.get("message", "uvmbus simulated host"))[:2047].encode()
        body = struct.pack("<III", _SHTDN_REASON_PLANNED, 0, flags) + msg.ljust(2048, b"\0")
        tid, ticket = self._ticket("shutdown")
        self._enqueue([_Txn(lib.IC_MSGTYPE_SHUTDOWN, body, lambda st, b: ticket.finish(st),
                            lambda: ticket.finish(None, error="no reply"), what=f"shutdown {action}")])
        return {"ticket": tid}


# ==== time sync ==========================================================================================

@register_model
class TimeSyncHost(IcHostModel):
    name = "timesync"
    class_id = _CLASS_IDS["timesync"]
    description = "time sync IC host: one SYNC, then a SAMPLE every interval"
    msgtype = lib.IC_MSGTYPE_TIMESYNC
    host_versions = ((4, 0),)
    periodic = True

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        self.skew = float(options.get("skew", 0.0))
        self._sent_sync = False

    def default_interval(self) -> float:
        return 5.0

    def on_ready(self) -> None:
        self._sent_sync = False

    def periodic_txn(self) -> _Txn | None:
        if self._current is not None:
            return None
        flag = 2 if self._sent_sync else 1           # SAMPLE, or the first SYNC
        self._sent_sync = True
        ft = int((time.time() + self.skew) * 1e7) + _FILETIME_EPOCH
        assert self.negotiated is not None
        if self.negotiated[1] >= (4, 0):
            body = struct.pack("<QQBBB3s", ft, 0, flag, 0, 0, b"")
        else:
            body = struct.pack("<QQQB", ft, 0, 0, flag)
        kind = "sync" if flag == 1 else "sample"

        def reply(status: int, b: bytes) -> None:
            self.counters[f"{kind}_answered" if status == 0 else f"{kind}_failed"] += 1
        return _Txn(lib.IC_MSGTYPE_TIMESYNC, body, reply, None, what=f"time {kind}")


# ==== KVP ================================================================================================

def _kvp_value(key: str, value: str | None = None) -> bytes:
    k = key.encode("utf-16-le") + b"\0\0"
    v = b"" if value is None else value.encode("utf-16-le") + b"\0\0"
    return struct.pack("<III", 1, len(k), len(v)) + k[:_KEY].ljust(_KEY, b"\0") + v[:_VALUE].ljust(_VALUE, b"\0")


@register_model
class KvpHost(IcHostModel):
    name = "kvp"
    class_id = _CLASS_IDS["kvp"]
    description = "KVP IC host: get/set/delete/enumerate items, query guest IP info"
    msgtype = lib.IC_MSGTYPE_KVPEXCHANGE
    host_versions = ((3, 0), (4, 0), (5, 0))

    def _pool(self, args: dict[str, Any]) -> int:
        pool = int(args.get("pool", 0))
        if not 0 <= pool <= 255:
            raise ConfigError("pool must be 0..255")
        return pool

    def ic_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        pool = self._pool(args)
        tid, ticket = self._ticket(op)
        missed = lambda: ticket.finish(None, error="no reply")  # noqa: E731
        if op in ("kvp_set", "kvp_get"):
            key = str(args["key"])
            if op == "kvp_set":
                body = struct.pack("<BBH", lib.IC_KVP_OP_SET, pool, 0) + _kvp_value(key, str(args.get("value", "")))
                cb: Callable[[int, bytes], None] = lambda st, b: ticket.finish(st)  # noqa: E731
            else:
                body = struct.pack("<BBH", lib.IC_KVP_OP_GET, pool, 0) + _kvp_value(key)

                def cb(st: int, b: bytes) -> None:
                    if st != 0 or len(b) < 4 + 12 + _KEY + _VALUE:
                        ticket.finish(st)
                        return
                    vsize = struct.unpack_from("<I", b, 12)[0]
                    raw = b[16 + _KEY:16 + _KEY + min(vsize, _VALUE)]
                    ticket.finish(st, value=_from_u16(raw))
            txns = [_Txn(lib.IC_MSGTYPE_KVPEXCHANGE, body, cb, missed, what=op)]
        elif op == "kvp_delete":
            k = str(args["key"]).encode("utf-16-le") + b"\0\0"
            body = struct.pack("<BBHI", lib.IC_KVP_OP_DELETE, pool, 0, len(k)) + k[:_KEY].ljust(_KEY, b"\0")
            txns = [_Txn(lib.IC_MSGTYPE_KVPEXCHANGE, body, lambda st, b: ticket.finish(st), missed, what=op)]
        elif op == "kvp_enumerate":
            items: list[list[str]] = []
            limit = int(args.get("limit", 1000))

            def enum_txn(index: int) -> _Txn:
                body = struct.pack("<BBHI", lib.IC_KVP_OP_ENUMERATE, pool, 0, index) + _kvp_value("")

                def cb(st: int, b: bytes) -> None:
                    if st != 0 or len(b) < 8 + 12 + _KEY + _VALUE:
                        # the guest ends an enumeration with S_CONT ("no more items")
                        ticket.finish(0 if st == lib.IC_S_CONT else st, items=items)
                        return
                    ks, vs = struct.unpack_from("<II", b, 12)
                    key = _from_u16(b[20:20 + min(ks, _KEY)])
                    val = _from_u16(b[20 + _KEY:20 + _KEY + min(vs, _VALUE)])
                    items.append([key, val])
                    if index + 1 >= limit:
                        ticket.finish(0, items=items, truncated=True)
                        return
                    self._queue.appendleft(enum_txn(index + 1))     # lock held by packet()
                return _Txn(lib.IC_MSGTYPE_KVPEXCHANGE, body, cb, missed, what=f"enumerate {index}")
            txns = [enum_txn(0)]
        elif op == "kvp_ip":
            mac = str(args["mac"])
            ipv = int(ffi.sizeof("struct ic_kvp_ipaddr_value"))
            ipmsg = bytearray(struct.pack("<BB", lib.IC_KVP_OP_GET_IP_INFO, pool) + bytes(ipv))
            ipmsg[2:2 + 256] = _u16(mac, 256)
            ipmsg[2 + 256] = int(args.get("family", 0))

            def cb(st: int, b: bytes) -> None:
                out: dict[str, Any] = {}
                if st == 0 and len(b) >= 2 + ipv:
                    for f in ("ip_addr", "sub_net", "gate_way", "dns_addr"):
                        off = 2 + _offsetof("ic_kvp_ipaddr_value", f)
                        size = 1024 if f == "gate_way" else 2048
                        out[f] = _from_u16(b[off:off + size])
                    out["dhcp_enabled"] = b[2 + _offsetof("ic_kvp_ipaddr_value", "dhcp_enabled")]
                ticket.finish(st, **out)
            txns = [_Txn(lib.IC_MSGTYPE_KVPEXCHANGE, bytes(ipmsg), cb, missed, what=op)]
        else:
            self._tickets.pop(tid, None)
            raise ConfigError(f"kvp: unknown operation {op!r} (kvp_set, kvp_get, kvp_delete, "
                              "kvp_enumerate, kvp_ip, status, result, fault, renegotiate)")
        self._enqueue(txns)
        return {"ticket": tid}


# ==== file copy ==========================================================================================

@register_model
class FcopyHost(IcHostModel):
    name = "fcopy"
    class_id = _CLASS_IDS["fcopy"]
    description = "file copy IC host: Copy-VMFile into the guest"
    msgtype = lib.IC_MSGTYPE_FCOPY
    host_versions = ((1, 1),)
    host_fw = ((3, 0),)
    kernel_driver: ClassVar[str | None] = None        # no kernel driver since Linux 6.10

    def ic_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op != "copy":
            raise ConfigError(f"fcopy: unknown operation {op!r} (copy, status, result, fault, renegotiate)")
        if "src" in args:
            try:
                data = Path(str(args["src"])).read_bytes()
            except OSError as exc:
                raise ConfigError(f"copy src={args['src']}: {exc}") from exc
        else:
            data = str(args.get("data", "")).encode()
        name, path = str(args["name"]), str(args.get("path", "/"))
        flags = (1 if _flag(args, "overwrite") else 0) | (2 if _flag(args, "create_path") else 0)
        chunk = max(1, min(int(args.get("chunk", 6144)), 6144))
        cancel_after = int(args["cancel_after"]) if "cancel_after" in args else None
        oversized = any(f.get("kind") == "oversized_name" for f in self._faults)
        if oversized:
            self._faults = deque(f for f in self._faults if f.get("kind") != "oversized_name")
        tid, ticket = self._ticket("copy")
        statuses: list[str] = []

        def hdr(op_code: int) -> bytes:
            return struct.pack("<I", op_code) + bytes(32)

        fname = ("A" * 300).encode("utf-16-le")[:2 * _MAX_PATH] if oversized else _u16(name, 2 * _MAX_PATH)
        start = hdr(0) + fname + _u16(path, 2 * _MAX_PATH) + struct.pack("<IQ", flags, len(data))
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        copied = [0]          # bytes the guest acknowledged writing (0 when START was refused)

        def finish(st: int | None, **kw: Any) -> None:
            ticket.finish(st, steps=statuses, bytes=copied[0], size=len(data), **kw)

        def cancel() -> None:
            self._queue.appendleft(_Txn(lib.IC_MSGTYPE_FCOPY, hdr(3), lambda st, b: statuses.append(f"cancel:{st:#x}"),
                                        None, what="CANCEL_FCOPY"))

        def step(i: int) -> _Txn:
            if i == len(pieces) or (cancel_after is not None and i == cancel_after):
                if cancel_after is not None and i == cancel_after:
                    def cancelled(st: int, b: bytes) -> None:
                        statuses.append(f"cancel:{st:#x}")
                        finish(st, cancelled=True)
                    return _Txn(lib.IC_MSGTYPE_FCOPY, hdr(3), cancelled, lambda: finish(None), what="CANCEL_FCOPY")

                def done(st: int, b: bytes) -> None:
                    statuses.append(f"complete:{st:#x}")
                    finish(st)
                return _Txn(lib.IC_MSGTYPE_FCOPY, hdr(2), done, lambda: finish(None, error="no reply"), what="COMPLETE_FCOPY")
            piece = pieces[i]
            body = hdr(1) + struct.pack("<IQI", 0, i * chunk, len(piece)) + piece.ljust(6144, b"\0")

            def wrote(st: int, b: bytes) -> None:
                statuses.append(f"write:{st:#x}")
                if st != 0:
                    finish(st)
                    cancel()
                    return
                copied[0] += len(piece)
                self._queue.appendleft(step(i + 1))
            return _Txn(lib.IC_MSGTYPE_FCOPY, body, wrote, lambda: finish(None, error="no reply"), what=f"WRITE {i}")

        def started(st: int, b: bytes) -> None:
            statuses.append(f"start:{st:#x}")
            if st != 0:
                finish(st)
                return
            self._queue.appendleft(step(0))
        self._enqueue([_Txn(lib.IC_MSGTYPE_FCOPY, start, started, lambda: finish(None, error="no reply"),
                            what="START_FILE_COPY")])
        return {"ticket": tid}



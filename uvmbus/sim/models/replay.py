"""Replay: play the host side of a recorded session against a guest (``uvmbus sim --replay``).

A trace (guest- or host-side, docs/trace.md) holds both directions of every channel.  For
each recorded device the simulator offers a replay device of the same class; per channel,
the model walks the recorded messages in order:

* each packet the guest sends must match the next recorded guest→host message (its decoded
  form with transaction ids, RNDIS request ids, GPADL handles and timestamps left out, as
  ``uvmbus trace diff`` compares); guest completions (acks) may come a little out of order
  and are matched against the next recorded completion;
* once every recorded request before them was matched, the recorded host→guest packets are
  sent: completions get the live request's transaction id, RNDIS answers the live request
  id, transfer-page packets put their recorded bytes back into the receive buffer, and a
  recorded sub-channel answer offers the sub-channels.

The first packet that does not match ends the replay of that device: the model reports the
message number with the expected and the received message (``describe()``, the simulator's
log, and the exit status of ``uvmbus sim --replay``).

Replay needs the referenced bytes of the host's messages (RNDIS answers in the receive
buffer): record with a snap length that covers them (the default does for control
messages).  For storvsc the guest's recorder adds the bytes each read brought (``EV_DATA``
events, up to the snap length; docs/trace.md): before the recorded completion of a read, its
bytes are written into the live request's buffer (the GPA range the guest sent), so a
driver that parses what it read (INQUIRY, READ CAPACITY, VPD pages) sees the recorded data.
"""

from __future__ import annotations

import struct
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uvmbus.errors import ConfigError
from uvmbus.native import lib
from uvmbus.ring import PKT_COMP, PKT_GPA_DIRECT, PKT_INBAND, PKT_XFER_PAGES
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel, gpa_ranges
from uvmbus.trace import pcapng
from uvmbus.trace.decode import CHUNK, HDR, Message, decode, fields, read_records
from uvmbus.trace.diff import key

if TYPE_CHECKING:
    from uvmbus.ring import Packet
    from uvmbus.sim.channel import HostChannel

NETVSC = "f8615163-df3e-46c5-913f-f2d2f965ed0e"
STORVSC = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"
CLASS_IDS = {"netvsc": NETVSC, "storvsc": STORVSC}


@dataclass
class Step:
    msg: Message
    data: bytes                  # the trace record (header + packet + attachments)
    done: bool = False

    @property
    def to_host(self) -> bool:
        return self.msg.dir == "g2h"

    @property
    def is_comp(self) -> bool:
        return bool(self.msg.vmbus) and self.msg.vmbus["type"] == PKT_COMP


@dataclass
class RecordedDevice:
    instance: str
    devclass: str
    channels: dict[int, list[Step]] = field(default_factory=lambda: defaultdict(list))
    #: (sub-channel, recorded transaction id) -> bytes a read brought (storvsc EV_DATA)
    data: dict[tuple[int, int], bytes] = field(default_factory=dict)


def load(path: str | Path, status: pcapng.ReadStatus | None = None) -> dict[str, RecordedDevice]:
    """The recorded devices of a trace, by instance GUID (packets only; one side's view);
    ``status`` learns whether the file was cut off."""
    devices: dict[str, RecordedDevice] = {}
    side = None
    data: list[tuple[str, int, int, bytes]] = []
    for i, rec in enumerate(read_records(path, status)):
        m = decode(i, rec)
        if m.devclass not in CLASS_IDS:
            continue
        desc = rec.interface.description
        inst = desc.split("instance ", 1)[1].split(";", 1)[0] if "instance " in desc else rec.interface.name
        if m.kind == "event" and m.name == "EVENT DATA":
            data.append((inst, m.subchan, int(m.fields["trans_id"]), bytes.fromhex(m.fields["data"])))
            continue
        if m.kind != "packet":
            continue
        side = side or m.side
        if m.side != side:
            continue
        dev = devices.setdefault(inst, RecordedDevice(inst, m.devclass))
        dev.channels[m.subchan].append(Step(m, rec.data))
    for inst, sub, tid, b in data:
        if inst in devices:
            devices[inst].data[(sub, tid)] = b
    if not devices:
        raise ConfigError(f"{path}: no netvsc or storvsc packets to replay")
    return devices


def device_specs(path: str | Path, status: pcapng.ReadStatus | None = None) -> list[Any]:
    """``DeviceSpec``s offering one replay device per recorded device (``status``: as load)."""
    from uvmbus.sim.config import DeviceSpec

    out = []
    for inst, dev in load(path, status).items():
        model = "replay-netvsc" if dev.devclass == "netvsc" else "replay-storvsc"
        out.append(DeviceSpec(model, {"trace": str(path), "instance": inst, "kind": dev.devclass}))
    return out


class _Replay(DeviceModel):
    description = "plays the host side of a recorded session (uvmbus sim --replay)"

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        path = options.get("trace")
        if not path:
            raise ConfigError(f"{self.name}: needs trace=FILE.pcapng")
        devs = load(path)
        inst = options.get("instance") or next(iter(devs))
        if inst not in devs:
            raise ConfigError(f"{path}: no recorded device {inst}")
        self.recorded = devs[inst]
        self.trace = str(path)
        self._lock = threading.Lock()
        self.status = "waiting"
        self.divergence: dict[str, Any] | None = None
        self.matched = 0
        self._tids: dict[int, dict[int, int]] = defaultdict(dict)     # subchan: recorded -> live
        self._req_ids: dict[int, int] = {}                              # RNDIS recorded -> live
        self._emit: dict[int, int] = defaultdict(int)
        #: sub-channel: recorded transaction id -> the live request's first GPA range
        self._ranges: dict[int, dict[int, tuple[int, int, list[int]]]] = defaultdict(dict)
        self.data_written = 0

    # -- matching ------------------------------------------------------------------------
    def _live_message(self, channel: HostChannel, pkt: Packet) -> Message:
        header, payload = bytes(pkt.header), bytes(pkt.payload)
        off8 = (16 + len(header)) // 8
        len8 = (16 + len(header) + len(payload)) // 8
        raw = struct.pack("<HHHHQ", pkt.type, off8, len8, pkt.flags, pkt.trans_id) + header + payload
        att = b""
        if self.recorded.devclass == "netvsc" and pkt.type == PKT_INBAND and len(payload) >= 16:
            t, _, idx, size = struct.unpack_from("<IIII", payload)
            send = self.device.buffer("send")
            if t == lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT and idx != lib.NVSP_SECTION_INDEX_NONE and send is not None:
                sec = self._section_size()
                if sec and (idx + 1) * sec <= send.size and size <= sec:
                    data = bytes(send.view[idx * sec:idx * sec + size])
                    att = struct.pack("<HHIII", lib.UVB_TRACE_CHUNK_SECTION, 0, idx * sec, size, size) + data
        hdr = struct.pack("<BBBBBBHIIIIII", lib.UVB_TRACE_VERSION, lib.UVB_TRACE_KIND_PACKET,
                          lib.UVB_TRACE_DIR_G2H, lib.UVB_TRACE_SIDE_HOST,
                          lib.UVB_TRACE_CLASS_NET if self.recorded.devclass == "netvsc" else lib.UVB_TRACE_CLASS_SCSI,
                          0, channel.subchannel_id, channel.relid, len(raw), len(raw), len(att), len(att), 0)
        return decode(0, pcapng.Record(0, 0, hdr + raw + att))

    def _section_size(self) -> int:
        for steps in self.recorded.channels.values():
            for s in steps:
                if s.msg.name == "NVSP SEND_SEND_BUF_COMPLETE":
                    return int(s.msg.fields.get("section_size", 0))
        return 0

    def _diverge(self, channel: HostChannel, index: int, expected: str, got: str) -> None:
        self.status = "diverged"
        self.divergence = {"subchannel": channel.subchannel_id, "message": index + 1,
                           "expected": expected, "got": got}
        self.device.log(f"REPLAY DIVERGENCE on {self.recorded.devclass} sub-channel {channel.subchannel_id} "
                        f"at recorded message #{index + 1}:\n  expected: {expected}\n  got:      {got}")

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        with self._lock:
            if self.status == "diverged":
                return
            steps = self.recorded.channels.get(channel.subchannel_id, [])
            live = self._live_message(channel, pkt)
            want_comp = pkt.type == PKT_COMP
            idx = next((i for i, s in enumerate(steps) if s.to_host and not s.done and s.is_comp == want_comp), None)
            if idx is None:
                self._diverge(channel, len(steps), "(end of the recorded session)", key(live, side=False))
                return
            exp = steps[idx]
            if key(exp.msg, side=False) != key(live, side=False):
                self._diverge(channel, idx, key(exp.msg, side=False), key(live, side=False))
                return
            exp.done = True
            self.matched += 1
            self._tids[channel.subchannel_id][exp.msg.vmbus["trans_id"]] = pkt.trans_id
            if pkt.type == PKT_GPA_DIRECT:
                ranges = gpa_ranges(pkt)
                if ranges:
                    self._ranges[channel.subchannel_id][exp.msg.vmbus["trans_id"]] = ranges[0]
            for rec_r, live_r in zip(exp.msg.inner, live.inner, strict=False):
                rid, lid = rec_r.get("fields", {}).get("req_id"), live_r.get("fields", {}).get("req_id")
                if rid is not None and lid is not None:
                    self._req_ids[rid] = lid
            self.status = "replaying"
            self._advance(channel)

    # -- playing the host side -------------------------------------------------------------
    def open(self, channel: HostChannel) -> None:
        with self._lock:
            self._advance(channel)

    def _advance(self, channel: HostChannel) -> None:
        sub = channel.subchannel_id
        steps = self.recorded.channels.get(sub, [])
        i = self._emit[sub]
        while i < len(steps):
            s = steps[i]
            if s.to_host:
                if not s.done and not s.is_comp:
                    break                   # wait for the guest's next request
                i += 1
                continue
            if not s.done:
                if any(not p.done and not p.is_comp for p in steps[:i] if p.to_host):
                    break
                self._send(channel, s)
                s.done = True
            i += 1
        self._emit[sub] = i
        if all(s.done for st in self.recorded.channels.values() for s in st if not (s.to_host and s.is_comp)):
            self.status = "complete"

    def _send(self, channel: HostChannel, s: Step) -> None:
        h = fields("struct uvb_trace_hdr", s.data)
        pkt = s.data[HDR:HDR + h["pkt_cap"]]
        att = s.data[HDR + h["pkt_cap"]:HDR + h["pkt_cap"] + h["att_len"]]
        v = s.msg.vmbus
        ptype, flags, tid = v["type"], v["flags"], v["trans_id"]
        off8 = v["offset8"] * 8
        payload = pkt[off8:]
        if ptype == PKT_COMP:
            self._put_read_data(channel, tid)
            tid = self._tids[channel.subchannel_id].get(tid, tid)
            channel.send(payload, trans_id=tid, flags=flags, type=PKT_COMP)
        elif ptype == PKT_XFER_PAGES:
            recv = self.device.buffer("recv")
            ranges = v.get("ranges", [])
            off = 0
            while off + CHUNK <= len(att) and recv is not None:
                c = fields("struct uvb_trace_chunk", att, off)
                data = bytearray(att[off + CHUNK:off + CHUNK + c["cap"]])
                self._patch_req_id(data)
                if c["offset"] + len(data) <= recv.size:
                    recv.view[c["offset"]:c["offset"] + len(data)] = data
                off += CHUNK + c["cap"]
            channel.send_xfer_pages(v["pageset_id"], list(ranges), payload, trans_id=tid, flags=flags)
        else:
            channel.send(payload, trans_id=tid, flags=flags, type=ptype)
        self._after_send(s)

    def _put_read_data(self, channel: HostChannel, recorded_tid: int) -> None:
        """The recorded bytes of a read, into the live request's buffer (before its completion)."""
        sub = channel.subchannel_id
        data = self.recorded.data.get((sub, recorded_tid))
        rng = self._ranges[sub].pop(recorded_tid, None)
        ram = self.device.guest_ram
        if not data or rng is None or ram is None:
            return
        count, offset, pfns = rng
        try:
            ram.write(pfns, offset, data[:count])
        except ConfigError as exc:
            self.device.log(f"replay: the recorded read data of trans_id {recorded_tid:#x} does not fit "
                            f"the live request's buffer ({exc}); the guest sees zeros")
            return
        self.data_written += 1

    def _patch_req_id(self, data: bytearray) -> None:
        """An RNDIS answer carries the request id of its request: use the live one."""
        if len(data) >= 12:
            t, = struct.unpack_from("<I", data)
            if t & lib.RNDIS_MSG_COMPLETION:
                rid, = struct.unpack_from("<I", data, 8)
                if rid in self._req_ids:
                    struct.pack_into("<I", data, 8, self._req_ids[rid])

    def _after_send(self, s: Step) -> None:
        n = 0
        if s.msg.name == "NVSP SUBCHANNEL":
            n = int(s.msg.fields.get("num_subchannels", 0))
        elif s.msg.name.startswith("VSTOR COMPLETE_IO"):
            # the answer to CREATE_SUB_CHANNELS: offer what the request asked for
            req = [p for st in self.recorded.channels.values() for p in st
                   if p.msg.name == "VSTOR CREATE_SUB_CHANNELS" and p.done]
            if req and not getattr(self, "_offered", False):
                n = int(req[0].msg.fields.get("sub_channel_count", 0))
                self._offered = True
        if n:
            self.device.offer_subchannels(n)

    def describe(self) -> dict[str, Any]:
        return {"replay": {"trace": self.trace, "instance": self.recorded.instance, "status": self.status,
                           "matched": self.matched, "divergence": self.divergence,
                           "reads_given_back": self.data_written}}


@register_model
class ReplayNetvsc(_Replay):
    name = "replay-netvsc"
    class_id = NETVSC
    is_nic = True


@register_model
class ReplayStorvsc(_Replay):
    name = "replay-storvsc"
    class_id = STORVSC

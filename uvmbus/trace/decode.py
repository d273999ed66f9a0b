"""Decode uvmbus traces with the drivers' own wire layouts (native/*_wire.h via cffi).

Every struct read here is the one the drivers and the simulator use (``ffi`` of
``uvmbus._native``); names come from the same headers' #defines.  Nothing about a layout is
written down a second time: field dicts are built from cffi's view of each struct.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.errors import TraceError
from uvmbus.native import ffi, lib
from uvmbus.trace import pcapng

HDR = ffi.sizeof("struct uvb_trace_hdr")
CHUNK = ffi.sizeof("struct uvb_trace_chunk")
EVENT = ffi.sizeof("struct uvb_trace_event")
DESC = ffi.sizeof("struct vmpacket_descriptor")


def _names(prefix: str, *, strip: str | None = None, skip: tuple[str, ...] = ()) -> dict[int, str]:
    out: dict[int, str] = {}
    for n in dir(lib):
        if n.startswith(prefix) and not any(n.startswith(s) for s in skip):
            v = getattr(lib, n)
            if isinstance(v, int):
                out.setdefault(v, n[len(strip if strip is not None else prefix):])
    return out


PKT_TYPES = {lib.VMBUS_PKT_INBAND: "INBAND", lib.VMBUS_PKT_XFER_PAGES: "XFER_PAGES",
             lib.VMBUS_PKT_GPA_DIRECT: "GPA_DIRECT", lib.VMBUS_PKT_COMP: "COMP"}
NVSP_TYPES = {**_names("NVSP_MSG_TYPE_", strip="NVSP_MSG_TYPE_"), **_names("NVSP_MSG1_TYPE_"),
              **_names("NVSP_MSG2_TYPE_"), **_names("NVSP_MSG4_TYPE_"), **_names("NVSP_MSG5_TYPE_")}
NVSP_STATUS = _names("NVSP_STAT_")
RNDIS_TYPES = _names("RNDIS_MSG_")
RNDIS_STATUS = _names("RNDIS_STATUS_")
OIDS = _names("OID_", strip="")
VSTOR_OPS = _names("VSTOR_OP_")
SRB_STATUS = _names("SRB_STATUS_", skip=("SRB_STATUS_MASK", "SRB_STATUS_AUTOSENSE", "SRB_STATUS_QUEUE"))
EVENTS = _names("UVB_TRACE_EV_")
IC_TYPES = _names("IC_MSGTYPE_")
SCSI_OPS = _names("SCSI_OP_")     # CDB byte 0 (storvsc_wire.h, as storvsc/scsi.py's Opcode)
CLASSES = {lib.UVB_TRACE_CLASS_NET: "netvsc", lib.UVB_TRACE_CLASS_SCSI: "storvsc",
           lib.UVB_TRACE_CLASS_IC: "ic", lib.UVB_TRACE_CLASS_OTHER: "vmbus"}

#: NVSP message type -> its struct (the completion form of SUBCHANNEL is chosen by direction)
NVSP_STRUCTS = {
    lib.NVSP_MSG_TYPE_INIT: "struct nvsp_init",
    lib.NVSP_MSG_TYPE_INIT_COMPLETE: "struct nvsp_init_complete",
    lib.NVSP_MSG1_TYPE_SEND_NDIS_VER: "struct nvsp_send_ndis_ver",
    lib.NVSP_MSG1_TYPE_SEND_RECV_BUF: "struct nvsp_send_recv_buf",
    lib.NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE: "struct nvsp_send_recv_buf_complete",
    lib.NVSP_MSG1_TYPE_REVOKE_RECV_BUF: "struct nvsp_revoke_buf",
    lib.NVSP_MSG1_TYPE_SEND_SEND_BUF: "struct nvsp_send_send_buf",
    lib.NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE: "struct nvsp_send_send_buf_complete",
    lib.NVSP_MSG1_TYPE_REVOKE_SEND_BUF: "struct nvsp_revoke_buf",
    lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT: "struct nvsp_send_rndis_pkt",
    lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE: "struct nvsp_send_rndis_pkt_complete",
    lib.NVSP_MSG2_TYPE_SEND_NDIS_CONFIG: "struct nvsp_send_ndis_config",
    lib.NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION: "struct nvsp_vf_association",
    lib.NVSP_MSG4_TYPE_SWITCH_DATA_PATH: "struct nvsp_switch_data_path",
    lib.NVSP_MSG5_TYPE_OID_QUERY_EX: "struct nvsp_oid_query_ex",
    lib.NVSP_MSG5_TYPE_OID_QUERY_EX_COMP: "struct nvsp_oid_query_ex_complete",
    lib.NVSP_MSG5_TYPE_SUBCHANNEL: "struct nvsp_subchannel_request",
    lib.NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE: "struct nvsp_send_indirection_table",
}
RNDIS_STRUCTS = {
    lib.RNDIS_MSG_PACKET: "struct rndis_packet",
    lib.RNDIS_MSG_INIT: "struct rndis_initialize_request",
    lib.RNDIS_MSG_INIT_C: "struct rndis_initialize_complete",
    lib.RNDIS_MSG_HALT: "struct rndis_halt_request",
    lib.RNDIS_MSG_QUERY: "struct rndis_query_request",
    lib.RNDIS_MSG_QUERY_C: "struct rndis_query_complete",
    lib.RNDIS_MSG_SET: "struct rndis_set_request",
    lib.RNDIS_MSG_SET_C: "struct rndis_set_complete",
    lib.RNDIS_MSG_RESET: "struct rndis_reset_request",
    lib.RNDIS_MSG_RESET_C: "struct rndis_reset_complete",
    lib.RNDIS_MSG_INDICATE: "struct rndis_indicate_status",
    lib.RNDIS_MSG_KEEPALIVE: "struct rndis_keepalive_request",
    lib.RNDIS_MSG_KEEPALIVE_C: "struct rndis_keepalive_complete",
}


def scsi_name(op: int) -> str:
    return SCSI_OPS.get(op, f"SCSI_{op:#04x}")


def fields(ctype: str, data: bytes, offset: int = 0) -> dict[str, Any]:
    """A struct's integer fields (nested structs flattened with dots), zero-filled when short."""
    size = ffi.sizeof(ctype)
    raw = bytes(data[offset:offset + size]).ljust(size, b"\0")
    obj = ffi.new(ctype.replace("struct ", "struct ", 1) + " *")
    ffi.memmove(obj, raw, size)
    return _todict(obj[0])


def _todict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in ffi.typeof(obj).fields:
        v = getattr(obj, name)
        if f.type.kind == "struct" or f.type.kind == "union":
            for k, x in _todict(v).items():
                out[f"{name}.{k}"] = x
        elif f.type.kind == "array":
            out[name] = bytes(ffi.buffer(ffi.addressof(obj, name))).hex()
        else:
            out[name] = int(v)
    return out


@dataclass
class Message:
    """One decoded record."""

    index: int
    ts_ns: int
    iface: str
    side: str
    dir: str                     # "g2h" / "h2g"
    devclass: str
    relid: int
    subchan: int
    kind: str                    # "packet" / "event"
    vmbus: dict[str, Any] = field(default_factory=dict)
    proto: str = ""
    name: str = ""               # e.g. "NVSP INIT", "RNDIS QUERY", "VSTOR EXECUTE_SRB READ10"
    fields: dict[str, Any] = field(default_factory=dict)
    inner: list[dict[str, Any]] = field(default_factory=list)     # RNDIS messages in attachments
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [self.name or self.kind]
        for r in self.inner:
            parts.append(r["name"])
        return " / ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("index", "ts_ns", "iface", "side", "dir", "devclass", "relid",
                                             "subchan", "kind", "vmbus", "proto", "name", "fields", "inner",
                                             "problems")}


def read_records(path: str | Path, status: pcapng.ReadStatus | None = None) -> Iterator[pcapng.Record]:
    """The records of a trace file; ``status`` learns whether it was cut off (and where)."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror}") from e
    with f:
        for r in pcapng.read(f, str(p), status):
            if r.interface.linktype != lib.UVB_TRACE_LINKTYPE:
                raise TraceError(f"{p}: interface {r.interface.name!r} has link type {r.interface.linktype}, "
                                 f"not a uvmbus trace ({lib.UVB_TRACE_LINKTYPE})")
            yield r


def decode_file(path: str | Path, status: pcapng.ReadStatus | None = None) -> list[Message]:
    """Every record of a trace, in time order (records of one commit keep their order);
    ``status`` learns whether the file was cut off."""
    msgs = [decode(i, r) for i, r in enumerate(read_records(path, status))]
    msgs.sort(key=lambda m: (m.ts_ns, m.index))
    return msgs


def decode(index: int, rec: pcapng.Record) -> Message:
    d = rec.data
    if len(d) < HDR:
        m = Message(index, rec.ts_ns, rec.interface.name, "?", "?", "?", 0, 0, "short")
        m.problems.append(f"record of {len(d)} bytes is shorter than the {HDR}-byte trace header")
        return m
    h = fields("struct uvb_trace_hdr", d)
    m = Message(index, rec.ts_ns, rec.interface.name, "host" if h["side"] == lib.UVB_TRACE_SIDE_HOST else "guest",
                "g2h" if h["dir"] == lib.UVB_TRACE_DIR_G2H else "h2g", CLASSES.get(h["devclass"], "vmbus"),
                h["relid"], h["subchan"], "event" if h["kind"] == lib.UVB_TRACE_KIND_EVENT else "packet")
    body = d[HDR:]
    if h["version"] != lib.UVB_TRACE_VERSION:
        m.problems.append(f"trace header version {h['version']} (this decoder reads {lib.UVB_TRACE_VERSION})")
        return m
    if m.kind == "event":
        e = fields("struct uvb_trace_event", body)
        m.name = "EVENT " + EVENTS.get(e["code"], str(e["code"]))
        raw = bytes(body[EVENT:EVENT + e["text_len"]])
        if e["code"] == lib.UVB_TRACE_EV_DATA:     # binary: bytes a read put in the guest buffer
            m.fields = {"transferred": e["arg0"], "trans_id": e["arg1"], "recorded": len(raw),
                        "data": raw.hex()}
            return m
        m.fields = {"arg0": e["arg0"], "arg1": e["arg1"], "text": raw.decode(errors="replace")}
        return m
    pkt = body[:h["pkt_cap"]]
    att = body[h["pkt_cap"]:h["pkt_cap"] + h["att_len"]]
    if len(pkt) < DESC:
        m.problems.append("packet shorter than a descriptor")
        return m
    _decode_vmbus(m, pkt)
    payload = pkt[m.vmbus["offset8"] * 8:]
    chunks = _chunks(att, m)
    if m.devclass == "netvsc":
        _decode_nvsp(m, payload)
        for c in chunks:          # a section / range may hold several RNDIS messages
            off = 0
            while off + 8 <= len(c):
                mlen, = struct.unpack_from("<I", c, off + 4)
                _decode_rndis(m, c[off:off + max(mlen, 8)])
                if mlen < 8:
                    break
                off += mlen
    elif m.devclass == "storvsc":
        _decode_vstor(m, payload)
    elif m.devclass == "ic":
        _decode_icmsg(m, payload)
    else:
        m.name = f"VMBUS {m.vmbus['type_name']}"
    return m


def _decode_vmbus(m: Message, pkt: bytes) -> None:
    d = fields("struct vmpacket_descriptor", pkt)
    v: dict[str, Any] = {"type": d["type"], "type_name": PKT_TYPES.get(d["type"], f"UNKNOWN({d['type']})"),
                         "flags": d["flags"], "trans_id": d["trans_id"], "offset8": d["offset8"], "len8": d["len8"]}
    if d["len8"] * 8 != len(pkt) or d["offset8"] < 2 or d["offset8"] > d["len8"]:
        m.problems.append(f"descriptor offset8 {d['offset8']} len8 {d['len8']} do not fit {len(pkt)} bytes")
    if d["type"] == lib.VMBUS_PKT_XFER_PAGES:
        x = fields("struct vmtransfer_page_header", pkt)
        v["pageset_id"] = x["xfer_pageset_id"]
        v["ranges"] = [struct.unpack_from("<II", pkt, 24 + 8 * i) for i in range(min(x["range_cnt"], (len(pkt) - 24) // 8))]
    elif d["type"] == lib.VMBUS_PKT_GPA_DIRECT:
        g = fields("struct vmgpa_direct_header", pkt)
        ranges, off = [], 24
        for _ in range(g["range_cnt"]):
            if off + 8 > len(pkt):
                break
            cnt, boff = struct.unpack_from("<II", pkt, off)
            n = (boff + cnt + 4095) // 4096
            ranges.append({"byte_count": cnt, "byte_offset": boff, "pfns": n})
            off += 8 + 8 * n
        v["gpa_ranges"] = ranges
    m.vmbus = v


def _chunks(att: bytes, m: Message) -> list[bytes]:
    out, off = [], 0
    while off + CHUNK <= len(att):
        c = fields("struct uvb_trace_chunk", att, off)
        out.append(bytes(att[off + CHUNK:off + CHUNK + c["cap"]]))
        off += CHUNK + c["cap"]
    if off != len(att):
        m.problems.append("attachment chunks do not add up")
    return out


def _decode_nvsp(m: Message, payload: bytes) -> None:
    m.proto = "nvsp"
    if len(payload) < 4:
        if m.vmbus["type"] == lib.VMBUS_PKT_COMP:
            m.name = "NVSP (empty completion)"
        else:
            m.problems.append("NVSP message shorter than its type")
        return
    t, = struct.unpack_from("<I", payload)
    name = NVSP_TYPES.get(t)
    if name is None:
        m.name = f"NVSP UNKNOWN({t})"
        m.problems.append(f"unknown NVSP message type {t}")
        return
    m.name = f"NVSP {name}"
    ctype = NVSP_STRUCTS.get(t)
    if t == lib.NVSP_MSG5_TYPE_SUBCHANNEL and m.dir == "h2g":
        ctype = "struct nvsp_subchannel_complete"
    if ctype:
        f = fields(ctype, payload)
        f.pop("msg_type", None)
        m.fields = f
        if "status" in f:
            f["status_name"] = NVSP_STATUS.get(f["status"], str(f["status"]))


def _decode_rndis(m: Message, data: bytes) -> None:
    if len(data) < 8:
        return
    t, ln = struct.unpack_from("<II", data)
    r: dict[str, Any] = {"type": t, "name": "RNDIS " + RNDIS_TYPES.get(t, f"UNKNOWN({t:#x})"), "len": ln}
    ctype = RNDIS_STRUCTS.get(t)
    if ctype:
        f = fields(ctype, data)
        f.pop("msg_type", None)
        r["fields"] = f
        if "oid" in f:
            r["oid"] = OIDS.get(f["oid"], f"{f['oid']:#010x}")
            r["name"] += f" {r['oid']}"
        if "status" in f and t & lib.RNDIS_MSG_COMPLETION:
            r["status"] = RNDIS_STATUS.get(f["status"], f"{f['status']:#x}")
        if t == lib.RNDIS_MSG_INDICATE:
            r["status"] = RNDIS_STATUS.get(f["status"], f"{f['status']:#x}")
            r["name"] += f" {r['status']}"
    else:
        m.problems.append(f"unknown RNDIS message type {t:#x}")
    m.inner.append(r)


def _decode_vstor(m: Message, payload: bytes) -> None:
    m.proto = "vstor"
    if len(payload) < 12:
        m.problems.append("VSTOR packet shorter than its 12-byte header")
        return
    p = fields("struct vstor_packet", payload)
    op = p["operation"]
    m.name = "VSTOR " + VSTOR_OPS.get(op, f"UNKNOWN({op})")
    f: dict[str, Any] = {"flags": p["flags"], "status": p["status"]}
    srb_len = struct.unpack_from("<H", payload.ljust(14, b"\0"), 12)[0]
    if op == lib.VSTOR_OP_EXECUTE_SRB or (op == lib.VSTOR_OP_COMPLETE_IO and srb_len in
                                          (lib.VSTOR_SRB_LEN_V1, lib.VSTOR_SRB_LEN_V2)):
        s = fields("struct vstor_srb", payload, 12)
        f.update({k: s[k] for k in ("length", "srb_status", "scsi_status", "lun", "target_id", "path_id",
                                    "cdb_length", "sense_info_length", "data_in", "data_transfer_length",
                                    "srb_flags")})
        f["srb_status_name"] = SRB_STATUS.get(s["srb_status"] & lib.SRB_STATUS_MASK, hex(s["srb_status"]))
        raw = bytes.fromhex(s["payload"])
        if op == lib.VSTOR_OP_EXECUTE_SRB and m.dir == "g2h" and s["cdb_length"]:
            cdb = raw[:s["cdb_length"]]
            f["cdb"] = cdb.hex()
            m.name += " " + scsi_name(cdb[0])
        elif s["scsi_status"]:
            f["sense"] = raw[:s["sense_info_length"]].hex()
    elif op == lib.VSTOR_OP_QUERY_PROTOCOL_VERSION:
        f.update(fields("struct vstor_protocol_version", payload, 12))
    elif op == lib.VSTOR_OP_QUERY_PROPERTIES:
        f.update(fields("struct vstor_channel_properties", payload, 12))
    elif op == lib.VSTOR_OP_CREATE_SUB_CHANNELS:
        f["sub_channel_count"] = struct.unpack_from("<H", payload.ljust(14, b"\0"), 12)[0]
    elif op not in VSTOR_OPS:
        m.problems.append(f"unknown VSTOR operation {op}")
    m.fields = f


def _decode_icmsg(m: Message, payload: bytes) -> None:
    """Integration-service header: the pipe header and icmsg header of ic_wire.h."""
    m.proto = "icmsg"
    pipe = ffi.sizeof("struct ic_pipe_hdr")
    if len(payload) < pipe + ffi.sizeof("struct ic_msg_hdr"):
        m.name = "ICMSG (short)"
        m.problems.append("integration-service message shorter than its headers")
        return
    h = fields("struct ic_msg_hdr", payload, pipe)
    t = h["icmsgtype"]
    m.name = "ICMSG " + IC_TYPES.get(t, f"type {t}")
    h.pop("reserved", None)
    m.fields = {**{f"pipe.{k}": v for k, v in fields("struct ic_pipe_hdr", payload).items()}, **h}


def messages_text(msgs: Iterable[Message]) -> Iterator[str]:
    t0 = None
    for m in msgs:
        t0 = m.ts_ns if t0 is None else t0
        arrow = "->" if m.dir == "g2h" else "<-"
        tid = f" tid={m.vmbus['trans_id']:#x}" if m.vmbus else ""
        f = " ".join(f"{k}={v}" for k, v in m.fields.items() if k not in ("cdb",) and not isinstance(v, str)
                     or k in ("status_name", "srb_status_name", "cdb", "text"))
        inner = "".join(f" | {r['name']}" for r in m.inner)
        prob = "".join(f"  !! {p}" for p in m.problems)
        yield (f"{(m.ts_ns - t0) / 1e6:10.3f} ms {m.side[0].upper()} {m.iface:<14} {arrow} "
               f"{(m.vmbus.get('type_name', '') if m.vmbus else ''):<10}{tid} {m.name}{inner} {f}{prob}").rstrip()

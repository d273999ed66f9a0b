"""Generate the constant and layout tables of the Lua dissector from the wire headers.

The dissector (uvmbus.lua) cannot read C headers, so the block between its
``-- BEGIN GENERATED`` and ``-- END GENERATED`` lines is written by this module from the very
structs and #defines the drivers use (cffi's view of native/*_wire.h) and the decoder's name
tables.  ``python -m uvmbus.trace.wireshark.gen`` rewrites it; a test fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from uvmbus.native import ffi, lib
from uvmbus.trace import decode as D
from uvmbus.trace.wireshark import dissector_path

BEGIN = "-- BEGIN GENERATED (python -m uvmbus.trace.wireshark.gen; do not edit)"
END = "-- END GENERATED"

STRUCTS = sorted({*D.NVSP_STRUCTS.values(), "struct nvsp_subchannel_complete", *D.RNDIS_STRUCTS.values(),
                  "struct vstor_srb", "struct vstor_protocol_version", "struct vstor_channel_properties",
                  "struct vmpacket_descriptor", "struct vmtransfer_page_header", "struct vmgpa_direct_header",
                  "struct uvb_trace_hdr", "struct uvb_trace_chunk", "struct uvb_trace_event",
                  "struct rndis_ppi", "struct ic_pipe_hdr", "struct ic_msg_hdr"})


def _layout(ctype: str) -> list[tuple[str, int, int, str]]:
    """(name, offset, size, kind) of every leaf field; kind "u" (unsigned) or "b" (bytes)."""
    out: list[tuple[str, int, int, str]] = []

    def walk(t: Any, base: int, prefix: str) -> None:
        for name, f in t.fields:
            ft = f.type
            if ft.kind in ("struct", "union"):
                walk(ft, base + f.offset, f"{prefix}{name}.")
            elif ft.kind == "array" or ffi.sizeof(ft) > 8:
                out.append((prefix + name, base + f.offset, ffi.sizeof(ft), "b"))
            else:
                out.append((prefix + name, base + f.offset, ffi.sizeof(ft), "u"))

    walk(ffi.typeof(ctype), 0, "")
    return out


def _table(name: str, d: dict[int, str]) -> str:
    items = ", ".join(f"[{k}] = {v!r}".replace("'", '"') for k, v in sorted(d.items()))
    return f"local {name} = {{ {items} }}\n"


def render() -> str:
    ppis = D._names("PPI_", skip=("PPI_TYPE_MASK", "PPI_INTERNAL_FLAG"))
    parts = [BEGIN + "\n"]
    consts = {n: int(getattr(lib, n)) for n in dir(lib) if n.startswith("UVB_TRACE_") and isinstance(getattr(lib, n), int)}
    consts.update({n: int(getattr(lib, n)) for n in (
        "VMBUS_PKT_INBAND", "VMBUS_PKT_XFER_PAGES", "VMBUS_PKT_GPA_DIRECT", "VMBUS_PKT_COMP",
        "NVSP_MSG1_TYPE_SEND_RNDIS_PKT", "NVSP_MSG5_TYPE_SUBCHANNEL", "RNDIS_MSG_PACKET", "RNDIS_MSG_COMPLETION",
        "RNDIS_MSG_INDICATE", "VSTOR_OP_EXECUTE_SRB", "VSTOR_OP_COMPLETE_IO", "VSTOR_OP_QUERY_PROTOCOL_VERSION",
        "VSTOR_OP_QUERY_PROPERTIES", "VSTOR_OP_CREATE_SUB_CHANNELS", "VSTOR_SRB_LEN_V1", "VSTOR_SRB_LEN_V2",
        "SRB_STATUS_MASK", "SRB_STATUS_AUTOSENSE_VALID", "VMBUS_PKT_FLAG_COMPLETION_REQUESTED")})
    parts.append("local C = { " + ", ".join(f"{k} = {v}" for k, v in sorted(consts.items())) + " }\n")
    parts += [_table("PKT_TYPES", D.PKT_TYPES), _table("NVSP_TYPES", D.NVSP_TYPES),
              _table("NVSP_STATUS", D.NVSP_STATUS), _table("RNDIS_TYPES", D.RNDIS_TYPES),
              _table("RNDIS_STATUS", D.RNDIS_STATUS), _table("OIDS", D.OIDS), _table("VSTOR_OPS", D.VSTOR_OPS),
              _table("SRB_STATUS", D.SRB_STATUS), _table("EVENTS", D.EVENTS), _table("CLASSES", D.CLASSES),
              _table("PPI_TYPES", ppis), _table("IC_TYPES", D.IC_TYPES), _table("SCSI_OPS", D.SCSI_OPS)]
    sname = {**{k: v.replace("struct ", "") for k, v in D.NVSP_STRUCTS.items()}}
    parts.append(_table("NVSP_STRUCT", sname))
    parts.append(_table("RNDIS_STRUCT", {k: v.replace("struct ", "") for k, v in D.RNDIS_STRUCTS.items()}))
    parts.append("local LAYOUT = {\n")
    for s in STRUCTS:
        fields = ", ".join(f'{{"{n}", {o}, {z}, "{k}"}}' for n, o, z, k in _layout(s))
        parts.append(f'  ["{s.replace("struct ", "")}"] = {{ size = {ffi.sizeof(s)}, {fields} }},\n')
    parts.append("}\n" + END)
    return "".join(parts)


def current() -> str:
    text = dissector_path().read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    return text[a:b]


def write() -> Path:
    p = dissector_path()
    text = p.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    p.write_text(text[:a] + render() + text[b:])
    return p


if __name__ == "__main__":
    print(f"wrote {write()}", file=sys.stderr)

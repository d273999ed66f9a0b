"""The NetVSP host's own control-message code: what it reads from a guest, what it answers.

The host shares only the wire layouts with the guest (``native/netvsc_wire.h`` through
``ffi``: structs and constants); every reader and builder here is the host's own, written from
the host's point of view (netvsc.md §2, §4, §10; openvmm ``vm/devices/net/netvsp``), so that a
misunderstanding in the guest driver's message code (``uvmbus.netvsc``) cannot be mirrored by
the simulator.  Frames are handled in C (``native/netvsp_*.c``).

Readers copy what they read (the guest's bytes are untrusted) and raise :class:`BadRequest`
on anything malformed; the model decides whether that is fatal or a failed request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from uvmbus.errors import ProtocolError
from uvmbus.native import ffi, lib

__all__ = ["BadRequest", "RssRequest", "RndisRequest", "nvsp_fields", "nvsp_msg_type", "read_rndis_request",
           "read_rss_request", "read_offload_request", "read_config_parameter", "ConfigParameter",
           "AccessError", "query_complete", "set_complete", "init_complete",
           "keepalive_complete", "status_indication", "rss_capabilities", "offload_capabilities",
           "LSO_MAX_SIZE", "LSO_MIN_SEGMENTS"]


class BadRequest(ProtocolError):
    """A malformed guest request (the host's own parse failed)."""


# ---- NVSP (guest → host) -------------------------------------------------------------
def nvsp_msg_type(payload: bytes) -> int:
    return int(struct.unpack_from("<I", payload.ljust(4, b"\0"))[0])


def nvsp_fields(payload: bytes, ctype: str) -> Any:
    """A private copy of NVSP struct ``ctype`` from the guest's message (the caller checked the
    length against ``ffi.sizeof(ctype)``; shorter input is zero-extended)."""
    obj = ffi.new(ctype + " *")
    n = min(len(payload), ffi.sizeof(ctype))
    ffi.memmove(obj, payload[:n], n)
    return obj


def nvsp_reply(msg_type: int, *words: int, size: int) -> bytes:
    """A host NVSP message: type then u32 words, padded to the negotiated host message size."""
    body = struct.pack(f"<I{len(words)}I", msg_type, *words)
    return body[:size].ljust(size, b"\0")


# ---- RNDIS requests (guest → host) ------------------------------------------------------
_REQUESTS = {
    lib.RNDIS_MSG_INIT: "struct rndis_initialize_request",
    lib.RNDIS_MSG_HALT: "struct rndis_halt_request",
    lib.RNDIS_MSG_QUERY: "struct rndis_query_request",
    lib.RNDIS_MSG_SET: "struct rndis_set_request",
    lib.RNDIS_MSG_RESET: "struct rndis_reset_request",
    lib.RNDIS_MSG_KEEPALIVE: "struct rndis_keepalive_request",
}
_NAMES = {lib.RNDIS_MSG_INIT: "INITIALIZE", lib.RNDIS_MSG_HALT: "HALT", lib.RNDIS_MSG_QUERY: "QUERY",
          lib.RNDIS_MSG_SET: "SET", lib.RNDIS_MSG_RESET: "RESET", lib.RNDIS_MSG_KEEPALIVE: "KEEPALIVE",
          lib.RNDIS_MSG_INDICATE: "INDICATE_STATUS", lib.RNDIS_MSG_SET_EX: "SET_EX",
          lib.RNDIS_MSG_PACKET: "PACKET"}


@dataclass
class RndisRequest:
    """An RNDIS control request as the host sees it.  ``info`` is the QUERY/SET buffer."""

    type: int
    length: int
    req_id: int = 0
    oid: int = 0
    info: bytes = b""

    @property
    def name(self) -> str:
        return _NAMES.get(self.type, f"type {self.type:#x}")


def read_rndis_request(data: bytes) -> RndisRequest:
    """The request at the start of ``data``: msg_len within the bytes the guest sent, the fixed
    part present, a QUERY's information buffer inside the message."""
    if len(data) < 8:
        raise BadRequest(f"RNDIS message of {len(data)} bytes")
    mtype, mlen = struct.unpack_from("<II", data)
    if mlen < 8 or mlen > len(data):
        raise BadRequest(f"RNDIS message claims {mlen} bytes of {len(data)}")
    raw = data[:mlen]
    ctype = _REQUESTS.get(mtype)
    if ctype is None:
        return RndisRequest(mtype, mlen)
    if mlen < ffi.sizeof(ctype):
        raise BadRequest(f"RNDIS {_NAMES[mtype]} of {mlen} bytes (fixed part {ffi.sizeof(ctype)})")
    obj = ffi.new(ctype + " *")
    ffi.memmove(obj, raw, ffi.sizeof(ctype))
    req = RndisRequest(mtype, mlen, req_id=int(getattr(obj, "req_id", 0)), oid=int(getattr(obj, "oid", 0)))
    if mtype == lib.RNDIS_MSG_QUERY and obj.info_buflen:
        off, n = int(obj.info_buf_offset), int(obj.info_buflen)
        if off < ffi.sizeof(ctype) - 8 or 8 + off + n > mlen:
            raise BadRequest(f"RNDIS QUERY buffer at {off} (+{n}) outside the {mlen}-byte message")
        req.info = raw[8 + off:8 + off + n]
    elif mtype == lib.RNDIS_MSG_SET:
        # the reference host reads a SET's buffer right after its 28-byte header (§4.1)
        req.info = raw[ffi.sizeof(ctype):mlen]
    return req


@dataclass
class RssRequest:
    flags: int
    hash_info: int
    table: list[int]
    key: bytes


def read_rss_request(info: bytes) -> RssRequest:
    """NDIS_RECEIVE_SCALE_PARAMETERS from a SET: table and key must lie inside the buffer."""
    size = lib.NDIS_RSS_PARAMS_SIZE
    if len(info) < size:
        raise BadRequest(f"RSS parameters of {len(info)} bytes (need {size})")
    p = ffi.new("struct ndis_recv_scale_param *")
    ffi.memmove(p, info, size)
    if p.hdr.type != lib.NDIS_OBJTYPE_RSS_PARAMS:
        raise BadRequest(f"RSS parameters of object type {p.hdr.type:#x}")
    toff, tlen = int(p.indirect_taboffset), int(p.indirect_tabsize)
    koff, klen = int(p.hashkey_offset), int(p.hashkey_size)
    if tlen % 4 or toff + tlen > len(info) or koff + klen > len(info):
        raise BadRequest("RSS table or key outside the buffer")
    table = list(struct.unpack_from(f"<{tlen // 4}I", info, toff)) if tlen else []
    return RssRequest(int(p.flags), int(p.hashinfo), table, info[koff:koff + klen])


def read_offload_request(info: bytes) -> dict[str, int] | None:
    """NDIS_OFFLOAD_PARAMETERS (§4.7: object type 0x80, revision ≥ 1, header size ≥ 20 and not
    beyond the buffer) → its fields, or None when invalid."""
    if len(info) < 20:
        return None
    otype, rev, hsize = struct.unpack_from("<BBH", info)
    if otype != lib.NDIS_OBJTYPE_DEFAULT or rev < 1 or hsize < 20 or hsize > len(info):
        return None
    p = ffi.new("struct ndis_offload_params *")
    n = min(len(info), ffi.sizeof("struct ndis_offload_params"))
    ffi.memmove(p, info, n)
    return {name: int(getattr(p, name)) for name, f in ffi.typeof("struct ndis_offload_params").fields
            if f.type.kind == "primitive"}


@dataclass
class ConfigParameter:
    """A guest's SET OID_GEN_RNDIS_CONFIG_PARAMETER, as the host read it."""

    name: str
    ptype: int
    value: str | int | None     # None: a parameter type the host does not interpret


class AccessError(BadRequest):
    """The request points outside the buffer the guest sent (the reference host answers such
    a SET with FAILURE, not INVALID_DATA)."""


def read_config_parameter(info: bytes) -> ConfigParameter:
    """The host's reading of ``rndis_config_parameter_info`` + name + value (O
    ``oid_set_rndis_config_parameter``): name and value lengths above 255 bytes or text that is
    not UTF-16 → :class:`BadRequest` (INVALID_DATA); offsets or lengths past the buffer →
    :class:`AccessError` (FAILURE)."""
    head = ffi.sizeof("struct rndis_config_parameter_info")
    if len(info) < head:
        raise AccessError(f"config parameter of {len(info)} bytes, header needs {head}")
    h = ffi.new("struct rndis_config_parameter_info *")
    ffi.memmove(h, info[:head], head)
    name_off, name_len, ptype = int(h.name_offset), int(h.name_length), int(h.parameter_type)
    value_off, value_len = int(h.value_offset), int(h.value_length)
    if name_len > 255:
        raise BadRequest(f"config parameter name of {name_len} bytes (limit 255)")
    if value_len > 255:
        raise BadRequest(f"config parameter value of {value_len} bytes (limit 255)")

    def span(off: int, length: int) -> bytes:
        if off > len(info) or length > len(info) - off:
            raise AccessError(f"config parameter bytes {off}+{length} past the {len(info)}-byte buffer")
        return bytes(info[off:off + length])

    try:
        name = span(name_off, name_len & ~1).decode("utf-16-le")
    except UnicodeDecodeError:
        raise BadRequest("config parameter name is not UTF-16") from None
    if ptype == lib.RNDIS_CONFIG_PARAM_TYPE_STRING:
        try:
            return ConfigParameter(name, ptype, span(value_off, value_len & ~1).decode("utf-16-le"))
        except UnicodeDecodeError:
            raise BadRequest("config parameter value is not UTF-16") from None
    if ptype == lib.RNDIS_CONFIG_PARAM_TYPE_INTEGER:
        return ConfigParameter(name, ptype, int(struct.unpack("<I", span(value_off, 4))[0]))
    return ConfigParameter(name, ptype, None)


# ---- RNDIS responses (host → guest) -------------------------------------------------------
def _message(ctype: str, msg_type: int, tail: bytes = b"", **values: int) -> bytes:
    obj = ffi.new(ctype + " *")
    obj.msg_type = msg_type
    obj.msg_len = ffi.sizeof(ctype) + len(tail)
    for k, v in values.items():
        setattr(obj, k, v)
    return bytes(ffi.buffer(obj)) + tail


def init_complete(req_id: int) -> bytes:
    """§10.1: 8 packets per message, alignment 2^3, max transfer 0xEFFFFFFF, RNDIS 1.0."""
    return _message("struct rndis_initialize_complete", lib.RNDIS_MSG_INIT_C, req_id=req_id,
                    status=lib.RNDIS_STATUS_SUCCESS, major_ver=1, minor_ver=0,
                    dev_flags=lib.RNDIS_DF_CONNECTIONLESS, medium=lib.RNDIS_MEDIUM_802_3,
                    max_pkt_per_msg=8, max_xfer_size=0xEFFFFFFF, pkt_alignment_factor=3)


def query_complete(req_id: int, status: int, data: bytes) -> bytes:
    """The answer's buffer follows the 24-byte header (offset 16 relative to byte 8)."""
    return _message("struct rndis_query_complete", lib.RNDIS_MSG_QUERY_C, data, req_id=req_id,
                    status=status, info_buflen=len(data), info_buf_offset=16 if data else 0)


def set_complete(req_id: int, status: int) -> bytes:
    return _message("struct rndis_set_complete", lib.RNDIS_MSG_SET_C, req_id=req_id, status=status)


def keepalive_complete(req_id: int) -> bytes:
    return _message("struct rndis_keepalive_complete", lib.RNDIS_MSG_KEEPALIVE_C, req_id=req_id,
                    status=lib.RNDIS_STATUS_SUCCESS)


def status_indication(status: int, data: bytes = b"") -> bytes:
    return _message("struct rndis_indicate_status", lib.RNDIS_MSG_INDICATE, data, status=status,
                    status_buflen=len(data), status_buf_offset=12 if data else 0)


_OFFLOAD_SIZE = {1: lib.NDIS_OFFLOAD_SIZE_REV1, 2: lib.NDIS_OFFLOAD_SIZE_REV2, 3: lib.NDIS_OFFLOAD_SIZE_REV3}


#: LSOv2 as the reference host announces it: maximum 0xF53C (62780) bytes, at least 2
#: segments, "same as vmswitch" (O; netvsc.md §4.6, §9); IPv6 with extension headers and TCP
#: options (NDIS_LSOV2_CAP_IP6, what Linux requires before it enables TSO6)
LSO_MAX_SIZE = 0xF53C
LSO_MIN_SEGMENTS = 2


def offload_capabilities(rev: int, *, lso4: bool = False, lso6: bool = False, rsc4: bool = False,
                         rsc6: bool = False) -> bytes:
    """The host's NDIS_OFFLOAD: IPv4/TCP/UDP checksum both ways (802.3), LSOv2 for IPv4 /
    IPv6 when ``lso4`` / ``lso6``, RSC for IPv4 / IPv6 when ``rsc4`` / ``rsc6`` (@144, revision
    3 only); cut to the revision the guest asked for."""
    o = ffi.new("struct ndis_offload *")
    o.hdr.type = lib.NDIS_OBJTYPE_OFFLOAD
    o.hdr.revision = rev
    o.hdr.size = _OFFLOAD_SIZE[rev]
    v4 = (lib.NDIS_TXCSUM_CAP_IP4 | lib.NDIS_TXCSUM_CAP_IP4OPT | lib.NDIS_TXCSUM_CAP_TCP4
          | lib.NDIS_TXCSUM_CAP_TCP4OPT | lib.NDIS_TXCSUM_CAP_UDP4)
    # O ChecksumOffloadConfig::flags: TCP/UDP over IPv6 also set "IP extension headers supported"
    v6 = (lib.NDIS_TXCSUM_CAP_IP6EXT | lib.NDIS_TXCSUM_CAP_TCP6 | lib.NDIS_TXCSUM_CAP_TCP6OPT
          | lib.NDIS_TXCSUM_CAP_UDP6)
    c = o.csum
    c.ip4_txenc = c.ip4_rxenc = c.ip6_txenc = c.ip6_rxenc = lib.NDIS_OFFLOAD_ENCAP_8023
    c.ip4_txcsum = c.ip4_rxcsum = v4
    c.ip6_txcsum = c.ip6_rxcsum = v6
    lv = o.lsov2
    if lso4:
        lv.ip4_encap = lib.NDIS_OFFLOAD_ENCAP_8023
        lv.ip4_maxsz = LSO_MAX_SIZE
        lv.ip4_minsg = LSO_MIN_SEGMENTS
    if lso6:
        lv.ip6_encap = lib.NDIS_OFFLOAD_ENCAP_8023
        lv.ip6_maxsz = LSO_MAX_SIZE
        lv.ip6_minsg = LSO_MIN_SEGMENTS
        lv.ip6_opts = lib.NDIS_LSOV2_CAP_IP6
    o.rsc.ip4 = int(rsc4)
    o.rsc.ip6 = int(rsc6)
    return bytes(ffi.buffer(o))[:_OFFLOAD_SIZE[rev]]


def rss_capabilities(queues: int) -> bytes:
    """NDIS_RECEIVE_SCALE_CAPABILITIES rev 2: Toeplitz over TCP/IPv4 and TCP/IPv6, 128 entries."""
    c = ffi.new("struct ndis_recv_scale_cap *")
    c.hdr.type = lib.NDIS_OBJTYPE_RSS_CAPS
    c.hdr.revision = 2
    c.hdr.size = lib.NDIS_RSS_CAPS_SIZE_REV2
    c.cap_flags = lib.NDIS_RSS_CAP_TOEPLITZ | lib.NDIS_RSS_CAP_TCP_IPV4 | lib.NDIS_RSS_CAP_TCP_IPV6
    c.num_int_msg = c.num_recv_que = queues
    c.num_indirect_tabent = 128
    return bytes(ffi.buffer(c))

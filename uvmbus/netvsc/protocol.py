"""NVSP / RNDIS / NDIS wire helpers shared by the netvsc driver, the NetVSP model and tests.

Every layout comes from ``native/netvsc_wire.h`` through ``ffi`` (the same structs the C
fast paths use; sizes pinned against ../shared/reference/netvsc.md §2.4 and §4 by
``_Static_assert``).  This module only builds and parses *control* messages; frames are
packed and parsed in C (``native/netvsc.c`` / ``native/netvsp.c``).

Conventions (§4.1): RNDIS ``info_buf_offset`` / ``status_buf_offset`` / ``data_offset`` /
``per_pkt_info_offset`` are relative to byte 8 of the message.  NVSP requests are always
sent as 40-byte messages (§2.3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from uvmbus.errors import ProtocolError
from uvmbus.native import ffi, lib

# ---- NVSP ------------------------------------------------------------------------------
NVSP_V1 = lib.NVSP_PROTOCOL_VERSION_1
NVSP_V2 = lib.NVSP_PROTOCOL_VERSION_2
NVSP_V4 = lib.NVSP_PROTOCOL_VERSION_4
NVSP_V5 = lib.NVSP_PROTOCOL_VERSION_5
NVSP_V6 = lib.NVSP_PROTOCOL_VERSION_6
NVSP_V61 = lib.NVSP_PROTOCOL_VERSION_61
#: what the guest tries, newest first (§3 step 2)
NVSP_VERSIONS: tuple[int, ...] = (NVSP_V61, NVSP_V6, NVSP_V5, NVSP_V4, NVSP_V2, NVSP_V1)
VERSION_NAMES = {NVSP_V1: "1", NVSP_V2: "2", NVSP_V4: "4", NVSP_V5: "5", NVSP_V6: "6", NVSP_V61: "6.1"}

NVSP_MSG_SIZE = lib.NVSP_MSG_SIZE_V61          # 40: every request the guest sends
STATUS_SUCCESS = lib.NVSP_STAT_SUCCESS
STATUS_FAIL = lib.NVSP_STAT_FAIL
RECV_BUF_ID = lib.NVSP_RECV_BUF_ID
SEND_BUF_ID = lib.NVSP_SEND_BUF_ID
SECTION_NONE = lib.NVSP_SECTION_INDEX_NONE

MSG_INIT = lib.NVSP_MSG_TYPE_INIT
MSG_INIT_COMPLETE = lib.NVSP_MSG_TYPE_INIT_COMPLETE
MSG_SEND_NDIS_VER = lib.NVSP_MSG1_TYPE_SEND_NDIS_VER
MSG_SEND_RECV_BUF = lib.NVSP_MSG1_TYPE_SEND_RECV_BUF
MSG_SEND_RECV_BUF_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE
MSG_REVOKE_RECV_BUF = lib.NVSP_MSG1_TYPE_REVOKE_RECV_BUF
MSG_SEND_SEND_BUF = lib.NVSP_MSG1_TYPE_SEND_SEND_BUF
MSG_SEND_SEND_BUF_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE
MSG_REVOKE_SEND_BUF = lib.NVSP_MSG1_TYPE_REVOKE_SEND_BUF
MSG_SEND_RNDIS_PKT = lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT
MSG_SEND_RNDIS_PKT_COMPLETE = lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE
MSG_SEND_NDIS_CONFIG = lib.NVSP_MSG2_TYPE_SEND_NDIS_CONFIG
MSG_VF_ASSOCIATION = lib.NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION
MSG_SWITCH_DATA_PATH = lib.NVSP_MSG4_TYPE_SWITCH_DATA_PATH
MSG_OID_QUERY_EX = lib.NVSP_MSG5_TYPE_OID_QUERY_EX
MSG_OID_QUERY_EX_COMP = lib.NVSP_MSG5_TYPE_OID_QUERY_EX_COMP
MSG_SUBCHANNEL = lib.NVSP_MSG5_TYPE_SUBCHANNEL
MSG_SEND_INDIRECTION_TABLE = lib.NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE

DATA_PATH_SYNTHETIC = lib.NVSP_DATA_PATH_SYNTHETIC
DATA_PATH_VF = lib.NVSP_DATA_PATH_VF
DATA_PATH_NAMES = {DATA_PATH_SYNTHETIC: "synthetic", DATA_PATH_VF: "vf"}

CHANNEL_TYPE_DATA = lib.NVSP_CHANNEL_TYPE_DATA
CHANNEL_TYPE_CONTROL = lib.NVSP_CHANNEL_TYPE_CONTROL
SEND_TABLE_ENTRIES = lib.NVSP_SEND_TABLE_ENTRIES

CAP_VMQ = lib.NVSP_NDIS_CAP_VMQ
CAP_CHIMNEY = lib.NVSP_NDIS_CAP_CHIMNEY
CAP_SRIOV = lib.NVSP_NDIS_CAP_SRIOV
CAP_IEEE8021Q = lib.NVSP_NDIS_CAP_IEEE8021Q
CAP_CORRELATION_ID = lib.NVSP_NDIS_CAP_CORRELATION_ID
CAP_TEAMING = lib.NVSP_NDIS_CAP_TEAMING
CAP_VSUBNETID = lib.NVSP_NDIS_CAP_VSUBNETID
CAP_RSC = lib.NVSP_NDIS_CAP_RSC
RSC_DISABLED = lib.NDIS_OFFLOAD_PARAM_RSC_DISABLED
RSC_ENABLED = lib.NDIS_OFFLOAD_PARAM_RSC_ENABLED

#: message type → (struct, name): what ``parse_nvsp`` decodes
NVSP_STRUCTS: dict[int, tuple[str, str]] = {
    MSG_INIT: ("struct nvsp_init", "INIT"),
    MSG_INIT_COMPLETE: ("struct nvsp_init_complete", "INIT_COMPLETE"),
    MSG_SEND_NDIS_VER: ("struct nvsp_send_ndis_ver", "SEND_NDIS_VER"),
    MSG_SEND_RECV_BUF: ("struct nvsp_send_recv_buf", "SEND_RECV_BUF"),
    MSG_SEND_RECV_BUF_COMPLETE: ("struct nvsp_send_recv_buf_complete", "SEND_RECV_BUF_COMPLETE"),
    MSG_REVOKE_RECV_BUF: ("struct nvsp_revoke_buf", "REVOKE_RECV_BUF"),
    MSG_SEND_SEND_BUF: ("struct nvsp_send_send_buf", "SEND_SEND_BUF"),
    MSG_SEND_SEND_BUF_COMPLETE: ("struct nvsp_send_send_buf_complete", "SEND_SEND_BUF_COMPLETE"),
    MSG_REVOKE_SEND_BUF: ("struct nvsp_revoke_buf", "REVOKE_SEND_BUF"),
    MSG_SEND_RNDIS_PKT: ("struct nvsp_send_rndis_pkt", "SEND_RNDIS_PKT"),
    MSG_SEND_RNDIS_PKT_COMPLETE: ("struct nvsp_send_rndis_pkt_complete", "SEND_RNDIS_PKT_COMPLETE"),
    MSG_SEND_NDIS_CONFIG: ("struct nvsp_send_ndis_config", "SEND_NDIS_CONFIG"),
    MSG_VF_ASSOCIATION: ("struct nvsp_vf_association", "VF_ASSOCIATION"),
    MSG_SWITCH_DATA_PATH: ("struct nvsp_switch_data_path", "SWITCH_DATA_PATH"),
    MSG_OID_QUERY_EX: ("struct nvsp_oid_query_ex", "OID_QUERY_EX"),
    MSG_OID_QUERY_EX_COMP: ("struct nvsp_oid_query_ex_complete", "OID_QUERY_EX_COMP"),
    MSG_SUBCHANNEL: ("struct nvsp_subchannel_request", "SUBCHANNEL"),
    MSG_SEND_INDIRECTION_TABLE: ("struct nvsp_send_indirection_table", "SEND_INDIRECTION_TABLE"),
}


def _pack(ctype: str, size: int | None = None, **fields: Any) -> bytes:
    obj = ffi.new(ctype + " *")
    for k, v in fields.items():
        setattr(obj, k, v)
    raw = bytes(ffi.buffer(obj))
    if size is not None:
        raw = raw.ljust(size, b"\0")
    return raw


def _unpack(ctype: str, data: Any) -> Any:
    """A private cdata copy of ``ctype`` read from the start of ``data`` (short data is
    zero-extended: callers check lengths where it matters)."""
    obj = ffi.new(ctype + " *")
    n = min(len(data), ffi.sizeof(ctype))
    ffi.memmove(obj, bytes(data[:n]), n)
    return obj


def nvsp(ctype: str, msg_type: int, size: int = NVSP_MSG_SIZE, **fields: Any) -> bytes:
    """An NVSP message of struct ``ctype`` padded to ``size`` (40 by default)."""
    return _pack(ctype, size, msg_type=msg_type, **fields)


def nvsp_init(version: int) -> bytes:
    return nvsp("struct nvsp_init", MSG_INIT, min_protocol_ver=version, max_protocol_ver=version)


def nvsp_ndis_config(mtu: int, capability: int) -> bytes:
    return nvsp("struct nvsp_send_ndis_config", MSG_SEND_NDIS_CONFIG, mtu=mtu, capability=capability)


def nvsp_ndis_version(major: int, minor: int) -> bytes:
    return nvsp("struct nvsp_send_ndis_ver", MSG_SEND_NDIS_VER, ndis_major_ver=major, ndis_minor_ver=minor)


def nvsp_send_recv_buf(gpadl: int, buf_id: int = RECV_BUF_ID) -> bytes:
    return nvsp("struct nvsp_send_recv_buf", MSG_SEND_RECV_BUF, gpadl_handle=gpadl, id=buf_id)


def nvsp_send_send_buf(gpadl: int, buf_id: int = SEND_BUF_ID) -> bytes:
    return nvsp("struct nvsp_send_send_buf", MSG_SEND_SEND_BUF, gpadl_handle=gpadl, id=buf_id)


def nvsp_revoke(msg_type: int, buf_id: int) -> bytes:
    return nvsp("struct nvsp_revoke_buf", msg_type, id=buf_id)


def nvsp_rndis_pkt(channel_type: int, section: int = SECTION_NONE, size: int = 0) -> bytes:
    return nvsp("struct nvsp_send_rndis_pkt", MSG_SEND_RNDIS_PKT, channel_type=channel_type,
                send_buf_section_index=section, send_buf_section_size=size)


def nvsp_subchannel_request(count: int) -> bytes:
    return nvsp("struct nvsp_subchannel_request", MSG_SUBCHANNEL, op=lib.NVSP_SUBCHANNEL_OP_ALLOCATE,
                num_subchannels=count)


def nvsp_switch_data_path(active: int) -> bytes:
    return nvsp("struct nvsp_switch_data_path", MSG_SWITCH_DATA_PATH, active_datapath=active)


def ndis_version_for(nvsp_version: int) -> tuple[int, int]:
    """NDIS version the guest announces: 6.1 for NVSP ≤ 4, else 6.30 (§2.1)."""
    return (6, 1) if nvsp_version <= NVSP_V4 else (6, 30)


@dataclass
class NvspMessage:
    """A decoded NVSP message: ``type``, ``name`` and the struct's fields."""

    type: int
    name: str
    fields: dict[str, Any]
    raw: bytes

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _fields(obj: Any, ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in ffi.typeof(ctype).fields:
        v = getattr(obj, name)
        if f.type.kind == "struct":
            out[name] = _fields(v, f.type.cname)
        elif f.type.kind == "array":
            out[name] = bytes(ffi.buffer(v))
        else:
            out[name] = int(v)
    return out


def parse_nvsp(payload: Any) -> NvspMessage:
    """Decode an NVSP message (any length ≥ 4; missing bytes read as 0)."""
    data = bytes(payload)
    if len(data) < 4:
        raise ProtocolError(f"NVSP message of {len(data)} bytes: shorter than its type field")
    mtype = struct.unpack_from("<I", data)[0]
    info = NVSP_STRUCTS.get(mtype)
    if info is None:
        return NvspMessage(mtype, f"UNKNOWN({mtype})", {"msg_type": mtype}, data)
    ctype, name = info
    return NvspMessage(mtype, name, _fields(_unpack(ctype, data), ctype), data)


def nvsp_type(payload: Any) -> int:
    return struct.unpack_from("<I", bytes(payload[:4]).ljust(4, b"\0"))[0]


# ---- RNDIS ---------------------------------------------------------------------------
RNDIS_PACKET = lib.RNDIS_MSG_PACKET
RNDIS_INIT = lib.RNDIS_MSG_INIT
RNDIS_INIT_C = lib.RNDIS_MSG_INIT_C
RNDIS_HALT = lib.RNDIS_MSG_HALT
RNDIS_QUERY = lib.RNDIS_MSG_QUERY
RNDIS_QUERY_C = lib.RNDIS_MSG_QUERY_C
RNDIS_SET = lib.RNDIS_MSG_SET
RNDIS_SET_C = lib.RNDIS_MSG_SET_C
RNDIS_RESET = lib.RNDIS_MSG_RESET
RNDIS_RESET_C = lib.RNDIS_MSG_RESET_C
RNDIS_INDICATE = lib.RNDIS_MSG_INDICATE
RNDIS_KEEPALIVE = lib.RNDIS_MSG_KEEPALIVE
RNDIS_KEEPALIVE_C = lib.RNDIS_MSG_KEEPALIVE_C
RNDIS_SET_EX = lib.RNDIS_MSG_SET_EX

RNDIS_NAMES = {
    RNDIS_PACKET: "PACKET", RNDIS_INIT: "INITIALIZE", RNDIS_INIT_C: "INITIALIZE_CMPLT",
    RNDIS_HALT: "HALT", RNDIS_QUERY: "QUERY", RNDIS_QUERY_C: "QUERY_CMPLT", RNDIS_SET: "SET",
    RNDIS_SET_C: "SET_CMPLT", RNDIS_RESET: "RESET", RNDIS_RESET_C: "RESET_CMPLT",
    RNDIS_INDICATE: "INDICATE_STATUS", RNDIS_KEEPALIVE: "KEEPALIVE", RNDIS_KEEPALIVE_C: "KEEPALIVE_CMPLT",
    RNDIS_SET_EX: "SET_EX",
}

ST_SUCCESS = lib.RNDIS_STATUS_SUCCESS
ST_MEDIA_CONNECT = lib.RNDIS_STATUS_MEDIA_CONNECT
ST_MEDIA_DISCONNECT = lib.RNDIS_STATUS_MEDIA_DISCONNECT
ST_LINK_SPEED_CHANGE = lib.RNDIS_STATUS_LINK_SPEED_CHANGE
ST_NETWORK_CHANGE = lib.RNDIS_STATUS_NETWORK_CHANGE
ST_TASK_OFFLOAD_CURRENT_CONFIG = lib.RNDIS_STATUS_TASK_OFFLOAD_CURRENT_CONFIG
ST_FAILURE = lib.RNDIS_STATUS_FAILURE
ST_NOT_SUPPORTED = lib.RNDIS_STATUS_NOT_SUPPORTED
ST_BAD_VERSION = lib.RNDIS_STATUS_BAD_VERSION
ST_INVALID_LENGTH = lib.RNDIS_STATUS_INVALID_LENGTH
ST_INVALID_DATA = lib.RNDIS_STATUS_INVALID_DATA

# OIDs
OID_GEN_SUPPORTED_LIST = lib.OID_GEN_SUPPORTED_LIST
OID_GEN_HARDWARE_STATUS = lib.OID_GEN_HARDWARE_STATUS
OID_GEN_MEDIA_SUPPORTED = lib.OID_GEN_MEDIA_SUPPORTED
OID_GEN_MEDIA_IN_USE = lib.OID_GEN_MEDIA_IN_USE
OID_GEN_MAXIMUM_LOOKAHEAD = lib.OID_GEN_MAXIMUM_LOOKAHEAD
OID_GEN_MAXIMUM_FRAME_SIZE = lib.OID_GEN_MAXIMUM_FRAME_SIZE
OID_GEN_LINK_SPEED = lib.OID_GEN_LINK_SPEED
OID_GEN_TRANSMIT_BUFFER_SPACE = lib.OID_GEN_TRANSMIT_BUFFER_SPACE
OID_GEN_RECEIVE_BUFFER_SPACE = lib.OID_GEN_RECEIVE_BUFFER_SPACE
OID_GEN_TRANSMIT_BLOCK_SIZE = lib.OID_GEN_TRANSMIT_BLOCK_SIZE
OID_GEN_RECEIVE_BLOCK_SIZE = lib.OID_GEN_RECEIVE_BLOCK_SIZE
OID_GEN_VENDOR_ID = lib.OID_GEN_VENDOR_ID
OID_GEN_VENDOR_DESCRIPTION = lib.OID_GEN_VENDOR_DESCRIPTION
OID_GEN_CURRENT_PACKET_FILTER = lib.OID_GEN_CURRENT_PACKET_FILTER
OID_GEN_CURRENT_LOOKAHEAD = lib.OID_GEN_CURRENT_LOOKAHEAD
OID_GEN_DRIVER_VERSION = lib.OID_GEN_DRIVER_VERSION
OID_GEN_MAXIMUM_TOTAL_SIZE = lib.OID_GEN_MAXIMUM_TOTAL_SIZE
OID_GEN_MAC_OPTIONS = lib.OID_GEN_MAC_OPTIONS
OID_GEN_MEDIA_CONNECT_STATUS = lib.OID_GEN_MEDIA_CONNECT_STATUS
OID_GEN_MAXIMUM_SEND_PACKETS = lib.OID_GEN_MAXIMUM_SEND_PACKETS
OID_GEN_VENDOR_DRIVER_VERSION = lib.OID_GEN_VENDOR_DRIVER_VERSION
OID_GEN_NETWORK_LAYER_ADDRESSES = lib.OID_GEN_NETWORK_LAYER_ADDRESSES
OID_GEN_RECEIVE_SCALE_CAPABILITIES = lib.OID_GEN_RECEIVE_SCALE_CAPABILITIES
OID_GEN_RECEIVE_SCALE_PARAMETERS = lib.OID_GEN_RECEIVE_SCALE_PARAMETERS
OID_GEN_MAX_LINK_SPEED = lib.OID_GEN_MAX_LINK_SPEED
OID_GEN_LINK_STATE = lib.OID_GEN_LINK_STATE
OID_GEN_RNDIS_CONFIG_PARAMETER = lib.OID_GEN_RNDIS_CONFIG_PARAMETER
OID_GEN_FRIENDLY_NAME = lib.OID_GEN_FRIENDLY_NAME
OID_802_3_PERMANENT_ADDRESS = lib.OID_802_3_PERMANENT_ADDRESS
OID_802_3_CURRENT_ADDRESS = lib.OID_802_3_CURRENT_ADDRESS
OID_802_3_MULTICAST_LIST = lib.OID_802_3_MULTICAST_LIST
OID_802_3_MAXIMUM_LIST_SIZE = lib.OID_802_3_MAXIMUM_LIST_SIZE
OID_OFFLOAD_ENCAPSULATION = lib.OID_OFFLOAD_ENCAPSULATION
OID_TCP_OFFLOAD_CURRENT_CONFIG = lib.OID_TCP_OFFLOAD_CURRENT_CONFIG
OID_TCP_OFFLOAD_PARAMETERS = lib.OID_TCP_OFFLOAD_PARAMETERS
OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES = lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES

OID_GEN_XMIT_OK = lib.OID_GEN_XMIT_OK
OID_GEN_RCV_OK = lib.OID_GEN_RCV_OK
OID_GEN_XMIT_ERROR = lib.OID_GEN_XMIT_ERROR
OID_GEN_RCV_ERROR = lib.OID_GEN_RCV_ERROR
OID_GEN_RCV_NO_BUFFER = lib.OID_GEN_RCV_NO_BUFFER
OID_GEN_BYTES_RCV = lib.OID_GEN_BYTES_RCV
OID_GEN_BYTES_XMIT = lib.OID_GEN_BYTES_XMIT
OID_GEN_RCV_DISCARDS = lib.OID_GEN_RCV_DISCARDS
OID_GEN_XMIT_DISCARDS = lib.OID_GEN_XMIT_DISCARDS
OID_802_3_RCV_ERROR_ALIGNMENT = lib.OID_802_3_RCV_ERROR_ALIGNMENT
OID_802_3_XMIT_ONE_COLLISION = lib.OID_802_3_XMIT_ONE_COLLISION
OID_802_3_XMIT_MORE_COLLISIONS = lib.OID_802_3_XMIT_MORE_COLLISIONS

#: the counters ``Nic.host_stats()`` asks the host for, by the name it reports them under
STATS_OIDS: dict[str, int] = {
    "xmit_ok": OID_GEN_XMIT_OK, "rcv_ok": OID_GEN_RCV_OK, "xmit_error": OID_GEN_XMIT_ERROR,
    "rcv_error": OID_GEN_RCV_ERROR, "rcv_no_buffer": OID_GEN_RCV_NO_BUFFER,
    "bytes_xmit": OID_GEN_BYTES_XMIT, "bytes_rcv": OID_GEN_BYTES_RCV,
    "xmit_discards": OID_GEN_XMIT_DISCARDS, "rcv_discards": OID_GEN_RCV_DISCARDS,
    "rcv_error_alignment": OID_802_3_RCV_ERROR_ALIGNMENT,
    "xmit_one_collision": OID_802_3_XMIT_ONE_COLLISION,
    "xmit_more_collisions": OID_802_3_XMIT_MORE_COLLISIONS,
}

FILTER_DIRECTED = lib.NDIS_PACKET_TYPE_DIRECTED
FILTER_MULTICAST = lib.NDIS_PACKET_TYPE_MULTICAST
FILTER_ALL_MULTICAST = lib.NDIS_PACKET_TYPE_ALL_MULTICAST
FILTER_BROADCAST = lib.NDIS_PACKET_TYPE_BROADCAST
FILTER_PROMISCUOUS = lib.NDIS_PACKET_TYPE_PROMISCUOUS

# PPI
PPI_TCPIP_CHKSUM = lib.PPI_TCPIP_CHKSUM
PPI_IEEE_8021Q = lib.PPI_IEEE_8021Q
PPI_HASH_VALUE = lib.PPI_HASH_VALUE
PPI_HASH_INFO = lib.PPI_HASH_INFO
PPI_TCP_LARGESEND = lib.PPI_TCP_LARGESEND
LSO_ENABLED = lib.NDIS_OFFLOAD_PARAM_LSO_ENABLED
LSO_DISABLED = lib.NDIS_OFFLOAD_PARAM_LSO_DISABLED

#: Microsoft's standard Toeplitz key (Linux netvsc default, §4.8)
MS_RSS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")

# RSS hash types (NDIS hash_info bits)
HASH_FUNC_TOEPLITZ = lib.NDIS_HASH_FUNC_TOEPLITZ
HASH_IPV4 = lib.NDIS_HASH_IPV4
HASH_TCP_IPV4 = lib.NDIS_HASH_TCP_IPV4
HASH_IPV6 = lib.NDIS_HASH_IPV6
HASH_TCP_IPV6 = lib.NDIS_HASH_TCP_IPV6
HASH_UDP_IPV4 = lib.NDIS_HASH_UDP_IPV4
HASH_UDP_IPV6 = lib.NDIS_HASH_UDP_IPV6
#: what Linux asks for (0x1701: Toeplitz, IPv4, TCP/IPv4, IPv6, TCP/IPv6)
LINUX_HASH_INFO = HASH_FUNC_TOEPLITZ | HASH_IPV4 | HASH_TCP_IPV4 | HASH_IPV6 | HASH_TCP_IPV6
RSS_FLAG_DISABLE = lib.NDIS_RSS_FLAG_DISABLE_RSS


def _rndis(ctype: str, msg_type: int, extra: bytes = b"", **fields: Any) -> bytes:
    size = ffi.sizeof(ctype) + len(extra)
    return _pack(ctype, None, msg_type=msg_type, msg_len=size, **fields) + extra


def rndis_init(req_id: int, max_xfer: int = lib.RNDIS_GUEST_MAX_XFER_SIZE) -> bytes:
    return _rndis("struct rndis_initialize_request", RNDIS_INIT, req_id=req_id,
                  major_ver=lib.RNDIS_MAJOR_VERSION, minor_ver=lib.RNDIS_MINOR_VERSION,
                  max_xfer_size=max_xfer)


def rndis_query(req_id: int, oid: int, data: bytes = b"") -> bytes:
    """QUERY with optional input (placed right after the fixed part: offset 20 → byte 28)."""
    return _rndis("struct rndis_query_request", RNDIS_QUERY, data, req_id=req_id, oid=oid,
                  info_buflen=len(data), info_buf_offset=20 if data else 0)


def rndis_set(req_id: int, oid: int, data: bytes) -> bytes:
    return _rndis("struct rndis_set_request", RNDIS_SET, data, req_id=req_id, oid=oid,
                  info_buflen=len(data), info_buf_offset=20)


def rndis_halt(req_id: int) -> bytes:
    return _rndis("struct rndis_halt_request", RNDIS_HALT, req_id=req_id)


def rndis_keepalive(req_id: int) -> bytes:
    return _rndis("struct rndis_keepalive_request", RNDIS_KEEPALIVE, req_id=req_id)


def rndis_reset() -> bytes:
    return _rndis("struct rndis_reset_request", RNDIS_RESET)


# responses (host side)
def rndis_init_complete(req_id: int, status: int = ST_SUCCESS, *, max_pkts: int = 8,
                        max_xfer: int = 0xEFFFFFFF, align_factor: int = 3) -> bytes:
    return _rndis("struct rndis_initialize_complete", RNDIS_INIT_C, req_id=req_id, status=status,
                  major_ver=1, minor_ver=0, dev_flags=lib.RNDIS_DF_CONNECTIONLESS,
                  medium=lib.RNDIS_MEDIUM_802_3, max_pkt_per_msg=max_pkts, max_xfer_size=max_xfer,
                  pkt_alignment_factor=align_factor)


def rndis_query_complete(req_id: int, status: int, data: bytes = b"") -> bytes:
    """QUERY_CMPLT; data at offset 16 (absolute 24), as the reference host puts it."""
    return _rndis("struct rndis_query_complete", RNDIS_QUERY_C, data, req_id=req_id, status=status,
                  info_buflen=len(data), info_buf_offset=16 if data else 0)


def rndis_set_complete(req_id: int, status: int) -> bytes:
    return _rndis("struct rndis_set_complete", RNDIS_SET_C, req_id=req_id, status=status)


def rndis_keepalive_complete(req_id: int, status: int = ST_SUCCESS) -> bytes:
    return _rndis("struct rndis_keepalive_complete", RNDIS_KEEPALIVE_C, req_id=req_id, status=status)


def rndis_indicate_status(status: int, data: bytes = b"") -> bytes:
    return _rndis("struct rndis_indicate_status", RNDIS_INDICATE, data, status=status,
                  status_buflen=len(data), status_buf_offset=12 if data else 0)


@dataclass
class RndisMessage:
    """A decoded RNDIS control message.

    ``info`` is the information/status buffer (QUERY/SET input, QUERY_CMPLT data,
    INDICATE_STATUS buffer), validated to lie inside the message."""

    type: int
    length: int
    req_id: int = 0
    status: int = 0
    oid: int = 0
    info: bytes = b""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return RNDIS_NAMES.get(self.type, f"UNKNOWN({self.type:#x})")


_RNDIS_STRUCTS = {
    RNDIS_PACKET: "struct rndis_packet",
    RNDIS_INIT: "struct rndis_initialize_request",
    RNDIS_INIT_C: "struct rndis_initialize_complete",
    RNDIS_HALT: "struct rndis_halt_request",
    RNDIS_QUERY: "struct rndis_query_request",
    RNDIS_QUERY_C: "struct rndis_query_complete",
    RNDIS_SET: "struct rndis_set_request",
    RNDIS_SET_C: "struct rndis_set_complete",
    RNDIS_RESET: "struct rndis_reset_request",
    RNDIS_RESET_C: "struct rndis_reset_complete",
    RNDIS_INDICATE: "struct rndis_indicate_status",
    RNDIS_KEEPALIVE: "struct rndis_keepalive_request",
    RNDIS_KEEPALIVE_C: "struct rndis_keepalive_complete",
}


def parse_rndis(data: Any) -> RndisMessage:
    """Decode and validate an RNDIS control message (msg_len ≥ 8 and within ``data``, the
    fixed part present, info offsets ≥ the fixed part and inside the message)."""
    raw = bytes(data)
    if len(raw) < 8:
        raise ProtocolError(f"RNDIS message of {len(raw)} bytes: shorter than its header")
    mtype, mlen = struct.unpack_from("<II", raw)
    if mlen < 8 or mlen > len(raw):
        raise ProtocolError(f"RNDIS message type {mtype:#x} claims {mlen} bytes, {len(raw)} available")
    raw = raw[:mlen]
    ctype = _RNDIS_STRUCTS.get(mtype)
    if ctype is None:
        return RndisMessage(mtype, mlen)
    fixed = ffi.sizeof(ctype)
    if mlen < fixed:
        raise ProtocolError(f"RNDIS {RNDIS_NAMES[mtype]} of {mlen} bytes: its fixed part is {fixed}")
    f = _fields(_unpack(ctype, raw), ctype)
    msg = RndisMessage(mtype, mlen, req_id=f.get("req_id", 0), status=f.get("status", 0),
                       oid=f.get("oid", 0), fields=f)
    off = len_ = None
    if mtype in (RNDIS_QUERY, RNDIS_QUERY_C, RNDIS_SET):
        off, len_ = f["info_buf_offset"], f["info_buflen"]
    elif mtype == RNDIS_INDICATE:
        off, len_ = f["status_buf_offset"], f["status_buflen"]
    if len_:
        assert off is not None
        if off < fixed - 8 or 8 + off + len_ > mlen:
            raise ProtocolError(f"RNDIS {RNDIS_NAMES[mtype]}: buffer at offset {off} (+{len_}) "
                                f"outside the {mlen}-byte message")
        msg.info = raw[8 + off:8 + off + len_]
    return msg


# ---- data packets (for tests and tools; the fast paths do this in C) ----------------
def ppi_u32(ppi_type: int, value: int) -> bytes:
    return struct.pack("<IIII", 16, ppi_type, 12, value & 0xFFFFFFFF)


def vlan_ppi_value(tci: int) -> int:
    """802.1Q TCI → VLAN PPI (priority bits 0-2, CFI bit 3, VLAN id bits 4-15)."""
    return ((tci >> 13) & 7) | (((tci >> 12) & 1) << 3) | ((tci & 0xFFF) << 4)


def vlan_tci(ppi_value: int) -> int:
    return ((ppi_value & 7) << 13) | (((ppi_value >> 3) & 1) << 12) | ((ppi_value >> 4) & 0xFFF)


def rndis_packet(frame: bytes, ppis: bytes = b"", *, pad_to: int = 0) -> bytes:
    """An RNDIS PACKET message: 44-byte header, PPIs at 36 (relative), then the frame.
    ``pad_to`` > 0 pads msg_len to a multiple (batching)."""
    body_len = 44 + len(ppis) + len(frame)
    mlen = body_len if not pad_to else (body_len + pad_to - 1) // pad_to * pad_to
    hdr = _pack("struct rndis_packet", None, msg_type=RNDIS_PACKET, msg_len=mlen,
                data_offset=36 + len(ppis), data_len=len(frame),
                per_pkt_info_offset=36 if ppis else 0, per_pkt_info_len=len(ppis))
    return (hdr + ppis + frame).ljust(mlen, b"\0")


@dataclass
class RxPacket:
    frame: bytes
    ppis: dict[int, int]


def parse_rndis_packet(data: Any) -> RxPacket:
    """Decode an RNDIS PACKET (frame + u32 PPIs) with the receive-side checks of §4.3."""
    raw = bytes(data)
    if len(raw) < 44:
        raise ProtocolError(f"RNDIS PACKET of {len(raw)} bytes")
    f = _fields(_unpack("struct rndis_packet", raw), "struct rndis_packet")
    mlen = f["msg_len"]
    if f["msg_type"] != RNDIS_PACKET or mlen < 44 or mlen > len(raw):
        raise ProtocolError(f"not an RNDIS PACKET: type {f['msg_type']:#x} length {mlen}")
    d0, dl = 8 + f["data_offset"], f["data_len"]
    if f["data_offset"] < 36 or dl == 0 or d0 + dl > mlen:
        raise ProtocolError(f"RNDIS PACKET data at {f['data_offset']} (+{dl}) outside {mlen} bytes")
    ppis: dict[int, int] = {}
    p0, pl = 8 + f["per_pkt_info_offset"], f["per_pkt_info_len"]
    if pl:
        if f["per_pkt_info_offset"] < 36 or p0 + pl > mlen:
            raise ProtocolError("RNDIS PACKET per-packet info outside the message")
        pos = p0
        while pos < p0 + pl:
            if pos + 12 > p0 + pl:
                raise ProtocolError(f"per-packet info: {p0 + pl - pos} stray bytes after the last element")
            size, ptype, poff = struct.unpack_from("<III", raw, pos)
            if size < 12 or pos + size > p0 + pl or poff < 12 or poff > size:
                raise ProtocolError(f"per-packet info element size {size} offset {poff}")
            if poff + 4 <= size:
                ppis[ptype] = struct.unpack_from("<I", raw, pos + poff)[0]
            pos += size
    return RxPacket(raw[d0:d0 + dl], ppis)


# ---- NDIS objects ---------------------------------------------------------------------
def obj_header(obj_type: int, revision: int, size: int) -> dict[str, int]:
    return {"type": obj_type, "revision": revision, "size": size}


def offload_caps(nvsp_version: int) -> int:
    """Revision / size of NDIS_OFFLOAD the guest sends in its caps query (§3 step 11)."""
    return 3 if nvsp_version >= NVSP_V5 else (2 if nvsp_version >= NVSP_V4 else 1)


NDIS_OFFLOAD_SIZES = {1: lib.NDIS_OFFLOAD_SIZE_REV1, 2: lib.NDIS_OFFLOAD_SIZE_REV2,
                      3: lib.NDIS_OFFLOAD_SIZE_REV3}


def ndis_offload_query_input(nvsp_version: int) -> bytes:
    rev = offload_caps(nvsp_version)
    size = NDIS_OFFLOAD_SIZES[rev]
    o = ffi.new("struct ndis_offload *")
    o.hdr.type = lib.NDIS_OBJTYPE_OFFLOAD
    o.hdr.revision = rev
    o.hdr.size = size
    return bytes(ffi.buffer(o))[:size]


def build_ndis_offload(csum4: int, csum6: int, *, rev: int = 3, lso4_max: int = 0, lso6_max: int = 0,
                       lso_min_segs: int = 0, lso6_opts: int = lib.NDIS_LSOV2_CAP_IP6) -> bytes:
    """An NDIS_OFFLOAD with TX/RX checksum flags (802.3 encapsulation) and, when ``lso4_max`` /
    ``lso6_max`` > 0, LSOv2 for IPv4 / IPv6 (802.3, those maximum sizes, ``lso_min_segs``;
    IPv6 with ``lso6_opts``).  No RSC."""
    o = ffi.new("struct ndis_offload *")
    size = NDIS_OFFLOAD_SIZES[rev]
    o.hdr.type = lib.NDIS_OBJTYPE_OFFLOAD
    o.hdr.revision = rev
    o.hdr.size = size
    enc = lib.NDIS_OFFLOAD_ENCAP_8023
    o.csum.ip4_txenc = o.csum.ip4_rxenc = o.csum.ip6_txenc = o.csum.ip6_rxenc = enc
    o.csum.ip4_txcsum = o.csum.ip4_rxcsum = csum4
    o.csum.ip6_txcsum = o.csum.ip6_rxcsum = csum6
    if lso4_max:
        o.lsov2.ip4_encap = enc
        o.lsov2.ip4_maxsz = lso4_max
        o.lsov2.ip4_minsg = lso_min_segs
    if lso6_max:
        o.lsov2.ip6_encap = enc
        o.lsov2.ip6_maxsz = lso6_max
        o.lsov2.ip6_minsg = lso_min_segs
        o.lsov2.ip6_opts = lso6_opts
    return bytes(ffi.buffer(o))[:size]


#: the largest large send the driver ever builds (GSO_LEGACY_MAX_SIZE in Linux: gso_max_size
#: starts there and only goes down to the host's maximum, L-r ``rndis_netdev_set_hwcaps``)
LSO_LEGACY_MAX = 65536


@dataclass
class OffloadCaps:
    """What the host answers to OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES (NDIS_OFFLOAD, §4.6)."""

    ip4_tx: int = 0
    ip4_rx: int = 0
    ip6_tx: int = 0
    ip6_rx: int = 0
    lso4_encap: int = 0
    lso4_max: int = 0
    lso4_min_segs: int = 0
    lso6_encap: int = 0
    lso6_max: int = 0
    lso6_min_segs: int = 0
    lso6_opts: int = 0
    rsc_ip4: int = 0
    rsc_ip6: int = 0

    @property
    def rsc(self) -> bool:
        """The host can coalesce received TCP segments (RSC) for IPv4 and IPv6: what Linux
        requires before it offers LRO (rndis_netdev_set_hwcaps)."""
        return bool(self.rsc_ip4 and self.rsc_ip6)

    @property
    def tx_tcp4(self) -> bool:
        need = lib.NDIS_TXCSUM_CAP_TCP4 | lib.NDIS_TXCSUM_CAP_TCP4OPT
        return (self.ip4_tx & need) == need

    @property
    def tx_udp4(self) -> bool:
        return bool(self.ip4_tx & lib.NDIS_TXCSUM_CAP_UDP4)

    @property
    def tx_ip4(self) -> bool:
        return bool(self.ip4_tx & lib.NDIS_TXCSUM_CAP_IP4)

    @property
    def tx_tcp6(self) -> bool:
        # Linux: NDIS_TXCSUM_ALL_TCP6 = TCP6 | TCP6OPT (L-r rndis_netdev_set_hwcaps)
        need = lib.NDIS_TXCSUM_CAP_TCP6 | lib.NDIS_TXCSUM_CAP_TCP6OPT
        return (self.ip6_tx & need) == need

    @property
    def tx_udp6(self) -> bool:
        return bool(self.ip6_tx & lib.NDIS_TXCSUM_CAP_UDP6)

    @property
    def lso4(self) -> bool:
        """IPv4 LSOv2 usable, by Linux's rule: TCP/IPv4 checksum offload and 802.3 LSOv2
        encapsulation (L-r ``rndis_netdev_set_hwcaps``)."""
        return self.tx_tcp4 and bool(self.lso4_encap & lib.NDIS_OFFLOAD_ENCAP_8023) and self.lso4_max > 0

    @property
    def lso6(self) -> bool:
        """IPv6 LSOv2 usable: TCP/IPv6 checksum offload, 802.3 encapsulation and both IPv6
        options (extension headers, TCP options: NDIS_LSOV2_CAP_IP6), as Linux requires."""
        need = lib.NDIS_LSOV2_CAP_IP6
        return (self.tx_tcp6 and bool(self.lso6_encap & lib.NDIS_OFFLOAD_ENCAP_8023)
                and (self.lso6_opts & need) == need and self.lso6_max > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"tx_ipv4_header": self.tx_ip4, "tx_tcp4": self.tx_tcp4, "tx_udp4": self.tx_udp4,
                "tx_tcp6": self.tx_tcp6, "tx_udp6": self.tx_udp6, "lso": self.lso4 or self.lso6,
                "lso_ipv4_max": self.lso4_max if self.lso4 else 0,
                "lso_ipv6_max": self.lso6_max if self.lso6 else 0,
                "lso_min_segments": max(self.lso4_min_segs, self.lso6_min_segs),
                "rx_checksum": bool(self.ip4_rx or self.ip6_rx), "rsc": self.rsc}


def parse_ndis_offload(data: Any) -> OffloadCaps:
    raw = bytes(data)
    if len(raw) < lib.NDIS_OFFLOAD_SIZE_REV1:
        raise ProtocolError(f"NDIS_OFFLOAD of {len(raw)} bytes (need ≥ {lib.NDIS_OFFLOAD_SIZE_REV1})")
    o = _unpack("struct ndis_offload", raw)
    if o.hdr.type != lib.NDIS_OBJTYPE_OFFLOAD:
        raise ProtocolError(f"NDIS_OFFLOAD with object type {o.hdr.type:#x}")
    # the RSC fields exist from revision 3 (NDIS 6.30, @144)
    rev3 = len(raw) >= lib.NDIS_OFFLOAD_SIZE_REV3 and o.hdr.size >= lib.NDIS_OFFLOAD_SIZE_REV3
    lv = o.lsov2
    return OffloadCaps(o.csum.ip4_txcsum, o.csum.ip4_rxcsum, o.csum.ip6_txcsum, o.csum.ip6_rxcsum,
                       lv.ip4_encap, lv.ip4_maxsz, lv.ip4_minsg, lv.ip6_encap, lv.ip6_maxsz,
                       lv.ip6_minsg, lv.ip6_opts, o.rsc.ip4 if rev3 else 0, o.rsc.ip6 if rev3 else 0)


def build_offload_params(nvsp_version: int, *, tcp4: int, udp4: int, tcp6: int, udp6: int,
                         ip4: int = 1, lso4: int = 0, lso6: int = 0, rsc: int = 0) -> bytes:
    """NDIS_OFFLOAD_PARAMETERS (type 0x80, rev 3 size 28 / rev 2 size 22 for NVSP ≤ 4).
    Checksum values: 0 no change, 1 disabled, 2 TX, 3 RX, 4 TX+RX; ``lso4`` / ``lso6``
    (lso_v2_ipv4 / lso_v2_ipv6): 0 no change, 1 disabled, 2 enabled (§4.7); ``rsc`` goes to
    both rsc_ip_v4 and rsc_ip_v6 (@22, @23; only in the 28-byte form): 0 no change,
    1 disabled, 2 enabled (L-r rndis_netdev_set_hwcaps)."""
    o = ffi.new("struct ndis_offload_params *")
    o.hdr.type = lib.NDIS_OBJTYPE_DEFAULT
    if nvsp_version <= NVSP_V4:
        o.hdr.revision, o.hdr.size = 2, lib.NDIS_OFFLOAD_PARAMS_SIZE_V4
    else:
        o.hdr.revision, o.hdr.size = 3, lib.NDIS_OFFLOAD_PARAMS_SIZE
    o.ip_v4_csum = ip4
    o.tcp_ip_v4_csum = tcp4
    o.udp_ip_v4_csum = udp4
    o.tcp_ip_v6_csum = tcp6
    o.udp_ip_v6_csum = udp6
    o.lso_v2_ipv4 = lso4
    o.lso_v2_ipv6 = lso6
    if nvsp_version > NVSP_V4:
        o.rsc_ip_v4 = o.rsc_ip_v6 = rsc
    return bytes(ffi.buffer(o))[:o.hdr.size]


def lso_ppi_value(mss: int, tcp_offset: int, ipv6: bool) -> int:
    """The LSOv2 per-packet info value (§4.4; L-h ``ndis_tcp_lso_info.lso_v2_transmit``):
    MSS in bits 0-19, TCP header offset in bits 20-29, bit 30 = LSOv2, bit 31 = IPv6."""
    if not 0 < mss <= lib.LSO_V2_MAX_MSS or not 0 <= tcp_offset < 1024:
        raise ValueError(f"MSS {mss} / TCP offset {tcp_offset} out of the LSOv2 PPI's range")
    return mss | (tcp_offset << lib.LSO_V2_TCP_OFFSET_SHIFT) | lib.LSO_V2_TYPE | (lib.LSO_V2_IPV6 if ipv6 else 0)


def parse_lso_ppi(value: int) -> tuple[int, int, bool, bool]:
    """An LSOv2 PPI value → (mss, tcp_offset, ipv6, lsov2)."""
    return (value & lib.LSO_V2_MSS_MASK, (value & lib.LSO_V2_TCP_OFFSET_MASK) >> lib.LSO_V2_TCP_OFFSET_SHIFT,
            bool(value & lib.LSO_V2_IPV6), bool(value & lib.LSO_V2_TYPE))


def parse_offload_params(data: Any) -> dict[str, int]:
    raw = bytes(data)
    if len(raw) < 4:
        raise ProtocolError("NDIS_OFFLOAD_PARAMETERS shorter than its header")
    return _fields(_unpack("struct ndis_offload_params", raw), "struct ndis_offload_params")


@dataclass
class RssCaps:
    flags: int
    num_int_msg: int
    num_queues: int
    table_size: int


def build_rss_caps(num_queues: int, *, table: int = 128,
                   flags: int = lib.NDIS_RSS_CAP_TOEPLITZ | lib.NDIS_RSS_CAP_TCP_IPV4 | lib.NDIS_RSS_CAP_TCP_IPV6
                   ) -> bytes:
    c = ffi.new("struct ndis_recv_scale_cap *")
    c.hdr.type = lib.NDIS_OBJTYPE_RSS_CAPS
    c.hdr.revision = 2
    c.hdr.size = lib.NDIS_RSS_CAPS_SIZE_REV2
    c.cap_flags = flags
    c.num_int_msg = num_queues
    c.num_recv_que = num_queues
    c.num_indirect_tabent = table
    return bytes(ffi.buffer(c))


def parse_rss_caps(data: Any) -> RssCaps:
    raw = bytes(data)
    if len(raw) < lib.NDIS_RSS_CAPS_SIZE_REV1:
        raise ProtocolError(f"RSS capabilities of {len(raw)} bytes")
    c = _unpack("struct ndis_recv_scale_cap", raw)
    if c.hdr.type != lib.NDIS_OBJTYPE_RSS_CAPS:
        raise ProtocolError(f"RSS capabilities with object type {c.hdr.type:#x}")
    tab = c.num_indirect_tabent if len(raw) >= lib.NDIS_RSS_CAPS_SIZE_REV2 else 0
    return RssCaps(c.cap_flags, c.num_int_msg, c.num_recv_que, tab)


def build_rss_params(table: list[int], key: bytes = MS_RSS_KEY, *, hash_info: int = LINUX_HASH_INFO,
                     flags: int = 0) -> bytes:
    """NDIS_RECEIVE_SCALE_PARAMETERS (type 0x89 rev 2): the 40-byte struct, the u32 table at 40,
    the key after it (Linux: 128 entries, 40-byte key at 552 → 592 bytes)."""
    p = ffi.new("struct ndis_recv_scale_param *")
    base = lib.NDIS_RSS_PARAMS_SIZE
    p.hdr.type = lib.NDIS_OBJTYPE_RSS_PARAMS
    p.hdr.revision = 2
    p.hdr.size = base
    p.flags = flags
    p.hashinfo = hash_info
    p.indirect_tabsize = 4 * len(table)
    p.indirect_taboffset = base
    p.hashkey_size = len(key)
    p.hashkey_offset = base + 4 * len(table)
    return bytes(ffi.buffer(p)) + struct.pack(f"<{len(table)}I", *table) + key


@dataclass
class RssParams:
    flags: int
    hash_info: int
    table: list[int]
    key: bytes


def parse_rss_params(data: Any) -> RssParams:
    """Decode NDIS_RECEIVE_SCALE_PARAMETERS; table/key offsets are checked against the buffer."""
    raw = bytes(data)
    if len(raw) < lib.NDIS_RSS_PARAMS_SIZE:
        raise ProtocolError(f"RSS parameters of {len(raw)} bytes (need ≥ {lib.NDIS_RSS_PARAMS_SIZE})")
    p = _unpack("struct ndis_recv_scale_param", raw)
    if p.hdr.type != lib.NDIS_OBJTYPE_RSS_PARAMS:
        raise ProtocolError(f"RSS parameters with object type {p.hdr.type:#x}")
    toff, tsize = p.indirect_taboffset, p.indirect_tabsize
    koff, ksize = p.hashkey_offset, p.hashkey_size
    table: list[int] = []
    key = b""
    if tsize:
        if toff + tsize > len(raw) or tsize % 4:
            raise ProtocolError(f"RSS indirection table at {toff} (+{tsize}) outside {len(raw)} bytes")
        table = list(struct.unpack_from(f"<{tsize // 4}I", raw, toff))
    if ksize:
        if koff + ksize > len(raw):
            raise ProtocolError(f"RSS key at {koff} (+{ksize}) outside {len(raw)} bytes")
        key = raw[koff:koff + ksize]
    return RssParams(p.flags, p.hashinfo, table, key)


def toeplitz(key: bytes, data: bytes) -> int:
    """Reference Toeplitz hash (bit-serial, written from the definition)."""
    kint = int.from_bytes(key, "big")
    kbits = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if data[i // 8] & (0x80 >> (i % 8)):
            if i + 32 <= kbits:
                result ^= (kint >> (kbits - 32 - i)) & 0xFFFFFFFF
            else:
                result ^= (kint << (i + 32 - kbits)) & 0xFFFFFFFF
    return result


def send_table_from(payload: Any, nvsp_version: int = NVSP_V61) -> list[int]:
    """Decode SEND_INDIRECTION_TABLE (134): 16 u32 entries at ``offset``.  Applies Linux's
    workaround for NVSP ≤ 6 hosts, whose table sits at 40 in a ≥ 104-byte message while
    ``offset`` may say otherwise (§2.4 notes)."""
    raw = bytes(payload)
    m = parse_nvsp(raw)
    count, off = m["count"], m["offset"]
    if count != SEND_TABLE_ENTRIES:
        raise ProtocolError(f"send indirection table with {count} entries (expected 16)")
    if nvsp_version <= NVSP_V6 and len(raw) >= 4 + 36 + 64:
        off = 40
    if off < 12 or off + 64 > len(raw):
        raise ProtocolError(f"send indirection table at offset {off} outside the {len(raw)}-byte message")
    return list(struct.unpack_from("<16I", raw, off))


# ---- filters and addresses (docs/netvsc.md "Filters, MAC address, statistics") --------
FILTER_NAMES = {FILTER_DIRECTED: "directed", FILTER_MULTICAST: "multicast",
                FILTER_ALL_MULTICAST: "all-multicast", FILTER_BROADCAST: "broadcast",
                FILTER_PROMISCUOUS: "promiscuous"}


def filter_names(value: int) -> list[str]:
    """The NDIS packet-filter bits of ``value`` by name (unknown bits in hex)."""
    names = [n for bit, n in sorted(FILTER_NAMES.items()) if value & bit]
    rest = value & ~sum(FILTER_NAMES)
    return names + ([hex(rest)] if rest else [])


def kernel_filter(*, promiscuous: bool, all_multicast: bool, multicast: bool, broadcast: bool = True) -> int:
    """The packet filter Linux sends for these interface flags (L-r ``rndis_set_multicast``):
    promiscuous alone when promiscuous; else DIRECTED, plus ALL_MULTICAST when all-multicast is
    on or any multicast address is joined (the kernel never sends a multicast list), plus
    BROADCAST."""
    if promiscuous:
        return FILTER_PROMISCUOUS
    f = FILTER_DIRECTED
    if all_multicast or multicast:
        f |= FILTER_ALL_MULTICAST
    if broadcast:
        f |= FILTER_BROADCAST
    return f


def config_parameter_string(name: str, value: str) -> bytes:
    """Info buffer of SET OID_GEN_RNDIS_CONFIG_PARAMETER with a string parameter: the 20-byte
    ``rndis_config_parameter_info``, then the UTF-16LE name, then the UTF-16LE value, no
    terminators (the layout of L-r ``rndis_filter_set_device_mac``)."""
    n = name.encode("utf-16-le")
    v = value.encode("utf-16-le")
    info = ffi.new("struct rndis_config_parameter_info *")
    head = ffi.sizeof("struct rndis_config_parameter_info")
    info.name_offset = head
    info.name_length = len(n)
    info.parameter_type = lib.RNDIS_CONFIG_PARAM_TYPE_STRING
    info.value_offset = head + len(n)
    info.value_length = len(v)
    return bytes(ffi.buffer(info)) + n + v


def mac_config_parameter(mac: bytes) -> bytes:
    """The MAC change Linux sends: name "NetworkAddress", value the 12 lowercase hex digits."""
    return config_parameter_string("NetworkAddress", mac.hex())


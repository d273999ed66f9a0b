"""netvsc wire layouts (native/netvsc_wire.h through ffi) against the reference tables
(../shared/reference/netvsc.md §2.3, §2.4, §4.1, §4.3, §4.4, §4.6–4.8), and the protocol
module's builders/parsers."""

from __future__ import annotations

import socket
import struct

import pytest

from uvmbus.errors import ProtocolError
from uvmbus.native import ffi, lib
from uvmbus.netvsc import protocol as P

# (struct, field, offset) straight from the reference tables
NVSP_OFFSETS = [
    ("nvsp_init", "min_protocol_ver", 4), ("nvsp_init", "max_protocol_ver", 8),
    ("nvsp_init_complete", "negotiated_protocol_ver", 4), ("nvsp_init_complete", "max_mdl_chain_len", 8),
    ("nvsp_init_complete", "status", 12),
    ("nvsp_send_ndis_ver", "ndis_major_ver", 4), ("nvsp_send_ndis_ver", "ndis_minor_ver", 8),
    ("nvsp_send_recv_buf", "gpadl_handle", 4), ("nvsp_send_recv_buf", "id", 8),
    ("nvsp_send_recv_buf_complete", "status", 4), ("nvsp_send_recv_buf_complete", "num_sections", 8),
    ("nvsp_send_recv_buf_complete", "section", 12),
    ("nvsp_revoke_buf", "id", 4),
    ("nvsp_send_send_buf", "gpadl_handle", 4), ("nvsp_send_send_buf", "id", 8),
    ("nvsp_send_send_buf_complete", "status", 4), ("nvsp_send_send_buf_complete", "section_size", 8),
    ("nvsp_send_rndis_pkt", "channel_type", 4), ("nvsp_send_rndis_pkt", "send_buf_section_index", 8),
    ("nvsp_send_rndis_pkt", "send_buf_section_size", 12),
    ("nvsp_send_rndis_pkt_complete", "status", 4),
    ("nvsp_send_ndis_config", "mtu", 4), ("nvsp_send_ndis_config", "reserved", 8),
    ("nvsp_send_ndis_config", "capability", 12),
    ("nvsp_vf_association", "allocated", 4), ("nvsp_vf_association", "serial", 8),
    ("nvsp_switch_data_path", "active_datapath", 4),
    ("nvsp_oid_query_ex", "oid", 8), ("nvsp_oid_query_ex_complete", "status", 4),
    ("nvsp_oid_query_ex_complete", "bytes", 8),
    ("nvsp_subchannel_request", "op", 4), ("nvsp_subchannel_request", "num_subchannels", 8),
    ("nvsp_subchannel_complete", "status", 4), ("nvsp_subchannel_complete", "num_subchannels", 8),
    ("nvsp_send_indirection_table", "count", 4), ("nvsp_send_indirection_table", "offset", 8),
]

RNDIS_SIZES = [
    ("rndis_initialize_request", 24), ("rndis_initialize_complete", 52), ("rndis_halt_request", 12),
    ("rndis_query_request", 28), ("rndis_query_complete", 24), ("rndis_set_request", 28),
    ("rndis_set_complete", 16), ("rndis_indicate_status", 20), ("rndis_keepalive_request", 12),
    ("rndis_keepalive_complete", 16), ("rndis_packet", 44), ("rndis_reset_complete", 16),
]

PACKET_OFFSETS = [("data_offset", 8), ("data_len", 12), ("oob_data_offset", 16), ("oob_data_len", 20),
                  ("num_oob_data_elements", 24), ("per_pkt_info_offset", 28), ("per_pkt_info_len", 32),
                  ("vc_handle", 36), ("reserved", 40)]


@pytest.mark.parametrize("struct_name,field,offset", NVSP_OFFSETS)
def test_nvsp_field_offsets(struct_name, field, offset):
    assert ffi.offsetof(f"struct {struct_name}", field) == offset


def test_nvsp_sizes():
    assert ffi.sizeof("struct nvsp_message") == 40          # v6.1 message size (§2.3)
    assert lib.NVSP_MSG_SIZE_V1 == 28 and lib.NVSP_MSG_SIZE_V61 == 40
    assert ffi.sizeof("struct nvsp_send_recv_buf_complete") == 28
    assert ffi.offsetof("struct nvsp_send_recv_buf_complete", "section") + \
        ffi.offsetof("struct nvsp_recv_buf_section", "sub_alloc_size") == 16
    assert ffi.offsetof("struct nvsp_recv_buf_section", "end_offset") == 12


@pytest.mark.parametrize("struct_name,size", RNDIS_SIZES)
def test_rndis_sizes(struct_name, size):
    assert ffi.sizeof(f"struct {struct_name}") == size


@pytest.mark.parametrize("field,offset", PACKET_OFFSETS)
def test_rndis_packet_offsets(field, offset):
    assert ffi.offsetof("struct rndis_packet", field) == offset


def test_ndis_object_layouts():
    assert ffi.sizeof("struct ndis_offload") == 156
    for f, off in (("csum", 4), ("lsov1", 36), ("ipsecv1", 52), ("lsov2", 80), ("flags", 108),
                   ("ipsecv2", 112), ("rsc", 144), ("encap_gre", 148)):
        assert ffi.offsetof("struct ndis_offload", f) == off, f
    assert ffi.sizeof("struct ndis_offload_params") == 28
    for f, off in (("ip_v4_csum", 4), ("udp_ip_v6_csum", 8), ("lso_v2_ipv6", 12), ("flags", 16),
                   ("ipsec_v2", 20), ("rsc_ip_v4", 22), ("encapsulation_types", 25)):
        assert ffi.offsetof("struct ndis_offload_params", f) == off, f
    assert ffi.sizeof("struct ndis_recv_scale_cap") == 18
    assert ffi.offsetof("struct ndis_recv_scale_cap", "num_indirect_tabent") == 16
    assert ffi.sizeof("struct ndis_recv_scale_param") == 40
    for f, off in (("flags", 4), ("base_cpu_number", 6), ("hashinfo", 8), ("indirect_tabsize", 12),
                   ("indirect_taboffset", 16), ("hashkey_size", 20), ("hashkey_offset", 24),
                   ("processor_masks_offset", 28), ("num_processor_masks", 32),
                   ("processor_masks_entry_size", 36)):
        assert ffi.offsetof("struct ndis_recv_scale_param", f) == off, f
    assert ffi.sizeof("struct rndis_ppi_u32") == 16 and ffi.sizeof("struct rndis_ppi") == 12


def test_constants_from_the_reference():
    assert [lib.NVSP_PROTOCOL_VERSION_1, lib.NVSP_PROTOCOL_VERSION_2, lib.NVSP_PROTOCOL_VERSION_4,
            lib.NVSP_PROTOCOL_VERSION_5, lib.NVSP_PROTOCOL_VERSION_6, lib.NVSP_PROTOCOL_VERSION_61] == \
        [0x2, 0x30002, 0x40000, 0x50000, 0x60000, 0x60001]
    assert (lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT, lib.NVSP_MSG2_TYPE_SEND_NDIS_CONFIG,
            lib.NVSP_MSG5_TYPE_SUBCHANNEL, lib.NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE) == (107, 125, 133, 134)
    assert lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES == 0xFC01020D
    assert lib.OID_GEN_RECEIVE_SCALE_PARAMETERS == 0x00010204
    assert lib.RNDIS_STATUS_MEDIA_DISCONNECT == 0x4001000C
    assert lib.NVSP_MAX_PACKETS_PER_RECEIVE == 375
    assert P.NVSP_VERSIONS[0] == P.NVSP_V61 and P.NVSP_VERSIONS[-1] == P.NVSP_V1


def test_requests_are_40_bytes_with_fields_in_place():
    for msg in (P.nvsp_init(P.NVSP_V5), P.nvsp_ndis_config(1514, 8), P.nvsp_ndis_version(6, 30),
                P.nvsp_send_recv_buf(0xE1E10), P.nvsp_send_send_buf(0xE1E11), P.nvsp_rndis_pkt(1, 3, 100),
                P.nvsp_subchannel_request(3), P.nvsp_revoke(P.MSG_REVOKE_RECV_BUF, 0xCAFE)):
        assert len(msg) == 40
    assert struct.unpack_from("<III", P.nvsp_init(P.NVSP_V5)) == (1, 0x50000, 0x50000)
    assert struct.unpack_from("<IIIQ", P.nvsp_ndis_config(1514, 0x28)) == (125, 1514, 0, 0x28)
    assert struct.unpack_from("<IIH", P.nvsp_send_recv_buf(0xE1E10)) == (101, 0xE1E10, 0xCAFE)
    assert struct.unpack_from("<IIII", P.nvsp_rndis_pkt(1, 3, 100)) == (107, 1, 3, 100)
    assert P.ndis_version_for(P.NVSP_V4) == (6, 1) and P.ndis_version_for(P.NVSP_V5) == (6, 30)


def test_rndis_requests_and_parse():
    q = P.rndis_query(7, P.OID_GEN_LINK_SPEED, b"\x01\x02")
    mtype, mlen, rid, oid, blen, boff = struct.unpack_from("<6I", q)
    assert (mtype, mlen, rid, oid, blen, boff) == (4, 30, 7, P.OID_GEN_LINK_SPEED, 2, 20)
    assert q[28:30] == b"\x01\x02"                  # input at byte 8 + 20
    init = P.rndis_init(1)
    assert struct.unpack("<6I", init) == (2, 24, 1, 1, 0, 0x4000)
    c = P.parse_rndis(P.rndis_query_complete(9, 0, b"abcdef"))
    assert (c.name, c.req_id, c.status, c.info) == ("QUERY_CMPLT", 9, 0, b"abcdef")
    assert struct.unpack_from("<I", P.rndis_query_complete(9, 0, b"x"), 20)[0] == 16
    ind = P.parse_rndis(P.rndis_indicate_status(P.ST_LINK_SPEED_CHANGE, struct.pack("<I", 100)))
    assert ind.status == P.ST_LINK_SPEED_CHANGE and ind.info == struct.pack("<I", 100)
    ic = P.parse_rndis(P.rndis_init_complete(3))
    assert ic.fields["max_pkt_per_msg"] == 8 and ic.fields["pkt_alignment_factor"] == 3


@pytest.mark.parametrize("raw,why", [
    (b"\x04\x00\x00\x80\x04\x00\x00\x00", "msg_len < 8"),
    (struct.pack("<II", 0x80000004, 200) + bytes(20), "claims more than available"),
    (struct.pack("<6I", 0x80000004, 24, 1, 0, 8, 4), "buffer offset inside the fixed part"),
    (struct.pack("<6I", 0x80000004, 24, 1, 0, 100, 16), "buffer beyond the message"),
    (struct.pack("<5I", 0x80000004, 20, 1, 0, 0), "shorter than its fixed part"),
])
def test_rndis_parse_rejects(raw, why):
    with pytest.raises(ProtocolError):
        P.parse_rndis(raw)


def test_rndis_packet_round_trip_with_ppis():
    frame = bytes(range(60))
    ppis = P.ppi_u32(P.PPI_IEEE_8021Q, P.vlan_ppi_value(0x6064)) + P.ppi_u32(P.PPI_TCPIP_CHKSUM, 0x28)
    msg = P.rndis_packet(frame, ppis, pad_to=8)
    assert len(msg) % 8 == 0
    d = struct.unpack_from("<9I", msg, 4)
    assert d[1] == 36 + 32 and d[2] == 60 and d[6] == 36 and d[7] == 32
    rx = P.parse_rndis_packet(msg)
    assert rx.frame == frame and P.vlan_tci(rx.ppis[P.PPI_IEEE_8021Q]) == 0x6064
    assert rx.ppis[P.PPI_TCPIP_CHKSUM] == 0x28
    with pytest.raises(ProtocolError):
        P.parse_rndis_packet(msg[:50])


def test_rss_params_layout_like_linux():
    table = [i % 4 for i in range(128)]
    raw = P.build_rss_params(table)
    assert len(raw) == 592                           # 40 + 512 + 40 (§4.8)
    hdr = struct.unpack_from("<BBHHHIH", raw)
    assert hdr[:3] == (0x89, 2, 40)
    assert struct.unpack_from("<I", raw, 16)[0] == 40 and struct.unpack_from("<I", raw, 24)[0] == 552
    back = P.parse_rss_params(raw)
    assert back.table == table and back.key == P.MS_RSS_KEY and back.hash_info == 0x1701
    with pytest.raises(ProtocolError):
        P.parse_rss_params(raw[:100])


def test_offload_objects():
    caps = P.parse_ndis_offload(P.build_ndis_offload(0x155, 0x54))
    assert caps.tx_tcp4 and caps.tx_udp4 and caps.tx_ip4 and caps.tx_tcp6 and caps.tx_udp6
    assert len(P.ndis_offload_query_input(P.NVSP_V5)) == 156
    assert len(P.ndis_offload_query_input(P.NVSP_V4)) == 144
    assert len(P.ndis_offload_query_input(P.NVSP_V2)) == 112
    p5 = P.build_offload_params(P.NVSP_V5, tcp4=4, udp4=4, tcp6=4, udp6=4)
    p4 = P.build_offload_params(P.NVSP_V4, tcp4=4, udp4=0, tcp6=4, udp6=0)
    assert len(p5) == 28 and p5[:4] == bytes([0x80, 3, 28, 0]) and p5[4:9] == bytes([1, 4, 4, 4, 4])
    assert len(p4) == 22 and p4[1] == 2
    rc = P.parse_rss_caps(P.build_rss_caps(8))
    assert (rc.num_queues, rc.table_size) == (8, 128)


def test_toeplitz_microsoft_verification_vectors():
    """The RSS verification suite's first IPv4 entry: 66.9.149.187:2794 -> 161.142.100.80:1766."""
    ips = socket.inet_aton("66.9.149.187") + socket.inet_aton("161.142.100.80")
    ports = struct.pack(">HH", 2794, 1766)
    assert P.toeplitz(P.MS_RSS_KEY, ips) == 0x323E8FC2
    assert P.toeplitz(P.MS_RSS_KEY, ips + ports) == 0x51CCC178
    assert lib.uvb_nvsp_toeplitz(P.MS_RSS_KEY, ips, 8) == 0x323E8FC2
    assert lib.uvb_nvsp_toeplitz(P.MS_RSS_KEY, ips + ports, 12) == 0x51CCC178


def test_send_table_decoding():
    table = list(range(16))
    o = struct.pack("<III", 134, 16, 12) + struct.pack("<16I", *table)     # reference host: 76 bytes
    assert P.send_table_from(o) == table
    bug = struct.pack("<III", 134, 16, 12).ljust(40, b"\0") + struct.pack("<16I", *table)
    assert P.send_table_from(bug, P.NVSP_V6) == table                       # table at 40 (§2.4 notes)
    assert P.send_table_from(o, P.NVSP_V6) == table
    with pytest.raises(ProtocolError):
        P.send_table_from(struct.pack("<III", 134, 8, 12) + bytes(32))

"""VSTOR wire layouts (native/storvsc_wire.h through cffi) against the reference tables of
storvsc_ic.md §2.2-§2.4 and §3.1, plus the protocol module's packet helpers and the SCSI
CDB builders/parsers against hand-written bytes."""

from __future__ import annotations

import struct

import pytest

from uvmbus.errors import (
    DataProtect,
    IllegalRequest,
    MediumError,
    NotReady,
    ProtocolError,
    ScsiError,
    UnitAttention,
)
from uvmbus.native import ffi, lib
from uvmbus.storvsc import protocol as P
from uvmbus.storvsc import scsi

# §2.3: (field, offset relative to the union, size); packet offset = +12
SRB_TABLE = [
    ("length", 0, 2), ("srb_status", 2, 1), ("scsi_status", 3, 1), ("port_number", 4, 1),
    ("path_id", 5, 1), ("target_id", 6, 1), ("lun", 7, 1), ("cdb_length", 8, 1),
    ("sense_info_length", 9, 1), ("data_in", 10, 1), ("reserved", 11, 1),
    ("data_transfer_length", 12, 4), ("payload", 16, 20), ("reserve", 36, 2),
    ("queue_tag", 38, 1), ("queue_action", 39, 1), ("srb_flags", 40, 4),
    ("time_out_value", 44, 4), ("queue_sort_key", 48, 4),
]


def test_vstor_packet_is_64_bytes_with_12_byte_header():
    assert ffi.sizeof("struct vstor_packet") == 64 == P.PACKET_SIZE
    assert ffi.offsetof("struct vstor_packet", "operation") == 0
    assert ffi.offsetof("struct vstor_packet", "flags") == 4
    assert ffi.offsetof("struct vstor_packet", "status") == 8
    assert ffi.offsetof("struct vstor_packet", "u") == 12
    assert ffi.sizeof("union vstor_body") == 52
    assert lib.VSTOR_MAX_PKT_SIZE == 16 + 64


@pytest.mark.parametrize("name,off,size", SRB_TABLE)
def test_vmscsi_request_layout(name, off, size):
    assert ffi.offsetof("struct vstor_srb", name) == off
    assert ffi.sizeof(ffi.typeof("struct vstor_srb").fields[[f[0] for f in ffi.typeof(
        "struct vstor_srb").fields].index(name)][1].type) == size


def test_srb_sizes_v1_v2():
    assert ffi.sizeof("struct vstor_srb") == 0x34 == P.SRB_LEN_V2
    assert ffi.offsetof("struct vstor_srb", "reserve") == 0x24 == P.SRB_LEN_V1   # win8 extension
    assert P.SENSE_SIZE == 0x14 and lib.VSTOR_SENSE_SIZE_PRE_WIN8 == 0x12
    assert P.MAX_CDB_LEN == 16


def test_other_union_members():
    assert ffi.sizeof("struct vstor_protocol_version") == 4
    assert ffi.offsetof("struct vstor_protocol_version", "revision") == 2
    props = "struct vstor_channel_properties"
    assert ffi.sizeof(props) == 24
    assert [ffi.offsetof(props, f) for f in ("reserved", "max_channel_cnt", "reserved1", "flags",
                                             "max_transfer_bytes", "reserved2")] == [0, 4, 6, 8, 12, 16]
    assert ffi.sizeof("struct vstor_fc_wwn") == 36
    assert ffi.offsetof("union vstor_body", "sub_channel_count") == 0


def test_operation_codes_and_versions():
    assert [P.Op.COMPLETE_IO, P.Op.REMOVE_DEVICE, P.Op.EXECUTE_SRB, P.Op.RESET_LUN,
            P.Op.RESET_ADAPTER, P.Op.RESET_BUS, P.Op.BEGIN_INITIALIZATION,
            P.Op.END_INITIALIZATION, P.Op.QUERY_PROTOCOL_VERSION, P.Op.QUERY_PROPERTIES,
            P.Op.ENUMERATE_BUS, P.Op.FCHBA_DATA, P.Op.CREATE_SUB_CHANNELS,
            P.Op.EVENT_NOTIFICATION] == list(range(1, 15))
    assert [int(v) for v in P.GUEST_VERSIONS[:3]] == [0x0602, 0x0600, 0x0501]
    assert set(P.HOST_VERSIONS_OPENVMM) == {0x0200, 0x0402, 0x0501, 0x0600}
    assert P.NtStatus.REVISION_MISMATCH == 0xC0000059
    assert P.NtStatus.IO_DEVICE_ERROR == 0xC0000185
    assert P.version_name(0x0602) == "6.2"


def test_gpa_direct_framing_section_3_1():
    # one range with N pfns: offset8 = 4 + N, pfns at 32, vstor packet at 32 + 8N
    assert ffi.sizeof("struct vmgpa_direct_header") == 24
    assert ffi.sizeof("struct vmgpa_range") == 8


@pytest.mark.parametrize("req,reply", [(48, 48), (50, 50), (56, 56), (64, 64), (72, 64), (12, 12)])
def test_reply_size_rule(req, reply):
    # §5.1 reply = 12 + min(len - 12, 52) (the unit test's 50 -> 56 is after ring padding)
    assert P.reply_size(req) == reply


def test_srb_to_ntstatus_table():
    S, N = P.SrbStatus, P.NtStatus
    assert P.ntstatus_for_srb(S.SUCCESS) == 0
    assert P.ntstatus_for_srb(S.SUCCESS | 0x80) == 0
    assert P.ntstatus_for_srb(S.BUSY) == N.DEVICE_BUSY
    for s in (S.INVALID_LUN, S.INVALID_TARGET_ID, S.NO_DEVICE, S.NO_HBA):
        assert P.ntstatus_for_srb(s) == N.DEVICE_DOES_NOT_EXIST
    assert P.ntstatus_for_srb(S.TIMEOUT) == P.ntstatus_for_srb(S.COMMAND_TIMEOUT) == N.IO_TIMEOUT
    assert P.ntstatus_for_srb(S.SELECTION_TIMEOUT) == N.DEVICE_NOT_CONNECTED
    assert P.ntstatus_for_srb(S.BAD_FUNCTION) == N.INVALID_DEVICE_REQUEST
    assert P.ntstatus_for_srb(S.DATA_OVERRUN) == N.BUFFER_OVERFLOW
    assert P.ntstatus_for_srb(S.REQUEST_FLUSHED) == N.UNSUCCESSFUL
    assert P.ntstatus_for_srb(S.ABORTED) == N.CANCELLED
    assert P.ntstatus_for_srb(S.ERROR) == P.ntstatus_for_srb(S.INVALID_REQUEST) == N.IO_DEVICE_ERROR


def test_build_and_parse_packets():
    pkt = P.build_packet(P.Op.QUERY_PROTOCOL_VERSION, body=P.version_body(0x0600))
    assert len(pkt) == 64
    assert pkt[:12] == struct.pack("<III", 9, 1, 0)
    assert pkt[12:16] == b"\x00\x06\x00\x00"
    parsed = P.parse_packet(pkt)
    assert parsed.operation == 9 and parsed.version() == 0x0600
    with pytest.raises(ProtocolError):
        P.parse_packet(b"\x01" * 11)
    props = P.ChannelProperties(max_channel_count=4, flags=1, max_transfer_bytes=0x40000)
    body = props.to_bytes()
    assert body[4:6] == b"\x04\x00" and body[8:12] == b"\x01\x00\x00\x00"
    assert body[12:16] == b"\x00\x00\x04\x00"
    assert P.ChannelProperties.from_bytes(body) == props and props.multi_channel


def test_srb_packet_round_trip():
    srb = P.Srb(cdb=scsi.read16(5, 8), data_in=P.DataIn.READ, data_transfer_length=4096, lun=3,
                srb_flags=0x48)
    raw = P.build_srb_packet(srb)
    assert len(raw) == 64
    assert raw[12:14] == b"\x34\x00" and raw[19] == 3 and raw[20] == 16 and raw[22] == 1
    assert raw[24:28] == (4096).to_bytes(4, "little")
    assert raw[28] == 0x88
    back = P.parse_srb(raw[12:])
    assert back.lun == 3 and back.data_transfer_length == 4096 and back.payload[:16] == scsi.read16(5, 8)
    # a pre-Win8 36-byte SRB parses with a zero Win8 extension
    short = P.parse_srb(raw[12:12 + 36])
    assert short.srb_flags == 0 and short.data_transfer_length == 4096


def test_cdb_builders_bytes():
    assert scsi.read16(0x0102030405060708, 0x10, fua=True) == bytes.fromhex(
        "88 08 0102030405060708 00000010 00 00")
    assert scsi.write16(1, 2) == bytes.fromhex("8a 00 0000000000000001 00000002 0000")
    assert scsi.read10(0x01020304, 0x0506) == bytes.fromhex("28 00 01020304 00 0506 00")
    assert scsi.inquiry(0x60, evpd=True, page=0x83) == bytes.fromhex("12 01 83 0060 00")
    assert scsi.report_luns(0x1000) == bytes.fromhex("a0 00 00 000000 00001000 00 00")
    assert scsi.read_capacity16() == bytes.fromhex("9e 10 0000000000000000 00000020 00 00")
    assert scsi.synchronize_cache16() == bytes.fromhex("91 00 0000000000000000 00000000 0000")
    assert scsi.unmap(24) == bytes.fromhex("42 00 00000000 00 0018 00")
    assert scsi.unmap_parameters([(7, 9)]) == bytes.fromhex(
        "0016 0010 00000000 0000000000000007 00000009 00000000")
    assert scsi.test_unit_ready() == bytes(6)
    assert len(scsi.mode_sense10(0x08)) == 10


def test_response_parsers():
    std = bytes([0x00, 0x00, 0x05, 0x02, 99, 0, 0, 0x02]) + b"Msft    " + b"Virtual Disk    " + b"1.0 "
    inq = scsi.parse_inquiry(std + bytes(68))
    assert inq.present and inq.vendor == "Msft" and inq.product == "Virtual Disk"
    assert inq.revision == "1.0" and inq.cmdque and inq.version == 5
    absent = scsi.parse_inquiry(bytes([0x7F, 0, 5, 2, 99]))
    assert not absent.present
    assert scsi.parse_vpd_supported(bytes([0, 0, 0, 3, 0x00, 0x80, 0x83])) == [0, 0x80, 0x83]
    rl = struct.pack(">I4x", 16) + scsi.encode_lun(0) + scsi.encode_lun(300)
    assert scsi.parse_report_luns(rl) == [0, 300]
    cap = scsi.parse_read_capacity16(struct.pack(">QIBBB", 2047, 512, 0, 3, 0x80) + bytes(17))
    assert cap.blocks == 2048 and cap.size == 2048 * 512 and cap.lbppbe == 3 and cap.lbpme
    with pytest.raises(ProtocolError):
        scsi.parse_read_capacity16(bytes(8))
    bl = bytes([0, 0xB0, 0, 0x3C]) + bytes(4) + struct.pack(">I", 512) + bytes(8) + \
        struct.pack(">II", 0x1000, 256) + bytes(32)
    limits = scsi.parse_vpd_block_limits(bl)
    assert limits.max_transfer_blocks == 512 and limits.max_unmap_blocks == 0x1000
    assert limits.max_unmap_descriptors == 256
    lbp = scsi.parse_vpd_lbp(bytes([0, 0xB2, 0, 4, 0, 0x80, 2, 0]))
    assert lbp.lbpu and not lbp.lbpws and lbp.provisioning_type == 2
    assert scsi.parse_vpd_rotation_rate(bytes([0, 0xB1, 0, 0x3C, 0, 1]) + bytes(58)) == 1
    ids = scsi.parse_vpd_device_ids(bytes([0, 0x83, 0, 12, 2, 1, 0, 8]) + b"MSFT    ")
    assert ids[0].type == 1 and ids[0].text == "MSFT"
    with pytest.raises(ProtocolError):
        scsi.parse_vpd_serial(bytes([0, 0x83, 0, 0]))   # wrong page


@pytest.mark.parametrize("key,cls", [(2, NotReady), (3, MediumError), (4, MediumError),
                                     (5, IllegalRequest), (6, UnitAttention), (7, DataProtect),
                                     (0xB, ScsiError)])
def test_sense_to_exception(key, cls):
    fixed = bytearray(18)
    fixed[0], fixed[2], fixed[7], fixed[12], fixed[13] = 0x70, key, 10, 0x11, 0x00
    s = scsi.parse_sense(bytes(fixed))
    assert s is not None and (s.key, s.asc, s.ascq) == (key, 0x11, 0)
    exc = scsi.sense_exception(s, "READ(16)", srb_status=0x84, scsi_status=2)
    assert type(exc) is cls and exc.sense_key == key and exc.asc == 0x11 and exc.srb_status == 0x84
    desc = bytes([0x72, key, 0x24, 0x00])
    d = scsi.parse_sense(desc)
    assert d is not None and (d.key, d.asc) == (key, 0x24)


def test_native_sense_decoder_agrees():
    k, a, q = ffi.new("uint8_t *"), ffi.new("uint8_t *"), ffi.new("uint8_t *")
    fixed = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x02])
    assert lib.uvb_stor_sense(fixed, len(fixed), k, a, q) == 1 and (k[0], a[0], q[0]) == (3, 0x11, 2)
    assert lib.uvb_stor_sense(b"\x00" * 18, 18, k, a, q) == 0


def test_opcode_enum_is_the_headers_scsi_op_table():
    """storvsc_wire.h's SCSI_OP_* are the one definition: the driver's Opcode enum names exactly
    them, and the trace decoder (which may not import the driver) names the same ones."""
    from uvmbus.trace import decode

    header = {n.removeprefix("SCSI_OP_"): getattr(lib, n) for n in dir(lib) if n.startswith("SCSI_OP_")}
    assert {o.name: int(o) for o in scsi.Opcode} == header
    assert decode.SCSI_OPS == {v: k for k, v in header.items()}
    assert decode.scsi_name(0x28) == "READ10" and decode.scsi_name(0xFE) == "SCSI_0xfe"

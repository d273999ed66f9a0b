"""IC wire layouts (native/ic_wire.h through cffi) against storvsc_ic.md §7, and version
negotiation exactly as the kernel's vmbus_prep_negotiate_resp."""

from __future__ import annotations

import struct

import pytest
from ichelpers import ic_packet, negotiate_body, negotiated, reply_fields

from uvmbus.ic import wire
from uvmbus.ic.framework import IcService, negotiate_in_place
from uvmbus.ic.heartbeat import HeartbeatService


@pytest.mark.parametrize("name,size", [
    ("ic_pipe_hdr", 8), ("ic_msg_hdr", 20), ("ic_negotiate", 8), ("ic_heartbeat", 40),
    ("ic_shutdown", 2060), ("ic_timesync", 25), ("ic_timesync_ref", 22), ("ic_kvp_hdr", 4),
    ("ic_kvp_value", 2572), ("ic_kvp_msg_value", 2576), ("ic_kvp_msg_enumerate", 2580),
    ("ic_kvp_msg_delete", 520), ("ic_kvp_ipaddr_value", 7426), ("ic_kvp_ip_msg", 7428),
    ("ic_fcopy_hdr", 36), ("ic_fcopy_start", 1088), ("ic_fcopy_write", 6196),
])
def test_struct_sizes(name, size):
    assert wire.sizeof(name) == size


@pytest.mark.parametrize("struct_name,field,off", [
    ("ic_msg_hdr", "icmsgtype", 4), ("ic_msg_hdr", "icvermsg", 6), ("ic_msg_hdr", "icmsgsize", 10),
    ("ic_msg_hdr", "status", 12), ("ic_msg_hdr", "ictransaction_id", 16), ("ic_msg_hdr", "icflags", 17),
    ("ic_shutdown", "flags", 8), ("ic_shutdown", "display_message", 12),
    ("ic_timesync_ref", "flags", 16), ("ic_kvp_value", "key", 12), ("ic_kvp_value", "value", 524),
    ("ic_kvp_msg_enumerate", "data", 8), ("ic_kvp_msg_delete", "key", 8),
    ("ic_kvp_ipaddr_value", "addr_family", 256), ("ic_kvp_ipaddr_value", "ip_addr", 258),
    ("ic_fcopy_start", "file_name", 36), ("ic_fcopy_start", "path_name", 556),
    ("ic_fcopy_start", "copy_flags", 1076), ("ic_fcopy_start", "file_size", 1080),
    ("ic_fcopy_write", "offset", 40), ("ic_fcopy_write", "size", 48), ("ic_fcopy_write", "data", 52),
])
def test_field_offsets(struct_name, field, off):
    assert wire.offsetof(struct_name, field) == off


def test_constants():
    assert wire.HDR_SIZE == 28 and wire.REQUEST_FLAGS == 3 and wire.RESPONSE_FLAGS == 5
    assert wire.Status.S_CONT == 0x80070103 and wire.Status.ALREADY_EXISTS == 0x80070050
    assert wire.Status.DISK_FULL == 0x80070070 and wire.Status.E_FAIL == 0x80004005


def _nego(fw, msg, gfw=((3, 0), (1, 0)), gmsg=((3, 2), (3, 1), (3, 0), (1, 0)), extra=0):
    buf = bytearray(ic_packet(0, negotiate_body(list(fw), list(msg)) + bytes(extra)))
    got = negotiate_in_place(buf, gfw, gmsg)
    return got, buf


def test_negotiate_picks_guest_preference_among_host_offers():
    # an OpenVMM-like host offers fw [1.0, 3.0], shutdown [1.0, 3.0, 3.1, 3.2]
    got, buf = _nego([(1, 0), (3, 0)], [(1, 0), (3, 0), (3, 1), (3, 2)])
    assert got == ((3, 0), (3, 2))
    assert negotiated(buf) == (1, 1, (3, 0), (3, 2))
    assert reply_fields(buf)["icmsgsize"] == 16


def test_negotiate_old_host():
    got, buf = _nego([(1, 0)], [(1, 0)])
    assert got == ((1, 0), (1, 0)) and negotiated(buf)[:2] == (1, 1)


def test_negotiate_no_common_framework_or_message():
    got, buf = _nego([(2, 0)], [(3, 0)])
    assert got is None
    fc, mc, v0, v1 = negotiated(buf)
    # the kernel's reply: counts 0/0, entries (fc count, 0) and (mc count, 0)
    assert (fc, mc) == (0, 0) and v0 == (1, 0) and v1 == (1, 0)
    got, buf = _nego([(3, 0)], [(9, 9)])
    assert got is None and negotiated(buf)[:3] == (0, 0, (3, 0))


def test_negotiate_refuses_counts_over_100_and_lists_past_the_packet():
    body = struct.pack("<HHI", 101, 1, 0) + struct.pack("<HH", 3, 0) * 102
    buf = bytearray(ic_packet(0, body))
    assert negotiate_in_place(buf, ((3, 0),), ((3, 0),)) is None
    body = struct.pack("<HHI", 2, 2, 0) + struct.pack("<HH", 3, 0)   # claims 4, holds 1
    buf = bytearray(ic_packet(0, body))
    assert negotiate_in_place(buf, ((3, 0),), ((3, 0),)) is None
    assert len(buf) == 28 + 12                                        # nothing written past it


def test_negotiate_too_short_for_counts():
    buf = bytearray(ic_packet(0, b"\x01\x00"))
    assert negotiate_in_place(buf, ((3, 0),), ((3, 0),)) is None


def test_service_reply_same_length_flags_and_status():
    s = HeartbeatService()
    pkt = ic_packet(0, negotiate_body([(1, 0), (3, 0)], [(1, 0), (3, 0)]) + bytes(5))
    r = s.handle(pkt)
    assert r is not None and len(r.data) == len(pkt)
    f = reply_fields(r.data)
    assert f["flags"] == 5 and f["status"] == 0 and f["txid"] == 0
    assert s.message_version == (3, 0) and s.framework_version == (3, 0)
    # failure: E_FAIL, counts 0/0
    r = s.handle(ic_packet(0, negotiate_body([(7, 0)], [(3, 0)])))
    assert reply_fields(r.data)["status"] == wire.Status.E_FAIL


def test_short_and_foreign_messages():
    s = HeartbeatService()
    assert s.handle(b"\x01" * 27) is None                 # shorter than the IC header: dropped
    assert s.handle(ic_packet(1, b"\x01\x02")) is None    # heartbeat without its seq: dropped
    r = s.handle(ic_packet(3, bytes(2060)))               # a shutdown message on heartbeat
    assert r is not None and reply_fields(r.data)["status"] == wire.Status.E_FAIL
    assert s.counters["dropped_short"] == 2 and s.counters["unknown_type"] == 1


def test_service_bug_answers_e_fail():
    class Broken(IcService):
        name, msgtype, message_versions = "broken", 1, ((3, 0),)

        def on_message(self, body):
            raise RuntimeError("bug")
    r = Broken().handle(ic_packet(1, bytes(8)))
    assert r is not None and reply_fields(r.data)["status"] == wire.Status.E_FAIL

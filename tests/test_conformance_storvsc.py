"""Conformance of the storvsc guest's wire packets with ../shared/reference/storvsc_ic.md.

The guest's C fast path (``uvb_stor_submit``, through :class:`uvmbus.storvsc.queue.IoQueue`)
writes into an in-memory ring; the host side of the same ring is read back and every field is
decoded here with ``struct`` from the reference tables — no simulator, no shared helpers:

* §2.2 / §10.1: every request is a 64-byte VSTOR packet, header flags = REQUEST_COMPLETION;
* §2.9: vm_srb.length 0x34, sense_info_length 0x14, time_out_value 60, srb_flags
  DISABLE_SYNCH_TRANSFER (+ QUEUE_ACTION_ENABLE | NO_QUEUE_FREEZE with queue_tag 0xFF and
  queue_action 0x20 when tagged), direction flags DATA_IN 0x40 / DATA_OUT 0x80, data_in
  1 / 0 / 2, data_transfer_length = buffer length and 0 without a buffer; trans_id never 0;
* §3.1: a request with data is a GPA-direct packet (type 9, completion requested) with one
  range {byte_count, byte_offset, pfn[N]}, offset8 = 4 + N, followed by the 64-byte packet;
  without data it is an in-band packet (type 6), completion requested.
"""

from __future__ import annotations

import mmap
import struct

import pytest

from uvmbus.channel import Channel
from uvmbus.native import ffi, lib
from uvmbus.ring import RingPair
from uvmbus.storvsc.queue import IoQueue

RING = 256 * 1024
READ16, WRITE16, TUR = 0x88, 0x8A, 0x00
DISABLE_SYNCH, QUEUE_ACTION, NO_QUEUE_FREEZE, DATA_IN, DATA_OUT = 0x8, 0x2, 0x100, 0x40, 0x80


@pytest.fixture
def rings():
    mm = mmap.mmap(-1, 2 * RING)
    RingPair.init_memory(mm, RING)
    guest = RingPair.attach(mm, RING, 4096, role="guest")
    host = RingPair.attach(mm, RING, 4096, role="host")
    ch = Channel(guest, relid=1, name="conformance")
    yield ch, host
    ch.close()
    host.close()
    mm.close()


def decode(pkt) -> dict:
    """One guest packet, decoded from the reference tables."""
    raw = bytes(pkt.payload)
    op, flags, status = struct.unpack_from("<III", raw)
    (length, srb_status, scsi_status, port, path, target, lun, cdb_len, sense_len, data_in,
     reserved, dtl) = struct.unpack_from("<HBBBBBBBBBBI", raw, 12)
    cdb = raw[28:28 + 16]
    reserve, queue_tag, queue_action, srb_flags, timeout, sort_key = struct.unpack_from("<HBBIII", raw, 48)
    out = dict(type=pkt.type, flags=pkt.flags, trans_id=pkt.trans_id, payload_len=len(raw),
               op=op, hdr_flags=flags, status=status, length=length, lun=lun, cdb_len=cdb_len,
               sense_len=sense_len, data_in=data_in, dtl=dtl, cdb=cdb, queue_tag=queue_tag,
               queue_action=queue_action, srb_flags=srb_flags, timeout=timeout)
    if pkt.type == lib.VMBUS_PKT_GPA_DIRECT:
        h = bytes(pkt.header)
        rsvd, count, byte_count, byte_offset = struct.unpack_from("<IIII", h)
        npfn = (byte_offset + byte_count + 4095) // 4096
        out.update(range_count=count, byte_count=byte_count, byte_offset=byte_offset,
                   pfns=list(struct.unpack_from(f"<{npfn}Q", h, 16)), header_len=16 + len(h),
                   gpa_reserved=rsvd)
    return out


def submit(q: IoQueue, **fields) -> None:
    r = q.reqs[0]
    ffi.memmove(ffi.addressof(r), bytes(ffi.sizeof(r)), ffi.sizeof(r))
    keep = []
    for k, v in fields.items():
        if k == "pfns":
            arr = ffi.new("uint64_t[]", v)
            keep.append(arr)
            r.pfns = arr
        elif k == "cdb":
            r.cdb[0:len(v)] = v
            r.cdb_length = len(v)
        else:
            setattr(r, k, v)
    assert q.submit(q.reqs, 1) == 1


def test_requests_match_the_reference_layout(rings):
    ch, host = rings
    q = IoQueue(ch, 8)
    # READ(16) of 3 blocks at offset 0x200 inside the first page: 2 pages, one range
    submit(q, tag=1, kind=lib.UVB_STOR_READ16, lun=2, lba=0x1234, blocks=3, length=3 * 512,
           byte_offset=0x200, pfns=[0x1000, 0x2000])
    # WRITE(16) with FUA, page-aligned
    submit(q, tag=2, kind=lib.UVB_STOR_WRITE16, lba=7, blocks=8, length=4096, byte_offset=0,
           pfns=[0x3000], flags=lib.UVB_STOR_FUA)
    # TEST UNIT READY: no data
    submit(q, tag=3, kind=lib.UVB_STOR_CDB, cdb=bytes(6), data_in=lib.VSTOR_DATA_NONE)
    pkts = list(host.inp.read(None, copy=True))
    assert len(pkts) == 3
    rd, wr, tur = (decode(p) for p in pkts)
    tids = {rd["trans_id"], wr["trans_id"], tur["trans_id"]}
    assert 0 not in tids and len(tids) == 3                                    # §2.9
    for d in (rd, wr, tur):
        assert d["flags"] == 1                                                 # completion requested
        assert d["payload_len"] == 64                                          # §2.2, §10.1
        assert (d["op"], d["hdr_flags"], d["status"]) == (3, 1, 0)             # EXECUTE_SRB
        assert (d["length"], d["sense_len"], d["timeout"]) == (0x34, 0x14, 60)
        assert d["srb_flags"] & DISABLE_SYNCH
        assert d["srb_flags"] & (QUEUE_ACTION | NO_QUEUE_FREEZE) == QUEUE_ACTION | NO_QUEUE_FREEZE
        assert (d["queue_tag"], d["queue_action"]) == (0xFF, 0x20)
    # READ: data in, GPA direct, one range
    assert rd["type"] == 9 and rd["data_in"] == 1 and rd["srb_flags"] & DATA_IN
    assert not rd["srb_flags"] & DATA_OUT
    assert rd["dtl"] == 1536 and rd["lun"] == 2 and rd["cdb_len"] == 16
    assert rd["cdb"] == struct.pack(">BBQIBB", READ16, 0, 0x1234, 3, 0, 0)
    assert (rd["gpa_reserved"], rd["range_count"]) == (0, 1)
    assert (rd["byte_count"], rd["byte_offset"], rd["pfns"]) == (1536, 0x200, [0x1000])
    assert rd["header_len"] == 32 + 8 * 1                                      # offset8 = 4 + N
    # WRITE: data out, FUA bit in the CDB
    assert wr["type"] == 9 and wr["data_in"] == 0 and wr["srb_flags"] & DATA_OUT
    assert wr["cdb"] == struct.pack(">BBQIBB", WRITE16, 0x08, 7, 8, 0, 0)
    assert (wr["byte_count"], wr["byte_offset"], wr["pfns"]) == (4096, 0, [0x3000])
    # no data: in-band, data_transfer_length 0, UNKNOWN_TYPE direction, no direction flag
    assert tur["type"] == 6 and tur["dtl"] == 0 and tur["data_in"] == 2
    assert not tur["srb_flags"] & (DATA_IN | DATA_OUT)
    assert tur["cdb_len"] == 6 and tur["cdb"][:6] == bytes([TUR] * 6)


def test_two_page_buffer_lists_both_pfns(rings):
    ch, host = rings
    q = IoQueue(ch, 4)
    submit(q, tag=1, kind=lib.UVB_STOR_READ16, lba=0, blocks=16, length=8192, byte_offset=0x800,
           pfns=[0x10, 0x11, 0x12])
    (p,) = list(host.inp.read(None, copy=True))
    d = decode(p)
    # N = ceil((byte_offset + byte_count) / 4096) = 3 (§3.1)
    assert (d["byte_count"], d["byte_offset"], d["pfns"]) == (8192, 0x800, [0x10, 0x11, 0x12])
    assert d["header_len"] == 32 + 8 * 3

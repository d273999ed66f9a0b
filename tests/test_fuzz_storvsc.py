"""Hostile-host fuzzing of the storvsc completion path (native/storvsc.c through
uvmbus.storvsc.queue.IoQueue), without the simulator.

The guest submits requests through the real IoQueue; the test plays the host and answers with
a mix of valid completions and everything a hostile host can send instead: duplicates, late
completions for abandoned requests, transaction ids of free or reused slots (stale
generation), slot 0 / beyond the table, short payloads, wrong operations, wrong packet types,
unsolicited packets with and without trans_id 0, random sense lengths.  A model of the request
table written from storvsc_ic.md §2.9/§2.10 and the uvb_stor_* contract (storvsc.h) predicts
every completion record, and the table must stay consistent: a slot is completed at most once
per submission, never freed twice, never leaked.

The table's arrays (slots, free list, packet infos, copy buffer) are placed flush against
PROT_NONE guard pages, so an index past any of them faults.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_ring import FAST, SLOW, Guarded, Wire, hostile_int, pad8

from uvmbus.errors import ConfigError, ProtocolError, RingCorrupt
from uvmbus.native import ffi, lib
from uvmbus.ring import (
    FLAG_COMPLETION_REQUESTED,
    PKT_COMP,
    PKT_GPA_DIRECT,
    PKT_INBAND,
    PKT_XFER_PAGES,
)
from uvmbus.storvsc import scsi
from uvmbus.storvsc.queue import REAP_BATCH, IoQueue

pytestmark = pytest.mark.timeout(180)

DONE, UNSOL, BOGUS, LATE = (lib.UVB_STOR_CPL_DONE, lib.UVB_STOR_CPL_UNSOLICITED,
                            lib.UVB_STOR_CPL_BOGUS, lib.UVB_STOR_CPL_LATE)
OK, ESHORT, EOP, ETID, ETYPE = (lib.UVB_STOR_OK, lib.UVB_STOR_ESHORT, lib.UVB_STOR_EOP,
                                lib.UVB_STOR_ETID, lib.UVB_STOR_ETYPE)
COMPLETE_IO = lib.VSTOR_OP_COMPLETE_IO


class Hba:
    """An IoQueue over guarded rings whose C table lives in guarded memory."""

    def __init__(self, depth: int, *, rxbuf: int = 64 * 1024, dsize: int = 32 * 1024):
        self.depth = depth
        self.w = Wire(dsize)
        self.io = IoQueue(self.w.ch, depth, tagged=False)
        sz = ffi.sizeof
        self.g_slots = Guarded(sz("struct uvb_stor_slot") * depth)
        self.g_free = Guarded(4 * depth)
        self.g_pkts = Guarded(sz("struct uvb_pkt") * REAP_BATCH)
        self.g_rx = Guarded(rxbuf)
        rc = lib.uvb_stor_queue_init(
            self.io.q, self.w.ch.tx.raw, self.w.ch.rx.raw, self.w.ch.signal,
            ffi.cast("struct uvb_stor_slot *", self.g_slots.ptr),
            ffi.cast("uint32_t *", self.g_free.ptr), depth,
            ffi.cast("struct uvb_pkt *", self.g_pkts.ptr), REAP_BATCH, self.g_rx.ptr, rxbuf)
        assert rc == 0
        self.pfns = ffi.new("uint64_t[]", [0x1000 + i for i in range(4)])
        self.next_tag = 100

    def submit(self, n: int, kinds: list[int]) -> list[int]:
        """Submit n requests (READ16 with data, or a bare VSTOR op / CDB without); tags."""
        reqs = self.io.reqs
        tags = []
        for i in range(n):
            r = reqs[i]
            ffi.memmove(ffi.addressof(r), bytes(ffi.sizeof("struct uvb_stor_req")),
                        ffi.sizeof("struct uvb_stor_req"))
            r.tag = self.next_tag
            tags.append(self.next_tag)
            self.next_tag += 1
            k = kinds[i % len(kinds)]
            if k == 0:
                r.kind, r.lba, r.blocks, r.length, r.pfns = lib.UVB_STOR_READ16, i, 1, 512, self.pfns
                r.byte_offset = 512 * (i % 8)
            elif k == 1:
                r.kind, r.operation = lib.UVB_STOR_VSTOR_OP, lib.VSTOR_OP_RESET_LUN
            else:
                r.kind, r.cdb_length, r.data_in = lib.UVB_STOR_CDB, 6, lib.VSTOR_DATA_NONE
        sent = self.io.submit(reqs, n)
        return tags[:sent]

    def close(self) -> None:
        self.w.close()
        for g in (self.g_slots, self.g_free, self.g_pkts, self.g_rx):
            g.close()


# =============================================================================================
# the model (storvsc_ic.md §2.9/§2.10 + storvsc.h)

@dataclass
class Slot:
    gen: int = 0
    tag: int = 0
    busy: int = 0          # 0 free, 1 in flight, 2 abandoned


@dataclass
class Model:
    depth: int
    slots: list[Slot] = field(default_factory=list)
    issued: dict[int, int] = field(default_factory=dict)     # tag -> tid (as seen on the wire)
    spent: list[int] = field(default_factory=list)           # tids completed or released

    def __post_init__(self) -> None:
        self.slots = [Slot() for _ in range(self.depth)]

    def sent(self, tid: int, tag: int) -> None:
        slot, gen = (tid & 0xFFFFFFFF) - 1, tid >> 32
        assert 0 <= slot < self.depth, hex(tid)
        s = self.slots[slot]
        assert s.busy == 0, f"slot {slot} handed out while in flight"
        assert gen != 0 and gen != s.gen, f"slot {slot} reused with the same generation"
        s.gen, s.tag, s.busy = gen, tag, 1
        self.issued[tag] = tid

    def inflight(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def expect(self, ptype: int, tid: int, payload: bytes) -> tuple:
        """(kind, error, tag, op, status, srb, scsi, transferred, sense)"""
        data = pad8(payload)
        op = struct.unpack_from("<I", data)[0] if len(data) >= 4 else 0
        if tid == 0:
            if len(data) < 4:
                return (BOGUS, ESHORT, 0, op)
            if ptype != PKT_INBAND:
                return (BOGUS, ETYPE, 0, op)
            if op == COMPLETE_IO:
                return (BOGUS, EOP, 0, op)
            return (UNSOL, OK, 0, op)
        slot, gen = (tid & 0xFFFFFFFF) - 1, tid >> 32
        if not 0 <= slot < self.depth or not self.slots[slot].busy or self.slots[slot].gen != gen:
            return (BOGUS, ETID, 0, op)
        s = self.slots[slot]
        kind = LATE if s.busy == 2 else DONE
        s.busy = 0
        self.spent.append(tid)
        if ptype != PKT_COMP:
            return (kind, ETYPE, s.tag, op)
        if len(data) < 64:
            return (kind, ESHORT, s.tag, op)
        if op != COMPLETE_IO:
            return (kind, EOP, s.tag, op)
        status = struct.unpack_from("<I", data, 8)[0]
        srb, scsi, sil = data[14], data[15], data[21]
        xfer = struct.unpack_from("<I", data, 24)[0]
        sense = b""
        if srb & 0x80:
            n = sil if 0 < sil <= 20 else 20
            sense = data[28:28 + n]
        return (kind, OK, s.tag, op, status, srb, scsi, xfer, sense)


def got_tuple(c: Any) -> tuple:
    base = (int(c.kind), int(c.error), int(c.tag) if c.kind in (DONE, LATE) else 0, int(c.operation))
    if c.kind in (DONE, LATE) and c.error == OK:
        return base + (int(c.status), int(c.srb_status), int(c.scsi_status), int(c.transferred),
                       bytes(ffi.buffer(c.sense, c.sense_len)))
    return base


def completion(status: int, srb: int, scsi: int, sil: int, xfer: int, sense: bytes,
               op: int = COMPLETE_IO, size: int = 64) -> bytes:
    pk = bytearray(64)
    struct.pack_into("<III", pk, 0, op, 0, status)
    pk[12:14] = struct.pack("<H", 0x34)
    pk[14], pk[15], pk[21] = srb, scsi, sil
    struct.pack_into("<I", pk, 24, xfer)
    pk[28:28 + len(sense[:20])] = sense[:20]
    return bytes(pk[:size]) if size <= 64 else bytes(pk) + bytes(size - 64)


ACTIONS = ["ok", "ok", "ok", "ok", "dup", "stale", "slot0", "slotover", "short", "op", "inband",
           "xfer", "unsol", "unsol_comp", "unsol_short", "abandon", "release", "submit", "wild"]


@st.composite
def script(draw: Any) -> tuple[int, list[tuple]]:
    depth = draw(st.sampled_from([1, 2, 3, 8, 32]))
    steps = []
    for _ in range(draw(st.integers(1, 40))):
        a = draw(st.sampled_from(ACTIONS))
        steps.append((a, draw(st.integers(0, 10_000)), draw(hostile_int()),
                      draw(st.sampled_from([0x01, 0x81, 0x84, 0x04, 0x20, 0x12, 0x00, 0xFF])),
                      draw(st.integers(0, 255)), draw(st.sampled_from([0, 1, 18, 20, 21, 255])),
                      draw(st.binary(max_size=24)),
                      draw(st.sampled_from([0, 4, 8, 12, 56, 60, 63]))))
    return depth, steps


def run(depth: int, steps: list[tuple]) -> None:
    hba = Hba(depth)
    m = Model(depth)
    host = hba.w.host.out
    kinds = [0, 1, 2]
    try:
        def pull() -> None:                      # the host reads what the guest submitted
            for p in hba.w.host_read():
                assert p.flags == FLAG_COMPLETION_REQUESTED
                assert p.type == (PKT_GPA_DIRECT if len(p.header) else PKT_INBAND)
                m.sent(p.trans_id, pending_tags.pop(0))

        pending_tags: list[int] = []
        pending_tags += hba.submit(depth, kinds)
        pull()
        for a, pick, wild, srb, scsi, sil, sense, short in steps:
            expected = []
            busy = [(i, s) for i, s in enumerate(m.slots) if s.busy]
            if a in ("ok", "inband", "xfer", "op") and busy:
                i, s = busy[pick % len(busy)]
                tid = (s.gen << 32) | (i + 1)
                payload = completion(wild, srb, scsi, sil, wild >> 3, sense,
                                     op=COMPLETE_IO if a != "op" else pick % 16)
                ptype = {"inband": PKT_INBAND, "xfer": PKT_XFER_PAGES}.get(a, PKT_COMP)
            elif a == "dup" and m.spent:
                tid, ptype = m.spent[pick % len(m.spent)], PKT_COMP
                payload = completion(0, 1, 0, 0, 512, b"")
            elif a == "stale" and busy:
                i, s = busy[pick % len(busy)]
                tid = (((s.gen + 1 + pick % 3) & 0xFFFFFFFF) << 32) | (i + 1)
                ptype, payload = PKT_COMP, completion(0, 1, 0, 0, 512, b"")
            elif a in ("slot0", "slotover"):
                slot = 0 if a == "slot0" else depth + 1 + pick
                tid = ((pick + 1) << 32) | slot
                ptype, payload = PKT_COMP, completion(0, 1, 0, 0, 512, b"")
            elif a == "short" and busy:
                i, s = busy[pick % len(busy)]
                tid, ptype = (s.gen << 32) | (i + 1), PKT_COMP
                payload = completion(0, 1, 0, 0, 512, b"", size=short)
            elif a in ("unsol", "unsol_comp", "unsol_short"):
                op = [lib.VSTOR_OP_ENUMERATE_BUS, lib.VSTOR_OP_REMOVE_DEVICE, COMPLETE_IO,
                      lib.VSTOR_OP_FCHBA_DATA, wild][pick % 5]
                tid = 0
                ptype = PKT_COMP if a == "unsol_comp" else PKT_INBAND
                payload = b"" if a == "unsol_short" else completion(0, 0, 0, 0, 0, b"", op=op)
            elif a in ("abandon", "release"):
                ab = [s for s in m.slots if s.busy == 1]
                if ab:
                    s = ab[pick % len(ab)]
                    assert hba.io.abandon(s.tag, release=a == "release")
                    if a == "release":
                        m.spent.append((s.gen << 32) | (m.slots.index(s) + 1))
                        s.busy = 0
                        s.gen = (s.gen + 1) & 0xFFFFFFFF or 1
                    else:
                        s.busy = 2
                else:
                    assert not hba.io.abandon(12345)
                continue
            elif a == "submit":
                free = depth - m.inflight()
                pending_tags += hba.submit(min(free, 1 + pick % depth), kinds)
                pull()
                assert hba.io.inflight == m.inflight()
                continue
            else:                                                  # random tid, random bytes
                tid, ptype = (wild << 32 | pick) & 0xFFFFFFFFFFFFFFFF, PKT_COMP
                payload = sense
            if ptype == PKT_XFER_PAGES:
                ok = host.put_xfer_pages(0, [(8, 0)], payload, trans_id=tid, flags=0)
            else:
                ok = host.put(payload, trans_id=tid, type=ptype)
            if not ok:
                break
            expected.append(m.expect(ptype, tid, payload))
            host.commit()
            n = hba.io.reap()
            assert [got_tuple(hba.io.cpls[k]) for k in range(n)] == expected
            assert hba.io.inflight == m.inflight()
            assert hba.io.q.nfree + m.inflight() == depth
        # the host completes everything left: no slot leaks, all come back
        for i, s in enumerate(m.slots):
            if s.busy:
                tid = (s.gen << 32) | (i + 1)
                payload = completion(0, 1, 0, 0, 512, b"")
                assert host.put(payload, trans_id=tid, type=PKT_COMP)
                m.expect(PKT_COMP, tid, payload)
        host.commit()
        while hba.io.reap():
            pass
        assert hba.io.inflight == 0 and m.inflight() == 0
        # every slot usable exactly once more: the free list holds each slot once
        pending_tags = hba.submit(depth, [1])
        assert len(pending_tags) == depth
        seen = set()
        for p in hba.w.host_read():
            slot = p.trans_id & 0xFFFFFFFF
            assert slot not in seen
            seen.add(slot)
        assert seen == set(range(1, depth + 1))
        assert not hba.w.ch.dead
    finally:
        hba.close()


@FAST
@given(script())
def test_fuzz_completions_against_model(case) -> None:
    run(*case)


@pytest.mark.slow
@SLOW
@given(script())
def test_fuzz_completions_against_model_slow(case) -> None:
    run(*case)


def test_oversized_host_packet_is_a_clear_protocol_error() -> None:
    """A host packet larger than the completion buffer: a ProtocolError naming the size, not
    a crash or a silent stall."""
    hba = Hba(4, rxbuf=4096, dsize=64 * 1024)
    try:
        assert hba.w.host.out.put(bytes(8000), trans_id=0, type=PKT_INBAND)
        hba.w.host_commit()
        with pytest.raises(ProtocolError, match="larger than"):
            hba.io.reap()
    finally:
        hba.close()


def test_corrupt_ring_is_ring_corrupt_from_reap_and_submit_checks() -> None:
    hba = Hba(4)
    try:
        hba.w.store_rx_write_index(13)                      # not 8-aligned
        with pytest.raises(RingCorrupt, match="write_index"):
            hba.io.reap()
        with pytest.raises(RingCorrupt):
            hba.io.has_completions()
        with pytest.raises(RingCorrupt):
            hba.io.reap()
    finally:
        hba.close()


def test_malformed_request_is_config_error() -> None:
    hba = Hba(2)
    try:
        r = hba.io.reqs[0]
        r.kind, r.tag, r.length, r.blocks, r.pfns, r.byte_offset = (lib.UVB_STOR_READ16, 1, 512, 1,
                                                                    hba.pfns, 4096)
        with pytest.raises(ConfigError, match="byte_offset"):
            hba.io.submit(hba.io.reqs, 1)
    finally:
        hba.close()


@given(st.binary(max_size=20))
def test_sense_decoder_stays_inside_its_length(data: bytes) -> None:
    """uvb_stor_sense on sense bytes that end at a guard page agrees with scsi.parse_sense."""
    key, asc, ascq = ffi.new("uint8_t *"), ffi.new("uint8_t *"), ffi.new("uint8_t *")
    g = Guarded(20)
    try:
        n = len(data)
        g.view[20 - n:20] = data
        has = lib.uvb_stor_sense(g.ptr + (20 - n), n, key, asc, ascq)
        s = scsi.parse_sense(data)
        assert bool(has) == (s is not None)
        if s is not None:
            assert (key[0], asc[0], ascq[0]) == (s.key, s.asc, s.ascq)
    finally:
        g.close()

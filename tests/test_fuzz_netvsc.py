"""Hostile-host fuzzing of the netvsc guest data path (native/netvsc.c through
uvmbus.netvsc.nic.Queue), without the simulator.

The test plays the host: it writes RNDIS messages into a guarded receive buffer and
transfer-page packets / completions / in-band messages into the guest's RX ring, then drives
the real :class:`~uvmbus.netvsc.nic.Queue`.  An independent reference written from
../shared/reference/netvsc.md §4.3 (PACKET), §4.4 (PPI) and §6 (RX validation) decides, for
every range, whether it is a frame (and which bytes and metadata), a control message or
malformed, and the guest must agree exactly: same frames in the same order, same control
records, one ack per transfer packet with status 1 (or 2 when something in it was invalid),
one host error per malformed item — and no access outside the guarded buffers.

TX: the host completes the guest's sends with valid, duplicate, late, forged and malformed
transaction ids; a send-buffer section must never be reused while the host still owns it and
must never leak.
"""

from __future__ import annotations

import struct
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_ring import FAST, SLOW, Guarded, Wire, hostile_int, pad8

from uvmbus.channel import PollingWaiter
from uvmbus.errors import ProtocolError, RingCorrupt
from uvmbus.native import ffi, lib
from uvmbus.netvsc import TxBatch
from uvmbus.netvsc import protocol as P
from uvmbus.netvsc.nic import Queue
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_INBAND
from uvmbus.uio.device import MappedRegion

pytestmark = pytest.mark.timeout(180)

CAFE = 0xCAFE
SLOT = 4096                  # where the fuzzer puts message i in the receive buffer
NSLOTS = 48
RECV_SIZE = SLOT * NSLOTS
SECTION = 6144
NSECTIONS = 16
MAX_FRAME = 1514
COPY_FRAMES = 64             # copy buffer 64 * (1514 + 8) > the largest RX frame (65535)
CTRL_MAX_LEN = 64 * 1024     # netvsc.c: a control message longer than this is malformed

TID_DATA = lib.UVB_NVSC_TID_DATA
TID_CTRL = lib.UVB_NVSC_TID_CTRL
TID_GPA = lib.UVB_NVSC_TID_GPA
TID_KIND = lib.UVB_NVSC_TID_KIND


class Nic:
    """A netvsc queue over guarded memory; the test is its host."""

    def __init__(self, *, copy_frames: int = COPY_FRAMES, section_size: int = SECTION,
                 sections: int = NSECTIONS, max_pkt_per_msg: int = 8, recv_size: int = RECV_SIZE,
                 dsize: int = 64 * 1024, strict: bool = False):
        self.w = Wire(dsize)
        self.recv = Guarded(recv_size)
        self.send = Guarded(section_size * sections)
        rr = MappedRegion(3, "recv", recv_size, self.recv.mm, self.recv.offset, 1, self.recv.ptr)
        sr = MappedRegion(4, "send", self.send.size, self.send.mm, self.send.offset, 2, self.send.ptr)
        self.q = Queue(0, self.w.ch, PollingWaiter(), rr, sr, section_size=section_size,
                       section_first=0, section_count=sections, max_pkt_per_msg=max_pkt_per_msg,
                       pkt_align=8, max_xfer=section_size, max_frame=MAX_FRAME,
                       copy_frames=copy_frames, strict=strict)
        self.copy_cap = copy_frames * (MAX_FRAME + 8)

    def records(self) -> list[tuple[int, bytes, int]]:
        rec = ffi.new("struct uvb_nvsc_ctrl *")
        buf = ffi.new("uint8_t[]", 1 << 17)
        out = []
        while lib.uvb_nvsc_ctrl_next(self.q.raw, rec, buf, 1 << 17) > 0:
            out.append((int(rec.kind), bytes(ffi.buffer(buf, rec.len)), int(rec.trans_id)))
        return out

    def close(self) -> None:
        self.q.close()
        self.w.close()
        self.recv.close()
        self.send.close()


# =============================================================================================
# the reference (netvsc.md §4.3, §4.4, §6) — written from the document, not from netvsc.c

@dataclass
class Expect:
    frames: list[tuple[bytes, int, int, int, int]] = field(default_factory=list)  # data, flags, vlan, csum, hash
    records: list[tuple[int, bytes, int]] = field(default_factory=list)
    acks: Counter[tuple[int, int]] = field(default_factory=Counter)
    errors: int = 0


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b.ljust(off + 4, b"\0"), off)[0]


RSC_SUBALLOC, RSC_FIRST, RSC_LAST = 1, 2, 4        # RNDIS_PKTINFO_ID flags (netvsc.md §4.4)


def ref_packet(recv: bytes, off: int, msg_len: int) -> tuple[tuple[bytes, int, int, int, int], int] | None:
    """A PACKET at ``off`` whose msg_len was checked against its range: the frame and its RSC
    fragment flags (0: a whole frame; §4.4 RNDIS_PKTINFO_ID, the first such element counts,
    SUBALLOC must be set), or None.  A fragment may carry fewer than 14 bytes."""
    h = recv[off:off + 44].ljust(44, b"\0")
    doff, dlen, poff, plen = u32(h, 8), u32(h, 12), u32(h, 28), u32(h, 32)
    if msg_len < 44:
        return None
    if doff < 36 or dlen == 0 or 8 + doff + dlen > msg_len or dlen > 65535:
        return None
    flags = vlan = csum = hsh = frag = 0
    seen_id = False
    if plen:
        if poff < 36 or poff % 4 or 8 + poff + plen > msg_len or plen > 1024:
            return None
        ppi = recv[off + 8 + poff:off + 8 + poff + plen]
        e = 0
        while e < len(ppi):
            left = len(ppi) - e
            if left < 12:
                return None
            size, ptype, po = struct.unpack_from("<III", ppi, e)
            if size < 12 or size > left or po < 12 or po > size:
                return None
            if ptype == lib.PPI_RNDIS_PKTINFO_ID and po + 4 <= size:
                if not seen_id:
                    seen_id = True
                    fl = ppi[e + po + 1]
                    frag = fl & (RSC_SUBALLOC | RSC_FIRST | RSC_LAST) if fl & RSC_SUBALLOC else 0
            elif not ptype & 0x80000000 and po + 4 <= size:
                v = u32(ppi, e + po)
                if ptype == P.PPI_TCPIP_CHKSUM:
                    csum, flags = v, flags | lib.UVB_NVSC_F_CSUM
                elif ptype == P.PPI_IEEE_8021Q:
                    vlan, flags = P.vlan_tci(v) & 0xFFFF, flags | lib.UVB_NVSC_F_VLAN
                elif ptype == P.PPI_HASH_VALUE:
                    hsh, flags = v, flags | lib.UVB_NVSC_F_HASH
            e += size
    if not frag and dlen < 14:
        return None
    start = off + 8 + doff
    return (recv[start:start + dlen], flags, vlan, csum, hsh), frag


def ref_xfer(ex: Expect, recv: bytes, tid: int, pageset: int, ranges: list[tuple[int, int]],
             payload: bytes) -> None:
    """One transfer-page packet as the guest sees it (payload padded to 8)."""
    bad = False
    if len(payload) < 8 or u32(payload, 0) != P.MSG_SEND_RNDIS_PKT or pageset != CAFE or not ranges:
        ex.errors += 1
        ex.acks[(tid, 2)] += 1
        return
    control = u32(payload, 4) == P.CHANNEL_TYPE_CONTROL
    # each range: ("badrange",) invalid range / msg_len; ("badpkt",) a PACKET that is not
    # valid here; ("ctrl", bytes | None) a control message (None: too long); ("pkt", frame, frag)
    items: list[tuple[Any, ...]] = []
    for count, off in ranges:
        if off + count > len(recv) or count < 8:
            items.append(("badrange",))
            continue
        mtype, mlen = u32(recv, off), u32(recv, off + 4)
        if mlen < 8 or mlen > count:
            items.append(("badrange",))
        elif mtype == P.RNDIS_PACKET:
            got = None if control else ref_packet(recv, off, mlen)
            items.append(("badpkt",) if got is None else ("pkt", *got))
        else:
            items.append(("ctrl", recv[off:off + mlen] if mlen <= CTRL_MAX_LEN else None))
    # §6 RSC: a chain SUBALLOC|1ST_FRAG, SUBALLOC..., SUBALLOC|LAST_FRAG in consecutive ranges
    # of one packet is one frame; a broken chain is dropped whole (one error), and the range
    # that broke it is handled on its own (an invalid fragment was already reported)
    i = 0
    while i < len(items):
        it = items[i]
        if it[0] in ("badrange", "badpkt"):
            ex.errors += 1
            bad = True
            i += 1
            continue
        if it[0] == "ctrl":
            if it[1] is None:
                ex.errors += 1
                bad = True
            else:
                ex.records.append((lib.UVB_NVSC_CTRL_RNDIS, it[1], 0))
            i += 1
            continue
        fr, frag = it[1], it[2]
        if not frag:
            ex.frames.append(fr)
            i += 1
            continue
        if not frag & RSC_FIRST:                        # a fragment of no chain
            ex.errors += 1
            bad = True
            i += 1
            continue
        parts, j, nxt, broken = [fr], i, i + 1, False
        while not frag & RSC_LAST:
            j += 1
            if j >= len(items):
                broken, nxt = True, j
                break
            jt = items[j]
            if jt[0] in ("badrange", "badpkt"):
                ex.errors += 1                          # the fragment's own error
                broken, nxt = True, j + 1
                break
            if jt[0] == "ctrl" or not jt[2] or jt[2] & RSC_FIRST:
                broken, nxt = True, j
                break
            parts.append(jt[1])
            frag = jt[2]
        else:
            nxt = j + 1
        total = sum(len(p[0]) for p in parts)
        if broken or total < 14:
            ex.errors += 1
            bad = True
        elif len(parts) == 1:
            ex.frames.append(fr)
        else:
            ex.frames.append((b"".join(p[0] for p in parts), fr[1] | lib.UVB_NVSC_F_RSC, *fr[2:]))
        i = nxt
    ex.acks[(tid, 2 if bad else 1)] += 1


# =============================================================================================
# the hostile host

INTERESTING = [0, 1, 7, 8, 12, 13, 14, 35, 36, 37, 40, 44, 48, 1024, 1025, 0xFFFF, 65535, 65536,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFC, 0xFFFFFFFF]


@st.composite
def ppi_elements(draw: Any) -> bytes:
    out = b""
    n = draw(st.integers(0, 4)) if draw(chance(90)) else draw(st.sampled_from([63, 64, 65, 70]))
    for _ in range(n):                  # a few elements, or ~1 KiB of them (the parser's bound)
        ptype = draw(st.sampled_from([P.PPI_TCPIP_CHKSUM, P.PPI_IEEE_8021Q, P.PPI_HASH_VALUE,
                                      P.PPI_HASH_INFO, lib.PPI_RNDIS_PKTINFO_ID, 0x40000006]))
        value = struct.pack("<I", draw(st.integers(0, 0xFFFFFFFF)))
        size, po = 16, 12
        if draw(chance(30)):          # §4.4: size and offset are the host's word
            if draw(st.booleans()):   # legal but unusual: the value may end past the element
                size = draw(st.sampled_from([12, 13, 15, 16, 17, 20, 24]))
                po = max(12, size - draw(st.sampled_from([0, 1, 3, 4])))
            else:                     # illegal
                size = draw(st.sampled_from([0, 8, 11, 16, 2000]))
                po = draw(st.sampled_from([0, 11, size + 1]))
        body = (value + bytes(range(40, 60)))[:max(size - 12, 0)] if size != 16 else value
        out += struct.pack("<III", size, ptype, po & 0xFFFFFFFF) + body
    if draw(chance(10)):
        out += draw(st.binary(max_size=20))          # trailing junk / a short element
    return out


def chance(percent: int) -> st.SearchStrategy[bool]:
    return st.integers(0, 99).map(lambda v: v < percent)


@st.composite
def rndis_message(draw: Any) -> bytes:
    """Mostly well-formed PACKETs (the parser must get the common case right too), some
    control messages and garbage; then, often, one or two header fields broken."""
    roll = draw(st.integers(0, 99))
    kind = "packet" if roll < 70 else "control" if roll < 88 else "garbage"
    if kind == "garbage":
        return draw(st.binary(min_size=0, max_size=120))
    if kind == "control":
        mtype = draw(st.sampled_from([P.RNDIS_INDICATE, P.RNDIS_QUERY_C, P.RNDIS_SET_C,
                                      P.RNDIS_INIT_C, P.RNDIS_KEEPALIVE, 0x12345678]))
        body = draw(st.binary(max_size=64))
        msg = bytearray(struct.pack("<II", mtype, 8 + len(body)) + body)
    else:
        size = draw(st.one_of(st.integers(0, 80), st.sampled_from([14, 60, 1514, 2000, 2900])))
        frame = bytes((i * 7 + size) & 0xFF for i in range(size))
        ppis = draw(ppi_elements()) if draw(chance(60)) else b""
        if draw(chance(25)):          # an RSC fragment (§4.4 RNDIS_PKTINFO_ID), well-formed
            fl = draw(st.sampled_from([1 | 2, 1, 1, 1 | 4, 1 | 2 | 4, 0, 2, 4]))
            pk = struct.pack("<BBH", 1, fl, draw(st.integers(0, 0xFFFF)))
            ppis = struct.pack("<III", 16, lib.PPI_RNDIS_PKTINFO_ID, 12) + pk + ppis
        # PPIs normally right after the header (offset 36); sometimes after a gap that
        # leaves them well-formed but misaligned (§4.3: the offset must be 4-aligned)
        gap = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3, 4]))
        msg = bytearray(P.rndis_packet(frame, b"\xEE" * gap + ppis))
        if ppis:
            struct.pack_into("<II", msg, 28, 36 + gap, len(ppis))
            if draw(chance(20)):      # the other legal order: the frame first, PPIs at the end
                msg = bytearray(msg[:44] + frame + ppis)
                struct.pack_into("<I", msg, 8, 36)
                struct.pack_into("<I", msg, 28, 36 + len(frame))
    if draw(chance(55)):                                     # break a header field
        for _ in range(draw(st.integers(1, 2))):
            fld = draw(st.sampled_from([4, 8, 12, 28, 32, 44, 48, 52] if kind == "packet" else [0, 4]))
            if fld + 4 > len(msg):
                continue
            f = [struct.unpack_from("<I", msg, o)[0] if o + 4 <= len(msg) else 0
                 for o in range(0, 44, 4)]
            old = f[fld // 4] if fld < 44 else struct.unpack_from("<I", msg, fld)[0]
            how = draw(st.integers(0, 2))
            if how == 0:
                v = draw(st.sampled_from(INTERESTING))
            elif how == 1:
                v = old + draw(st.integers(-8, 8))
            else:                     # off-by-a-little at the message end / alignment
                e = draw(st.sampled_from([-1, 0, 1, 2, 4, 8]))
                mlen = f[1]
                if fld == 8:          # data_offset: frame ends at msg_len + e
                    v = mlen + e - 8 - f[3]
                elif fld == 12:       # data_len
                    v = mlen + e - 8 - f[2]
                elif fld == 28:       # PPI offset: misaligned, or PPIs end at msg_len + e
                    v = old + e if draw(st.booleans()) else mlen + e - 8 - f[8]
                elif fld == 32:       # PPI length
                    v = mlen + e - 8 - f[7]
                else:                 # msg_len / PPI element size/offset
                    v = old + e
            struct.pack_into("<I", msg, fld, v & 0xFFFFFFFF)
    return bytes(msg[:SLOT])


@st.composite
def a_range(draw: Any, msgs: list[bytes]) -> tuple[int, int]:
    i = draw(st.integers(0, len(msgs) - 1))
    roll = draw(st.integers(0, 99))
    if roll < 75:                                            # exactly the message
        return len(msgs[i]), msg_offset(i, msgs)
    if roll < 82:                                            # the whole slot (padding after)
        return SLOT, i * SLOT
    if roll < 90:                                            # hug the end of the buffer
        count = draw(st.integers(0, 64))
        return count, RECV_SIZE - count + draw(st.integers(-8, 8)) & 0xFFFFFFFF
    return draw(hostile_int()), draw(hostile_int())


@st.composite
def rsc_chain(draw: Any) -> list[bytes]:
    """A frame the host coalesced, as RSC fragments (§6): PACKETs with RNDIS_PKTINFO_ID
    SUBALLOC|1ST_FRAG, SUBALLOC..., SUBALLOC|LAST_FRAG; sometimes one flag is wrong."""
    size = draw(st.sampled_from([14, 60, 1514, 3000, 9000]))
    frame = bytes((i * 5 + size) & 0xFF for i in range(size))
    k = draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.integers(1, size - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    parts = [frame[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
    flags = [RSC_SUBALLOC | (RSC_FIRST if i == 0 else 0) | (RSC_LAST if i == k - 1 else 0) for i in range(k)]
    if draw(chance(30)):
        flags[draw(st.integers(0, k - 1))] ^= draw(st.sampled_from([RSC_SUBALLOC, RSC_FIRST, RSC_LAST]))
    out = []
    for part, fl in zip(parts, flags, strict=True):
        ppi = struct.pack("<III", 16, lib.PPI_RNDIS_PKTINFO_ID, 12) + struct.pack("<BBH", 1, fl, 7)
        if fl & RSC_FIRST and draw(st.booleans()):
            ppi = P.ppi_u32(P.PPI_HASH_VALUE, 0x1234) + ppi
        out.append(P.rndis_packet(part, ppi)[:SLOT])
    return out


@st.composite
def host_script(draw: Any) -> tuple[list[bytes], list[tuple]]:
    msgs = draw(st.lists(rndis_message(), min_size=1, max_size=12))
    chains: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(0, 2))):
        c = draw(rsc_chain())
        chains.append((len(msgs), len(c)))
        msgs += c
    ops: list[tuple] = []
    for a, k in chains:               # each chain in one transfer packet, maybe with company
        ranges = [(len(msgs[j]), msg_offset(j, msgs)) for j in range(a, a + k)]
        if draw(chance(30)):
            ranges.insert(draw(st.integers(0, len(ranges))), draw(a_range(msgs)))
        ops.append(("xfer", 0x2000 + a, FLAG_COMPLETION_REQUESTED, CAFE, ranges,
                    struct.pack("<IIII", P.MSG_SEND_RNDIS_PKT, P.CHANNEL_TYPE_DATA, 0xFFFFFFFF, 0)))
    for n in range(draw(st.integers(1, 10))):
        roll = draw(st.integers(0, 99))
        tid = 0x1000 + n
        if roll < 70:
            ranges = draw(st.lists(a_range(msgs), min_size=1, max_size=8))
            if draw(chance(25)):      # consecutive messages: fragment chains line up
                a = draw(st.integers(0, len(msgs) - 1))
                ranges = [(len(msgs[k]), msg_offset(k, msgs)) for k in range(a, min(len(msgs), a + 8))]
            chtype = P.CHANNEL_TYPE_DATA if draw(chance(75)) else P.CHANNEL_TYPE_CONTROL
            nvsp_type, pageset, cut = P.MSG_SEND_RNDIS_PKT, CAFE, 16
            if draw(chance(15)):                             # a broken NVSP / xfer header
                nvsp_type = draw(st.sampled_from([P.MSG_SEND_RNDIS_PKT, 108, 0, 0xFFFFFFFF]))
                pageset = draw(st.sampled_from([CAFE, 0, 0xCAFF]))
                chtype = draw(st.sampled_from([0, 1, 7, 0xFFFFFFFF]))
                cut = draw(st.sampled_from([16, 8, 4, 0]))
                if draw(chance(30)):
                    ranges = []
            payload = struct.pack("<IIII", nvsp_type, chtype, 0xFFFFFFFF, 0)[:cut]
            flags = FLAG_COMPLETION_REQUESTED if draw(chance(85)) else 0
            ops.append(("xfer", tid, flags, pageset, ranges, payload))
        elif roll < 80:
            ops.append(("inband", tid, draw(st.binary(max_size=48))))
        elif roll < 92:
            ctid = draw(st.one_of(st.integers(0, 2**64 - 1),
                                  st.sampled_from([TID_DATA, TID_CTRL | 3, TID_GPA, TID_DATA | (1 << 40)])))
            ops.append(("comp", ctid, draw(st.binary(max_size=16))))
        else:
            ops.append(("gpa", tid, draw(st.sampled_from([0, FLAG_COMPLETION_REQUESTED]))))
    return msgs, ops


def msg_offset(i: int, msgs: list[bytes]) -> int:
    """Message i lives at slot i; the last one ends exactly at the end of the receive buffer,
    against the guard page, so reading one byte past its range faults."""
    return RECV_SIZE - len(msgs[i]) if i == len(msgs) - 1 else i * SLOT


def play(nic: Nic, msgs: list[bytes], ops: list[tuple]) -> Expect:
    """Write the script into the receive buffer and the RX ring; return the reference."""
    for i, m in enumerate(msgs):
        at = msg_offset(i, msgs)
        nic.recv.view[at:at + len(m)] = m
    recv = bytes(nic.recv.view)
    ex = Expect()
    comps: list[tuple[int, bytes]] = []
    host = nic.w.host.out
    for op in ops:
        if op[0] == "xfer":
            _, tid, flags, pageset, ranges, payload = op
            rg = [(c & 0xFFFFFFFF, o & 0xFFFFFFFF) for c, o in ranges]
            if not host.put_xfer_pages(pageset, rg, payload, trans_id=tid, flags=flags):
                break
            ref_xfer(ex, recv, tid, pageset, rg, pad8(payload))
        elif op[0] == "inband":
            _, tid, payload = op
            if not host.put(payload, trans_id=tid, type=PKT_INBAND):
                break
            ex.records.append((lib.UVB_NVSC_CTRL_INBAND, pad8(payload), tid))
        elif op[0] == "comp":
            _, tid, payload = op
            if not host.put(payload, trans_id=tid, type=PKT_COMP):
                break
            comps.append((tid, pad8(payload)))
        else:
            _, tid, flags = op
            if not host.put_gpa_direct([(100, 0, [0x1234])], b"gpa", trans_id=tid, flags=flags):
                break
            ex.errors += 1
            if flags & FLAG_COMPLETION_REQUESTED:
                ex.acks[(tid, 2)] += 1
    nic.w.host_commit()
    for tid, payload in comps:           # nothing is in flight: ours are errors, others records
        if tid & TID_KIND in (TID_DATA, TID_CTRL, TID_GPA):
            ex.errors += 1
        else:
            ex.records.append((lib.UVB_NVSC_CTRL_COMP, payload, tid))
    return ex


def receive_all(nic: Nic, zero_copy: bool, maxes: list[int]) -> list[tuple[bytes, int, int, int, int]]:
    got: list[tuple[bytes, int, int, int, int]] = []
    for i in range(400):
        b = nic.q.rx_burst(maxes[i % len(maxes)], copy=not zero_copy)
        arr = b.descriptors
        for j in range(len(b)):
            f = arr[j]
            off, n = int(f.offset), int(f.len)
            if zero_copy and f.flags & lib.UVB_NVSC_F_RSC:     # joined into the reassembly buffer
                assert off % 8 == 0 and off + n <= nic.q.raw.rsc_size
            elif zero_copy:              # a view into the receive buffer, inside it
                assert 0 <= off and off + n <= RECV_SIZE
            else:
                assert off % 8 == 0 and off + n <= nic.copy_cap
            got.append((bytes(b[j]), int(f.flags), int(f.vlan), int(f.csum), int(f.hash)))
        b.release()
        if not len(b) and not lib.uvb_nvsc_rx_pending(nic.q.raw):
            return got
    raise AssertionError("rx_burst never drained a finite script (livelock)")


def check_script(script: tuple[list[bytes], list[tuple]], zero_copy: bool, maxes: list[int]) -> None:
    msgs, ops = script
    nic = Nic()
    try:
        ex = play(nic, msgs, ops)
        got = receive_all(nic, zero_copy, maxes)
        assert got == ex.frames
        recs = nic.records()
        for kind in (lib.UVB_NVSC_CTRL_RNDIS, lib.UVB_NVSC_CTRL_INBAND, lib.UVB_NVSC_CTRL_COMP):
            assert [r for r in recs if r[0] == kind] == [r for r in ex.records if r[0] == kind]
        raw = nic.q.raw
        assert raw.host_errors == ex.errors, ffi.string(raw.errmsg)
        if ex.errors:
            msg = ffi.string(raw.errmsg).decode()
            assert msg and any(w in msg for w in ("tid", "transaction", "section", "slot", "type")), msg
        acks = Counter()
        for p in nic.w.host_read():
            assert p.type == PKT_COMP and p.flags == 0
            mtype, status = struct.unpack_from("<II", bytes(p.payload))
            assert mtype == P.MSG_SEND_RNDIS_PKT_COMPLETE
            acks[(p.trans_id, status)] += 1
        assert acks == ex.acks                     # every transfer packet acked exactly once
        assert not nic.w.ch.dead
    finally:
        nic.close()


@FAST
@given(host_script(), st.booleans(), st.lists(st.integers(1, 300), min_size=1, max_size=4))
def test_fuzz_rx_against_reference(script, zero_copy, maxes) -> None:
    check_script(script, zero_copy, maxes)


@pytest.mark.slow
@SLOW
@given(host_script(), st.booleans(), st.lists(st.integers(1, 300), min_size=1, max_size=4))
def test_fuzz_rx_against_reference_slow(script, zero_copy, maxes) -> None:
    check_script(script, zero_copy, maxes)


# ---- targeted hostile cases (each found or pinned by the fuzzer) -----------------------------

def test_huge_control_messages_are_bounded() -> None:
    """One transfer packet whose ranges all cover the whole receive buffer, each an RNDIS
    INDICATE claiming that whole length: the guest must not copy range-sized control records
    (a 31 MiB buffer x 4096 records would exhaust memory); they are malformed (status 2)."""
    big = 4 * 1024 * 1024
    nic = Nic(recv_size=big)
    try:
        nic.recv.view[0:8] = struct.pack("<II", P.RNDIS_INDICATE, big)
        for tid, ch in ((1, P.CHANNEL_TYPE_CONTROL), (2, P.CHANNEL_TYPE_DATA)):
            assert nic.w.host.out.put_xfer_pages(CAFE, [(big, 0)] * 64, P.nvsp_rndis_pkt(ch),
                                                 trans_id=tid)
        nic.w.host_commit()
        assert len(nic.q.rx_burst(64)) == 0
        recs = nic.records()
        assert sum(len(r[1]) for r in recs) <= 64 * 1024, [len(r[1]) for r in recs]
        assert nic.q.raw.host_errors == 128 and "RNDIS control message" in nic.q.last_host_error
        acks = sorted((p.trans_id, struct.unpack_from("<I", bytes(p.payload), 4)[0])
                      for p in nic.w.host_read())
        assert acks == [(1, 2), (2, 2)]
    finally:
        nic.close()


def test_inband_records_are_bounded() -> None:
    """In-band packets are copied into records: each is capped, and so is the queue."""
    nic = Nic(dsize=1024 * 1024)
    try:
        blob = bytes(200 * 1024)
        n = 0
        while nic.w.host.out.put(blob, trans_id=n, type=PKT_INBAND):
            n += 1
        nic.w.host_commit()
        nic.q.rx_burst(8)
        recs = nic.records()
        assert recs and all(len(r[1]) <= 64 * 1024 for r in recs)
    finally:
        nic.close()


def test_frame_larger_than_the_copy_buffer_is_dropped_not_stuck() -> None:
    """Copy mode with a small copy buffer: a (valid) frame that can never fit must be dropped
    and its packet acked — not left at the head of the queue forever."""
    nic = Nic(copy_frames=2)                                   # 3044-byte copy buffer
    try:
        frame = bytes(range(256)) * 16                         # 4096 bytes
        m1 = P.rndis_packet(frame)
        m2 = P.rndis_packet(frame[:100])
        nic.recv.view[0:len(m1)] = m1
        nic.recv.view[SLOT * 2:SLOT * 2 + len(m2)] = m2
        assert nic.w.host.out.put_xfer_pages(CAFE, [(len(m1), 0), (len(m2), SLOT * 2)],
                                             P.nvsp_rndis_pkt(0), trans_id=9)
        nic.w.host_commit()
        got = []
        for _ in range(5):
            b = nic.q.rx_burst(16)
            got += b.frames()
            b.release()
        assert got == [frame[:100]]
        assert "copy buffer" in nic.q.last_host_error
        assert [p.trans_id for p in nic.w.host_read()] == [9]
    finally:
        nic.close()


def test_flood_of_non_frames_returns_instead_of_spinning() -> None:
    """Every call does bounded work: a ring full of packets that are not frames (here
    completions for sends that do not exist) makes rx_burst return 0 frames after a bounded
    number of ring batches — the caller's timeout applies — instead of reading on for as long
    as the host keeps writing."""
    nic = Nic(dsize=8 * 1024 * 1024)
    try:
        n = 150_000
        payload = struct.pack("<II", P.MSG_SEND_RNDIS_PKT_COMPLETE, 1) * n
        lens = array("I", [8]) * n
        assert nic.w.host.out.put_burst(payload, lens, tid_base=TID_DATA | 0x100000,
                                         type=PKT_COMP) == n
        nic.w.host_commit()
        calls = 0
        while True:
            assert len(nic.q.rx_burst(64)) == 0
            calls += 1
            if not nic.w.ch.rx.avail:
                break
            assert calls < 50
        assert calls >= 2, "one call consumed 150000 packets: no bound on the work per call"
        assert nic.q.raw.host_errors == n
    finally:
        nic.close()


def test_frames_over_64k_are_malformed() -> None:
    """A PACKET whose data fits its (huge) range but exceeds the largest frame the guest takes
    (65535): malformed, status 2, nothing delivered."""
    nic = Nic(recv_size=256 * 1024)
    try:
        for n, tid in ((65535, 1), (65536, 2)):
            m = P.rndis_packet(bytes(n))
            nic.recv.view[0:len(m)] = m
            assert nic.w.host.out.put_xfer_pages(CAFE, [(len(m), 0)], P.nvsp_rndis_pkt(0),
                                                 trans_id=tid)
            nic.w.host_commit()
            b = nic.q.rx_burst(8, copy=False)
            assert b.lengths() == ([65535] if n == 65535 else [])
            b.release()
        acks = sorted((p.trans_id, struct.unpack_from("<I", bytes(p.payload), 4)[0])
                      for p in nic.w.host_read())
        assert acks == [(1, 1), (2, 2)]
    finally:
        nic.close()


def test_strict_mode_names_the_problem() -> None:
    nic = Nic(strict=True)
    try:
        assert nic.w.host.out.put_xfer_pages(CAFE, [(44, RECV_SIZE - 40)], P.nvsp_rndis_pkt(0),
                                             trans_id=77)
        nic.w.host_commit()
        with pytest.raises(ProtocolError, match=r"tid 77.*outside"):
            nic.q.rx_burst(8)
    finally:
        nic.close()


def test_corrupt_descriptor_is_ring_corrupt_through_the_queue() -> None:
    nic = Nic()
    try:
        assert nic.w.host.out.put_xfer_pages(CAFE, [(8, 0)], P.nvsp_rndis_pkt(0), trans_id=1)
        nic.w.host_commit()
        at = nic.w.rx_data_offset()
        struct.pack_into("<H", nic.w.mem.view, at + 2, 0xFFFF)     # offset8 > len8
        with pytest.raises(RingCorrupt, match="offset8"):
            nic.q.rx_burst(8)
        with pytest.raises(RingCorrupt):                            # stays dead
            nic.q.rx_burst(8, timeout=0.01)
        with pytest.raises(RingCorrupt):
            nic.q.reap()
    finally:
        nic.close()


# =============================================================================================
# TX completions

def sent_sections(nic: Nic) -> list[tuple[int, int]]:
    """(transaction id, section) of every SEND_RNDIS_PKT the guest sent since the last call."""
    out = []
    for p in nic.w.host_read():
        assert p.type == PKT_INBAND and p.flags == FLAG_COMPLETION_REQUESTED
        mtype, _, sec, size = struct.unpack_from("<IIII", bytes(p.payload))
        assert mtype == P.MSG_SEND_RNDIS_PKT and 0 < size <= SECTION
        out.append((p.trans_id, sec))
    return out


@st.composite
def completion_rounds(draw: Any) -> list[tuple[int, list[tuple[str, int, int, int]]]]:
    rounds = []
    for _ in range(draw(st.integers(1, 6))):
        nframes = draw(st.integers(0, 40))
        comps = draw(st.lists(st.tuples(
            st.sampled_from(["inflight", "inflight", "inflight", "dup", "stale", "kindswap",
                             "highbits", "idx", "foreign", "short", "wrongtype"]),
            st.integers(0, 1000), st.sampled_from([1, 1, 1, 2, 0]), hostile_int()), max_size=24))
        rounds.append((nframes, comps))
    return rounds


def check_completions(rounds: list[tuple[int, list[tuple[str, int, int, int]]]]) -> None:
    nic = Nic()
    host = nic.w.host.out
    inflight: dict[int, int] = {}          # section -> tid as sent
    done: list[int] = []                   # tids completed once
    errors = 0
    frames = [bytes([i]) * 60 for i in range(64)]
    try:
        for nframes, comps in rounds:
            taken = nic.q.tx_burst(frames[:nframes])
            assert 0 <= taken <= nframes
            for tid, sec in sent_sections(nic):
                assert 0 <= sec < NSECTIONS, sec
                assert sec not in inflight, f"section {sec} reused while the host owns it"
                assert tid & ~0xFFFFFFFF == TID_DATA and tid & 0xFFFFFFFF == sec
                inflight[sec] = tid
            assert nic.q.tx_inflight == len(inflight)
            for what, pick, status, wild in comps:
                secs = sorted(inflight)
                payload = struct.pack("<II", P.MSG_SEND_RNDIS_PKT_COMPLETE, status)
                if what in ("inflight", "kindswap") and secs:
                    sec = secs[pick % len(secs)]
                    tid = inflight.pop(sec)
                    if what == "kindswap":           # same section, CTRL kind: still that section
                        tid = TID_CTRL | sec
                    done.append(tid)
                elif what == "dup" and done:
                    tid = done[pick % len(done)]
                    if tid & 0xFFFFFFFF in inflight:  # re-sent since: a valid completion now
                        inflight.pop(tid & 0xFFFFFFFF)
                    else:
                        errors += 1
                elif what == "stale":
                    tid = TID_DATA | (NSECTIONS + pick)
                    errors += 1
                elif what == "highbits":
                    tid = TID_DATA | (1 << 33) | (pick % NSECTIONS)
                    errors += 1
                elif what == "idx":
                    tid = TID_DATA | (wild & 0xFFFFFFFF)
                    if tid & 0xFFFFFFFF in inflight:
                        inflight.pop(tid & 0xFFFFFFFF)
                    else:
                        errors += 1
                elif what == "short":
                    tid, payload = TID_DATA | (pick % NSECTIONS), b""   # padded to 8: use 0
                    errors += 1
                elif what == "wrongtype":
                    tid, payload = TID_DATA | (pick % NSECTIONS), struct.pack("<II", 107, status)
                    errors += 1
                else:                                 # no kind bits: handed to Python
                    tid = wild & ~TID_KIND & 0xFFFFFFFFFFFFFFFF
                if not host.put(payload, trans_id=tid, type=PKT_COMP):
                    break
            host.commit()
            nic.q.reap()
            assert nic.q.tx_inflight == len(inflight)
            assert nic.q.raw.host_errors == errors, ffi.string(nic.q.raw.errmsg)
        # the host completes everything: nothing leaks
        for _, tid in sorted(inflight.items()):
            assert host.put(struct.pack("<II", 108, 1), trans_id=tid, type=PKT_COMP)
        host.commit()
        nic.q.reap()
        assert nic.q.tx_inflight == 0
        assert nic.q.tx_burst(frames[:40]) > 0          # and the queue still works
    finally:
        nic.close()


@FAST
@given(completion_rounds())
def test_fuzz_tx_completions(rounds) -> None:
    check_completions(rounds)


@pytest.mark.slow
@SLOW
@given(completion_rounds())
def test_fuzz_tx_completions_slow(rounds) -> None:
    check_completions(rounds)


def test_host_max_pkt_per_msg_cannot_alias_the_free_marker() -> None:
    """INIT_CMPLT's max_pkt_per_msg is host-controlled and unbounded: 65535 small frames in one
    (huge) section must not be recorded as 0xFFFF, the "section free" marker, which made the
    host's completion look bogus and leaked the section for good."""
    section = 4 * 1024 * 1024
    nic = Nic(section_size=section, sections=2, max_pkt_per_msg=1_000_000)
    try:
        nic.q.raw.max_pkt_per_msg = 1_000_000                  # as nic.py sets it after INIT_CMPLT
        batch = TxBatch.repeat(bytes(14), 65535)
        assert nic.q.tx_burst(batch) == 65535
        sent = []
        for p in nic.w.host_read():
            _, _, sec, _ = struct.unpack_from("<IIII", bytes(p.payload))
            sent.append((p.trans_id, sec))
        for tid, _ in sent:
            assert nic.w.host.out.put(struct.pack("<II", 108, 1), trans_id=tid, type=PKT_COMP)
        nic.w.host_commit()
        nic.q.reap()
        assert nic.q.raw.host_errors == 0, ffi.string(nic.q.raw.errmsg)
        assert nic.q.tx_inflight == 0
    finally:
        nic.close()

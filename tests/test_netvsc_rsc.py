"""RSC (receive segment coalescing, NVSP 6.1 / NDIS 6.30) end to end: the guest joins fragment
chains (native/netvsc.c), the NetVSP model coalesces TCP segments (native/netvsp_rsc.c).

Facts from ../shared/reference/netvsc.md §4.4 / §6 (RNDIS_PKTINFO_ID, fragments in the ranges
of one transfer-page packet, NVSP_RSC_MAX 562) and the NDIS RSC rules (docs/simulator.md
"RSC"); frames and packets are built here by hand, independently of both sides' code.

1. the guest against a hand-played host (no simulator): valid chains joined in copy and
   zero-copy mode, hostile chains (range outside the buffer, no LAST_FRAG, orphans, > 562
   fragments, more than a datagram, truncated messages, a range count beyond the header)
   dropped with a counted, clear error and a FAIL ack — never a crash;
2. the model's coalescing rules against a raw guest (hand-built NVSP/RNDIS);
3. the driver against the model: N segments in, fewer and larger frames out with the same
   bytes and counts; RSC off (either side) changes nothing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim
from test_fuzz_netvsc import CAFE, RECV_SIZE
from test_fuzz_netvsc import Nic as HandNic
from test_netvsp_model import RawGuest

import uvmbus.netvsc as nv
from uvmbus.errors import ProtocolError, RingCorrupt
from uvmbus.native import lib
from uvmbus.netvsc import protocol as P
from uvmbus.ring import PKT_XFER_PAGES

pytestmark = pytest.mark.timeout(180)

SUBALLOC, FIRST, LAST = 1, 2, 4              # RNDIS_PKTINFO_ID flags (§4.4)
PKTINFO = 0x80000001
DATA_NVSP = struct.pack("<IIII", 107, 0, 0xFFFFFFFF, 0)
F_RSC = lib.UVB_NVSC_F_RSC


# ==== frames ==================================================================================
def csum16(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f">{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp4(seq: int, payload: bytes, *, flags: int = 0x10, ack: int = 5000, sport: int = 40000,
         dport: int = 5001, src: int = 1, ts: bool = False, dst_mac: bytes = b"\x00\x15\x5d\x00\x00\x01",
         window: int = 65535) -> bytes:
    """An Ethernet/IPv4/TCP segment with valid checksums."""
    opts = b"\x01\x01\x08\x0a" + struct.pack(">II", seq, 0) if ts else b""
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, (5 + len(opts) // 4) << 4, flags,
                      window, 0, 0) + opts + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), seq & 0xFFFF, 0x4000, 64, 6, 0,
                     bytes([10, 1, 0, src]), bytes([10, 0, 0, 254]))
    ip = ip[:10] + struct.pack(">H", csum16(ip)) + ip[12:]
    c = csum16(ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack(">H", c) + tcp[18:]
    return dst_mac + b"\x02\x00\x00\x00\x00\x07\x08\x00" + ip + tcp


def udp4(i: int, size: int) -> bytes:
    body = bytes((i + k) & 0xFF for k in range(size - 42))
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28 + len(body), i, 0x4000, 64, 17, 0,
                     bytes([10, 1, 0, 9]), bytes([10, 0, 0, 254]))
    ip = ip[:10] + struct.pack(">H", csum16(ip)) + ip[12:]
    return b"\x00\x15\x5d\x00\x00\x01\x02\x00\x00\x00\x00\x07\x08\x00" + ip + struct.pack(
        ">HHHH", 1000, 2000, 8 + len(body), 0) + body


def check_segment(f: bytes) -> tuple[int, int, bytes]:
    """A coalesced frame must look like one segment from the wire (NDIS "Indicating coalesced
    segments"): consistent lengths and valid checksums.  Returns (seq, flags, payload)."""
    ip = f[14:34]
    assert ip[0] == 0x45 and struct.unpack(">H", ip[2:4])[0] == len(f) - 14
    assert csum16(ip) == 0
    tcp = f[34:]
    assert csum16(ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp)) + tcp) == 0
    hl = (tcp[12] >> 4) * 4
    return struct.unpack(">I", tcp[4:8])[0], tcp[13], tcp[hl:]


def pkt(part: bytes, flags: int | None, *, pid: int = 9, extra: bytes = b"") -> bytes:
    """An RNDIS PACKET carrying ``part``; ``flags``: an RNDIS_PKTINFO_ID PPI with them."""
    ppi = extra
    if flags is not None:
        ppi += struct.pack("<III", 16, PKTINFO, 12) + struct.pack("<BBH", 1, flags, pid)
    return P.rndis_packet(part, ppi)


def chain(frame: bytes, n: int, *, pid: int = 9, hash_value: int | None = 0xABCD) -> list[bytes]:
    """``frame`` as ``n`` fragments: SUBALLOC|1ST_FRAG, SUBALLOC..., SUBALLOC|LAST_FRAG."""
    step = -(-len(frame) // n)
    parts = [frame[i:i + step] for i in range(0, len(frame), step)]
    assert len(parts) == n
    out = []
    for i, part in enumerate(parts):
        fl = SUBALLOC | (FIRST if i == 0 else 0) | (LAST if i == n - 1 else 0)
        extra = P.ppi_u32(P.PPI_HASH_VALUE, hash_value) if i == 0 and hash_value is not None else b""
        out.append(pkt(part, fl, pid=pid, extra=extra))
    return out


# ==== 1. the guest against a hand-played host =================================================
class Host:
    """Lays messages into the receive buffer (4 KiB slots) and sends transfer packets."""

    def __init__(self, **kw: Any):
        self.nic = HandNic(**kw)
        self.slot = 0

    def put(self, msg: bytes) -> tuple[int, int]:
        off = self.slot * 4096
        self.slot += -(-len(msg) // 4096)
        self.nic.recv.view[off:off + len(msg)] = msg
        return len(msg), off

    def xfer(self, ranges: list[tuple[int, int]], tid: int = 1) -> None:
        assert self.nic.w.host.out.put_xfer_pages(CAFE, ranges, DATA_NVSP, trans_id=tid)
        self.nic.w.host_commit()

    def acks(self) -> list[tuple[int, int]]:
        return [(p.trans_id, struct.unpack_from("<I", bytes(p.payload), 4)[0]) for p in self.nic.w.host_read()]

    def rx(self, copy: bool = True) -> tuple[list[bytes], list[Any]]:
        frames: list[bytes] = []
        metas: list[Any] = []
        for _ in range(20):
            b = self.nic.q.rx_burst(64, copy=copy)
            frames += [bytes(f) for f in b]
            metas += b.metas()
            b.release()
            if not len(b):
                break
        return frames, metas

    @property
    def stats(self) -> dict[str, int]:
        return self.nic.q.stats()

    def close(self) -> None:
        self.nic.close()


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    yield h
    h.close()


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "zero-copy"])
def test_guest_joins_a_fragment_chain(host, copy):
    frame = tcp4(1, bytes(range(256)) * 12)               # 3126 bytes
    plain = udp4(3, 200)
    ranges = [host.put(m) for m in chain(frame, 3)] + [host.put(P.rndis_packet(plain))]
    host.xfer(ranges)
    frames, metas = host.rx(copy)
    assert frames == [frame, plain]
    assert metas[0].coalesced and metas[0].rss_hash == 0xABCD and not metas[1].coalesced
    s = host.stats
    assert (s["rx_rsc_frames"], s["rx_rsc_frags"], s["rx_rsc_errors"], s["host_errors"]) == (1, 3, 0, 0)
    assert s["rx_packets"] == 2
    assert host.acks() == [(1, 1)]


def test_zero_copy_burst_with_a_joined_frame_forwards_a_copy(host):
    frame = tcp4(1, b"x" * 900)
    host.xfer([host.put(m) for m in chain(frame, 2)])
    b = host.nic.q.rx_burst(8, copy=False)
    assert len(b) == 1 and b.has_rsc_copies and bytes(b[0]) == frame
    assert b.descriptors[0].flags & F_RSC
    assert host.nic.q.tx_burst(b) == 1                    # sent from a copy, not base + offset
    b.release()
    with pytest.raises(Exception, match="released"):
        bytes(b[0])


def test_one_fragment_chain_is_an_ordinary_frame(host):
    frame = tcp4(1, b"y" * 100)
    host.xfer([host.put(pkt(frame, SUBALLOC | FIRST | LAST))])
    frames, metas = host.rx()
    assert frames == [frame] and not metas[0].coalesced
    assert host.stats["rx_rsc_frames"] == 0 and host.acks() == [(1, 1)]


def _dropped(host: Host, frames_expected: list[bytes], *, errors: int = 1, rsc_errors: int = 1) -> str:
    frames, _ = host.rx()
    assert frames == frames_expected
    s = host.stats
    assert s["rx_rsc_errors"] == rsc_errors and s["host_errors"] == errors, host.nic.q.last_host_error
    assert host.acks() == [(1, 2)]                        # status FAIL, like Linux
    return host.nic.q.last_host_error


def test_fragment_range_outside_the_buffer(host):
    frame = tcp4(1, b"z" * 3000)
    after = udp4(1, 100)
    r = [host.put(m) for m in chain(frame, 3)]
    r[1] = (r[1][0], RECV_SIZE - 10)                      # the middle fragment: past the end
    host.xfer(r + [host.put(P.rndis_packet(after))])
    msg = _dropped(host, [after], errors=3, rsc_errors=2)   # the range, the chain, the orphan
    assert "fragment of no chain" in msg


def test_chain_without_last_fragment(host):
    frame = tcp4(1, b"q" * 3000)
    ms = chain(frame, 3)[:2]                              # LAST_FRAG never comes
    host.xfer([host.put(m) for m in ms])
    assert "runs past the last range" in _dropped(host, [])


def test_orphan_fragment_and_interrupted_chain(host):
    frame = tcp4(1, b"o" * 3000)
    whole = udp4(2, 300)
    a, b, c = chain(frame, 3)
    host.xfer([host.put(b), host.put(a), host.put(P.rndis_packet(whole)), host.put(c)])
    frames, _ = host.rx()
    assert frames == [whole]                              # orphan, broken chain, orphan
    s = host.stats
    assert s["rx_rsc_errors"] == 3 and s["rx_rsc_frames"] == 0
    assert host.acks() == [(1, 2)]


def test_more_than_nvsp_rsc_max_fragments():
    h = Host(dsize=1024 * 1024)
    try:
        first = h.put(pkt(b"a" * 14, SUBALLOC | FIRST))
        mid = h.put(pkt(b"b" * 8, SUBALLOC))
        last = h.put(pkt(b"c" * 8, SUBALLOC | LAST))
        after = h.put(P.rndis_packet(udp4(1, 80)))
        n = lib.NVSP_RSC_MAX + 40
        h.xfer([first] + [mid] * (n - 2) + [last, after])
        assert "NVSP_RSC_MAX" in _dropped(h, [udp4(1, 80)])
        # exactly NVSP_RSC_MAX fragments is a frame
        h.xfer([first] + [mid] * (lib.NVSP_RSC_MAX - 2) + [last], tid=2)
        frames, metas = h.rx()
        assert len(frames) == 1 and len(frames[0]) == 14 + 8 * (lib.NVSP_RSC_MAX - 1)
        assert h.acks() == [(2, 1)]
    finally:
        h.close()


def test_joined_frame_larger_than_a_datagram(host):
    first = host.put(pkt(b"h" * 4000, SUBALLOC | FIRST))
    mid = host.put(pkt(b"m" * 4000, SUBALLOC))
    last = host.put(pkt(b"e" * 4000, SUBALLOC | LAST))
    host.xfer([first] + [mid] * 15 + [last])              # 17 x 4000 > 14 + 65535
    assert "more than one IP datagram" in _dropped(host, [])


def test_truncated_fragment_message(host):
    frame = tcp4(1, b"t" * 3000)
    ms = chain(frame, 3)
    r = [host.put(m) for m in ms]
    r[2] = (r[2][0] - 20, r[2][1])                        # the range cuts the last message short
    host.xfer(r)
    msg = _dropped(host, [], errors=2)                    # the message, then the chain
    assert "invalid fragment" in msg


def test_range_count_beyond_the_packet_is_a_corrupt_ring(host):
    """range_cnt larger than the transfer-page header holds: the ring layer ends the channel
    with a clear error (never reads ranges past the packet)."""
    r = host.put(P.rndis_packet(udp4(1, 60)))
    out = host.nic.w.host.out
    assert out.put_xfer_pages(CAFE, [r, r], DATA_NVSP, trans_id=1)
    # rewrite range_cnt (@ 20 of the first descriptor) to a huge value, then publish
    start = host.nic.w.rx_data_offset()
    host.nic.w.mem.view[start + 20:start + 24] = struct.pack("<I", 100000)
    host.nic.w.host_commit()
    with pytest.raises(RingCorrupt, match="ranges"):
        host.nic.q.rx_burst(8)


def test_strict_mode_raises_on_a_broken_chain():
    h = Host(strict=True)
    try:
        h.xfer([h.put(m) for m in chain(tcp4(1, b"s" * 3000), 3)[1:]])
        with pytest.raises(ProtocolError, match="RSC fragment chain"):
            h.nic.q.rx_burst(8)
    finally:
        h.close()


# ==== 2. the model's coalescing rules against a raw guest =====================================
@pytest.fixture(scope="module")
def rsim(tmp_path_factory) -> Iterator[SimProcess]:
    with run_sim(tmp_path_factory.mktemp("rsc"), "--echo", "0", "--no-ic",
                 "--device", "netvsc:backend=loopback",
                 "--device", "netvsc:backend=loopback,rsc_segments=4",
                 "--device", "netvsc:backend=loopback,rsc=off") as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield sim


def raw_guest(sim: SimProcess, index: int = 0, *, declare: bool = True, enable: bool = True,
              refused: bool = False) -> RawGuest:
    """NVSP 6.1 bring-up by hand: NDIS config with (or without) the RSC capability, RNDIS
    init, packet filter, then OID_TCP_OFFLOAD_PARAMETERS with rsc_ip_v4/v6 = 2 (enabled)."""
    g = RawGuest(sim, sim.device("netvsc", index)["device_id"])
    g.request(P.nvsp_init(P.NVSP_V61))
    g.version = P.NVSP_V61
    caps = P.CAP_IEEE8021Q | P.CAP_TEAMING | (P.CAP_RSC if declare else 0)
    g.ch.send(P.nvsp_ndis_config(1514, caps))
    g.ch.send(P.nvsp_ndis_version(6, 30))
    assert g.request(P.nvsp_send_recv_buf(g.recv.gpadl))["status"] == 1
    assert g.request(P.nvsp_send_send_buf(g.send_buf.gpadl))["status"] == 1
    g.rndis(P.rndis_init(1), P.RNDIS_INIT_C)
    assert g.set(P.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0x0B)).status == 0
    if enable:
        params = struct.pack("<BBHBBBBBBBBBBBBIBBBBBBBB", 0x80, 3, 28, 0, 0, 0, 0, 0, 0, 0, 0,
                             0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0)   # @22 rsc_ip_v4, @23 rsc_ip_v6
        assert len(params) == 28
        status = g.set(P.OID_TCP_OFFLOAD_PARAMETERS, params).status
        if refused:                                        # a host without RSC (like LSO)
            assert status == P.ST_NOT_SUPPORTED
        else:
            assert status == 0
            (ind,) = g.xfers()                             # TASK_OFFLOAD_CURRENT_CONFIG
            g.ack(ind.trans_id)
    return g


def units(g: RawGuest, want_bytes: int, timeout: float = 5.0) -> list[tuple[bytes, list[dict[int, int]]]]:
    """Receive transfer packets (acking each) until ``want_bytes`` frame bytes came; join each
    chain of fragments.  Returns (frame, [PPIs of each fragment])."""
    out: list[tuple[bytes, list[dict[int, int]]]] = []
    got = 0
    end = time.monotonic() + timeout
    cur: list[Any] = []
    while got < want_bytes and time.monotonic() < end:
        x = g.ch.wait_for(lambda p: p.type == PKT_XFER_PAGES, timeout=timeout, what="a transfer-page packet")
        _, _, rg = g.ranges(x)
        for count, off in rg:
            rp = P.parse_rndis_packet(g.read(count, off))
            ident = rp.ppis.get(PKTINFO)
            fl = (ident >> 8) & 0xFF if ident is not None else 0
            if not fl & SUBALLOC:
                assert not cur
                out.append((rp.frame, [rp.ppis]))
                got += len(rp.frame)
                continue
            assert bool(fl & FIRST) == (not cur), "1ST_FRAG exactly on the first fragment"
            assert ident & 0xFF == 1                          # version 1
            cur.append(rp)
            if fl & LAST:
                assert len({c.ppis[PKTINFO] >> 16 for c in cur}) == 1    # one packet id
                frame = b"".join(c.frame for c in cur)
                out.append((frame, [c.ppis for c in cur]))
                got += len(frame)
                cur = []
        assert not cur, "a chain must end inside its transfer packet"
        g.ack(x.trans_id)
    return out


def send(g: RawGuest, frames: list[bytes]) -> None:
    """All frames in one NVSP message: the host reads them in one pump pass."""
    assert g.send_frames(frames) == 1


def stats(g: RawGuest) -> dict[str, Any]:
    return g.sim.device_stats(g.dev)["netvsp"]


@pytest.fixture
def guest(rsim: SimProcess) -> Iterator[Any]:
    made: list[RawGuest] = []

    def make(*a: Any, **kw: Any) -> RawGuest:
        g = raw_guest(rsim, *a, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_model_coalesces_one_flow_into_a_multi_range_unit(guest):
    g = guest()
    st = stats(g)
    assert st["rsc"] == {"offered": True, "ipv4": True, "ipv6": True, "max_segments": 0}
    payloads = [bytes([i]) * 120 for i in range(20)]
    segs = [tcp4(1000 + 120 * i, p) for i, p in enumerate(payloads)]
    send(g, segs)
    (u,) = units(g, 54 + 2400)
    frame, ppis = u
    seq, flags, data = check_segment(frame)
    assert (seq, flags, data) == (1000, 0x10, b"".join(payloads))
    assert len(ppis) == 2                                   # 2454 bytes: two 1550-byte sub-allocations
    assert ppis[0][P.PPI_TCPIP_CHKSUM] & (lib.CSUM_RX_IP_OK | lib.CSUM_RX_TCP_OK) == \
        lib.CSUM_RX_IP_OK | lib.CSUM_RX_TCP_OK
    assert P.PPI_TCPIP_CHKSUM not in ppis[1]                # metadata rides on the first
    q = stats(g)["queues"]["0"]
    assert (q["rsc_units"], q["rsc_segments"], q["rsc_fragments"]) == (1, 20, 2)


def test_model_keeps_flows_apart_and_breaks_on_gaps_and_flags(guest):
    g = guest()
    p = b"p" * 100
    a = [tcp4(1 + 100 * i, p, src=1) for i in range(6)]
    b = [tcp4(9000 + 100 * i, p, src=2) for i in range(6)]
    inter = [f for pair in zip(a, b, strict=True) for f in pair]          # A B A B ...
    gap = [tcp4(50000, p, src=3), tcp4(50100, p, src=3), tcp4(50300, p, src=3), tcp4(50400, p, src=3)]
    fin = [tcp4(70000, p, src=4), tcp4(70100, p, src=4), tcp4(70200, p, src=4, flags=0x11),
           tcp4(70300, p, src=4)]
    send(g, inter + gap + fin)
    got = units(g, 2 * (54 + 600) + 2 * (54 + 200) + (54 + 200) + 2 * 154)   # what the rules leave
    by_src: dict[int, list[tuple[int, int, int]]] = {}
    for frame, _ in got:
        seq, flags, data = check_segment(frame)
        by_src.setdefault(frame[29], []).append((seq, flags, len(data)))
    assert by_src[1] == [(1, 0x10, 600)] and by_src[2] == [(9000, 0x10, 600)]   # interleaved: one each
    assert by_src[3] == [(50000, 0x10, 200), (50300, 0x10, 200)]                # a gap: two units
    assert by_src[4] == [(70000, 0x10, 200), (70200, 0x11, 100), (70300, 0x10, 100)]  # FIN alone


def test_model_psh_ack_change_and_segment_limit(guest, rsim):
    g = guest()
    p = b"k" * 100
    psh = [tcp4(1, p), tcp4(101, p, flags=0x18), tcp4(201, p)]            # PSH ends its unit
    ack = [tcp4(5000, p, src=2), tcp4(5100, p, src=2, ack=6000)]          # another ACK number
    ts = [tcp4(8000, p, src=3, ts=True), tcp4(8100, p, src=3, ts=True)]   # timestamps coalesce
    send(g, psh + ack + ts)
    got = [check_segment(f) for f, _ in units(g, 7 * 100 + 5 * 54 + 12)]
    got_by = {(s, fl, len(d)) for s, fl, d in got}
    assert got_by == {(1, 0x18, 200), (201, 0x10, 100), (5000, 0x10, 100), (5100, 0x10, 100),
                      (8000, 0x10, 200)}
    g4 = guest(1)                                                         # rsc_segments=4
    send(g4, [tcp4(1 + 50 * i, b"s" * 50) for i in range(10)])
    sizes = [len(check_segment(f)[2]) for f, _ in units(g4, 500 + 3 * 54)]
    assert sizes == [200, 200, 100]


def test_model_never_coalesces_when_off_or_undeclared_or_not_tcp(rsim):
    segs = [tcp4(1 + 100 * i, b"n" * 100) for i in range(5)]
    for index, kw in ((0, {"enable": False}), (0, {"declare": False}), (2, {"refused": True})):
        g = raw_guest(rsim, index, **kw)
        try:
            send(g, segs)
            got = units(g, 5 * 154)
            assert [f for f, _ in got] == segs
            assert all(PKTINFO not in pp[0] for _, pp in got)
            st = stats(g)
            assert not st["rsc"]["ipv4"]
            if index == 2:
                assert st["rsc"]["offered"] is False
            elif not kw.get("declare", True):
                assert st["rsc_undeclared"] >= 1           # enabled without the NDIS capability
        finally:
            g.close()
    g = raw_guest(rsim)
    try:
        dgrams = [udp4(i, 200) for i in range(5)]
        send(g, dgrams)
        assert [f for f, _ in units(g, 5 * 200)] == dgrams
    finally:
        g.close()


def tcp6(seq: int, payload: bytes, *, hop: int = 64, src: int = 1) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", 40001, 5001, seq, 7000, 0x50, 0x10, 1000, 0, 0) + payload
    s6, d6 = bytes(15) + bytes([src]), bytes(15) + b"\xfe"
    c = csum16(s6 + d6 + struct.pack(">IxxxB", len(tcp), 6) + tcp)
    tcp = tcp[:16] + struct.pack(">H", c) + tcp[18:]
    ip = struct.pack(">IHBB", 6 << 28, len(tcp), 6, hop) + s6 + d6
    return b"\x00\x15\x5d\x00\x00\x01\x02\x00\x00\x00\x00\x07\x86\xdd" + ip + tcp


def test_model_coalesces_ipv6_and_keeps_the_vlan(guest):
    g = guest()
    segs = [tcp6(10 + 150 * i, bytes([i]) * 150, hop=64 - i) for i in range(12)]
    send(g, segs)
    ((frame, ppis),) = units(g, 74 + 12 * 150)
    ip, tcp = frame[14:54], frame[54:]
    assert struct.unpack(">H", ip[4:6])[0] == len(tcp) == 20 + 1800 and ip[7] == 64 - 11   # minimum hop limit
    assert csum16(ip[8:40] + struct.pack(">IxxxB", len(tcp), 6) + tcp) == 0
    assert struct.unpack(">I", tcp[4:8])[0] == 10 and tcp[20:] == b"".join(bytes([i]) * 150 for i in range(12))
    assert len(ppis) == 2 and ppis[0][P.PPI_TCPIP_CHKSUM] & lib.CSUM_RX_TCP_OK
    # a VLAN tag (PPI from the guest's send, metadata on the way back) rides on the first fragment
    tci = 0x2005
    vlan = P.ppi_u32(P.PPI_IEEE_8021Q, P.vlan_ppi_value(tci))
    assert g.send_frames([tcp4(1 + 200 * i, b"v" * 200) for i in range(10)], ppis=vlan) == 1
    ((frame, ppis),) = units(g, 54 + 2000)
    assert check_segment(frame)[2] == b"v" * 2000
    assert P.vlan_tci(ppis[0][P.PPI_IEEE_8021Q]) == tci and P.PPI_IEEE_8021Q not in ppis[1]


# ==== 3. the driver against the model ===========================================================
def drain_bytes(nic: nv.Nic, want: int, copy: bool = True, timeout: float = 10.0) -> tuple[list[bytes], list[Any]]:
    frames: list[bytes] = []
    metas: list[Any] = []
    end = time.monotonic() + timeout
    while sum(len(f) - 54 for f in frames) < want and time.monotonic() < end:
        b = nic.rx_burst(0, 256, timeout=0.05, copy=copy)
        frames += [bytes(f) for f in b]
        metas += b.metas()
        b.release()
    return frames, metas


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "zero-copy"])
def test_end_to_end_segments_arrive_coalesced(rsim, copy):
    dev = rsim.device("netvsc", 0)["device_id"]
    payloads = [bytes([(i * 7 + k) & 0xFF for k in range(1000)]) for i in range(40)]
    segs = [tcp4(77 + 1000 * i, p) for i, p in enumerate(payloads)]
    with nv.open(dev, rsim.root, rsc=True) as nic:
        assert nic.rsc and nic.info().rsc and nic.info().offloads["rsc"]
        before = rsim.device_stats(dev)["netvsp"]["queues"]["0"]
        assert nic.tx_burst(segs, timeout=5) == 40
        frames, metas = drain_bytes(nic, 40_000, copy)
        assert len(frames) < 40 and any(m.coalesced for m in metas)
        assert b"".join(check_segment(f)[2] for f in frames) == b"".join(payloads)
        assert check_segment(frames[0])[0] == 77
        s = nic.stats()["total"]
        assert s["rx_packets"] == len(frames) and s["rx_rsc_frames"] == sum(m.coalesced for m in metas)
        assert s["rx_rsc_errors"] == 0 and s["host_errors"] == 0
        after = rsim.device_stats(dev)["netvsp"]["queues"]["0"]
        assert after["rsc_segments"] - before["rsc_segments"] == sum(
            len(check_segment(f)[2]) // 1000 for f, m in zip(frames, metas, strict=True) if m.coalesced)
    assert rsim.totals()["needless_signals"] == 0, rsim.needless_report()


@pytest.mark.parametrize("index,ask", [(0, False), (2, True)], ids=["guest-off", "host-off"])
def test_end_to_end_without_rsc_nothing_changes(rsim, index, ask):
    dev = rsim.device("netvsc", index)["device_id"]
    segs = [tcp4(1 + 1000 * i, bytes([i]) * 1000) for i in range(30)]
    with nv.open(dev, rsim.root, rsc=ask) as nic:
        assert not nic.rsc
        assert nic.tx_burst(segs, timeout=5) == 30
        frames, metas = drain_bytes(nic, 30_000)
        assert frames == segs and not any(m.coalesced for m in metas)
        assert nic.stats()["total"]["rx_rsc_frames"] == 0


def test_generator_tcp_stream_with_and_without_rsc(tmp_path):
    """The generator's TCP stream: in-order segments of one flow, each payload starting with
    its stream number; with RSC they arrive coalesced, written straight into the fragments —
    here with an odd fragment size (MTU 1501: 1551 bytes per sub-allocation), so the TCP
    checksum runs across odd fragment boundaries."""
    size, count = 600, 300
    pl = size - 54
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device",
                 "netvsc:backend=generator,gen_proto=tcp,gen_flows=1") as sim:
        dev = sim.device("netvsc")["device_id"]
        sim.bind(dev)
        for rsc in (True, False):
            sim.control("model", device=dev, op="generator", args={"size": size, "flows": 1, "count": count})
            with nv.open(dev, sim.root, rsc=rsc, mtu=1501) as nic:
                assert nic.rsc == rsc
                frames, metas = drain_bytes(nic, count * pl)
                q = sim.device_stats(dev)["netvsp"]["queues"]["0"]
            if rsc:         # as many segments per unit as one IP datagram holds (65495 // 546)
                per = (65535 - 40) // pl
                assert q["rsc_segments"] == count and q["rsc_units"] == -(-count // per)
            assert (len(frames) < count) == rsc and any(m.coalesced for m in metas) == rsc
            seq0 = check_segment(frames[0])[0]
            stream = b""
            for f in frames:
                seq, flags, data = check_segment(f)
                assert seq == seq0 + len(stream) and flags == 0x10
                stream += data
            assert len(stream) == count * pl
            nums = [struct.unpack_from("<Q", stream, i * pl)[0] for i in range(count)]
            assert nums == list(range(count))


def test_bench_cli_compares_rsc_off_and_on(rsim):
    import json
    import subprocess
    import sys
    dev = rsim.device("netvsc", 0)["device_id"]
    r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "bench", dev, "--root", str(rsim.root),
                        "--mode", "rx", "--proto", "tcp", "--size", "1514", "--seconds", "0.5",
                        "--rsc", "both", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    off, on = d["runs"]
    assert (off["rsc"], on["rsc"]) == (False, True) and d["rsc_payload_ratio"] > 0
    assert off["segments"] == off["frames"] > 0
    assert on["segments"] > on["frames"] > 0 and on["guest"]["rx_rsc_frames"] > 0
    assert rsim.device_stats(dev)["netvsp"]["backend"] == "loopback"      # restored
    r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "bench", dev, "--root", str(rsim.root),
                        "--mode", "fwd", "--rsc", "on"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--mode rx" in r.stderr
    r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "bench", dev, "--root", str(rsim.root),
                        "--mode", "rx", "--rsc", "both"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "add --proto tcp" in r.stderr        # UDP: nothing to coalesce
    for bad, why in ((["--mode", "tx", "--proto", "tcp"], "--proto tcp"), (["--mode", "fwd", "--copy"], "--copy")):
        r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "bench", dev, "--root", str(rsim.root), *bad],
                           capture_output=True, text=True, timeout=60)   # options the mode would ignore
        assert r.returncode != 0 and f"uvmbus: error: {why}:" in r.stderr, r.stderr


def test_net_info_shows_rsc(rsim):
    import json
    import subprocess
    import sys
    for index, ask, want in ((0, True, "on"), (0, False, "off (the host offers it"), (2, True, "off (the host does not")):
        dev = rsim.device("netvsc", index)["device_id"]
        r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "info", dev, "--root", str(rsim.root),
                            "--stats", *(["--rsc"] if ask else [])], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"RSC: {want}" in r.stdout and "rx_rsc_frames 0" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "uvmbus", "net", "info", rsim.device("netvsc", 0)["device_id"],
                        "--root", str(rsim.root), "--rsc", "--stats", "--json"], capture_output=True, text=True,
                       timeout=60)
    d = json.loads(r.stdout)
    assert d["rsc"] and d["rsc_requested"] and d["offloads"]["rsc"] and "rx_rsc_errors" in d["guest_stats"]


def test_rsc_survives_a_reinitialisation(rsim):
    """set_mtu re-initialises NVSP/RNDIS: RSC is asked for again (and the larger
    sub-allocations of a jumbo MTU carry the unit in fewer fragments)."""
    dev = rsim.device("netvsc", 0)["device_id"]
    with nv.open(dev, rsim.root, rsc=True) as nic:
        nic.set_mtu(4000)
        assert nic.rsc and nic.mtu == 4000
        segs = [tcp4(5 + 3000 * i, bytes([i]) * 3000) for i in range(12)]
        assert nic.tx_burst(segs, timeout=5) == 12
        frames, metas = drain_bytes(nic, 36_000)
        assert b"".join(check_segment(f)[2] for f in frames) == b"".join(bytes([i]) * 3000 for i in range(12))
        assert any(m.coalesced for m in metas)
        s = nic.stats()["total"]
        assert s["rx_rsc_frags"] < 12 * 2          # 4050-byte fragments: fewer than at MTU 1500

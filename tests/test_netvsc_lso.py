"""Large send offload (LSOv2): the PPI the guest's C data path builds, the host model's C
segmenter against a reference written here from the RFC rules, negotiation by OID (host with
and without LSO, driver with LSO off), large sends end to end through the simulator, and the
errors a wrong large send gives.

The reference segmenter (``ref_segments``) is written from RFC 9293 (sequence numbers),
RFC 791 / RFC 8200 (lengths, identification), RFC 1071 (checksums) and Microsoft's LSO rules
as the docs quote them (FIN/PSH on the last segment only; CWR on the first only, as Linux
``tcp_gso_segment``), independently of native/netvsp_lso.c; checksums of every segment are
verified on their own by summing the whole header + pseudo header (``verify``).
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simhelpers import run_sim
from test_fuzz_netvsc import Nic as GuardedNic

import uvmbus.netvsc as nv
from uvmbus.errors import ConfigError, FrameRejected, NegotiationError
from uvmbus.native import ffi, lib
from uvmbus.netvsc import TxBatch
from uvmbus.netvsc import protocol as P

pytestmark = pytest.mark.timeout(180)

SRC_MAC = b"\x02\x00\x00\x00\x00\x07"


# ==== frames and the reference ==================================================================
def csum16(data: bytes) -> int:
    """RFC 1071 one's-complement sum (folded, not complemented)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def cksum(data: bytes) -> int:
    return ~csum16(data) & 0xFFFF


def pseudo(ip: bytes, v6: bool, l4len: int) -> bytes:
    if v6:
        return ip[8:40] + struct.pack(">IxxxB", l4len, 6)
    return ip[12:20] + struct.pack(">xBH", 6, l4len)


def tcp_frame(dst: bytes, payload: bytes, *, v6: bool = False, seq: int = 1000, flags: int = 0x18,
              ip_opts: bytes = b"", tcp_opts: bytes = b"", ident: int = 0x1234, sport: int = 40000) -> bytes:
    """A well-formed Ethernet + IPv4/IPv6 + TCP frame with correct lengths and checksums."""
    thl = 20 + len(tcp_opts)
    tcp = struct.pack(">HHIIBBHHH", sport, 5201, seq, 77, (thl // 4) << 4, flags, 65535, 0, 0) + tcp_opts
    if v6:
        ip = struct.pack(">IHBB16s16s", 0x60000000, thl + len(payload), 6, 64,
                         bytes.fromhex("fd000000000000000000000000000001"),
                         bytes.fromhex("fd000000000000000000000000000002"))
        et = b"\x86\xdd"
    else:
        ihl = 20 + len(ip_opts)
        ip = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + thl + len(payload), ident, 0x4000, 64, 6,
                         0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])) + ip_opts
        ip = ip[:10] + struct.pack(">H", cksum(ip)) + ip[12:]
        et = b"\x08\x00"
    c = cksum(pseudo(ip, v6, len(tcp) + len(payload)) + tcp + payload)
    tcp = tcp[:16] + struct.pack(">H", c) + tcp[18:]
    return dst + SRC_MAC + et + ip + tcp + payload


def ref_segments(frame: bytes, mss: int) -> list[bytes]:
    """What a NIC puts on the wire for a large send of ``frame`` at ``mss`` (see the module
    docstring for the rules)."""
    v6 = frame[12:14] == b"\x86\xdd"
    l3 = 14
    ihl = 40 if v6 else (frame[l3] & 0xF) * 4
    l4 = l3 + ihl
    thl = (frame[l4 + 12] >> 4) * 4
    hdr = l4 + thl
    payload = frame[hdr:]
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    seq0 = struct.unpack_from(">I", frame, l4 + 4)[0]
    ident0 = 0 if v6 else struct.unpack_from(">H", frame, l3 + 4)[0]
    flags0 = frame[l4 + 13]
    out = []
    for k, chunk in enumerate(chunks):
        ip = bytearray(frame[l3:l4])
        tcp = bytearray(frame[l4:hdr])
        if v6:
            struct.pack_into(">H", ip, 4, thl + len(chunk))
        else:
            struct.pack_into(">H", ip, 2, ihl + thl + len(chunk))
            struct.pack_into(">H", ip, 4, (ident0 + k) & 0xFFFF)
            struct.pack_into(">H", ip, 10, 0)
            struct.pack_into(">H", ip, 10, cksum(bytes(ip)))
        struct.pack_into(">I", tcp, 4, (seq0 + k * mss) & 0xFFFFFFFF)
        fl = flags0
        if k < len(chunks) - 1:
            fl &= ~0x09                  # FIN, PSH: last segment only
        if k > 0:
            fl &= ~0x80                  # CWR: first segment only
        tcp[13] = fl
        struct.pack_into(">H", tcp, 16, 0)
        struct.pack_into(">H", tcp, 16, cksum(pseudo(bytes(ip), v6, len(tcp) + len(chunk)) + bytes(tcp) + chunk))
        out.append(frame[:l3] + bytes(ip) + bytes(tcp) + chunk)
    return out


def verify(seg: bytes) -> None:
    """Independent check of one segment: lengths agree with its size, checksums sum to zero."""
    v6 = seg[12:14] == b"\x86\xdd"
    if v6:
        plen = struct.unpack_from(">H", seg, 18)[0]
        assert 54 + plen == len(seg)
        l4 = 54
        ip = seg[14:54]
    else:
        ihl = (seg[14] & 0xF) * 4
        assert struct.unpack_from(">H", seg, 16)[0] == len(seg) - 14
        assert csum16(seg[14:14 + ihl]) == 0xFFFF, "IPv4 header checksum"
        l4 = 14 + ihl
        ip = seg[14:l4]
    assert csum16(pseudo(ip, v6, len(seg) - l4) + seg[l4:]) == 0xFFFF, "TCP checksum"


def c_segment(frame: bytes, ppi: int) -> list[bytes] | int:
    """native/netvsp_lso.c: the host model's segmenter."""
    segs_max = len(frame) // max(ppi & 0xFFFFF, 1) + 2
    cap = segs_max * 256 + len(frame)           # headers are at most 14 + 60 + 60 bytes
    out = ffi.new("uint8_t[]", cap)
    lens = ffi.new("uint32_t[]", 70000)
    n = lib.uvb_nvsp_lso_segment(frame, len(frame), ppi, out, cap, lens, 70000)
    if n < 0:
        return int(n)
    segs, pos = [], 0
    for i in range(n):
        segs.append(bytes(ffi.buffer(out + pos, lens[i])))
        pos += lens[i]
    return segs


DST = b"\x00\x15\x5d\x00\x00\x01"


# ==== PPI encoding ===============================================================================
def test_ppi_bit_layout():
    # bits 0-19 MSS, 20-29 TCP header offset, 30 LSOv2, 31 IPv6 (netvsc.md §4.4)
    assert P.lso_ppi_value(1448, 34, False) == 1448 | (34 << 20) | (1 << 30)
    assert P.lso_ppi_value(1440, 54, True) == 1440 | (54 << 20) | (1 << 30) | (1 << 31)
    assert P.lso_ppi_value(0xFFFFF, 1023, True) == 0xFFFFFFFF
    assert P.parse_lso_ppi(P.lso_ppi_value(536, 66, False)) == (536, 66, False, True)
    for bad in ((0, 34), (1 << 20, 34), (1448, 1024)):
        with pytest.raises(ValueError):
            P.lso_ppi_value(bad[0], bad[1], False)


def sent_messages(nic: GuardedNic) -> list[bytes]:
    """The RNDIS stream of every data send since the last call (sections only)."""
    out = []
    for p in nic.w.host_read():
        mtype, _, sec, size = struct.unpack_from("<IIII", bytes(p.payload))
        assert mtype == P.MSG_SEND_RNDIS_PKT
        base = sec * SECTION_BIG
        out.append(bytes(nic.send.mm[nic.send.offset + base:nic.send.offset + base + size]))
    return out


SECTION_BIG = 72 * 1024          # a section that holds a whole large send


def test_c_data_path_builds_the_lso_ppi_and_prepares_headers():
    """The guest's C path: one LSO PPI (no checksum PPI), frame headers prepared like Linux's
    netvsc_xmit (IPv4 total length / checksum 0, IPv6 payload length 0, TCP checksum = the
    pseudo-header sum without length), payload untouched."""
    nic = GuardedNic(section_size=SECTION_BIG, sections=4)
    try:
        r = nic.q.raw
        r.lso4_max = r.lso6_max = 62780
        r.lso_min_segs = 2
        pay = bytes(random.Random(5).randrange(256) for _ in range(5000))
        f4 = tcp_frame(DST, pay, tcp_opts=b"\x01\x01\x08\x0a" + bytes(8))        # 32-byte TCP header
        f6 = tcp_frame(DST, pay, v6=True)
        assert nic.q.tx_burst(TxBatch([f4, f6], mss=[1448, 1400], offload_csum=True)) == 2
        stream = b"".join(sent_messages(nic))
        pkts = []
        while stream:
            mlen = struct.unpack_from("<I", stream, 4)[0]
            pkts.append(stream[:mlen])
            stream = stream[(mlen + 7) & ~7:]
        assert len(pkts) == 2
        for raw, f, mss, v6 in ((pkts[0], f4, 1448, False), (pkts[1], f6, 1400, True)):
            p = P.parse_rndis_packet(raw)
            tcp_off = 54 if v6 else 34
            assert p.ppis == {P.PPI_TCP_LARGESEND: P.lso_ppi_value(mss, tcp_off, v6)}
            sent = p.frame
            assert len(sent) == len(f) and sent[tcp_off + 18:] == f[tcp_off + 18:]
            ip = f[14:tcp_off]
            if v6:
                assert sent[18:20] == b"\0\0"
            else:
                assert sent[16:18] == b"\0\0" and sent[24:26] == b"\0\0"
            seed = csum16(pseudo(ip, v6, 0))
            assert struct.unpack_from(">H", sent, tcp_off + 16)[0] == seed
            # the host's segmentation of what was sent = the reference's of the original frame
            assert c_segment(sent, P.lso_ppi_value(mss, tcp_off, v6)) == ref_segments(f, mss)
        assert nic.q.stats()["tx_lso"] == 2
    finally:
        nic.close()


# ==== the host model's segmenter =================================================================
CASES = [
    ("v4 exact multiple", False, 1448 * 4, 1448, b"", b"", 0x18),
    ("v4 ragged tail", False, 10000, 1448, b"", b"", 0x19),        # PSH|FIN
    ("v4 one short segment", False, 100, 1448, b"", b"", 0x18),
    ("v4 options both", False, 7000, 1000, b"\x01\x01\x01\x00", b"\x02\x04\x05\xb4\x01\x01\x08\x0a" + bytes(8), 0x98),
    ("v6", True, 20000, 1440, b"", b"", 0x18),
    ("v6 cwr fin", True, 3000, 1000, b"", b"\x01\x01\x01\x01", 0x99),
    ("v4 max size", False, 62780 - 54, 1460, b"", b"", 0x10),
]


@pytest.mark.parametrize("name,v6,size,mss,ip_opts,tcp_opts,flags", CASES, ids=[c[0] for c in CASES])
def test_segmenter_matches_the_reference(name, v6, size, mss, ip_opts, tcp_opts, flags):
    pay = bytes(random.Random(size).randrange(256) for _ in range(size))
    f = tcp_frame(DST, pay, v6=v6, ip_opts=ip_opts, tcp_opts=tcp_opts, flags=flags, seq=0xFFFFF000)
    tcp_off = 54 if v6 else 34 + len(ip_opts)
    segs = c_segment(f, P.lso_ppi_value(mss, tcp_off, v6))
    assert isinstance(segs, list)
    ref = ref_segments(f, mss)
    assert segs == ref
    assert len(segs) == max(1, -(-size // mss))
    assert b"".join(s[tcp_off + 20 + len(tcp_opts):] for s in segs) == pay
    for s in segs:
        verify(s)


def test_segmenter_ignores_the_guests_length_and_checksum_fields():
    """Linux leaves total length 0 and a pseudo-header seed: the result is the same."""
    f = tcp_frame(DST, bytes(5000))
    mangled = bytearray(f)
    mangled[16:18] = b"\0\0"
    mangled[24:26] = b"\xde\xad"
    mangled[34 + 16:34 + 18] = b"\xbe\xef"
    assert c_segment(bytes(mangled), P.lso_ppi_value(1000, 34, False)) == ref_segments(f, 1000)


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.integers(0, 9000), st.integers(1, 2000), st.integers(0, 10).map(lambda n: n * 4),
       st.integers(0, 255), st.integers(0, 0xFFFFFFFF))
def test_segmenter_property(v6, size, mss, topt, flags, seq):
    f = tcp_frame(DST, bytes((i * 7) & 0xFF for i in range(size)), v6=v6, tcp_opts=b"\x01" * topt,
                  flags=flags, seq=seq, ident=0xFFFE)
    tcp_off = 54 if v6 else 34
    segs = c_segment(f, P.lso_ppi_value(mss, tcp_off, v6))
    assert segs == ref_segments(f, mss)
    for s in segs:
        verify(s)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 0xFFFFFFFF))
def test_segmenter_on_garbage(data, ppi):
    """A hostile guest's bytes: refused (UVB_EINVAL) or segmented into frames that each carry
    the same headers; never a read outside the frame (the copy is exact-size)."""
    frame = bytes(data)
    r = c_segment(frame, ppi)
    if isinstance(r, int):
        assert r == lib.UVB_EINVAL
        return
    mss = ppi & 0xFFFFF
    tcp = (ppi >> 20) & 0x3FF
    hdr = tcp + (frame[tcp + 12] >> 4) * 4
    assert b"".join(s_[hdr:] for s_ in r) == frame[hdr:]
    assert all(len(s_) - hdr <= mss for s_ in r)


def test_segmenter_refusals():
    f4 = tcp_frame(DST, bytes(3000))
    f6 = tcp_frame(DST, bytes(3000), v6=True)
    einval = lib.UVB_EINVAL
    assert c_segment(f4, 34 << 20) == einval                                   # MSS 0
    assert c_segment(f4, P.lso_ppi_value(1000, 33, False)) == einval           # offset < 14 + 20
    assert c_segment(f6, P.lso_ppi_value(1000, 53, True)) == einval            # offset < 14 + 40
    assert c_segment(f4, P.lso_ppi_value(1000, 1023, False)) == einval         # beyond the frame
    assert c_segment(f4, P.lso_ppi_value(1000, 34, True)) == einval            # says IPv6, is IPv4
    assert c_segment(f4[:40], P.lso_ppi_value(1000, 34, False)) == einval      # TCP header cut
    bad_doff = bytearray(f4)
    bad_doff[34 + 12] = 0x40                                                    # data offset 16 bytes
    assert c_segment(bytes(bad_doff), P.lso_ppi_value(1000, 34, False)) == einval
    small = ffi.new("uint8_t[]", 100)
    lens = ffi.new("uint32_t[]", 8)
    assert lib.uvb_nvsp_lso_segment(f4, len(f4), P.lso_ppi_value(1000, 34, False), small, 100, lens, 8) \
        == lib.UVB_ENOBUFS


# ==== negotiation ================================================================================
def netvsp(sim: Any, device: str) -> dict[str, Any]:
    return sim.device_stats(device)["netvsp"]


def test_offload_objects_round_trip():
    raw = P.build_ndis_offload(0x155, 0x55, lso4_max=62780, lso6_max=30000, lso_min_segs=2)
    c = P.parse_ndis_offload(raw)
    assert (c.lso4, c.lso6, c.lso4_max, c.lso6_max, c.lso4_min_segs) == (True, True, 62780, 30000, 2)
    # Linux's rules: IPv6 LSO needs both IPv6 options, any LSO needs TCP checksum offload
    assert not P.parse_ndis_offload(P.build_ndis_offload(0x155, 0x55, lso6_max=30000, lso6_opts=1)).lso6
    assert not P.parse_ndis_offload(P.build_ndis_offload(0x100, 0x55, lso4_max=30000)).lso4
    params = P.parse_offload_params(P.build_offload_params(P.NVSP_V61, tcp4=4, udp4=4, tcp6=4, udp6=4,
                                                           lso4=2, lso6=1))
    assert (params["lso_v2_ipv4"], params["lso_v2_ipv6"]) == (2, 1)
    v4 = P.build_offload_params(P.NVSP_V4, tcp4=4, udp4=0, tcp6=4, udp6=0, lso4=2, lso6=2)
    assert len(v4) == 22 and v4[11] == 2 and v4[12] == 2      # @11/@12 inside the NVSP ≤ 4 size


@pytest.fixture(scope="module")
def lso_sim(tmp_path_factory) -> Any:
    """Loopback NICs: one of a host with LSO (the reference host), one without, a sink."""
    args = ["--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback",
            "--device", "netvsc:backend=loopback,lso=off", "--device", "netvsc:backend=loopback"]
    with run_sim(tmp_path_factory.mktemp("lso"), *args) as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield sim


def dev(sim: Any, i: int) -> str:
    return sim.device("netvsc", i)["device_id"]


def test_negotiation_like_linux(lso_sim):
    d = dev(lso_sim, 0)
    with nv.open(d, lso_sim.root) as nic:
        assert nic.offloads.lso4 and nic.offloads.lso6
        assert nic.info().lso == {"ipv4_max": 62780, "ipv6_max": 62780, "min_segments": 2}
        assert netvsp(lso_sim, d)["lso_enabled"] == {"ipv4": True, "ipv6": True}


def test_host_without_lso(lso_sim):
    d = dev(lso_sim, 1)
    with nv.open(d, lso_sim.root) as nic:
        assert not nic.offloads.lso4 and not nic.offloads.to_dict()["lso"]
        assert nic.info().lso == {"ipv4_max": 0, "ipv6_max": 0, "min_segments": 0}
        assert netvsp(lso_sim, d)["lso_enabled"] == {"ipv4": False, "ipv6": False}
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        with pytest.raises(FrameRejected, match="LSO is not negotiated") as ei:
            nic.tx_burst([tcp_frame(mac, bytes(5000))], mss=1448)
        assert ei.value.reason == "lso-not-negotiated" and ei.value.queued == 0
        normal = tcp_frame(mac, bytes(100))
        assert nic.tx_burst([normal], timeout=5) == 1              # the ordinary path still works
        assert drain(nic, 1) == [normal]
    with pytest.raises(NegotiationError, match="offers no LSOv2"):
        nv.open(d, lso_sim.root, lso=True)


def test_driver_with_lso_off_disables_it_on_the_host(lso_sim):
    d = dev(lso_sim, 2)
    with nv.open(d, lso_sim.root, lso=False) as nic:
        assert nic.offloads.lso4                       # offered ...
        assert nic.info().lso["ipv4_max"] == 0         # ... not used
        assert netvsp(lso_sim, d)["lso_enabled"] == {"ipv4": False, "ipv6": False}
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        # white box: force the C path to send an LSO PPI anyway — the host counts it
        r = nic.queue(0).raw
        r.lso4_max = 62780
        r.lso_min_segs = 2
        before = netvsp(lso_sim, d)["queues"]["0"]
        f = tcp_frame(mac, bytes(4000))
        assert nic.tx_burst([f], mss=1000, timeout=5) == 1
        got = drain(nic, 4)
        after = netvsp(lso_sim, d)["queues"]["0"]
        assert after["tx_lso_not_enabled"] == before["tx_lso_not_enabled"] + 1
        assert got == ref_segments(f, 1000)            # segmented all the same (O does not check)


# ==== end to end =================================================================================
def drain(nic: nv.Nic, want: int, timeout: float = 10.0) -> list[bytes]:
    import time
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for q in range(nic.num_queues):
            b = nic.rx_burst(q, 256, timeout=0.02)
            got += b.frames()
    return got


def test_large_sends_through_the_simulator(lso_sim):
    """A burst mixing large sends (IPv4, IPv6, GPA-direct and in-section sizes) and ordinary
    frames comes back over loopback as exactly the reference's segments, in order."""
    d = dev(lso_sim, 0)
    with nv.open(d, lso_sim.root) as nic:
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        rng = random.Random(1)
        frames = [tcp_frame(mac, bytes(rng.randrange(256) for _ in range(n)), v6=v6, seq=1000 * i, flags=0x19)
                  for i, (n, v6) in enumerate([(62780 - 54, False), (3000, False), (40000, True), (5000, True)])]
        plain = tcp_frame(mac, b"x" * 200, sport=1)
        burst = [frames[0], plain, frames[1], frames[2], frames[3]]
        mss = [1460, None, 1000, 1440, 1220]
        before = netvsp(lso_sim, d)["queues"]["0"]
        assert nic.tx_burst(burst, mss=mss, timeout=10) == 5
        want: list[bytes] = []
        for f, m in zip(burst, mss, strict=True):
            want += ref_segments(f, m) if m else [f]
        got = drain(nic, len(want))
        assert got == want
        for s in got:
            verify(s)
        st_ = nic.stats()["total"]
        assert st_["tx_lso"] == 4 and st_["tx_drops"] == 0 and st_["tx_failed"] == 0
        after = netvsp(lso_sim, d)["queues"]["0"]
        assert after["tx_lso"] - before["tx_lso"] == 4
        assert after["tx_lso_segments"] - before["tx_lso_segments"] == len(want) - 1
        assert after["tx_lso_not_enabled"] == before["tx_lso_not_enabled"]
        assert after["tx_lso_invalid"] == before["tx_lso_invalid"] == 0


def test_wrong_large_sends_are_refused(lso_sim):
    d = dev(lso_sim, 0)
    with nv.open(d, lso_sim.root) as nic:
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        good = tcp_frame(mac, bytes(5000))
        udp = bytearray(good)
        udp[23] = 17
        cases = [
            (bytes(udp), 1448, "lso-not-tcp", "only TCP"),
            (good, 0, "lso-mss", "MSS 0"),
            (good, 1500, "lso-mss", "MSS 1500"),                      # 54 + 1500 > 1514
            (tcp_frame(mac, bytes(63000)), 1448, "lso-too-large", "largest large send"),
            (tcp_frame(mac, bytes(1000)), 1448, "lso-too-few-segments", "minimum"),
            (good[:50], 1448, "lso-not-tcp", "only TCP"),
        ]
        for frame, mss, reason, text in cases:
            with pytest.raises(FrameRejected, match=text) as ei:
                nic.tx_burst([good, frame], mss=[1448, mss])
            assert ei.value.reason == reason and ei.value.index == 1 and ei.value.queued == 1
        drain(nic, 4 * len(cases))
        # rejected=[] skips them and sends the rest
        bad: list[int] = []
        assert nic.tx_burst([bytes(udp), good], mss=1448, rejected=bad, timeout=5) == 1 and bad == [0]
        assert drain(nic, 4) == ref_segments(good, 1448)
        with pytest.raises(ConfigError, match="MSS values for"):
            TxBatch([good], mss=[1, 2])
        with pytest.raises(ConfigError, match="TxBatch"):
            nic.tx_burst(TxBatch([good]), mss=1448)


# ==== frames from a TAP with virtio-net headers (the bridge's path) ===============================
def vnet(frame: bytes, *, gso: int = 0, gso_size: int = 0, csum: tuple[int, int] | None = None) -> bytes:
    """struct virtio_net_hdr (native endian) + frame: flags, gso_type, hdr_len, gso_size,
    csum_start, csum_offset."""
    flags = 1 if csum else 0
    start, off = csum or (0, 0)
    return struct.pack("<BBHHHH", flags, gso, 0, gso_size, start, off) + frame


def partial(frame: bytes, l4: int, v6: bool) -> bytes:
    """The frame as the kernel hands it with CHECKSUM_PARTIAL: TCP checksum = pseudo seed."""
    b = bytearray(frame)
    ip = frame[14:l4]
    seed = csum16(pseudo(ip, v6, len(frame) - l4))
    struct.pack_into(">H", b, l4 + 16, seed)
    return bytes(b)


def test_vnet_prep_turns_gso_frames_into_large_sends():
    """uvb_nvsc_vnet_prep (C): GSO TCPv4/v6 → LSO with MSS = gso_size; NEEDS_CSUM completed in
    software (also on a GSO frame of one segment, below the host's minimum of 2); a runt header
    is refused by tx_burst."""
    nic = GuardedNic(section_size=SECTION_BIG, sections=8)
    try:
        r = nic.q.raw
        r.lso4_max = r.lso6_max = 62780
        r.lso_min_segs = 2
        big4 = tcp_frame(DST, bytes(range(256)) * 30)
        big6 = tcp_frame(DST, bytes(range(256)) * 20, v6=True)
        small = tcp_frame(DST, b"hello" * 50)
        one_seg = tcp_frame(DST, bytes(1000))
        frames = [vnet(partial(big4, 34, False), gso=1, gso_size=1448, csum=(34, 16)),
                  vnet(partial(big6, 54, True), gso=4 | 0x80, gso_size=1220, csum=(54, 16)),
                  vnet(partial(small, 34, False), csum=(34, 16)),
                  vnet(partial(one_seg, 34, False), gso=1, gso_size=1448, csum=(34, 16))]
        batch = TxBatch(frames)
        assert lib.uvb_nvsc_vnet_prep(nic.q.raw, batch.base, batch.descriptors, len(batch)) == 2
        d = batch.descriptors
        assert [(d[i].len, d[i].flags) for i in range(4)] == [
            (len(big4), lib.UVB_NVSC_F_TX_LSO), (len(big6), lib.UVB_NVSC_F_TX_LSO), (len(small), 0),
            (len(one_seg), 0)]
        assert (d[0].mss, d[1].mss) == (1448, 1220)
        assert bytes(batch.buf[d[2].offset:d[2].offset + d[2].len]) == small        # checksum completed
        assert bytes(batch.buf[d[3].offset:d[3].offset + d[3].len]) == one_seg
        # the whole path: tx_burst(vnet=True) sends both large sends and the two frames
        assert nic.q.tx_burst(frames, vnet=True) == 4
        stream = b"".join(sent_messages(nic))
        pkts = []
        while stream:
            mlen = struct.unpack_from("<I", stream, 4)[0]
            pkts.append(P.parse_rndis_packet(stream[:mlen]))
            stream = stream[(mlen + 7) & ~7:]
        assert [p.ppis.get(P.PPI_TCP_LARGESEND) for p in pkts] == [
            P.lso_ppi_value(1448, 34, False), P.lso_ppi_value(1220, 54, True), None, None]
        assert c_segment(pkts[0].frame, P.lso_ppi_value(1448, 34, False)) == ref_segments(big4, 1448)
        assert pkts[2].frame == small and pkts[3].frame == one_seg
        with pytest.raises(FrameRejected):
            nic.q.tx_burst([b"\0" * 9], vnet=True)                     # shorter than the header
    finally:
        nic.close()


@pytest.mark.root
def test_bridge_uses_large_sends_and_no_lso_turns_them_off(tmp_path):
    """`uvmbus net bridge` between two namespaces: a TCP sender's GSO frames (IPv4, IPv6) cross
    the NIC as large sends the host segments; with --no-lso none do.  (iperf3 numbers: make
    bench-lso.)"""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    for tool in ("ip", "iperf3", "ss", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps)")
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    import lso_iperf3 as B

    try:
        with run_sim(tmp_path / "sim", "--echo", "0", "--no-ic", "--nic", "1",
                     "--nic-backend", f"tap:{B.TAP_A}@{B.NS_A}") as sim:
            nic = sim.device("netvsc")["device_id"]
            sim.bind(nic)
            on = B.one_case(sim, nic, tmp_path, True, 1.0, 5461)
            off = B.one_case(sim, nic, tmp_path, False, 1.0, 5462)
            on6 = B.one_case(sim, nic, tmp_path, True, 1.0, 5463, ipv6=True)       # TSO6
            assert sim.totals()["needless_signals"] == 0, sim.needless_report()
    finally:
        for ns in (B.NS_A, B.NS_B):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert on["received_bytes"] > 0 and off["received_bytes"] > 0
    assert on["bridge_large_sends"] > 0 and on["host"]["tx_lso"] == on["bridge_large_sends"]
    assert on["host"]["tx_lso_segments"] > 2 * on["host"]["tx_lso"]
    assert on["host"]["tx_lso_invalid"] == 0 and on["host"]["tx_lso_not_enabled"] == 0
    assert off["bridge_large_sends"] == 0 and off["host"]["tx_lso"] == 0
    assert on6["received_bytes"] > 0 and on6["bridge_large_sends"] > 0
    assert on6["host"]["tx_lso"] == on6["bridge_large_sends"] and on6["host"]["tx_lso_invalid"] == 0

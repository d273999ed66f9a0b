"""Acceptance tests of the netvsc driver (uvmbus.netvsc) against the simulated host, which
runs as a separate process (tests/simhelpers.py): bring-up on every NVSP version, frames
through loopback intact and in order per queue, RSS spreading, link changes, jumbo MTU,
malformed host messages, back-pressure, zero-copy, threads and processes, teardown — with
zero needless guest signals counted by the simulator."""

from __future__ import annotations

import multiprocessing
import random
import socket
import struct
import threading
import time
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim

import uvmbus.netvsc as nv
from uvmbus.errors import ConfigError, FrameRejected, ProtocolError, RingCorrupt
from uvmbus.netvsc import protocol as P
from uvmbus.sim.models.netvsp import parse_versions

pytestmark = pytest.mark.timeout(180)

VERSIONS = ["1", "2", "4", "5", "6", "6.1"]


def udp_frame(i: int, size: int, *, flow: int | None = None, dst: bytes = b"\x00\x15\x5d\x00\x00\x01") -> bytes:
    """An IPv4/UDP frame of ``size`` bytes; ``flow`` picks the source address (RSS input)."""
    f = i if flow is None else flow
    payload_len = size - 42
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + 8 + payload_len, i & 0xFFFF, 0x4000, 64, 17, 0,
                     bytes([10, 1, (f >> 8) & 0xFF, f & 0xFF]), bytes([10, 0, 0, 254]))
    ip = ip[:10] + struct.pack(">H", ip_checksum(ip)) + ip[12:]
    udp = struct.pack(">HHHH", 1024 + (f & 0x3FFF), 4789, 8 + payload_len, 0)   # no UDP checksum
    body = struct.pack("<II", f, i) + bytes((i * 13 + k) & 0xFF for k in range(payload_len - 8))
    return dst + b"\x02\x00\x00\x00\x00\x07" + b"\x08\x00" + ip + udp + body


def ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f">{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def drain(nic: nv.Nic, want: int, timeout: float = 10.0, *, copy: bool = True) -> dict[int, list[bytes]]:
    """Receive from every queue until ``want`` frames arrived."""
    got: dict[int, list[bytes]] = {q: [] for q in range(nic.num_queues)}
    n = 0
    deadline = time.monotonic() + timeout
    while n < want and time.monotonic() < deadline:
        for q in range(nic.num_queues):
            b = nic.rx_burst(q, 256, timeout=0.02, copy=copy)
            frames = b.frames()
            b.release()
            got[q] += frames
            n += len(frames)
    return got


def assert_no_needless(sim: SimProcess) -> None:
    t = sim.totals()
    assert t["needless_signals"] == 0, sim.needless_report()
    assert t.get("kernel_oops", 0) == 0


@pytest.fixture(scope="module")
def lsim(tmp_path_factory) -> Any:
    """One simulator: a loopback NIC per NVSP version, a multi-queue loopback NIC, a NIC
    with link pacing for link tests, and a sink NIC."""
    args = ["--echo", "0", "--no-ic"]
    for v in VERSIONS:
        args += ["--device", f"netvsc:backend=loopback,versions={v.replace('.', '')}"]
    args += ["--device", "netvsc:backend=loopback,link_pacing=0.2",
             "--device", "netvsc:backend=sink"]
    with run_sim(tmp_path_factory.mktemp("nvdrv"), *args) as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield sim


def dev(sim: SimProcess, index: int) -> str:
    return sim.device("netvsc", index)["device_id"]


LOOP = len(VERSIONS)          # index of the general loopback NIC
SINK = LOOP + 1


def netvsp(sim: SimProcess, device: str) -> dict[str, Any]:
    return sim.device_stats(device)["netvsp"]


# ==== bring-up ==============================================================================
@pytest.mark.parametrize("vi", range(len(VERSIONS)), ids=VERSIONS)
def test_bring_up_on_every_offered_version(lsim, vi):
    d = dev(lsim, vi)
    assert netvsp(lsim, d)["offered_versions"] == [VERSIONS[vi]]
    with nv.open(d, lsim.root, queues=4) as nic:
        info = nic.info()
        assert info.nvsp_version == VERSIONS[vi]
        assert info.ndis_version == ("6.1" if parse_versions(VERSIONS[vi])[0] <= P.NVSP_V4 else "6.30")
        assert info.mac == netvsp(lsim, d)["mac"]
        assert info.mtu == 1500 and nic.link_up
        assert info.max_pkt_per_msg == 8 and info.pkt_alignment == 8 and info.section_size == 6144
        assert info.sub_alloc_size == 1806 and info.sub_allocs == 17998
        # multi-queue needs NVSP 5 (sub-channels) and RSS capabilities
        assert info.queues == (4 if parse_versions(VERSIONS[vi])[0] >= P.NVSP_V5 else 1)
        st = netvsp(lsim, d)
        assert st["state"] == "ready" and st["filter"] == 0x0D and st["rndis"] == "operational"
        frames = [udp_frame(i, 60 + i) for i in range(40)]
        assert nic.tx_burst(frames, timeout=5) == 40
        got = drain(nic, 40)
        assert sorted(sum(got.values(), [])) == sorted(frames)
    st = netvsp(lsim, d)
    assert st["state"] == "version" and st["guest_owned"] == 0     # clean teardown reset the host
    assert_no_needless(lsim)


def test_teardown_sequence_and_reopen(lsim):
    d = dev(lsim, LOOP)
    nic = nv.open(d, lsim.root)
    nic.tx_burst([udp_frame(1, 100)], timeout=2)
    nic.close()
    nic.close()                                    # idempotent
    with pytest.raises(nv.nic.NetError):
        nic.rx_burst()
    st = netvsp(lsim, d)
    assert st["fatal_errors"] == 0 and st["state"] == "version"
    with nv.open(d, lsim.root) as again:
        assert again.link_up


# ==== loopback data ==========================================================================
def test_random_frames_intact_and_in_order_per_queue(lsim):
    rng = random.Random(4)
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root, queues=4) as nic:
        assert nic.num_queues == 4
        assert nic.send_table == [i % 4 for i in range(16)]
        frames = [udp_frame(i, rng.randint(60, 1514), flow=rng.randrange(64)) for i in range(3000)]
        # a flow is sent from one TX queue (flow % 4): only then is its order defined
        by_txq = {q: [f for f in frames if struct.unpack_from("<I", f, 42)[0] % 4 == q] for q in range(4)}
        pos = dict.fromkeys(range(4), 0)
        got: dict[int, list[bytes]] = {q: [] for q in range(4)}
        while any(pos[q] < len(by_txq[q]) for q in range(4)):
            for q in range(4):
                pos[q] += nic.tx_burst(by_txq[q][pos[q]:pos[q] + rng.randint(1, 300)], queue=q)
                got[q] += nic.rx_burst(q, 256).frames()
        more = drain(nic, len(frames) - sum(len(v) for v in got.values()))
        for q in range(4):
            got[q] += more[q]
        allgot = sum(got.values(), [])
        assert len(allgot) == len(frames) and sorted(allgot) == sorted(frames)
        # per queue: each flow's frames in sending order (frames of one flow share a queue)
        index = {f: i for i, f in enumerate(frames)}
        for q, fl in got.items():
            by_flow: dict[int, list[int]] = {}
            for f in fl:
                by_flow.setdefault(struct.unpack_from("<I", f, 42)[0], []).append(index[f])
            for seq in by_flow.values():
                assert seq == sorted(seq), f"queue {q}: a flow arrived out of order"
        assert all(got[q] for q in range(4)), {q: len(v) for q, v in got.items()}
        s = nic.stats()["total"]
        assert s["rx_packets"] == s["tx_packets"] == 3000 and s["drops"] == 0 and s["host_errors"] == 0
    assert_no_needless(lsim)


def test_rss_spreads_flows_with_hash_metadata(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root, queues=4) as nic:
        frames = [udp_frame(i, 128, flow=i) for i in range(256)]
        assert nic.tx_burst(frames, timeout=5) == 256
        per_queue = {q: 0 for q in range(4)}
        deadline = time.monotonic() + 10
        seen = 0
        while seen < 256 and time.monotonic() < deadline:
            for q in range(4):
                b = nic.rx_burst(q, 256, timeout=0.02)
                for i in range(len(b)):
                    m = b.meta(i)
                    f = bytes(b[i])
                    assert m.rss_hash == P.toeplitz(P.MS_RSS_KEY, f[26:34])
                    assert nic.rss_table[m.rss_hash & 127] == q
                    assert m.ip_checksum_ok and m.l4_checksum_ok
                per_queue[q] += len(b)
                seen += len(b)
        assert seen == 256
        assert min(per_queue.values()) > 256 // 4 // 3, per_queue     # every queue gets a share


def test_zero_copy_views_and_release(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        frames = [udp_frame(i, 300) for i in range(10)]
        nic.tx_burst(frames, timeout=2)
        seen: list[bytes] = []
        last = None
        deadline = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < deadline:
            b = nic.rx_burst(0, 256, timeout=0.1, copy=False)   # releases the previous burst
            if len(b):
                assert b.zero_copy
                seen += [bytes(x) for x in b]
                last = b
        assert seen == frames and last is not None
        assert netvsp(lsim, d)["guest_owned"] >= len(last)      # still ours until released
        last.release()
        deadline = time.monotonic() + 5
        while netvsp(lsim, d)["guest_owned"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert netvsp(lsim, d)["guest_owned"] == 0


def test_forwarding_a_zero_copy_burst(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        frames = [udp_frame(i, 64 + i) for i in range(50)]
        nic.tx_burst(frames, timeout=2)
        b = nic.rx_burst(0, 256, timeout=3, copy=False)
        n = len(b)
        assert n > 0
        assert nic.tx_burst(b) == n                    # back out, straight from the receive buffer
        got = drain(nic, 50)[0]
        assert sorted(got) == sorted(frames[n:] + frames[:n])
        assert nic.stats()["total"]["tx_packets"] == 50 + n


def test_vlan_and_checksum_offload(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        assert nic.offloads.tx_udp4 and nic.offloads.tx_tcp4
        f = bytearray(udp_frame(1, 200))
        f[24:26] = b"\0\0"                              # IPv4 header checksum: not filled in
        f[40:42] = b"\0\0"                              # UDP checksum: not filled in
        batch = nv.TxBatch([bytes(f)], vlan=(3 << 13) | 42, offload_csum=True)
        assert nic.tx_burst(batch, timeout=2) == 1
        b = nic.rx_burst(0, 8, timeout=3)
        assert len(b) == 1
        m = b.meta(0)
        assert m.vlan == (3 << 13) | 42 and m.vlan_id == 42
        out = bytes(b[0])
        assert out[24:26] != b"\0\0" and out[40:42] != b"\0\0"   # the host computed them
        assert m.ip_checksum_ok and m.l4_checksum_ok and not m.checksum_failed
        bad = bytearray(udp_frame(2, 200))
        bad[24:26] = b"\x12\x34"                         # wrong header checksum, no offload
        nic.tx_burst([bytes(bad)], timeout=2)
        b = nic.rx_burst(0, 8, timeout=3)
        assert b.meta(0).checksum_failed


def test_inline_vlan_tag_becomes_a_ppi(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        plain = udp_frame(7, 1514)                      # a full-MTU frame...
        tagged = plain[:12] + struct.pack(">HH", 0x8100, (1 << 13) | 77) + plain[12:]   # ...tagged: 1518
        assert nic.tx_burst([tagged], timeout=2) == 1
        b = nic.rx_burst(0, 8, timeout=3)
        assert b.frames() == [plain] and b.meta(0).vlan == (1 << 13) | 77
        assert nic.stats()["total"]["tx_drops"] == 0


# ==== link ========================================================================================
def test_link_down_up_reported(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        events: list[bool] = []
        nic.on_link_change(events.append)
        lsim.control("model", device=d, op="link", args={"up": False})
        assert nic.wait_link(False, 5)
        assert events == [False]
        nic.tx_burst([udp_frame(1, 100)], timeout=2)
        assert len(nic.rx_burst(0, 8, timeout=0.3)) == 0      # nothing while down
        lsim.control("model", device=d, op="link", args={"up": True})
        assert nic.wait_link(True, 5)                           # after the host's pacing delay
        assert events == [False, True]
        nic.tx_burst([udp_frame(2, 100)], timeout=2)
        assert nic.rx_burst(0, 8, timeout=3).frames() == [udp_frame(2, 100)]
        assert nic.stats()["events"]["link_changes"] == 2


def test_link_change_seen_by_rx_on_queue0(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        events: list[bool] = []
        nic.on_link_change(events.append)
        lsim.control("model", device=d, op="link", args={"up": False})
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            nic.rx_burst(0, 16, timeout=0.05)
        assert events == [False] and not nic.link_up
        lsim.control("model", device=d, op="link", args={"up": True})
        assert nic.wait_link(True, 5)


# ==== MTU ========================================================================================
def test_jumbo_mtu_both_directions(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, mtu=9000) as nic:
            assert nic.mtu == 9000
            assert netvsp(sim, d)["sub_alloc_size"] == 256 + 9014 + 36
            info = nic.info()
            assert info.gpa_direct                        # frames > a 6144-byte section go GPA-direct
            frames = [udp_frame(i, s) for i, s in enumerate((9014, 6000, 64, 9014, 1514, 7777))]
            assert nic.tx_burst(frames, timeout=5) == len(frames)
            got = drain(nic, len(frames))[0]
            assert got == frames
            s = nic.stats()["total"]
            assert s["tx_gpa"] == 3 and s["tx_drops"] == 0           # 9014, 9014, 7777
            nic.set_mtu(1500)                             # full re-initialisation
            assert nic.mtu == 1500 and netvsp(sim, d)["sub_alloc_size"] == 1806
            with pytest.raises(FrameRejected, match="longer than this NIC sends"):   # not "sent"
                nic.tx_burst([udp_frame(1, 9014)])
            assert nic.stats()["total"]["tx_drops"] == 1
            nic.tx_burst([udp_frame(2, 1514)], timeout=2)
            assert drain(nic, 1)[0] == [udp_frame(2, 1514)]
        assert_no_needless(sim)


def test_mtu_limits():
    with pytest.raises(ConfigError):
        nv.Nic("x", "/nonexistent", mtu=9300)
    with pytest.raises(ConfigError):
        nv.Nic("x", "/nonexistent", queues=0)


# ==== malformed host messages ===========================================================================
FAULTS = ["bad_range", "bad_rndis_len", "bad_nvsp_type", "bad_pageset", "bad_data_offset", "bad_ppi"]


@pytest.mark.parametrize("kind", FAULTS)
def test_malformed_host_messages_are_dropped_with_a_clear_error(lsim, kind, caplog):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        lsim.control("model", device=d, op="fault", args={"kind": kind, "count": 1})
        nic.tx_burst([udp_frame(1, 100)], timeout=2)
        deadline = time.monotonic() + 3
        while nic.stats()["total"]["host_errors"] == 0 and time.monotonic() < deadline:
            assert len(nic.rx_burst(0, 8, timeout=0.05)) == 0      # the bad frame never surfaces
        q0 = nic.queue(0)
        assert nic.stats()["total"]["host_errors"] == 1
        assert q0.last_host_error and "tid" in q0.last_host_error
        assert any("malformed host packet" in r.getMessage() for r in caplog.records)
        # the queue keeps working, and the host got its buffers back (acked with status 2)
        nic.tx_burst([udp_frame(2, 100)], timeout=2)
        assert drain(nic, 1)[0] == [udp_frame(2, 100)]
    deadline = time.monotonic() + 3
    while netvsp(lsim, d)["guest_owned"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert netvsp(lsim, d)["guest_owned"] == 0 and netvsp(lsim, d)["fatal_errors"] == 0


def test_strict_mode_raises(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root, strict=True) as nic:
        lsim.control("model", device=d, op="fault", args={"kind": "bad_range", "count": 1})
        nic.tx_burst([udp_frame(1, 100)], timeout=2)
        with pytest.raises(ProtocolError, match="outside"):
            for _ in range(100):
                nic.rx_burst(0, 8, timeout=0.05)


def test_unknown_inband_message_type(lsim, caplog):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root) as nic:
        lsim.control("model", device=d, op="fault", args={"kind": "unknown_inband"})
        deadline = time.monotonic() + 3
        while nic.stats()["events"]["unknown_messages"] == 0 and time.monotonic() < deadline:
            nic.rx_burst(0, 8, timeout=0.05)
        assert nic.stats()["events"]["unknown_messages"] == 1
        assert "unknown in-band NVSP message type" in nic.last_host_error
        nic.tx_burst([udp_frame(2, 100)], timeout=2)
        assert drain(nic, 1)[0] == [udp_frame(2, 100)]


def test_corrupt_ring_descriptor_is_a_clear_error(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        nic = nv.open(d, sim.root)
        try:
            sim.fault("corrupt_descriptor", {"count": 1, "field": "offset8"}, device=d)
            nic.tx_burst([udp_frame(1, 100)], timeout=2)
            with pytest.raises(RingCorrupt, match="offset8"):
                for _ in range(100):
                    nic.rx_burst(0, 8, timeout=0.05)
        finally:
            sim.clear_faults()
            nic.close()


# ==== back-pressure ==========================================================================================
def test_back_pressure_when_the_host_stalls(lsim):
    d = dev(lsim, SINK)
    with nv.open(d, lsim.root) as nic:
        batch = nv.TxBatch.repeat(udp_frame(1, 1400), 256)
        lsim.fault("stall", 0, device=d)
        try:
            sent = 0
            for _ in range(100):
                n = nic.tx_burst(batch)
                sent += n
                if n < len(batch):
                    break
            s = nic.stats()["total"]
            assert s["no_section"] + s["ring_full"] >= 1        # sections or ring ran out
            assert s["tx_inflight"] > 0
        finally:
            lsim.clear_faults(device=d)
        assert nic.tx_burst(batch, timeout=10) == 256           # progress once the host runs
        st = netvsp(lsim, d)
        deadline = time.monotonic() + 5
        while st["queues"]["0"]["sink_frames"] < sent + 256 and time.monotonic() < deadline:
            time.sleep(0.05)
            st = netvsp(lsim, d)
        assert st["queues"]["0"]["sink_frames"] == sent + 256


# ==== threads and processes ======================================================================================
def test_queues_in_threads(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root, queues=4) as nic:
        frames = [udp_frame(i, 200, flow=i) for i in range(400)]
        counts = [0] * 4
        stop = threading.Event()
        errors: list[BaseException] = []

        def worker(q: int) -> None:
            try:
                while not stop.is_set():
                    counts[q] += len(nic.rx_burst(q, 64, timeout=0.05))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(q,)) for q in range(1, 4)]
        for t in threads:
            t.start()
        try:
            sent = 0
            deadline = time.monotonic() + 10
            while (sent < 400 or sum(counts) < 400) and time.monotonic() < deadline:
                if sent < 400:
                    sent += nic.tx_burst(frames[sent:sent + 50])
                counts[0] += len(nic.rx_burst(0, 64, timeout=0.01))
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        assert not errors and sum(counts) == 400 and all(counts), counts


def _child_queue(spec: nv.QueueSpec, n: int, back: bytes, conn: Any) -> None:
    try:
        with nv.attach_queue(spec) as q:
            got = 0
            deadline = time.monotonic() + 20
            frames = []
            while got < n and time.monotonic() < deadline:
                b = q.rx_burst(64, timeout=0.1)
                frames += b.frames()
                got += len(b)
            # and send one frame back out of this process's queue
            q.tx_burst([back], timeout=5)
            conn.send((got, sorted(frames), q.stats()))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(repr(exc))


def test_queue_in_another_process(lsim):
    d = dev(lsim, LOOP)
    with nv.open(d, lsim.root, queues=2) as nic:
        spec = nic.export_queue(1)
        frames = [udp_frame(i, 150, flow=i) for i in range(200)]
        mine = [f for f in frames if nic.rss_table[P.toeplitz(P.MS_RSS_KEY, f[26:34]) & 127] == 1]
        assert mine
        back = next(f for f in (udp_frame(99999, 100, flow=k) for k in range(64))
                    if nic.rss_table[P.toeplitz(P.MS_RSS_KEY, f[26:34]) & 127] == 0)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child_queue, args=(spec, len(mine), back, child))
        p.start()
        try:
            time.sleep(0.5)
            assert nic.tx_burst(frames, timeout=5) == 200
            ours: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(ours) < 200 - len(mine) and time.monotonic() < deadline:
                ours += nic.rx_burst(0, 256, timeout=0.05).frames()
            assert parent.poll(30)
            res = parent.recv()
            assert not isinstance(res, str), res
            got, child_frames, stats = res
            assert got == len(mine) and child_frames == sorted(mine)
            assert sorted(ours) == sorted(f for f in frames if f not in mine)
            assert stats["tx_packets"] == 1
            assert nic.rx_burst(0, 8, timeout=5).frames() == [back]   # RSS steers it to queue 0
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
        with pytest.raises(ConfigError):
            nic.export_queue(0)
    assert_no_needless(lsim)


def test_generator_backend_rx(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1", "--nic-backend", "generator") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        sim.control("model", device=d, op="generator", args={"size": 256, "flows": 32, "count": 2000})
        with nv.open(d, sim.root, queues=2) as nic:
            got = drain(nic, 2000, timeout=20)
            frames = sum(got.values(), [])
            assert len(frames) == 2000 and all(len(f) == 256 for f in frames)
            assert got[0] and got[1]                  # flows spread over both queues
            seqs = sorted(struct.unpack_from("<Q", f, 42)[0] for f in frames)
            assert seqs == list(range(2000))
            for f in frames[:50]:
                assert f[12:14] == b"\x08\x00" and f[23] == 17
                assert socket.inet_ntoa(f[30:34]) == "10.0.0.254"
        assert_no_needless(sim)


@pytest.mark.parametrize("kernel,extra,queues", [
    ("6.9", [], 4),                                  # sub-channels must stay masked: polled
    ("6.10", ["--unmonitored"], 1),                  # non-monitored sub-channels: cannot signal
    ("6.16", ["--unmonitored-subchannels"], 4),
    ("6.18", ["--page-size", "65536"], 4),
])
def test_kernel_modes(tmp_path, kernel, extra, queues):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--kernel", kernel, *extra,
                 "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, queues=4) as nic:
            assert nic.num_queues == queues
            frames = [udp_frame(i, 80 + i, flow=i) for i in range(128)]
            assert nic.tx_burst(frames, timeout=5) == 128
            got = drain(nic, 128)
            assert sorted(sum(got.values(), [])) == sorted(frames)
            for q in range(1, nic.num_queues):
                assert nic.queue(q).poll_only == (kernel == "6.9")     # only 6.16+ takes them
        assert sim.totals().get("kernel_oops", 0) == 0
        assert_no_needless(sim)

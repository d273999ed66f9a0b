"""Jumbo frames from a queue attached in another process (issue 14 item 6).

A queue exported with :meth:`Nic.export_queue` and attached in a separate process with
:func:`uvmbus.netvsc.attach_queue` sends frames from 64 bytes to MTU 9000 + 14: frames larger
than a send section go GPA-direct through bounce slots the attaching process allocates in
its own DMA memory (the simulator's guest RAM), while the owning process sends jumbo frames
GPA-direct from its own slots at the same time.  The loopback backend returns every frame to
queue 0 (RSS chosen per flow), where each is compared byte for byte; the driver's and the
simulated host's counters must agree, with zero host protocol errors and zero needless
signals."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim

import uvmbus.netvsc as nv
from uvmbus.errors import FrameRejected
from uvmbus.netvsc import protocol as P

pytestmark = pytest.mark.timeout(240)

SIZES = [64, 65, 128, 511, 1514, 3000, 4096, 6000, 6067, 6068, 6099, 6100, 6101, 6102, 6144,
         7000, 8192, 8999, 9000, 9013, 9014]


def frame(src: int, i: int, size: int, flow: int) -> bytes:
    """An IPv4/UDP frame of ``size`` bytes from sender ``src``; ``flow`` is the RSS input."""
    from test_netvsc_driver import udp_frame

    f = udp_frame(i, size, flow=flow)
    # mark the sender in the payload (after the 8-byte flow/index words), keep the rest
    return f[:50] + bytes([src]) + f[51:] if size > 50 else f


def to_queue0(nic: nv.Nic) -> list[int]:
    """Flows the host steers to queue 0 (where the parent receives)."""
    from test_netvsc_driver import udp_frame

    return [k for k in range(256)
            if nic.rss_table[P.toeplitz(P.MS_RSS_KEY, udp_frame(0, 64, flow=k)[26:34]) & 127] == 0]


def _child(spec: nv.QueueSpec, frames: list[bytes], conn: Any) -> None:
    try:
        with nv.attach_queue(spec) as q:
            conn.send(("ready", q._gpa is not None))
            conn.recv()                                       # go
            sent = 0
            deadline = time.monotonic() + 60
            while sent < len(frames) and time.monotonic() < deadline:
                sent += q.tx_burst(frames[sent:sent + 16], timeout=1.0)
            while q.tx_inflight and time.monotonic() < deadline:
                q.reap()
                q.wait(0.05)
            stats = q.stats()
        conn.send(("done", sent, stats))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(("error", repr(exc)))


def _child_no_gpa(spec: nv.QueueSpec, jumbo: bytes, conn: Any) -> None:
    try:
        with nv.attach_queue(spec) as q:
            try:
                q.tx_burst([jumbo])
                conn.send("sent")
            except FrameRejected as exc:
                conn.send(f"rejected: {exc}")
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(repr(exc))


def netvsp(sim: SimProcess, d: str) -> dict[str, Any]:
    return sim.device_stats(d)["netvsp"]


def test_attached_queue_sends_jumbo_frames(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, queues=2, mtu=9000) as nic:
            assert nic.num_queues == 2 and nic.info().gpa_direct
            flows = to_queue0(nic)
            assert flows
            theirs = [frame(1, i, s, flows[i % len(flows)]) for i, s in enumerate(SIZES * 6)]
            mine = [frame(2, i, s, flows[(i * 7) % len(flows)]) for i, s in enumerate(reversed(SIZES * 6))]
            # a frame goes GPA-direct when its RNDIS PACKET (44-byte header, no PPI) exceeds a section
            big = sum(1 for f in theirs if 44 + len(f) > nic.section_size)
            assert 0 < big < len(theirs)
            spec = nic.export_queue(1)
            assert spec.max_frame == 9014
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(spec, theirs, child))
            p.start()
            try:
                assert parent.poll(60)
                msg = parent.recv()
                assert msg == ("ready", True), msg           # the child has its own slots
                parent.send("go")
                sent = 0
                got: list[bytes] = []
                deadline = time.monotonic() + 60
                want = len(theirs) + len(mine)
                while len(got) < want and time.monotonic() < deadline:
                    if sent < len(mine):
                        sent += nic.tx_burst(mine[sent:sent + 16])
                    b = nic.rx_burst(0, 256, timeout=0.02)
                    got += b.frames()
                assert parent.poll(60)
                res = parent.recv()
                assert res[0] == "done", res
                _, child_sent, cs = res
            finally:
                p.join(20)
                if p.is_alive():
                    p.kill()
            assert child_sent == len(theirs) and sent == len(mine)
            # every frame intact, and each sender's frames in the order it sent them
            assert [f for f in got if f[50] == 1] == theirs
            assert [f for f in got if f[50] == 2] == mine
            assert len(got) == want
            # the attached queue's counters agree with what arrived and with the host's
            assert cs["tx_packets"] == len(theirs) and cs["tx_gpa"] == big
            assert cs["tx_drops"] == 0 and cs["tx_failed"] == 0 and cs["tx_inflight"] == 0
            assert cs["tx_bytes"] == sum(len(f) for f in theirs)
            host = netvsp(sim, d)
            hq = host["queues"]["1"]
            assert hq["tx_frames"] == len(theirs) and hq["tx_dropped"] == 0 and hq["tx_failed"] == 0
            assert hq["tx_bytes"] == cs["tx_bytes"]
            q0 = nic.stats()["queues"][0]
            assert q0["tx_gpa"] == big and q0["rx_packets"] >= want and q0["rx_drops"] == 0
            assert host["fatal_errors"] == 0
        t = sim.totals()
        assert t["needless_signals"] == 0, sim.needless_report()
        assert t.get("kernel_oops", 0) == 0


def test_attached_queue_without_gpa_refuses_clearly(tmp_path):
    """gpa=False on the owner carries over to the attached queue: a jumbo frame is refused
    with FrameRejected (not dropped silently)."""
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, queues=2, mtu=9000, gpa=False) as nic:
            spec = nic.export_queue(1)
            assert spec.gpa is False
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child_no_gpa, args=(spec, frame(1, 1, 9014, 0), child))
            p.start()
            try:
                assert parent.poll(60)
                res = parent.recv()
            finally:
                p.join(20)
                if p.is_alive():
                    p.kill()
            assert res.startswith("rejected:") and "GPA-direct" in res, res
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()


def _child_lso(spec: nv.QueueSpec, frames: list[bytes], mss: list[int | None], conn: Any) -> None:
    try:
        with nv.attach_queue(spec) as q:
            n = q.tx_burst(frames, mss=mss, timeout=20)
            deadline = time.monotonic() + 20
            while q.tx_inflight and time.monotonic() < deadline:
                q.reap()
                q.wait(0.05)
            conn.send(("done", n, q.stats(), int(q.raw.lso4_max), int(q.raw.lso6_max)))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(("error", repr(exc)))


def test_attached_queue_makes_large_sends(tmp_path):
    """LSOv2 as the owner negotiated it works from the attached queue too (its own bounce
    slots sized for 64 KiB sends): the loopback host segments each large send exactly as
    the reference segmenter of test_netvsc_lso does."""
    from test_netvsc_lso import ref_segments, tcp_frame, verify

    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, queues=2) as nic:
            lso = nic.info().lso
            assert lso["ipv4_max"] > 60000
            mac = bytes.fromhex(nic.mac.replace(":", ""))
            # source ports whose TCP/IPv4 4-tuple the host steers to queue 0 (the parent's)
            ports = [p for p in range(40000, 40400)
                     if nic.rss_table[P.toeplitz(P.MS_RSS_KEY, tcp_frame(mac, b"", sport=p)[26:38]) & 127] == 0]
            sizes = [(60000, 1460), (3000, 1000), (20000, 1448), (200, None), (9000, 536)]
            frames = [tcp_frame(mac, bytes((i * 7 + k) & 0xFF for k in range(n)), sport=ports[i], seq=1000 * i,
                                flags=0x19) for i, (n, _) in enumerate(sizes)]
            mss = [m for _, m in sizes]
            want: list[bytes] = []
            for f, m in zip(frames, mss, strict=True):
                want += ref_segments(f, m) if m else [f]
            spec = nic.export_queue(1)
            assert (spec.lso4_max, spec.lso6_max) == (lso["ipv4_max"], lso["ipv6_max"])
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child_lso, args=(spec, frames, mss, child))
            p.start()
            try:
                got: list[bytes] = []
                deadline = time.monotonic() + 60
                while len(got) < len(want) and time.monotonic() < deadline:
                    got += nic.rx_burst(0, 256, timeout=0.05).frames()
                assert parent.poll(60)
                res = parent.recv()
            finally:
                p.join(20)
                if p.is_alive():
                    p.kill()
            assert res[0] == "done", res
            _, n, cs, l4, l6 = res
            assert n == len(frames) and (l4, l6) == (lso["ipv4_max"], lso["ipv6_max"])
            assert got == want
            for s in got:
                verify(s)
            assert cs["tx_lso"] == 4 and cs["tx_drops"] == 0 and cs["tx_failed"] == 0
            hq = netvsp(sim, d)["queues"]["1"]
            assert hq["tx_lso"] == 4 and hq["tx_lso_segments"] == len(want) - mss.count(None)
            assert netvsp(sim, d)["fatal_errors"] == 0
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()

"""Changing the number of queues of a running NIC (issue 14 item 5): ``Nic.set_queues``.

A full NVSP/RNDIS re-initialisation (filter 0, drain, HALT, REVOKE_*_BUF, channels closed,
re-opened, bring-up with the new sub-channel count and RSS table) in the same process, on the
same Nic object, which keeps its MAC, receive filter and MTU.  Checked: 1 → 4 → 2 → 1 with
traffic before and after each change (every frame compared, each on the queue RSS picks,
every queue used), old Queue objects raise QueueInvalidated, a queue attached in another
process fails clearly (and is waited for), zero host protocol errors, zero needless signals;
what the host limits (fewer queues) and failed re-initialisations leave (a usable NIC rolled
back to its previous settings, or a clearly closed one); and the NetVSP model's handling of
a revoke followed by a new INIT on the still-open channel (silence, as the reference host).
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import time
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim
from test_netvsc_driver import udp_frame

import uvmbus.netvsc as nv
from uvmbus.errors import ConfigError, DeviceBusy, NetError, QueueInvalidated, ReinitFailed
from uvmbus.netvsc import protocol as P
from uvmbus.ring import FLAG_COMPLETION_REQUESTED

pytestmark = pytest.mark.timeout(300)

FLOWS = 64


def netvsp(sim: SimProcess, d: str) -> dict[str, Any]:
    return sim.device_stats(d)["netvsp"]


def expected_queue(nic: nv.Nic, frame: bytes) -> int:
    if nic.num_queues == 1:
        return 0
    return nic.rss_table[P.toeplitz(P.MS_RSS_KEY, frame[26:34]) & 127]


def traffic(nic: nv.Nic, tag: int, per_flow: int = 4, size: int = 300) -> dict[int, int]:
    """Send frames of FLOWS flows from queue 0 through the loopback backend; every frame must
    come back once, intact, on the queue RSS picks for it; returns frames per queue."""
    frames = [udp_frame(tag * 10000 + i, size, flow=i % FLOWS) for i in range(FLOWS * per_flow)]
    want = {q: [f for f in frames if expected_queue(nic, f) == q] for q in range(nic.num_queues)}
    assert nic.tx_burst(frames, timeout=10) == len(frames)
    got: dict[int, list[bytes]] = {q: [] for q in range(nic.num_queues)}
    deadline = time.monotonic() + 20
    while sum(map(len, got.values())) < len(frames) and time.monotonic() < deadline:
        for q in range(nic.num_queues):
            got[q] += nic.rx_burst(q, 256, timeout=0.01).frames()
    for q in range(nic.num_queues):
        assert got[q] == want[q], f"queue {q}: {len(got[q])} frames, {len(want[q])} expected"
    counts = {q: len(v) for q, v in got.items()}
    assert all(counts.values()), counts           # RSS spreads over every queue
    return counts


def assert_clean(sim: SimProcess, nic: nv.Nic | None, d: str) -> None:
    t = sim.totals()
    assert t["needless_signals"] == 0, sim.needless_report()
    assert netvsp(sim, d)["fatal_errors"] == 0, netvsp(sim, d)["fatal"]
    if nic is not None and not nic.closed:
        assert nic.stats()["total"]["host_errors"] == 0
        assert nic.events["unknown_messages"] == 0


@pytest.fixture
def nicsim(tmp_path) -> Any:
    # mac_change=apply: a host that takes a new MAC address (Hyper-V with MAC spoofing allowed)
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback,mac_change=apply") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        yield sim, d


def test_queue_count_1_4_2_1_with_traffic(nicsim):
    sim, d = nicsim
    with nv.open(d, sim.root, queues=1, mtu=3000) as nic:
        nic.set_all_multicast(True)                  # a user filter that must survive
        nic.set_mac("02:11:22:33:44:55")              # and a user MAC address
        mac, filt = nic.mac, nic.packet_filter
        assert mac == "02:11:22:33:44:55"
        assert nic.num_queues == 1
        traffic(nic, 0)
        revokes = netvsp(sim, d)["revokes"]
        for step, n in enumerate((4, 2, 1), start=1):
            old = [nic.queue(i) for i in range(nic.num_queues)]
            gen = nic.generation
            assert nic.set_queues(n) == n
            assert nic.num_queues == n and nic.generation == gen + 1
            for q in old:
                with pytest.raises(QueueInvalidated, match="set_queues"):
                    q.rx_burst(8)
                with pytest.raises(QueueInvalidated, match=r"nic\.queue"):
                    q.tx_burst([udp_frame(1, 100)])
            # same NIC: MAC, filter, MTU kept, as the host sees them too
            host = netvsp(sim, d)
            assert nic.mac == mac and nic.packet_filter == filt and nic.mtu == 3000
            assert host["filter"] == filt and host["mtu"] == 3014 and host["state"] == "ready"
            assert host["current_mac"] == mac
            assert len(host["queues"]) == n and host["granted"] == n - 1
            assert host["revokes"] == revokes + step        # the buffers were revoked each time
            assert nic.rss_table == [i % n for i in range(128)] or n == 1
            counts = traffic(nic, step)
            assert len(counts) == n
            assert_clean(sim, nic, d)
        info = nic.info()
        assert info.queues == 1 and info.requested_queues == 1
    assert_clean(sim, None, d)


def test_limits_refused_before_anything_changes(nicsim):
    sim, d = nicsim
    with nv.open(d, sim.root, queues=2) as nic:
        q1 = nic.queue(1)
        offered = nic.rss_queues_offered
        with pytest.raises(ConfigError, match="offers at most"):
            nic.set_queues(offered + 1)
        with pytest.raises(ConfigError, match="1..64"):
            nic.set_queues(0)
        # nothing changed: the old queue objects still work
        assert nic.num_queues == 2 and q1.rx_burst(8).frames() == []
        traffic(nic, 1)
        # the host lowers its limit (a new endpoint): the next re-init gets what it offers now
        sim.control("model", device=d, op="max_queues", args={"max_queues": 3})
        assert nic.set_queues(4) == 3
        assert nic.num_queues == 3 and nic.rss_queues_offered == 3
        traffic(nic, 2)
        with pytest.raises(ConfigError, match="offers at most 3"):
            nic.set_queues(4)
        assert_clean(sim, nic, d)
    nic.close()
    with pytest.raises(NetError, match="closed"):
        nic.set_queues(1)


def _attached(spec: nv.QueueSpec, mode: str, conn: Any) -> None:
    """``busy``: receive in a loop until the queue becomes invalid; ``idle``: attach, then do
    nothing until told to close."""
    try:
        q = nv.attach_queue(spec)
        conn.send("attached")
        if mode == "idle":
            conn.recv()
            q.close()
            conn.send("closed")
            return
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                q.rx_burst(64, timeout=0.5)
            conn.send("never invalidated")
        except QueueInvalidated as exc:
            conn.send(f"invalidated: {exc}; closed={q.closed}")
    except BaseException as exc:  # pragma: no cover - reported to the parent
        conn.send(f"error: {exc!r}")


def test_attached_queue_in_another_process_fails_clearly(nicsim):
    sim, d = nicsim
    ctx = multiprocessing.get_context("spawn")
    with nv.open(d, sim.root, queues=2) as nic:
        # 1. a busy attached queue notices, closes itself; set_queues waits for it
        spec = nic.export_queue(1)
        with pytest.raises(QueueInvalidated, match="exported"):
            nic.queue(1).rx_burst(1)
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_attached, args=(spec, "busy", child))
        p.start()
        try:
            assert parent.poll(60) and parent.recv() == "attached"
            assert nic.set_queues(3) == 3
            assert parent.poll(30)
            msg = parent.recv()
        finally:
            p.join(20)
            if p.is_alive():
                p.kill()
        assert msg.startswith("invalidated:") and "set_queues" in msg and "closed=True" in msg, msg
        # the stale spec cannot be attached again (checked before the device is touched)
        with pytest.raises(QueueInvalidated, match="set_queues"):
            nv.attach_queue(spec)
        traffic(nic, 1)                               # all three queues local again
        # 2. an idle attached queue that never calls: set_queues gives up, NIC unchanged
        spec = nic.export_queue(2)
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_attached, args=(spec, "idle", child))
        p.start()
        try:
            assert parent.poll(60) and parent.recv() == "attached"
            q0 = nic.queue(0)
            with pytest.raises(DeviceBusy, match=rf"queue 2 in pid {p.pid}"):
                nic.set_queues(1, timeout=1.0)
            assert nic.num_queues == 3 and q0.rx_burst(4).frames() == []   # unchanged, usable
            parent.send("close")
            assert parent.poll(30) and parent.recv() == "closed"
        finally:
            p.join(20)
            if p.is_alive():
                p.kill()
        assert nic.set_queues(1) == 1
        traffic(nic, 2)
        assert_clean(sim, nic, d)


def test_failed_reinit_rolls_back_to_a_usable_nic(tmp_path):
    """The host grants the sub-channels but their ring files never appear in time: the
    re-initialisation fails and the NIC comes back with its previous queue count."""
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--subchannel-delay", "120",
                 "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root, queues=1, timeout=2.0) as nic:
            mac = nic.mac
            q0 = nic.queue(0)
            traffic(nic, 0)
            with pytest.raises(ReinitFailed, match="previous settings .1 queue") as ei:
                nic.set_queues(2)
            assert ei.value.usable and not nic.closed
            assert nic.num_queues == 1 and nic.mac == mac
            with pytest.raises(QueueInvalidated):
                q0.rx_burst(1)
            traffic(nic, 1)
            assert_clean(sim, nic, d)


def test_failed_reinit_and_rollback_leave_a_closed_nic(tmp_path):
    """The host stops answering: both attempts time out; the NIC is closed, says so, and the
    device can be opened again once the host answers."""
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        nic = nv.open(d, sim.root, queues=2, timeout=1.0)
        try:
            q0 = nic.queue(0)
            traffic(nic, 0)
            spec = nic.export_queue(1)                 # a lease file exists now
            assert os.path.exists(spec.lease)
            sim.fault("stall", 0, device=d)           # until cleared
            with pytest.raises(ReinitFailed, match="the NIC is closed") as ei:
                nic.set_queues(1)
            assert not ei.value.usable and nic.closed
            assert not os.path.exists(spec.lease)     # removed with the dead NIC
            with pytest.raises(QueueInvalidated):
                q0.rx_burst(1)
            with pytest.raises(QueueInvalidated, match="closed"):
                nv.attach_queue(spec)
            with pytest.raises(NetError, match="closed"):
                nic.rx_burst(0)
        finally:
            nic.close()
        sim.clear_faults(device=d)
        with nv.open(d, sim.root, queues=2) as again:
            traffic(again, 1)
        assert netvsp(sim, d)["fatal_errors"] == 0


def test_model_revoke_then_init_on_the_open_channel_is_silent(tmp_path):
    """As the reference host: a revoke ends the primary channel's processing (no answer, no
    fatal error), a new INIT on the still-open channel is ignored; a close + re-open starts a
    new session.  A revoke on a sub-channel is fatal."""
    from test_netvsp_model import RawGuest

    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        g = RawGuest(sim, d)
        g.bring_up()
        g.ch.send(P.nvsp_revoke(P.MSG_REVOKE_RECV_BUF, P.RECV_BUF_ID))
        g.ch.send(P.nvsp_revoke(P.MSG_REVOKE_SEND_BUF, P.SEND_BUF_ID))
        assert g.silent(P.nvsp_init(P.NVSP_V61), timeout=1.0)
        st = netvsp(sim, d)
        assert st["revokes"] == 1 and st["after_revoke"] >= 2 and st["fatal_errors"] == 0
        g.close()
        g = RawGuest(sim, d)                           # a new session on the re-opened channel
        g.bring_up(P.NVSP_V5)
        assert struct.unpack_from("<II", g.request(P.nvsp_subchannel_request(1)).raw, 4) == (1, 1)
        (sub,) = g.cd.open_subchannels(1, timeout=10)
        sub.send(P.nvsp_revoke(P.MSG_REVOKE_RECV_BUF, P.RECV_BUF_ID), flags=FLAG_COMPLETION_REQUESTED,
                 trans_id=7)
        deadline = time.monotonic() + 5
        while netvsp(sim, d)["fatal_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "REVOKE" in netvsp(sim, d)["fatal"][-1]
        g.close()

"""Every fault the simulated host can inject ends in a clear guest error or in recovery:
no hang (each wait has a timeout), no crash, no read outside a map (the guest validates what
it reads; a stray access would kill this test process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.channel import ChannelDevice, open_device
from uvmbus.errors import ChannelTimeout, RingCorrupt
from uvmbus.ring import PKT_COMP, PKT_INBAND

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fsim() -> Iterator[SimProcess]:
    with run_sim("", "--kernel", "6.18") as sim:
        sim.bind(sim.device("echo")["device_id"])
        yield sim


@pytest.fixture
def cd(fsim: SimProcess) -> Iterator[ChannelDevice]:
    fsim.clear_faults()
    dev = open_device(fsim.device("echo")["device_id"], fsim.root)
    try:
        yield dev
    finally:
        dev.close()
        fsim.clear_faults()


def healthy(cd: ChannelDevice) -> None:
    r = cd.primary.request(b"are you there", timeout=10)
    assert r.type == PKT_COMP


def needless(sim: SimProcess) -> int:
    return int(sim.totals().get("needless_signals", 0))


def test_stall_times_out_then_recovers(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("stall", 0)
    with pytest.raises(ChannelTimeout):
        cd.primary.request(b"stalled", timeout=0.5)
    fsim.clear_faults()
    healthy(cd)
    assert needless(fsim) == 0, fsim.needless_report()


def test_stall_with_duration_ends_by_itself(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("stall", 0.3)
    healthy(cd)


def test_slow_host_still_answers(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("slow_us", 2000)
    for _ in range(3):
        healthy(cd)


def test_dropped_completion_times_out_then_recovers(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("drop_completions", 1)
    with pytest.raises(ChannelTimeout):
        cd.primary.request(b"lost", timeout=0.5)
    healthy(cd)


def test_duplicated_completion_is_a_stray_packet(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("dup_completions", 1)
    r = cd.primary.request(b"twice", timeout=10)
    extra = [p for p in cd.primary.recv(timeout=5) if p.type == PKT_COMP]
    assert [p.trans_id for p in extra] == [r.trans_id]
    healthy(cd)


def test_dropped_packet_is_missing(fsim: SimProcess, cd: ChannelDevice) -> None:
    ch = cd.primary
    fsim.fault("drop_packets", 1)
    ch.send(b"first", trans_id=1)
    r = ch.request(b"second", timeout=10)
    echoes = [p.trans_id for p in ch.poll() if p.type == PKT_INBAND]
    assert 1 not in echoes and r.trans_id in echoes


@pytest.mark.parametrize("field", ["offset8", "len8", "type", "flags"])
def test_corrupt_descriptor_kills_the_channel(fsim: SimProcess, cd: ChannelDevice, field: str) -> None:
    fsim.fault("corrupt_descriptor", {"count": 1, "field": field})
    with pytest.raises(RingCorrupt):
        cd.primary.request(b"corrupt me", timeout=10)
    assert cd.primary.dead


def test_reopen_after_corruption_is_healthy(fsim: SimProcess) -> None:
    echo = fsim.device("echo")["device_id"]
    fsim.fault("corrupt_descriptor", 1)
    with open_device(echo, fsim.root) as d, pytest.raises(RingCorrupt):
        d.primary.request(b"x", timeout=10)
    fsim.clear_faults()
    with open_device(echo, fsim.root) as d:     # the next open resets the rings
        healthy(d)


def test_corrupt_rx_index(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("corrupt_index", "rx")
    with pytest.raises(RingCorrupt, match="write_index"):
        for _ in range(100):
            cd.primary.recv(timeout=0.1)


def test_corrupt_tx_index(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("corrupt_index", "tx")
    deadline = time.monotonic() + 10
    with pytest.raises(RingCorrupt, match="read_index"):
        while time.monotonic() < deadline:
            cd.primary.send(b"y" * 32)
            time.sleep(0.01)


def test_no_interrupts_means_the_guest_must_poll_or_time_out(fsim: SimProcess, cd: ChannelDevice) -> None:
    echo = fsim.device("echo")["device_id"]
    fsim.fault("no_interrupts", True)
    fsim.fault("slow_us", 200_000)       # the answer comes after the guest went to sleep
    before = cd.waiter.interrupts
    r = cd.primary.request(b"nobody tells me", timeout=1.0)   # found by the last re-check
    assert r.type == PKT_COMP and cd.waiter.interrupts == before
    chans = fsim.device_stats(echo)["channels"]
    assert sum(c.get("dropped_interrupts", 0) for c in chans.values()) > 0
    fsim.clear_faults()
    healthy(cd)


def test_spurious_and_unmasked_interrupts_are_harmless(fsim: SimProcess, cd: ChannelDevice) -> None:
    fsim.fault("spurious_interrupt", 3)
    healthy(cd)
    fsim.fault("ignore_rx_mask", True)
    for _ in range(5):
        healthy(cd)
    assert needless(fsim) == 0, fsim.needless_report()


def test_guest_blocked_on_tx_space_is_woken(fsim: SimProcess, cd: ChannelDevice) -> None:
    """The guest fills its TX ring while the host stalls, blocks with pending_send_sz set,
    and the host interrupts it when its consumption crosses that size (§2.6)."""
    ch = cd.primary
    fsim.fault("stall", 0)
    n = 0
    while ch.tx.put(b"z" * 200, trans_id=n):
        n += 1
    ch.flush()
    errors: list[BaseException] = []

    def blocked_send() -> None:
        try:
            ch.send(b"z" * 200, trans_id=n, timeout=30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=blocked_send)
    t.start()
    deadline = time.monotonic() + 10
    while not ch.tx.control()["pending_send_sz"]:
        assert time.monotonic() < deadline, "guest never asked for TX space"
        time.sleep(0.005)
    fsim.clear_faults()
    t.join(30)
    assert not t.is_alive() and not errors, errors
    got = 0
    while got < n + 1:
        pk = ch.recv(timeout=10)
        assert pk
        got += len([p for p in pk if p.type == PKT_INBAND])
    assert needless(fsim) == 0, fsim.needless_report()

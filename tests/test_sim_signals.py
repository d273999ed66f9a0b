"""The simulator's host rules and its needless-signal accounting can fail: a guest that
signals when it should not is caught; a host that is masked is not interrupted."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.channel import open_device
from uvmbus.native import lib
from uvmbus.ring import PKT_COMP

pytestmark = pytest.mark.timeout(90)

#: the host gives a guest the benefit of the doubt for a signal it may still send (an
#: entitlement it could not rule out) for --signal-grace seconds; these tests use a short
#: grace and a deliberate bad signal waits it out
GRACE = ("--signal-grace", "0.3")
CREDIT_TTL = 0.4


def wait_stat(sim: SimProcess, cond: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        t = sim.totals()
        if cond(t):
            return t
        assert time.monotonic() < deadline, f"{what}: {t}"
        time.sleep(0.01)


@pytest.mark.parametrize("monitored", [True, False], ids=["monitored", "unmonitored"])
def test_signal_on_an_empty_ring_is_needless(monitored: bool) -> None:
    args = ["--kernel", "6.18"] + ([] if monitored else ["--unmonitored"])
    with run_sim("", *args, *GRACE) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            assert cd.primary.request(b"x", timeout=10).type == PKT_COMP
            base = sim.totals()
            assert base["needless_signals"] == 0
            time.sleep(CREDIT_TTL)
            lib.uvb_signal(cd.primary.signal)          # nothing was written: needless
            wait_stat(sim, lambda t: t["needless_signals"] == 1, "needless signal not counted")


def test_signal_while_host_is_busy_is_needless() -> None:
    """Two signals for one empty→non-empty transition: the second is needless."""
    with run_sim("", "--kernel", "6.18", "--unmonitored", *GRACE) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            ch = cd.primary
            assert ch.request(b"zero", timeout=10).type == PKT_COMP
            deadline = time.monotonic() + 10
            while ch.tx.control()["interrupt_mask"]:      # wait until the host has re-armed
                assert time.monotonic() < deadline
                time.sleep(0.001)
            time.sleep(CREDIT_TTL)
            base = sim.totals()
            ch.send(b"one", trans_id=1)        # empty→non-empty with the mask clear: needed
            lib.uvb_signal(ch.signal)          # again for the same packet: needless
            t = wait_stat(sim, lambda t: t["guest_signals"] == base["guest_signals"] + 2,
                          "two more signals")
            assert t["needed_signals"] == base["needed_signals"] + 1
            assert t["needless_signals"] == 1
            assert ch.request(b"two", timeout=10).type == PKT_COMP


def test_masked_guest_gets_no_interrupts() -> None:
    """The host interrupts only on RX empty→non-empty with the RX mask clear."""
    with run_sim("", "--kernel", "6.18") as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            ch = cd.primary
            ch.rx.mask()
            for i in range(200):
                ch.send(b"p" * 40, trans_id=i)
                got: list = []
                deadline = time.monotonic() + 10
                while not got:
                    assert time.monotonic() < deadline
                    got = ch.poll()
            assert sim.totals()["interrupts"] == 0
            assert sim.totals()["needless_signals"] == 0, sim.needless_report()
            assert ch.request(b"armed now", timeout=10).type == PKT_COMP


@pytest.mark.parametrize("kernel,sets_mask", [("6.16", True), ("6.18", False)])
def test_kernel_mask_behaviour(kernel: str, sets_mask: bool) -> None:
    """< 6.18 the 'kernel' sets RX interrupt_mask=1 at open and in every interrupt."""
    with run_sim("", "--kernel", kernel) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            ch = cd.primary
            ch.rx.arm()
            ch.send(b"wake me", trans_id=1)
            assert cd.waiter.endpoint.wait(10) is not None
            assert ch.rx.control()["interrupt_mask"] == (1 if sets_mask else 0)
            ch.poll()


def test_irqcontrol_unmasks_and_signals_per_kernel() -> None:
    """6.16: write(1) unmasks every channel and signals the non-monitored ones.

    Issue 10.6: this failed once under load with 1 needless signal instead of 2.  The guest
    was right (nothing was written: both signals are needless); the accounting had given one
    of them the benefit of the doubt: under load the host's re-arm after the echo request
    more often races the guest's commit, which leaves a "may signal" credit for the default
    grace of 5 s.  The test now uses a short grace and waits, after the host re-armed every
    channel, until no such credit can be left (as the other exact-count tests here do)."""
    with run_sim("", "--kernel", "6.16", "--unmonitored", "--subchannel-delay", "0.05", *GRACE) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        from uvmbus.sim.models.echo import OP_OFFER_SUBCHANNELS, control_message
        with open_device(echo, sim.root) as cd:
            cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 1), timeout=10)
            (sub,) = cd.open_subchannels(1, timeout=10)
            for ch in cd.channels:
                ch.rx.mask()
                deadline = time.monotonic() + 10
                while ch.tx.control()["interrupt_mask"]:     # the host re-armed: no new credit
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
            time.sleep(CREDIT_TTL)
            before = sim.totals()
            cd.uio.endpoint.irqcontrol(1)              # no int-page bit: both are signalled
            t = wait_stat(sim, lambda t: t["guest_signals"] >= before["guest_signals"] + 2,
                          "irqcontrol(1) did not signal both channels")
            assert all(ch.rx.control()["interrupt_mask"] == 0 for ch in cd.channels)
            assert t["needless_signals"] == before["needless_signals"] + 2
            cd.uio.endpoint.irqcontrol(0)
            deadline = time.monotonic() + 10
            while not all(ch.rx.control()["interrupt_mask"] == 1 for ch in cd.channels):
                assert time.monotonic() < deadline
                time.sleep(0.01)


def test_overlapping_irqcontrol_writes_from_two_queues_are_not_needless() -> None:
    """6.16, non-monitored: two queues each set their int-page bit and write 1; if the host
    handles the first write after both bits are set, the second write is collateral, not
    needless. A later write with no int-page bit at all is still needless."""
    with run_sim("", "--kernel", "6.16", "--unmonitored", "--subchannel-delay", "0.05", *GRACE) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        from uvmbus.sim.models.echo import OP_OFFER_SUBCHANNELS, control_message
        with open_device(echo, sim.root) as cd:
            cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 1), timeout=10)
            (sub,) = cd.open_subchannels(1, timeout=10)
            for ch in cd.channels:                     # wait until the host re-armed both
                deadline = time.monotonic() + 10
                while ch.tx.control()["interrupt_mask"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
            time.sleep(CREDIT_TTL)
            before = sim.totals()
            # both queues publish a packet without signalling, set their bits, then write
            for i, ch in enumerate(cd.channels):
                ch.tx.put(b"q%d" % i, trans_id=i)
                assert ch.tx.commit()                  # empty -> non-empty: a signal is due
                lib.uvb_intpage_set(cd.uio.int_page_send, ch.relid)
            cd.uio.endpoint.irqcontrol(1)
            cd.uio.endpoint.irqcontrol(1)
            t = wait_stat(sim, lambda t: t["guest_signals"] + t["collateral_signals"]
                          >= before["guest_signals"] + before["collateral_signals"] + 4,
                          "two writes x two channels")
            assert t["needless_signals"] == before["needless_signals"], sim.needless_report()
            assert t["needed_signals"] == before["needed_signals"] + 2
            assert t["collateral_signals"] == before["collateral_signals"] + 2
            got = 0
            deadline = time.monotonic() + 10
            while got < 2:
                got += sum(len(ch.poll()) for ch in cd.channels)
                assert time.monotonic() < deadline
            time.sleep(CREDIT_TTL)
            cd.uio.endpoint.irqcontrol(1)              # no bit, nothing written: needless
            wait_stat(sim, lambda t: t["needless_signals"] >= before["needless_signals"] + 2,
                      "a bit-less write after the overlap must count as needless")


def test_repeat_signal_whose_int_page_bit_coalesced_is_not_needless_for_other_channels() -> None:
    """6.16, non-monitored, two channels: a guest signals one channel twice before the host
    handles its first write(1).  The int-page bit is a flag (set twice = set once), so the
    first write finds it and the second finds none.  The second write was still meant for
    that channel: its signal to the other channel is collateral, not needless (issue 14:
    `blk bench --channels 4` against `sim --unmonitored` counted 2-33 needless signals in
    some runs, all from such bit-less repeats).  The repeat itself is judged as a signal to
    its own channel: here the guest signals twice for one empty->non-empty transition, so it
    is needless there — exactly one needless signal, on the channel it was meant for."""
    with run_sim("", "--kernel", "6.16", "--unmonitored", "--subchannel-delay", "0.05", *GRACE) as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        from uvmbus.sim.models.echo import OP_OFFER_SUBCHANNELS, control_message
        with open_device(echo, sim.root) as cd:
            cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 1), timeout=10)
            (sub,) = cd.open_subchannels(1, timeout=10)
            for ch in cd.channels:                     # wait until the host re-armed both
                deadline = time.monotonic() + 10
                while ch.tx.control()["interrupt_mask"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
            time.sleep(CREDIT_TTL)
            before = sim.device_stats(echo)["channels"]
            ch = cd.primary
            ch.tx.put(b"once", trans_id=7)
            assert ch.tx.commit()                      # empty -> non-empty: a signal is due
            # two signals for it, both bits set before the host handles either write
            lib.uvb_intpage_set(cd.uio.int_page_send, ch.relid)
            lib.uvb_intpage_set(cd.uio.int_page_send, ch.relid)
            cd.uio.endpoint.irqcontrol(1)
            cd.uio.endpoint.irqcontrol(1)

            def delta(key: str, relid: int) -> int:
                now = sim.device_stats(echo)["channels"]
                return int(now[str(relid)][key]) - int(before[str(relid)][key])

            deadline = time.monotonic() + 10
            while (delta("guest_signals", ch.relid) + delta("collateral_signals", sub.relid) < 4
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            assert delta("guest_signals", ch.relid) == 2
            assert delta("needed_signals", ch.relid) == 1
            assert delta("needless_signals", ch.relid) == 1
            assert delta("collateral_signals", sub.relid) == 2
            assert delta("guest_signals", sub.relid) == 0, sim.needless_report()
            assert delta("needless_signals", sub.relid) == 0
            assert sim.stats()["counters"]["irqcontrol_repeats"] == 1
            deadline = time.monotonic() + 10
            while not ch.poll():
                assert time.monotonic() < deadline


def test_storvsc_over_four_unmonitored_channels_sends_no_needless_signal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stress that counts (no timing): one IoBatch over four non-monitored channels (6.18:
    every write(1) signals all four) sends no needless signal.  Before bit-less repeats were
    attributed to their channel this counted 1-33 needless signals in about a quarter of the
    runs (3 of 6 runs of this test failed with the old rule); the guest's own signalling was right."""
    import json
    import os

    from uvmbus.services.cli import main

    img = tmp_path / "a.img"
    img.write_bytes(os.urandom(8 << 20))
    with run_sim(tmp_path, "--unmonitored", "--no-ic", "--echo", "0",
                 "--device", f"storvsc:disks={img},max_subchannels=3,bind=uio_hv_generic") as sim:
        for _ in range(2):
            assert main(["blk", "bench", "storvsc", "--root", str(sim.root), "--pattern", "randread",
                         "--bs", "4K", "--qd", "32", "--seconds", "1", "--channels", "4",
                         "--no-reference", "--json"]) == 0
            r = json.loads(capsys.readouterr().out)
            assert r["channels"] == 4 and r["errors"] == 0 and r["ios"] > 0
        t = sim.totals()
        assert t["guest_signals"] > 0 and t["collateral_signals"] > 0   # signals did flow
        assert t["needless_signals"] == 0, sim.needless_report()

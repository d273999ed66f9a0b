"""The monitor-page scanner backs off when nothing moves (an idle simulator costs ~no CPU)
and still delivers every guest signal; ``--monitor-idle-us 0`` keeps Hyper-V's fixed scan."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.channel import open_device
from uvmbus.ring import PKT_COMP

pytestmark = pytest.mark.timeout(90)


def wait_monitor(sim: SimProcess, cond: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        m = sim.stats()["monitor"]
        if cond(m):
            return m
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.05)


def wait_armed(ch: Any) -> None:
    """Until the host has re-armed (TX interrupt_mask clear): the next send must signal."""
    deadline = time.monotonic() + 20
    while ch.tx.control()["interrupt_mask"]:
        assert time.monotonic() < deadline, "the host never re-armed"
        time.sleep(0.001)


def test_idle_scanner_backs_off_and_still_delivers_signals() -> None:
    with run_sim("", "--kernel", "6.18", "--no-ic") as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            assert cd.primary.monitor_id is not None, "the echo channel is monitored"
            assert cd.primary.request(b"a", timeout=10).type == PKT_COMP
            m = wait_monitor(sim, lambda m: m["idle_scans"] > 0, "the scanner never backed off")
            assert m["idle_us"] == 2000.0
            for i in range(20):                       # each request after an idle gap arrives
                wait_armed(cd.primary)                # so the request needs a guest signal
                hits = sim.stats()["monitor"]["hits"]
                assert cd.primary.request(b"b" * i, timeout=10).type == PKT_COMP
                wait_monitor(sim, lambda m, h=hits: m["hits"] > h, "a guest signal was not delivered")
                if i % 5 == 0:
                    idle = sim.stats()["monitor"]["idle_scans"]
                    wait_monitor(sim, lambda m, s=idle: m["idle_scans"] > s, "no back-off again")
        assert sim.totals()["needless_signals"] == 0


def test_idle_back_off_can_be_disabled() -> None:
    with run_sim("", "--kernel", "6.18", "--no-ic", "--monitor-idle-us", "0") as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        with open_device(echo, sim.root) as cd:
            assert cd.primary.request(b"a", timeout=10).type == PKT_COMP
            start = sim.stats()["monitor"]["scans"]
            m = wait_monitor(sim, lambda m: m["scans"] > start + 2000, "the scanner stopped scanning")
            assert m["idle_scans"] == 0 and m["idle_us"] == 0.0
            assert cd.primary.request(b"b", timeout=10).type == PKT_COMP

"""`uvmbus net bridge` when its NIC comes back different (issue 12 follow-up): rescinded and
re-offered with another queue count, MTU and MAC, under traffic, the bridge keeps its TAP
(same ifindex), sets the TAP's MTU and MAC to the NIC's, runs one rx worker per new queue,
says what changed (status, metrics, STATUS=, log) and traffic flows again.

As tests/test_reliability_bridge.py: simulated NIC with a TAP backend in namespace A ↔ bridge
↔ TAP in namespace B, random names; bounds are only "did not hang"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim
from test_reliability_bridge import _in_ns, _need_tools, _wait
from test_services_helpers import NotifyListener, start_daemon

from uvmbus.services.daemon import call_control

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

NET = "10.231.11"
ADDR_A, ADDR_B = f"{NET}.1", f"{NET}.2"
NEW_MAC = "02:5e:11:22:33:44"


def _status(sim: SimProcess) -> dict[str, Any]:
    sock = next((sim.root / "run" / "uvmbus").glob("net-*.sock"))
    return dict(call_control(sock, "status")["status"])


def _metrics(sim: SimProcess) -> str:
    sock = next((sim.root / "run" / "uvmbus").glob("net-*.sock"))
    return str(call_control(sock, "metrics")["text"])


def _peer_up(ns: str, tap: str) -> bool:
    if _in_ns(ns, "ip", "link", "show", tap).returncode != 0:
        return False
    _in_ns(ns, "ip", "addr", "replace", f"{ADDR_A}/24", "dev", tap)
    _in_ns(ns, "ip", "link", "set", tap, "up")
    return True


def _ping(ns: str, size: int = 56) -> bool:
    return _in_ns(ns, "ping", "-c", "1", "-W", "2", "-s", str(size), "-M", "do", ADDR_A).returncode == 0


def _link(ns: str, tap: str, attr: str) -> str:
    return _in_ns(ns, "cat", f"/sys/class/net/{tap}/{attr}").stdout.strip()


def test_bridge_follows_a_nic_reoffered_with_other_queues_mtu_and_mac(tmp_path: Path) -> None:
    _need_tools()
    tag = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
    ns_a, ns_b, tap_a, tap_b = f"uvcA{tag}", f"uvcB{tag}", f"uvca{tag}"[:15], f"uvcb{tag}"[:15]
    try:
        with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1",
                     "--nic-backend", f"tap:{tap_a}@{ns_a}") as sim:
            nic = sim.device("netvsc")["device_id"]
            sim.bind(nic)
            lst = NotifyListener(tmp_path / "notify")
            d = start_daemon(["net", "bridge", nic, "--root", str(sim.root), "--tap", tap_b,
                              "--netns", ns_b, "--address", f"{ADDR_B}/24", "--queues", "4",
                              "--reattach-timeout", "60"],
                             notify=lst, log=tmp_path / "bridge.log", watchdog_usec=1_000_000)
            flood = None
            try:
                _wait(lambda: _peer_up(ns_a, tap_a), 30, f"{tap_a} in {ns_a}")
                _wait(lambda: _ping(ns_b), 60, "ping through the bridge")
                st = _status(sim)
                assert st["healthy"] and st["num_queues"] == 4 and st["mtu"] == 1500, st
                old_mac = st["mac"]
                ifindex = _link(ns_b, tap_b, "ifindex")
                assert _link(ns_b, tap_b, "address") == old_mac.lower()

                # traffic all along: a ping flood from B (errors while the NIC is away are fine)
                flood = subprocess.Popen(["ip", "netns", "exec", ns_b, "ping", "-q", "-i", "0.01",
                                          "-W", "1", ADDR_A], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                # the host's NIC changes while rescinded: 2 queues, MTU 1400, another MAC
                sim.control("model", device=nic, op="max_queues", args={"value": 2})
                sim.control("model", device=nic, op="max_mtu", args={"value": 1400})
                sim.control("model", device=nic, op="mac", args={"mac": NEW_MAC})
                sim.rescind(nic, reoffer_after=2.0)
                _wait(lambda: _status(sim)["reattaches"] == 1 and _status(sim)["healthy"], 90,
                      "reattached to the changed NIC")
                assert d.alive(), d.output
                st = _status(sim)
                assert st["num_queues"] == 2 and st["mtu"] == 1400, st
                assert st["mac"].lower() == NEW_MAC, st
                assert st["nic_changes"] == {"queues": 1, "mtu": 1, "mac": 1, "lso": 0}, st
                last = st["last_nic_change"]
                assert last["queues"] == [4, 2] and last["mtu"] == [1500, 1400], last
                assert len(st["queues"]) == 2, st
                # the same TAP, changed in place
                assert _link(ns_b, tap_b, "ifindex") == ifindex
                assert _link(ns_b, tap_b, "mtu") == "1400"
                assert _link(ns_b, tap_b, "address") == NEW_MAC
                m = _metrics(sim)
                for what in ("queues", "mtu", "mac"):
                    assert f'uvmbus_bridge_nic_changes_total{{device="{nic}",what="{what}"}} 1' in m, m
                _wait(lambda: any("the NIC changed" in v and "MTU 1500 -> 1400" in v
                                  for k, v in lst.events() if k == "STATUS"), 30, "STATUS= names the change")

                flood.terminate()
                flood.wait(timeout=30)
                flood = None
                # traffic flows again through the changed NIC, up to the new MTU and not past it
                _wait(lambda: _peer_up(ns_a, tap_a), 30, f"{tap_a} back in {ns_a}")
                _wait(lambda: _ping(ns_b), 60, "ping after the reattach")
                assert _ping(ns_b, 1400 - 28)
                assert not _ping(ns_b, 1500 - 28)       # DF set: the TAP's MTU says no
                assert d.alive(), d.output
                assert "the re-offered NIC differs" in d.output, d.output
            finally:
                if flood is not None:
                    flood.kill()
                    flood.wait()
                rc = d.stop()
                lst.close()
            assert rc == 0, d.output
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

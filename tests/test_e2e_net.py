"""End to end with real tools: simulated NIC (TAP backend in namespace A) ↔ netvsc driver ↔
`uvmbus net bridge` daemon ↔ TAP in namespace B.  `ping` and `iperf3` run between the
namespaces; a hook that drops ICMP makes ping fail while TCP still flows.  The daemon runs
under a fake NOTIFY_SOCKET with a watchdog and must stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim
from test_services_helpers import DaemonProc, NotifyListener, first_order, start_daemon

from uvmbus.services.daemon import call_control
from uvmbus.services.metrics import parse_text

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TAG = f"{os.getpid() % 100000}"
NS_A, NS_B = f"uvbA{TAG}", f"uvbB{TAG}"
TAP_A, TAP_B = f"uvbsa{TAG}", f"uvbtb{TAG}"
NET = "10.231.7"
ADDR_A, ADDR_B = f"{NET}.1", f"{NET}.2"


def need_tools() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    for tool in ("ip", "ping", "iperf3", "ss"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps)")


def netns_list() -> list[str]:
    from pyroute2 import netns
    return list(netns.listnetns())


def in_ns(ns: str, *cmd: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, check=check)


@pytest.fixture(scope="module")
def nic_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, str]]:
    need_tools()
    tmp = tmp_path_factory.mktemp("e2e-net")
    try:
        with run_sim(tmp, "--echo", "0", "--no-ic", "--nic", "1",
                     "--nic-backend", f"tap:{TAP_A}@{NS_A}") as sim:
            nic = sim.device("netvsc")["device_id"]
            sim.bind(nic)
            yield sim, nic
            totals = sim.totals()
            assert totals["needless_signals"] == 0, sim.needless_report()
            assert totals.get("kernel_oops", 0) == 0
    finally:
        for ns in (NS_A, NS_B):
            if ns in netns_list():
                subprocess.run(["ip", "netns", "del", ns], check=False)


@contextmanager
def bridge(sim: SimProcess, nic: str, tmp: Path, *extra: str) -> Iterator[tuple[DaemonProc, NotifyListener]]:
    lst = NotifyListener(tmp / "notify")
    args = ["net", "bridge", nic, "--root", str(sim.root), "--tap", TAP_B, "--netns", NS_B,
            "--address", f"{ADDR_B}/24", "--metrics-port", "0", *extra]
    d = start_daemon(args, notify=lst, log=tmp / "bridge.log", watchdog_usec=1_000_000)
    try:
        # the simulator creates its TAP when the driver opens the NIC: give it its address
        deadline = time.monotonic() + 20
        while in_ns(NS_A, "ip", "link", "show", TAP_A).returncode != 0:
            assert time.monotonic() < deadline, f"{TAP_A} never appeared in {NS_A}"
            time.sleep(0.05)
        in_ns(NS_A, "ip", "addr", "add", f"{ADDR_A}/24", "dev", TAP_A, check=True)
        yield d, lst
    except BaseException:
        d.kill()
        lst.close()
        raise


def finish(d: DaemonProc, lst: NotifyListener, sim: SimProcess) -> list[str]:
    """SIGTERM; check exit status, notification order, and that nothing is left behind."""
    assert lst.wait_for("WATCHDOG", 10), lst.keys()      # at least one ping before stopping
    rc = d.stop()
    assert rc == 0, d.output
    assert lst.wait_for("STOPPING", 5), lst.keys()
    keys = lst.keys()
    lst.close()
    assert keys[0] == "READY", keys
    assert first_order(keys, ["READY", "STATUS", "WATCHDOG", "STOPPING"]) == \
        ["READY", "STATUS", "WATCHDOG", "STOPPING"], keys
    assert "WATCHDOG" not in keys[keys.index("STOPPING"):], keys
    assert NS_B not in netns_list(), "the bridge created namespace B and must remove it"
    run_dir = sim.root / "run" / "uvmbus"
    assert not run_dir.exists() or list(run_dir.iterdir()) == [], list(run_dir.iterdir())
    return keys


def control_status(sim: SimProcess) -> dict[str, Any]:
    socks = list((sim.root / "run" / "uvmbus").glob("net-*.sock"))
    assert len(socks) == 1, socks
    return dict(call_control(socks[0], "status")["status"])


def test_ping_iperf3_metrics_status_and_notify(nic_sim, tmp_path):
    sim, nic = nic_sim
    cpu = str(min(os.sched_getaffinity(0)))
    with bridge(sim, nic, tmp_path, "--cpu", cpu) as (d, lst):
        p = in_ns(NS_B, "ping", "-c", "3", "-i", "0.2", "-W", "2", ADDR_A)
        assert p.returncode == 0, p.stdout + p.stderr + d.output

        port = "5399"
        srv = subprocess.Popen(["ip", "netns", "exec", NS_A, "iperf3", "-s", "-1", "-B", ADDR_A, "-p", port],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 20
            while f"{ADDR_A}:{port}" not in in_ns(NS_A, "ss", "-ltn").stdout:
                assert time.monotonic() < deadline and srv.poll() is None, "iperf3 server did not start"
                time.sleep(0.05)
            c = in_ns(NS_B, "iperf3", "-c", ADDR_A, "-p", port, "-t", "3", "-J", timeout=60)
            assert c.returncode == 0, c.stdout[-2000:] + c.stderr + d.output
            res = json.loads(c.stdout)
            assert "error" not in res, res.get("error")
            received = res["end"]["sum_received"]["bytes"]
            assert received > 1_000_000, res["end"]
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()

        st = control_status(sim)
        assert st["healthy"] and st["device_id"] == nic and st["tap"] == TAP_B
        assert st["bridge"]["tx"]["frames"] > 100 and st["bridge"]["rx"]["frames"] > 100
        with urllib.request.urlopen(st["metrics_url"], timeout=10) as resp:
            fams = parse_text(resp.read().decode())
        pk = {(s.labels["direction"]): s.value for s in fams["uvmbus_net_packets_total"].samples}
        assert pk["rx"] > 100 and pk["tx"] > 100
        assert fams["uvmbus_net_link_up"].samples[0].value == 1
        assert fams["uvmbus_net_vf_allocated"].samples[0].value == 0
        # the host announces an accelerated-networking VF (Azure): status and metrics show it,
        # the bridge stays on the synthetic path
        sim.control("model", device=nic, op="vf", args={"action": "add", "serial": 77})
        deadline = time.monotonic() + 20
        while not control_status(sim)["vf"]["allocated"]:
            assert time.monotonic() < deadline, control_status(sim)
            time.sleep(0.05)
        vf = control_status(sim)["vf"]
        assert vf["serial"] == 77 and vf["data_path"] == "synthetic" and vf["pci"]
        with urllib.request.urlopen(st["metrics_url"], timeout=10) as resp:
            fams = parse_text(resp.read().decode())
        assert fams["uvmbus_net_vf_allocated"].samples[0].value == 1
        assert fams["uvmbus_net_vf_associations_total"].samples[0].value == 1
        p = in_ns(NS_B, "ping", "-c", "2", "-i", "0.2", "-W", "2", ADDR_A)
        assert p.returncode == 0, p.stdout + p.stderr + d.output
        sim.control("model", device=nic, op="vf", args={"action": "remove"})
        # the kernel's TCP sends went out as large sends (docs/netvsc.md "Large send offload")
        assert st["lso"] and st["bridge"]["tx"]["large_sends"] > 0, st["bridge"]["tx"]
        assert fams["uvmbus_bridge_large_sends_total"].samples[0].value > 0
        assert sum(s.value for s in fams["uvmbus_bridge_burst_seconds"].samples
                   if s.name.endswith("_count")) > 0
        needless = fams["uvmbus_sim_needless_signals_total"].samples
        assert needless and all(s.value == 0 for s in needless)

        out = subprocess.run([str(Path(sys.executable).parent / "uvmbus"), "status", "--json",
                              "--root", str(sim.root), "--sample", "0.1"],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items()
                                  if k not in ("RUNTIME_DIRECTORY", "UVMBUS_RUN_DIR")})
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        svc = [s for s in status["services"] if s["kind"] == "net"]
        assert len(svc) == 1 and svc[0]["alive"] and svc[0]["pid"] == d.proc.pid
        assert svc[0]["process"]["rss_bytes"] > 0 and svc[0]["status"]["queues"][0]["rx_packets"] > 0
        assert svc[0]["process"]["cpu_affinity"] == [int(cpu)]          # --cpu pinned it
        dev = [x for x in status["devices"] if x["device_id"] == nic][0]
        assert dev["driver"] == "uio_hv_generic"
        assert status["simulator"]["totals"]["needless_signals"] == 0
    finish(d, lst, sim)
    assert TAP_B not in in_ns(NS_A, "ip", "link").stdout


def test_hook_drops_icmp_but_not_tcp(nic_sim, tmp_path):
    sim, nic = nic_sim
    with bridge(sim, nic, tmp_path, "--hook", "uvmbus.services.hooks:drop_icmp") as (d, lst):
        p = in_ns(NS_B, "ping", "-c", "3", "-i", "0.2", "-W", "1", ADDR_A)
        assert p.returncode != 0 and " 0 received" in p.stdout, p.stdout
        # the bridge itself still works: TCP gets through the same hook
        port = "5398"
        srv = subprocess.Popen(["ip", "netns", "exec", NS_A, "iperf3", "-s", "-1", "-B", ADDR_A, "-p", port],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 20
            while f"{ADDR_A}:{port}" not in in_ns(NS_A, "ss", "-ltn").stdout:
                assert time.monotonic() < deadline and srv.poll() is None, "iperf3 server did not start"
                time.sleep(0.05)
            c = in_ns(NS_B, "iperf3", "-c", ADDR_A, "-p", port, "-t", "1", "-J", timeout=60)
            assert c.returncode == 0, c.stdout[-2000:] + c.stderr
            assert json.loads(c.stdout)["end"]["sum_received"]["bytes"] > 0
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()
        st = control_status(sim)
        assert st["hook"] == "uvmbus.services.hooks:drop_icmp"
        assert st["bridge"]["tx"]["hook_drops"] >= 3           # the three echo requests
        assert st["bridge"]["tx"]["hook_errors"] == 0
    finish(d, lst, sim)


def test_bridge_refuses_bad_hook(nic_sim, tmp_path):
    sim, nic = nic_sim
    p = subprocess.run([str(Path(sys.executable).parent / "uvmbus"), "net", "bridge", nic,
                        "--root", str(sim.root), "--tap", TAP_B, "--hook", "no.such.module:fn"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no.such.module" in p.stderr
    assert TAP_B not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout

#!/usr/bin/env python3
"""iperf3 TCP through `uvmbus net bridge` with and without large send offload, in one run.

    sudo .venv/bin/python tests/bench/lso_iperf3.py [--seconds 5] [--rounds 2] [--ipv6] [--json FILE]
    make bench-lso                    # the same, niced, 2 rounds of 5 s

Path (as tests/test_e2e_net.py): iperf3 client in namespace B → TAP (bridge side) →
`uvmbus net bridge` → netvsc driver → simulated host (NetVSP model, backend TAP in namespace
A) → iperf3 server in namespace A.  Rounds alternate "lso" (the default bridge: the TAP offers
TSO + checksum offload, the kernel hands over GSO frames, the driver sends them as LSOv2 large
sends and the simulated host segments them) and "no-lso" (`--no-lso`: MTU-sized frames), each
with a fresh bridge against the same simulator, so both are measured on the same machine state.

Reported per case: iperf3's received throughput (sender → receiver, the server's count), the
bridge's TX frames and large sends, the host's LSO counters (large sends, segments) and the
frames the host wrote to its TAP.  Needs root, /dev/net/tun, ip and iperf3 (.ci/install-deps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from simhelpers import SimProcess, run_sim  # noqa: E402
from test_services_helpers import NotifyListener, start_daemon  # noqa: E402

from uvmbus.services.daemon import call_control  # noqa: E402

TAG = f"{os.getpid() % 100000}{os.urandom(1).hex()}"
NS_A, NS_B = f"uvlA{TAG}", f"uvlB{TAG}"
TAP_A, TAP_B = f"uvlsa{TAG}"[:15], f"uvltb{TAG}"[:15]
NET = "10.231.11"
ADDR_A, ADDR_B = f"{NET}.1", f"{NET}.2"
NET6 = "fd00:231:11::"
ADDR6_A, ADDR6_B = f"{NET6}1", f"{NET6}2"


def in_ns(ns: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


def host_lso(sim: SimProcess, nic: str) -> dict[str, int]:
    res = sim.control("model", device=nic, op="stats")["results"]
    queues = next(iter(res.values()))["netvsp"]["queues"].values()
    keys = ("tx_frames", "tx_lso", "tx_lso_segments", "tx_lso_invalid", "tx_lso_not_enabled", "tx_dropped")
    return {k: sum(int(q[k]) for q in queues) for k in keys}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bridge_status(sim: SimProcess) -> dict[str, Any]:
    sock = next((sim.root / "run" / "uvmbus").glob("net-*.sock"))
    return dict(call_control(sock, "status")["status"])


def one_case(sim: SimProcess, nic: str, tmp: Path, lso: bool, seconds: float, port: int,
             ipv6: bool = False) -> dict[str, Any]:
    lst = NotifyListener(tmp / f"notify-{port}")
    args = ["net", "bridge", nic, "--root", str(sim.root), "--tap", TAP_B, "--netns", NS_B,
            "--address", f"{ADDR_B}/24"] + ([] if lso else ["--no-lso"])
    d = start_daemon(args, notify=lst, log=tmp / f"bridge-{port}.log")
    srv = None
    try:
        deadline = time.monotonic() + 20
        while in_ns(NS_A, "ip", "link", "show", TAP_A).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{TAP_A} never appeared in {NS_A}")
            time.sleep(0.05)
        in_ns(NS_A, "ip", "addr", "replace", f"{ADDR_A}/24", "dev", TAP_A)
        in_ns(NS_A, "ip", "link", "set", TAP_A, "up")
        server, listen = ADDR_A, f"{ADDR_A}:{port}"
        if ipv6:                                  # nodad: usable at once
            in_ns(NS_A, "ip", "-6", "addr", "replace", f"{ADDR6_A}/64", "dev", TAP_A, "nodad")
            in_ns(NS_B, "ip", "-6", "addr", "replace", f"{ADDR6_B}/64", "dev", TAP_B, "nodad")
            server, listen = ADDR6_A, f"[{ADDR6_A}]:{port}"
        srv = subprocess.Popen(["ip", "netns", "exec", NS_A, "iperf3", "-s", "-1", "-B", server, "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while listen not in in_ns(NS_A, "ss", "-ltn").stdout:
            if time.monotonic() > deadline or srv.poll() is not None:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        ping = in_ns(NS_B, "ping", "-c", "1", "-W", "5", server)
        if ping.returncode:
            raise RuntimeError(f"no ping through the bridge: {ping.stdout}{d.output}")
        h0 = host_lso(sim, nic)
        b0 = bridge_status(sim)["bridge"]["tx"]
        c0 = (cpu_seconds(d.proc.pid), cpu_seconds(sim.proc.pid))
        c = in_ns(NS_B, "iperf3", "-c", server, "-p", str(port), "-t", f"{seconds:g}", "-J",
                  timeout=seconds + 60)
        if c.returncode:
            raise RuntimeError(f"iperf3 failed: {c.stdout[-2000:]}{c.stderr}{d.output}")
        res = json.loads(c.stdout)
        h1 = host_lso(sim, nic)
        b1 = bridge_status(sim)["bridge"]["tx"]
        c1 = (cpu_seconds(d.proc.pid), cpu_seconds(sim.proc.pid))
        end = res["end"]
        gb = end["sum_received"]["bytes"] / 1e9
        return {
            "lso": lso, "ipv6": ipv6, "seconds": seconds,
            "received_bps": end["sum_received"]["bits_per_second"],
            "received_bytes": end["sum_received"]["bytes"],
            "retransmits": end["sum_sent"].get("retransmits"),
            "sender_cpu": end.get("cpu_utilization_percent", {}).get("host_total"),
            "bridge_tx_frames": b1["frames"] - b0["frames"],
            "bridge_large_sends": b1.get("large_sends", 0) - b0.get("large_sends", 0),
            "host": {k: h1[k] - h0[k] for k in h0},
            # CPU seconds per GB received: the bridge (guest driver) and the simulator (host)
            "bridge_cpu_s_per_gb": (c1[0] - c0[0]) / gb if gb else None,
            "sim_cpu_s_per_gb": (c1[1] - c0[1]) / gb if gb else None,
        }
    finally:
        if srv is not None and srv.poll() is None:
            srv.kill()
        if srv is not None:
            srv.wait()
        rc = d.stop()
        lst.close()
        if rc != 0:
            print(f"warning: bridge exited with {rc}:\n{d.output}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 -t per case (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="lso / no-lso pairs (default 2)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ipv6", action="store_true", help="also run each round over IPv6 (TSO6)")
    a = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        print("needs root and /dev/net/tun", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ss", "ping"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (.ci/install-deps)", file=sys.stderr)
            return 2
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="uvb-lso-bench-"))
    try:
        with run_sim(tmp / "sim", "--echo", "0", "--no-ic", "--nic", "1",
                     "--nic-backend", f"tap:{TAP_A}@{NS_A}") as sim:
            nic = sim.device("netvsc")["device_id"]
            sim.bind(nic)
            port = 5420
            for r in range(a.rounds):
                for ipv6, lso in [(v6, lso) for v6 in ((False, True) if a.ipv6 else (False,))
                                  for lso in (True, False)]:
                    port += 1
                    res = one_case(sim, nic, tmp, lso, a.seconds, port, ipv6)
                    res["round"] = r
                    results.append(res)
                    h = res["host"]
                    print(f"round {r} {'IPv6' if ipv6 else 'IPv4'} {'lso   ' if lso else 'no-lso'}: "
                          f"{res['received_bps'] / 1e9:6.3f} Gbit/s "
                          f"received, retransmits {res['retransmits']}, bridge tx {res['bridge_tx_frames']} "
                          f"frames ({res['bridge_large_sends']} large sends), host segmented "
                          f"{h['tx_lso']} large sends into {h['tx_lso_segments']} segments, "
                          f"{h['tx_frames']} frames to its TAP; CPU s/GB bridge "
                          f"{res['bridge_cpu_s_per_gb']:.2f}, simulator {res['sim_cpu_s_per_gb']:.2f}", flush=True)
    finally:
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    for ipv6, lso in [(v6, lso) for v6 in (False, True) for lso in (True, False)]:
        rs = [x for x in results if x["lso"] == lso and x["ipv6"] == ipv6]
        if not rs:
            continue
        bps = sorted(x["received_bps"] for x in rs)
        cpu = sorted(x["bridge_cpu_s_per_gb"] or 0 for x in rs)
        print(f"{'IPv6' if ipv6 else 'IPv4'} {'lso' if lso else 'no-lso'}: median {bps[len(bps) // 2] / 1e9:.3f} Gbit/s, bridge "
              f"{cpu[len(cpu) // 2]:.2f} CPU s/GB over {len(rs)} run(s) of {a.seconds:g} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

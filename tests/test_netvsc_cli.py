"""`uvmbus net info|capture|bench` against the simulator (each command is its own process)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

pytestmark = pytest.mark.timeout(180)


def uvmbus(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gsim(tmp_path_factory):
    with run_sim(tmp_path_factory.mktemp("nvcli"), "--echo", "0", "--no-ic", "--nic", "1",
                 "--nic-backend", "generator", "--bind") as sim:
        yield sim


def test_info_json_and_text(gsim):
    r = uvmbus("net", "info", "netvsc", "--root", str(gsim.root), "--json", "--queues", "2")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    dev = gsim.device("netvsc")["device_id"]
    assert info["device_id"] == dev and info["queues"] == 2 and info["nvsp_version"] == "6.1"
    assert info["mac"] == gsim.device_stats(dev)["netvsp"]["mac"] and info["mtu"] == 1500
    r = uvmbus("net", "info", dev[:8], "--root", str(gsim.root))
    assert r.returncode == 0, r.stderr
    assert "NVSP / NDIS: 6.1 / 6.30" in r.stdout and "link: up" in r.stdout
    assert info["lso"] == {"ipv4_max": 62780, "ipv6_max": 62780, "min_segments": 2}
    assert "LSO: IPv4 up to 62780 B, IPv6 up to 62780 B, at least 2 segments" in r.stdout


def test_capture_is_readable_by_tshark(gsim, tmp_path):
    dev = gsim.device("netvsc")["device_id"]
    gsim.control("model", device=dev, op="generator", args={"size": 128, "flows": 4, "count": 25})
    out = tmp_path / "cap.pcap"
    r = uvmbus("net", "capture", "netvsc", "--root", str(gsim.root), "-w", str(out), "-c", "20",
               "--seconds", "30")
    assert r.returncode == 0, r.stderr
    assert "20 frames written" in r.stderr
    raw = out.read_bytes()
    assert struct.unpack_from("<IHH", raw) == (0xA1B2C3D4, 2, 4)
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    t = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.len", "-e", "ip.dst",
                        "-e", "udp.dstport"], capture_output=True, text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    rows = [line.split("\t") for line in t.stdout.splitlines() if line.strip()]
    assert len(rows) == 20
    assert all(row == ["128", "10.0.0.254", "9"] for row in rows), rows[:3]


def test_bench_json_has_the_reference(gsim):
    r = uvmbus("net", "bench", "netvsc", "--root", str(gsim.root), "--mode", "rx", "--size", "1514",
               "--seconds", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mode"] == "rx" and d["size"] == 1514 and d["frames"] > 0
    assert d["ring_c_loop_mpps"] > 0 and d["gbit_per_s"] > 0
    assert d["guest"]["host_errors"] == 0
    for mode in ("tx", "fwd"):
        r = uvmbus("net", "bench", "netvsc", "--root", str(gsim.root), "--mode", mode, "--size", "64",
                   "--seconds", "1")
        assert r.returncode == 0, r.stderr
        assert "Mpps" in r.stdout and "ring C loop" in r.stdout
    st = gsim.device_stats(gsim.device("netvsc")["device_id"])["netvsp"]
    assert st["backend"] == "generator"          # the bench restores the backend it found (tx: sink)


def test_errors_are_one_line(tmp_path: Path):
    r = uvmbus("net", "info", "netvsc", "--root", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("uvmbus: error:") and "Traceback" not in r.stderr


def test_link_down_and_up_from_the_command_line(gsim):
    dev = gsim.device("netvsc")["device_id"]
    r = uvmbus("sim", "ctl", "--root", str(gsim.root), "link", dev, "down")
    assert r.returncode == 0 and r.stdout.splitlines() == [f"{dev} (link down):", "  link: down"], r
    r = uvmbus("sim", "ctl", "--root", str(gsim.root), "link", dev, "down", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][dev] == {"link": "down"}
    r = uvmbus("net", "info", "netvsc", "--root", str(gsim.root), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["link_up"] is False
    r = uvmbus("sim", "ctl", "--root", str(gsim.root), "model", dev, "link", "up=1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][dev] == {"link": "up"}
    r = uvmbus("sim", "ctl", "--root", str(gsim.root), "link", dev, "sideways")
    assert r.returncode != 0 and "up|down" in r.stderr

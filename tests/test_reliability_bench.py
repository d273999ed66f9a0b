"""Benchmarks never report success over a dead channel (issue 12.3): `net bench` and
`blk bench` exit non-zero with the reason when the ring is corrupted or the device rescinded
mid-run, and their JSON carries an error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim
from test_storvsc_driver import make_image

pytestmark = pytest.mark.timeout(180)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "uvmbus", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _when_open(sim: SimProcess, dev: str, proc: subprocess.Popen[str], settle: float) -> None:
    """Wait until the command has the device open, then a little more (it is running)."""
    deadline = time.monotonic() + 60
    while not sim.device_stats(dev)["connections"]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never opened the device"
        time.sleep(0.05)
    time.sleep(settle)


@pytest.mark.parametrize("fault", ["corrupt_rx", "corrupt_tx", "rescind"])
def test_net_bench_fails_when_the_channel_dies(tmp_path: Path, fault: str) -> None:
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1", "--nic-backend", "generator",
                 "--bind") as sim:
        dev = sim.device("netvsc")["device_id"]
        p = _start("net", "bench", "netvsc", "--root", str(sim.root), "--mode",
                   "tx" if fault == "corrupt_tx" else "rx", "--seconds", "8", "--json")
        _when_open(sim, dev, p, 1.5)
        t0 = time.monotonic()
        if fault == "rescind":
            sim.rescind(dev)
        else:
            sim.fault("corrupt_index", fault[-2:], device=dev)
        out, err = p.communicate(timeout=60)
        assert p.returncode != 0, (out, err)
        assert time.monotonic() - t0 < 7.5          # it stopped at the failure, not at the end
        d = json.loads(out)
        assert d["error"] and "channel died" in d["error"], d
        cause = "rescind" if fault == "rescind" else "index"
        assert cause in d["error"].lower() and cause in err.lower(), (d["error"], err)


@pytest.mark.parametrize("fault", ["corrupt_tx", "rescind"])
def test_blk_bench_fails_when_the_channel_dies(tmp_path: Path, fault: str) -> None:
    img = make_image(tmp_path / "a.img", 8 << 20)
    with run_sim(tmp_path, "--disk", str(img), "--bind", "--no-ic", "--echo", "0") as sim:
        dev = sim.device("storvsc")["device_id"]
        p = _start("blk", "bench", "storvsc", "--root", str(sim.root), "--pattern", "randread",
                   "--bs", "4K", "--qd", "4", "--seconds", "8", "--json", "--no-reference")
        _when_open(sim, dev, p, 1.5)
        t0 = time.monotonic()
        if fault == "rescind":
            sim.rescind(dev)
        else:
            sim.fault("corrupt_index", "tx", device=dev)
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
        assert p.returncode != 0, (out, err)
        d = json.loads(out)
        assert d["error"], d
        assert took < 7.5, (took, d, err[-2000:])
        cause = "rescind" if fault == "rescind" else "read_index"
        assert cause in d["error"].lower(), d["error"]

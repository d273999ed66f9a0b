"""Replay (`uvmbus sim --replay`): recordings of this project's netvsc bring-ups under
tests/data/ play the host side against the current driver; a driver made to send a
different message fails, and the report names the first divergent message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

import uvmbus.netvsc as nv
from uvmbus.errors import UvmbusError
from uvmbus.netvsc import protocol as P

DATA = Path(__file__).resolve().parent / "data"
RECORDINGS = {"netvsc-bringup.pcapng": 1, "netvsc-4queues.pcapng": 4}


@pytest.mark.parametrize("name", sorted(RECORDINGS))
def test_recorded_bringup_replays_against_the_current_driver(tmp_path, name):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(DATA / name)) as sim:
        dev = sim.device("netvsc")["device_id"]
        sim.bind(dev)
        out = subprocess.run([sys.executable, "-m", "uvmbus", "net", "info", dev, "--root", str(sim.root),
                              "--queues", str(RECORDINGS[name]), "--timeout", "10", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        r = sim.device_stats(dev)["replay"]
        assert r["status"] == "complete" and r["divergence"] is None, r
        assert sim.totals()["needless_signals"] == 0
    # exit status 0: everything recorded was replayed


def test_replay_names_the_first_divergent_message(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(DATA / "netvsc-bringup.pcapng"),
                 check_exit=False) as sim:
        dev = sim.device("netvsc")["device_id"]
        sim.bind(dev)
        # the driver made to send a different message: it proposes NVSP 5 instead of 6.1
        with pytest.raises(UvmbusError):
            nv.open(dev, sim.root, versions=(P.NVSP_V5,), timeout=2)
        r = sim.device_stats(dev)["replay"]
        assert r["status"] == "diverged", r
        dv = r["divergence"]
        assert dv["message"] == 1 and dv["subchannel"] == 0
        assert "NVSP INIT min_protocol_ver=393217" in dv["expected"]
        assert "NVSP INIT min_protocol_ver=327680" in dv["got"]
    assert sim.proc.returncode == 3
    assert "first divergence at recorded message #1" in "".join(getattr(sim, "_stderr", []))


def test_replay_of_a_file_without_devices_is_refused(tmp_path):
    from uvmbus.trace import Recorder

    empty = tmp_path / "empty.pcapng"
    Recorder(empty).close()
    out = subprocess.run([sys.executable, "-m", "uvmbus", "sim", "--root", str(tmp_path / "r"), "--replay", str(empty)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no netvsc or storvsc packets to replay" in out.stderr

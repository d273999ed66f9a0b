"""A stopped (SIGSTOP) or hung simulator gives a clear error naming the cause, not a bare
"timed out" (review finding)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from simhelpers import run_sim

from uvmbus.errors import ChannelTimeout, SimulatorError
from uvmbus.sim.control import ControlClient
from uvmbus.uio import SimEndpoint


def test_stopped_simulator_is_named_in_the_error(tmp_path):
    with run_sim(tmp_path, "--echo", "1", "--no-ic") as sim:
        dev = sim.device("echo")["device_id"]
        sim.bind(dev)
        uio = sorted((sim.root / "dev").glob("uio*"))
        assert uio, "the bound echo device has a /dev/uioN"
        os.kill(sim.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ChannelTimeout, match="stopped .SIGSTOP. or hung"):
                SimEndpoint(uio[0], connect_timeout=0.5)
            with pytest.raises(SimulatorError, match="did not answer 'stats'.*SIGSTOP"):
                ControlClient(sim.root, timeout=0.5).call("stats")
        finally:
            os.kill(sim.proc.pid, signal.SIGCONT)
        assert sim.stats()                      # resumed: answers again


@pytest.mark.parametrize("cmd", [["net", "info", "netvsc"], ["blk", "info", "storvsc"]])
def test_command_timeout_bounds_the_wait_for_a_stopped_simulator(tmp_path, cmd):
    """`--timeout T` also bounds the endpoint open (connect + hello), not a fixed 10 s."""
    img = tmp_path / "d.img"
    with run_sim(tmp_path, "--nic", "1", "--disk", f"{img}:size=1M", "--bind", "--no-ic",
                 "--echo", "0") as sim:
        os.kill(sim.proc.pid, signal.SIGSTOP)
        try:
            r = subprocess.run([sys.executable, "-m", "uvmbus", *cmd, "--root", str(sim.root),
                                "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
        finally:
            os.kill(sim.proc.pid, signal.SIGCONT)
        assert r.returncode == 1, r.stderr
        assert "within 0.5 s: is it stopped (SIGSTOP)" in r.stderr, r.stderr
        assert f"--root {sim.root} ping" in r.stderr, r.stderr

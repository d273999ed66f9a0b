"""A stopped (SIGSTOP) or hung simulator gives a clear error naming the cause, not a bare
"timed out" (review finding)."""

from __future__ import annotations

import os
import signal

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

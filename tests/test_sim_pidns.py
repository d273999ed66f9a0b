"""A simulator in another PID namespace is alive: guest commands in a container (the units
under systemd-nspawn in tests/test_units_systemd.py) cannot see the simulator's pid, and must
not call its root stale (they ask its control socket instead)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_live_simulator_in_another_pid_namespace(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a new PID namespace")
    with run_sim(tmp_path, "--nic", "1", "--no-ic") as sim:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        env.pop("UVMBUS_ROOT", None)
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "uvmbus",
               "list", "--root", str(sim.root), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        assert sim.device("netvsc")["device_id"] in p.stdout
    # (a root whose simulator is gone is still stale: tests/test_cli_small.py)

"""`uvmbus demo` (what `make demo` runs) finishes, prints the figures and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

UVMBUS = str(Path(sys.executable).parent / "uvmbus")


def leftovers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("uvb-demo-*")} if Path("/dev/shm").is_dir() else set()


def test_demo_prints_figures_and_exits_zero():
    before = leftovers()
    p = subprocess.run([UVMBUS, "demo", "--seconds", "1.0"], capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for needle in ("Mpps", "Gbit/s", "IOPS", "MB/s", "needless", "read back identical", "demo OK"):
        assert needle in out, f"{needle!r} missing from the demo output:\n{out}"
    assert leftovers() <= before, "the demo left its temporary root behind"


def test_demo_json_figures():
    p = subprocess.run([UVMBUS, "demo", "--seconds", "0.5", "--json"], capture_output=True, text=True,
                       timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    nic, disk = res["nic"], res["disk"]
    assert nic["link_up"] and nic["frames_60"]["mpps"] > 0 and nic["frames_1514"]["gbit_per_s"] > 0
    assert nic["frames_60"]["rx_frames"] <= nic["frames_60"]["tx_frames"]
    assert disk["verified_bytes"] > 0
    assert disk["randread_4k"]["iops"] > 0 and disk["seqread_256k"]["mb_per_s"] > 0
    assert res["signals"]["needless_signals"] == 0 and res["signals"]["kernel_oops"] == 0
    assert res["signals"]["guest_signals"] > 0
    assert "simulated Hyper-V host" in p.stderr          # progress goes to stderr with --json


def test_demo_fails_loudly():
    """A failing step gives a non-zero exit and a clear message (here: the simulator cannot
    start because its Python cannot import uvmbus)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/nonexistent", "PYTHONNOUSERSITE": "1"}
    code = ("import sys; sys.executable = '/bin/false'; "
            "from uvmbus.services.cli import main; sys.exit(main(['demo', '--time-limit', '60']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "uvmbus demo: FAILED:" in p.stderr and "simulator did not become ready" in p.stderr

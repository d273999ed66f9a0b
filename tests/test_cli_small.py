"""The small things a new user tripped over (issue 10.7), one regression test each:
capture on a loopback NIC says why it is empty; demo rejects bad durations up front; hints
carry --root; `list` on a dead simulator's root says so; `sim --root a/b/c` cleans what it
made; the relids column is labelled; blk info shows a read-only LUN (`:ro` with `:size=`);
`sim ctl --json`; no setuptools license warning; a SIGKILLed bench does not leave the NIC on
the generator; `--json` on bind, unbind, units install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parent.parent


def uvmbus(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, Path]]:
    tmp = tmp_path_factory.mktemp("small")
    img = tmp / "rw.img"
    img.write_bytes(b"\0" * (1 << 20))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--nic", "2", "--disk", str(img),
                 "--disk", f"{tmp / 'new-ro.img'}:ro:size=2M") as s:
        yield s, tmp


def _nic(s: SimProcess, i: int) -> str:
    return s.device("netvsc", i)["device_id"]


def test_bind_unbind_json_and_hints_with_root(sim: tuple) -> None:
    s, _ = sim
    root = str(s.root)
    nic = _nic(s, 1)
    r = uvmbus("net", "info", nic, "--root", root)           # not bound yet
    assert r.returncode == 1 and f"`uvmbus bind {nic} --root {root}`" in r.stderr, r.stderr
    r = uvmbus("bind", nic, "--root", root, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device_id"] == nic and out["driver"] == "uio_hv_generic" and out["uio"]
    r = uvmbus("unbind", nic, "--root", root, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["device_id"] == nic
    r = uvmbus("list", "--root", root)
    assert r.stdout.splitlines()[0].split()[4] == "relids"


def test_units_install_json(tmp_path: Path) -> None:
    r = uvmbus("units", "install", "--root", str(tmp_path), "--exec", "/usr/bin/uvmbus", "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["written"]
    assert written and all(Path(p).is_file() for p in written)


def test_capture_on_loopback_says_why_it_is_empty(sim: tuple, tmp_path: Path) -> None:
    s, _ = sim
    nic = _nic(s, 0)
    s.bind(nic)
    r = uvmbus("net", "capture", nic, "--root", str(s.root), "-w", str(tmp_path / "c.pcap"),
               "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    assert "0 frames written" in r.stderr and "loopback backend" in r.stderr
    assert "backend=generator" in r.stderr and f"--root {s.root}" in r.stderr


def test_blk_info_shows_a_read_only_lun(sim: tuple) -> None:
    s, tmp = sim
    disk = s.device("storvsc")["device_id"]
    s.bind(disk)
    assert (tmp / "new-ro.img").stat().st_size == 2 << 20        # :ro with :size= created it
    r = uvmbus("blk", "info", disk, "--root", str(s.root), "--json")
    assert r.returncode == 0, r.stderr
    ro = {d["size"]: d["read_only"] for d in json.loads(r.stdout)["luns"]}
    assert ro == {1 << 20: False, 2 << 20: True}
    r = uvmbus("blk", "info", disk, "--root", str(s.root))
    lines = [x for x in r.stdout.splitlines() if "LUN" in x]
    assert sum("READ-ONLY" in x for x in lines) == 1, r.stdout


def test_sim_ctl_json(sim: tuple) -> None:
    s, _ = sim
    r = uvmbus("sim", "ctl", "--root", str(s.root), "ping", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "pid": s.proc.pid}, r.stdout
    r = uvmbus("sim", "ctl", "--root", str(s.root), "ping")
    assert r.stdout.strip() == f"pid: {s.proc.pid}"
    r = uvmbus("sim", "ctl", "--root", str(s.root), "kernel")
    with pytest.raises(ValueError):
        json.loads(r.stdout)                  # text without --json
    r = uvmbus("sim", "ctl", "--root", str(s.root), "kernel", "--json")
    assert "kernel" in json.loads(r.stdout)


def _backend(root: Path, dev: str) -> str | None:
    from uvmbus.netvsc.bench import sim_nic_backend
    from uvmbus.sim.control import ControlClient

    with ControlClient(root, timeout=10) as c:
        return sim_nic_backend(c, dev)


def test_killed_bench_does_not_leave_the_generator_on(sim: tuple) -> None:
    s, _ = sim
    nic = _nic(s, 0)
    assert _backend(s.root, nic) == "loopback"
    p = subprocess.Popen([sys.executable, "-m", "uvmbus", "net", "bench", nic, "--root", str(s.root),
                          "--mode", "rx", "--seconds", "60"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _backend(s.root, nic) != "generator":
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the bench never switched the backend"
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 30
    while _backend(s.root, nic) != "loopback":
        assert time.monotonic() < deadline, "the simulator kept the generator after the bench died"
        time.sleep(0.1)


@pytest.mark.parametrize("args", [["--seconds", "0"], ["--seconds", "-1"], ["--time-limit", "-1"]])
def test_demo_rejects_bad_durations_up_front(args: list[str]) -> None:
    r = uvmbus("demo", *args)
    assert r.returncode == 2 and "must be" in r.stderr, r.stderr


def _start_sim(root: Path, *extra: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "uvmbus", "sim", "--root", str(root), "--quiet",
                          "--no-ic", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("ready "), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_list_on_a_killed_simulators_root(tmp_path: Path) -> None:
    root = Path("/dev/shm") / f"uvbnu-dead-{os.getpid()}"
    try:
        p = _start_sim(root, "--nic", "1")
        p.send_signal(signal.SIGKILL)
        p.communicate()
        r = uvmbus("list", "--root", str(root))
        assert r.returncode == 1, r.stdout
        assert f"pid {p.pid}" in r.stderr and "no longer running" in r.stderr, r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_sim_removes_the_parents_it_created_and_run(tmp_path: Path) -> None:
    base = Path("/dev/shm") / f"uvbnu-parents-{os.getpid()}"
    try:
        p = _start_sim(base / "a" / "b" / "c", "--echo", "1")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        assert p.returncode == 0
        assert not base.exists()                    # /a/b/c and every parent it made are gone
        given = tmp_path / "root"
        given.mkdir()
        p = _start_sim(given, "--echo", "1")
        (given / "run" / "uvmbus").mkdir(parents=True)     # what a daemon leaves
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        assert p.returncode == 0 and given.is_dir() and list(given.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_no_setuptools_license_deprecation_warning() -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert not [w for w in got if "license" in str(w.message)], [str(w.message)[:200] for w in got]

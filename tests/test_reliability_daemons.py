"""`uvmbus blk export` after its device goes away (issue 12.2): unhealthy at once (status,
sd_notify STATUS, no watchdog), requests fail only while the device is gone, reattach on a
re-offer, or exit non-zero after the bounded wait so systemd restarts the service."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from simhelpers import run_sim
from test_services_helpers import NotifyListener, start_daemon

from uvmbus.services.daemon import call_control

pytestmark = pytest.mark.timeout(240)

SIZE = 4 << 20


def _need_tools() -> None:
    for tool in ("nbdkit", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps installs it)")


def _status(root: Path) -> dict:
    sock = next(Path(root, "run", "uvmbus").glob("blk-*.sock"))
    return call_control(sock, "status")["status"]


def _wait(cond, timeout: float, what: str) -> float:      # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _read(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", "read -v 0 512", uri], capture_output=True,
                          text=True, timeout=60)


def _ok(p: subprocess.CompletedProcess[str]) -> bool:
    return p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower()


def test_export_reattaches_after_rescind_and_reoffer(tmp_path: Path) -> None:
    _need_tools()
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--disk", str(image)) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        lst = NotifyListener(tmp_path / "notify")
        nbd = tmp_path / "export.nbd"
        d = start_daemon(["blk", "export", dev, "--root", str(sim.root), "--socket", str(nbd),
                          "--reattach-timeout", "60"],
                         notify=lst, log=tmp_path / "export.log", watchdog_usec=1_000_000)
        uri = f"nbd+unix:///?socket={nbd}"
        try:
            assert _ok(_read(uri)), d.output
            assert _status(sim.root)["healthy"]
            sim.rescind(dev, reoffer_after=4.0)
            took = _wait(lambda: not _status(sim.root)["healthy"], 3.0, "unhealthy after rescind")
            st = _status(sim.root)
            assert "device lost" in st["problem"] and st["device_lost"], st
            assert lst.wait_for("STATUS", 2)
            assert any("device lost" in v for k, v in lst.events() if k == "STATUS"), lst.events()
            if took < 3.0:                       # still before the re-offer: requests fail
                assert not _ok(_read(uri))
            _wait(lambda: _status(sim.root)["healthy"], 30.0, "reattached after the re-offer")
            st = _status(sim.root)
            assert st["reattaches"] == 1 and st["device_lost"] is None, st
            p = _read(uri)
            assert _ok(p), p.stdout + p.stderr + d.output
            assert d.alive()
        finally:
            rc = d.stop()
            lst.close()
        assert rc == 0, d.output


def test_export_exits_nonzero_when_no_reoffer_comes(tmp_path: Path) -> None:
    _need_tools()
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--disk", str(image)) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        lst = NotifyListener(tmp_path / "notify")
        d = start_daemon(["blk", "export", dev, "--root", str(sim.root), "--socket",
                          str(tmp_path / "e.nbd"), "--reattach-timeout", "2"],
                         notify=lst, log=tmp_path / "export.log")
        try:
            sim.rescind(dev)
            t0 = time.monotonic()
            rc = d.proc.wait(timeout=60)
            took = time.monotonic() - t0
        finally:
            if d.alive():
                d.kill()
            lst.close()
        assert rc == 1, d.output
        assert took < 30, took
        assert "device lost" in d.output and "re-offer" in d.output, d.output

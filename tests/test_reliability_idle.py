"""Daemons notice a dead simulator without traffic (issue 12 follow-up): `blk export` with no
NBD request in flight, and `net bridge` with no frame, must report the device lost (status,
sd_notify STATUS=) once the simulator is killed, not only at the next request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from simhelpers import run_sim
from test_services_helpers import NotifyListener, start_daemon

from uvmbus.services.daemon import call_control

pytestmark = pytest.mark.timeout(240)


def _wait(cond, timeout: float, what: str) -> float:      # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_idle_export_notices_a_killed_simulator(tmp_path: Path) -> None:
    for tool in ("nbdkit", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps installs it)")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--disk", str(image), check_exit=False) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        lst = NotifyListener(tmp_path / "notify")
        d = start_daemon(["blk", "export", dev, "--root", str(sim.root), "--socket",
                          str(tmp_path / "e.nbd"), "--reattach-timeout", "120"],
                         notify=lst, log=tmp_path / "export.log")
        sock = next(Path(sim.root, "run", "uvmbus").glob("blk-*.sock"))
        try:
            assert call_control(sock, "status")["status"]["healthy"], d.output
            os.kill(sim.proc.pid, signal.SIGKILL)          # no request is in flight
            sim.proc.wait(timeout=30)
            _wait(lambda: not call_control(sock, "status")["status"]["healthy"], 60,
                  "unhealthy without a request after the simulator was killed")
            st = call_control(sock, "status")["status"]
            assert "device lost" in st["problem"] and st["device_lost"], st
            _wait(lambda: any("device lost" in v for k, v in lst.events() if k == "STATUS"), 30,
                  "STATUS=device lost")
            assert d.alive(), d.output
        finally:
            d.stop()
            lst.close()
        assert "device lost" in d.output, d.output


@pytest.mark.root
def test_idle_bridge_notices_a_killed_simulator(tmp_path: Path) -> None:
    """The same for `net bridge` with nothing sent or received: its main loop sees the endpoint
    revoked (the simulator's socket reads EOF)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    tag = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
    ns, tap = f"uviB{tag}", f"uvib{tag}"[:15]
    try:
        with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1", check_exit=False) as sim:
            nic = sim.device("netvsc")["device_id"]
            sim.bind(nic)
            lst = NotifyListener(tmp_path / "notify")
            d = start_daemon(["net", "bridge", nic, "--root", str(sim.root), "--tap", tap, "--netns", ns,
                              "--reattach-timeout", "120"], notify=lst, log=tmp_path / "bridge.log")
            sock = next(Path(sim.root, "run", "uvmbus").glob("net-*.sock"))
            try:
                assert call_control(sock, "status")["status"]["healthy"], d.output
                os.kill(sim.proc.pid, signal.SIGKILL)
                sim.proc.wait(timeout=30)
                _wait(lambda: not call_control(sock, "status")["status"]["healthy"], 60,
                      "unhealthy without traffic after the simulator was killed")
                st = call_control(sock, "status")["status"]
                assert "device lost" in st["problem"] and st["device_lost"], st
                _wait(lambda: any("device lost" in v for k, v in lst.events() if k == "STATUS"), 30,
                      "STATUS=device lost")
                assert d.alive(), d.output
            finally:
                d.stop()
                lst.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

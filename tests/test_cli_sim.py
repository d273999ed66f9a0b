"""`uvmbus sim` as docs/simulator.md shows it: a device-model plugin loaded from the current
directory or from a file, the root named on stderr, the quick-start commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

UPCASE = '''
from uvmbus.sim import DeviceModel, HostChannel, register_model
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, Packet

@register_model
class Upcase(DeviceModel):
    name = "upcase"
    class_id = "5d2ba4a5-0000-4000-8000-000000000001"

    def open(self, channel: HostChannel) -> None:
        self.count = 0

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        self.count += 1
        channel.send(bytes(pkt.payload).upper(), trans_id=pkt.trans_id)
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            channel.complete(pkt.trans_id, b"\\0\\0\\0\\0")

    def reset(self) -> None:
        self.count = 0
'''


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], dict, Path]:
    root = Path(tempfile.mkdtemp(prefix="uvb-", dir="/dev/shm")) / "r"
    env = {k: v for k, v in os.environ.items() if k != "UVMBUS_ROOT"}
    p = subprocess.Popen([sys.executable, "-m", "uvmbus", "sim", "--root", str(root), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready "):
        p.kill()
        raise AssertionError(f"not ready: {line!r} {p.communicate()[1]}")
    return p, json.loads(line[6:]), root


def stop(p: subprocess.Popen[str], root: Path) -> str:
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert not (root / "sys").exists()
    root.parent.rmdir()
    return err


@pytest.mark.parametrize("how", ["module-in-cwd", "file"])
def test_load_model_as_documented(tmp_path: Path, how: str) -> None:
    (tmp_path / "mymodel.py").write_text(UPCASE)
    arg = "mymodel" if how == "module-in-cwd" else str(tmp_path / "mymodel.py")
    cwd = tmp_path if how == "module-in-cwd" else Path("/")
    p, ready, root = start(["--quiet", "--no-ic", "--load-model", arg, "--device", "upcase", "--bind"], cwd)
    try:
        dev = next(d for d in ready["devices"] if d["model"] == "upcase")
        assert dev["driver"] == "uio_hv_generic"
        from uvmbus.channel import open_device

        with open_device(dev["device_id"], root) as cd:
            cd.primary.send(b"hello", trans_id=7)
            pkts = cd.primary.recv(timeout=5.0)
            assert bytes(pkts[0].payload).startswith(b"HELLO") and pkts[0].trans_id == 7
    finally:
        if p.poll() is None:
            stop(p, root)


def test_ready_root_on_stderr_and_quickstart(tmp_path: Path) -> None:
    p, ready, root = start(["--kernel", "6.16", "--echo", "2"], tmp_path)
    try:
        env = {**os.environ, "UVMBUS_ROOT": str(root)}

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True,
                                  text=True, timeout=60, env=env)

        r = run("list")
        assert r.returncode == 0 and r.stdout.count(" echo ") == 2, r.stdout      # the two echo devices
        r = run("sim", "ctl", "fault", "stall", "2", "--device", "*")
        lines = r.stdout.splitlines()                 # one line per device (echo + IC devices)
        assert r.returncode == 0 and len(lines) >= 2, (r.stdout, r.stderr)
        assert all(ln.endswith(": fault stall 2 set") for ln in lines), r.stdout
        r = run("sim", "ctl", "clear")
        assert r.returncode == 0, r.stderr
    finally:
        err = stop(p, root) if p.poll() is None else ""
    assert f"ready under {root}: `export UVMBUS_ROOT={root}`" in err

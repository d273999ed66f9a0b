"""The command line's failure modes without a device: one clear line (no traceback unless -v),
exit 1 for a failed command, 2 for a bad option value, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def uvmbus(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "UVMBUS_ROOT"}
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def one_error_line(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uvmbus: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("cmd", [["list"], ["status", "--sample", "0"], ["net", "info", "netvsc"],
                                 ["blk", "info", "storvsc"], ["bind", "netvsc"], ["unbind", "netvsc"]])
def test_missing_root_is_one_line(tmp_path: Path, cmd: list[str]) -> None:
    line = one_error_line(uvmbus(*cmd, "--root", str(tmp_path / "nope")))
    assert "no such directory" in line and "uvmbus sim" in line


def test_root_without_vmbus_says_what_to_do(tmp_path: Path) -> None:
    r = uvmbus("list", "--root", str(tmp_path))
    assert r.returncode == 0 and "no sys/bus/vmbus" in r.stdout and "uvmbus sim" in r.stdout
    line = one_error_line(uvmbus("net", "info", "netvsc", "--root", str(tmp_path)))
    assert "no VMBus under" in line and "--root" in line


@pytest.mark.parametrize("cmd,needle", [
    (["bench", "ring", "--sizes", "abc"], "--sizes"),
    (["bench", "ring", "--sizes", "0"], "--sizes"),
    (["bench", "ring", "--burst", "0"], "--burst"),
    (["bench", "ring", "--seconds", "0"], "--seconds"),
    (["net", "bench", "netvsc", "--mode", "rx", "--seconds", "-1"], "--seconds"),
    (["net", "bench", "netvsc", "--mode", "rx", "--burst", "0"], "--burst"),
    (["net", "capture", "netvsc", "-w", "x.pcap", "--count", "-1"], "-c/--count"),
    (["blk", "bench", "storvsc", "--subchannels", "-1"], "--subchannels"),
    (["blk", "bench", "storvsc", "--spin-us", "-1"], "--spin-us"),
    (["blk", "bench", "storvsc", "--seconds", "0"], "--seconds"),
    (["blk", "read", "storvsc", "--timeout", "nan"], "--timeout"),
    (["net", "bridge", "netvsc", "--tap", "t0", "--metrics-port", "99999"], "--metrics-port"),
    (["blk", "export", "storvsc", "--port", "0"], "--port"),
    (["sim", "--nic", "-1"], "--nic"),
])
def test_bad_values_are_usage_errors(tmp_path: Path, cmd: list[str], needle: str) -> None:
    r = uvmbus(*cmd, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and f"argument {needle}" in r.stderr, r.stderr


def test_os_errors_are_one_line_and_v_shows_the_traceback(tmp_path: Path) -> None:
    args = ["blk", "write", "storvsc", "--root", str(tmp_path), "-i", str(tmp_path / "missing.img")]
    line = one_error_line(uvmbus(*args))
    assert "missing.img: No such file or directory" in line
    r = uvmbus(*args, "-v")                       # -v after the sub-command works too
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
    line = one_error_line(uvmbus("blk", "write", "storvsc", "--root", str(tmp_path), "-i", str(tmp_path)))
    assert "Is a directory" in line


def test_sim_ctl_without_a_simulator_and_bad_count(tmp_path: Path) -> None:
    line = one_error_line(uvmbus("sim", "ctl", "--root", str(tmp_path), "stats"))
    assert "is `uvmbus sim` running with this root?" in line
    line = one_error_line(uvmbus("sim", "ctl", "--root", str(tmp_path), "subchannels", "abc", "x"))
    assert "subchannels needs DEVICE COUNT" in line


def test_sim_bad_option_leaves_no_root_behind(tmp_path: Path) -> None:
    root = tmp_path / "simroot"
    line = one_error_line(uvmbus("sim", "--root", str(root), "--guest-ram", "12Q"))
    assert "guest RAM size" in line
    assert not root.exists()
    line = one_error_line(uvmbus("sim", "--root", str(root), "--load-model", str(tmp_path / "no.py")))
    assert "no such file" in line and not root.exists()


def test_version_and_help_exit_codes() -> None:
    r = uvmbus("--version")
    assert r.returncode == 0 and r.stdout.startswith("uvmbus ")
    r = uvmbus()
    assert r.returncode == 2 and "COMMAND" in r.stdout
    r = uvmbus("net", "--help")
    assert r.returncode == 0 and "bridge" in r.stdout

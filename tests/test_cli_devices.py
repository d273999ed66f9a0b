"""The command line against a simulated NIC and disk, as a user drives it: the class of a
device is checked before any protocol runs, a device is used by one command at a time,
`blk read/write` protect the terminal and the disk, Ctrl-C leaves everything clean.
Every command runs as its own process."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "uvmbus", *args]


def uvmbus(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout, **kw)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uvmbus: error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, str, str, Path]]:
    tmp = tmp_path_factory.mktemp("clidev")
    img = tmp / "disk.img"
    img.write_bytes(os.urandom(16 * MiB))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--nic", "1", "--disk", str(img)) as s:
        nic = s.device("netvsc")["device_id"]
        disk = s.device("storvsc")["device_id"]
        root = str(s.root)
        # not bound yet: the OS column shows what the kernel drivers made of them
        r = uvmbus("list", "--root", root)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
        assert rows[nic][-1].startswith("simeth") and rows[disk][-1].startswith("simsd")
        for dev in (nic, disk):
            r = uvmbus("bind", dev, "--root", root)
            assert r.returncode == 0, r.stderr
        yield s, nic, disk, img


def test_wrong_class_fails_at_once(sim: tuple) -> None:
    s, nic, disk, _ = sim
    t = time.monotonic()
    line = one_error_line(uvmbus("net", "info", disk, "--root", str(s.root)))
    assert f"{disk} is a storvsc device, not netvsc" in line
    line = one_error_line(uvmbus("blk", "info", nic[:8], "--root", str(s.root)))
    assert f"{nic} is a netvsc device, not storvsc" in line
    line = one_error_line(uvmbus("blk", "export", nic, "--root", str(s.root)))
    assert "not storvsc" in line
    assert time.monotonic() - t < 20          # no protocol timeout (5-10 s each) was waited for


def _holds_flock(pid: int) -> bool:
    return any(f.split()[1:2] == ["FLOCK"] and f.split()[4:5] == [str(pid)]
               for f in Path("/proc/locks").read_text().splitlines())


def test_a_device_is_used_by_one_command_at_a_time(sim: tuple, tmp_path: Path) -> None:
    s, nic, _, _ = sim
    root = str(s.root)
    p = subprocess.Popen(cmd("net", "capture", nic, "--root", root, "-w", str(tmp_path / "c.pcap"),
                             "--seconds", "30"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _holds_flock(p.pid):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "capture never took the device lock"
            time.sleep(0.05)
        time.sleep(0.5)                       # let it finish bringing the NIC up
        line = one_error_line(uvmbus("net", "info", "netvsc", "--root", root))
        assert f"{nic} is in use by pid {p.pid}" in line and "net capture" in line
        line = one_error_line(uvmbus("unbind", nic, "--root", root))
        assert f"in use by pid {p.pid}" in line and "before you unbind it" in line
        p.send_signal(signal.SIGINT)          # capture stops on ^C, cleanly, exit 0
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0 and "frames written to" in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # the first session was not disturbed and the device is free again
    r = uvmbus("net", "info", nic, "--root", root, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["device_id"] == nic


def test_blk_write_that_does_not_fit_writes_nothing(sim: tuple, tmp_path: Path) -> None:
    s, _, disk, img = sim
    before = img.read_bytes()
    src = tmp_path / "big.bin"
    src.write_bytes(b"\x5a" * (2 * MiB))
    line = one_error_line(uvmbus("blk", "write", disk, "--root", str(s.root), "-i", str(src),
                                 "--offset", "15M"))
    assert "does not fit" in line and "nothing was written" in line
    assert img.read_bytes() == before
    line = one_error_line(uvmbus("blk", "write", disk, "--root", str(s.root), "-i", str(src),
                                 "--offset", "1000"))
    assert "not a multiple of the 512-byte block size" in line


def test_blk_read_refuses_a_terminal(sim: tuple) -> None:
    s, _, disk, _ = sim
    master, slave = pty.openpty()
    try:
        r = subprocess.run(cmd("blk", "read", disk, "--root", str(s.root), "--length", "4K"),
                           stdout=slave, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 1 and "refusing to write disk data to a terminal" in r.stderr, r.stderr
    r = subprocess.run(cmd("blk", "read", disk, "--root", str(s.root), "--length", "4K"),
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout) == 4096


def test_ctrl_c_in_net_bench_is_clean(sim: tuple) -> None:
    s, nic, _, _ = sim
    p = subprocess.Popen(cmd("net", "bench", nic, "--root", str(s.root), "--mode", "fwd",
                             "--seconds", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a shell without job control starts background jobs (`.ci/run &`) with
                         # SIGINT ignored, and the child would inherit that: give it Ctrl-C back
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(2.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (p.returncode, err)          # not a crash (SIGSEGV) or a traceback
    assert err.strip() == "uvmbus: interrupted", err
    st = s.device_stats(nic)["netvsp"]
    assert st["backend"] == "loopback"        # the bench put the host's backend back
    r = uvmbus("net", "info", nic, "--root", str(s.root))
    assert r.returncode == 0, r.stderr
    assert s.totals()["needless_signals"] == 0, s.needless_report()


def test_broken_pipe_is_quiet(sim: tuple) -> None:
    s, _, _, _ = sim
    p = subprocess.Popen(cmd("blk", "read", "storvsc", "--root", str(s.root)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.read(100)
    p.stdout.close()                          # like `| head -c 100`
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.wait(60) in (0, 141) and err == "", err        # 141 = 128 + SIGPIPE, like a C tool

"""Output files and the first steps of a new user (issue 10.4, 10.5):

* a failed `blk read -o FILE` / `net capture -w FILE` leaves an existing FILE as it was
  (before: emptied before failing); a good one replaces it; `-w -` writes to stdout;
* `make demo` says where `uvmbus` is, since it is not on PATH.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.services.cli import output_file

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parent.parent
OLD = b"precious old content\n"


def uvmbus(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True,
                          timeout=timeout, **kw)


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".part")]


def test_output_file_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    f = tmp_path / "out.bin"
    f.write_bytes(OLD)
    f.chmod(0o640)
    with pytest.raises(RuntimeError), output_file(str(f)) as out:
        out.write(b"partial")
        raise RuntimeError("boom")
    assert f.read_bytes() == OLD and not _leftovers(tmp_path)
    with output_file(str(f)) as out:
        out.write(b"new")
    assert f.read_bytes() == b"new" and (f.stat().st_mode & 0o777) == 0o640
    assert not _leftovers(tmp_path)


def test_output_file_writes_devices_and_fifos_in_place_and_follows_symlinks(tmp_path: Path) -> None:
    """`-o /dev/null` must never replace the device node with a regular file (a rename over
    it did, which broke the machine's /dev/null); a FIFO is written, not replaced; a symlink
    stays a symlink and the file it names gets the output."""
    # a character device of our own (a copy of /dev/null's numbers) in tmp_path
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with output_file(str(dev)) as out:
        out.write(b"gone")
    assert stat.S_ISCHR(dev.stat().st_mode) and not _leftovers(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with output_file(str(fifo)) as out:
            out.write(b"through")
        assert os.read(r, 100) == b"through" and stat.S_ISFIFO(fifo.stat().st_mode)
    finally:
        os.close(r)
    real = tmp_path / "real.bin"
    real.write_bytes(OLD)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with output_file(str(link)) as out:
        out.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new" and not _leftovers(tmp_path)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, str, str]]:
    tmp = tmp_path_factory.mktemp("outs")
    img = tmp / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--nic", "2", "--disk", str(img)) as s:
        disk = s.device("storvsc")["device_id"]
        s.bind(disk)
        s.bind(s.device("netvsc", 1)["device_id"])
        yield s, disk, str(img)


def test_failed_blk_read_keeps_the_output_file(sim: tuple, tmp_path: Path) -> None:
    s, disk, img = sim
    out = tmp_path / "existing.bin"
    out.write_bytes(OLD)
    r = uvmbus("blk", "read", disk, "--root", str(s.root), "--offset", "1G", "--length", "4K",
               "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert out.read_bytes() == OLD and not _leftovers(tmp_path)
    r = uvmbus("blk", "read", disk, "--root", str(s.root), "--length", "8K", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == Path(img).read_bytes()[:8192] and not _leftovers(tmp_path)
    r = uvmbus("blk", "read", disk, "--root", str(s.root), "--length", "4K", "-o", "-")
    assert r.returncode == 0 and r.stdout == Path(img).read_bytes()[:4096], r.stderr


def test_failed_capture_keeps_the_pcap_and_dash_is_stdout(sim: tuple, tmp_path: Path) -> None:
    s, _, _ = sim
    unbound = s.device("netvsc", 0)["device_id"]
    bound = s.device("netvsc", 1)["device_id"]
    out = tmp_path / "existing.pcap"
    out.write_bytes(OLD)
    r = uvmbus("net", "capture", unbound, "--root", str(s.root), "-w", str(out), "--seconds", "1")
    assert r.returncode == 1 and b"bind it first" in r.stderr, r.stderr
    assert out.read_bytes() == OLD and not _leftovers(tmp_path)
    r = uvmbus("net", "capture", bound, "--root", str(s.root), "-w", "-", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:4] == bytes.fromhex("d4c3b2a1")            # a pcap header on stdout
    assert not (Path.cwd() / "-").exists()


def test_make_demo_says_where_uvmbus_is() -> None:
    venv = Path(sys.prefix)
    r = subprocess.run(["make", "-s", "-C", str(REPO), "-o", f"{venv}/.installed-stamp", "demo",
                        f"VENV={venv}", "DEMO_ARGS=--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tail = r.stdout.strip().splitlines()[-2:]
    assert "not on your PATH" in tail[0], r.stdout
    assert f"{venv}/bin/uvmbus" in tail[1] and f". {venv}/bin/activate" in tail[1], tail
    assert os.access(venv / "bin" / "uvmbus", os.X_OK)
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/uvmbus" in readme and ". .venv/bin/activate" in readme

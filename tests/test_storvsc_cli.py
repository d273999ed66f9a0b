"""`uvmbus blk info|read|write|bench` against the simulator (separate process)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.services.cli import main

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


@pytest.fixture(scope="module")
def sim_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, Path]]:
    tmp = tmp_path_factory.mktemp("blkcli")
    img = tmp / "disk.img"
    img.write_bytes(random.Random(5).randbytes(8 * MiB))
    with run_sim(tmp, "--disk", str(img), "--disk", f"{tmp / 'new.img'}:size=2M:bs=4096",
                 "--bind", "--no-ic", "--echo", "0") as sim:
        yield sim, img


def test_info_json(sim_disk: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    sim, img = sim_disk
    assert main(["blk", "info", "storvsc", "--root", str(sim.root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["protocol"] == "6.0" and info["max_transfer_bytes"] == 256 * 1024
    assert [(d["lun"], d["size"], d["block_size"]) for d in info["luns"]] == [
        (0, 8 * MiB, 512), (1, 2 * MiB, 4096)]
    assert main(["blk", "info", "storvsc", "--root", str(sim.root)]) == 0
    text = capsys.readouterr().out
    assert "LUN 0: 8388608 bytes" in text and "protocol 6.0" in text


def test_read_whole_disk_to_file(sim_disk: tuple, tmp_path: Path) -> None:
    sim, img = sim_disk
    out = tmp_path / "copy.img"
    assert main(["blk", "read", "storvsc", "--root", str(sim.root), "-o", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(img.read_bytes()).digest()
    part = tmp_path / "part"
    assert main(["blk", "read", "storvsc", "--root", str(sim.root), "--offset", "1M",
                 "--length", "64K", "-o", str(part)]) == 0
    assert part.read_bytes() == img.read_bytes()[MiB:MiB + 64 * 1024]


def test_write_from_file(sim_disk: tuple, tmp_path: Path) -> None:
    sim, img = sim_disk
    src = tmp_path / "src"
    data = os.urandom(300 * 1024)
    src.write_bytes(data)
    assert main(["blk", "write", "storvsc", "--root", str(sim.root), "--offset", "4096",
                 "-i", str(src), "--fua"]) == 0
    assert img.read_bytes()[4096:4096 + len(data)] == data
    odd = tmp_path / "odd"
    odd.write_bytes(b"q" * 1000)
    assert main(["blk", "write", "storvsc", "--root", str(sim.root), "-i", str(odd)]) == 1
    assert main(["blk", "write", "storvsc", "--root", str(sim.root), "-i", str(odd), "--pad"]) == 0
    assert img.read_bytes()[:1024] == b"q" * 1000 + bytes(24)


def test_errors_are_clear(sim_disk: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    sim, _ = sim_disk
    assert main(["blk", "read", "storvsc", "--root", str(sim.root), "--offset", "100",
                 "--length", "512", "-o", "/dev/null"]) == 1
    assert "multiples of the 512-byte block size" in capsys.readouterr().err
    assert main(["blk", "read", "storvsc", "--root", str(sim.root), "--lun", "9"]) == 1
    assert "no disk at LUN 9" in capsys.readouterr().err


@pytest.mark.parametrize("pattern,bs,qd", [("randread", "4K", 8), ("seqwrite", "64K", 4),
                                           ("seqread", "1M", 2), ("randwrite", "512", 16)])
def test_bench_json(sim_disk: tuple, capsys: pytest.CaptureFixture[str], pattern: str, bs: str,
                    qd: int) -> None:
    sim, img = sim_disk
    before = img.read_bytes()
    assert main(["blk", "bench", "storvsc", "--root", str(sim.root), "--pattern", pattern,
                 "--bs", bs, "--qd", str(qd), "--seconds", "0.3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pattern"] == pattern and r["qd"] == qd and r["errors"] == 0
    assert r["ios"] > 0 and r["iops"] > 0 and r["mb_per_s"] > 0
    assert r["reference"]["file"] == str(img) and r["reference"]["ios"] > 0
    assert r["host_stats"]["needless_signals"] == 0
    if pattern.endswith("read"):
        assert img.read_bytes() == before
    else:
        assert img.read_bytes() != before


def test_bench_rejects_impossible_settings(sim_disk: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    sim, _ = sim_disk
    assert main(["blk", "bench", "storvsc", "--root", str(sim.root), "--bs", "1M", "--qd", "100",
                 "--seconds", "0.1"]) == 1
    assert "exceed the per-channel queue depth" in capsys.readouterr().err

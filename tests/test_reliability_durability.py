"""Durability and soak of `uvmbus blk export` (issue 12.6).

- kill -9 durability: NBD clients write (FUA, or plain + flush) at offsets never reused while
  the export daemon or the simulator is killed with SIGKILL at a random moment; every write a
  client saw acknowledged must be in the disk image afterwards.  Rounds:
  UVMBUS_KILL_ROUNDS (CI: 4; `make soak`: 40).
- soak: the export under continuous NBD load for UVMBUS_SOAK_SECONDS (CI: 8; `make soak`:
  300) with its RSS and open fds sampled twice a second: neither may grow.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from simhelpers import run_sim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SIZE = 16 << 20
BLOCK = 4096


def _need_tools() -> None:
    for tool in ("nbdkit", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps installs it)")


def _export(sim_root: Path, dev: str, nbd: Path, log: Path) -> subprocess.Popen[bytes]:
    nbd.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "uvmbus", "blk", "export", dev, "--root", str(sim_root),
                          "--socket", str(nbd), "--reattach-timeout", "2"],
                         stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not nbd.exists():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return p


def _writer(uri: str, offsets: list[int], acked: dict[int, int], stop: threading.Event,
            rnd: random.Random) -> None:
    while offsets and not stop.is_set():
        off = offsets.pop()
        pat = rnd.randrange(1, 256)
        cmds = (["-c", f"write -f -P {pat} {off} {BLOCK}"] if rnd.random() < 0.5 else
                ["-c", f"write -P {pat} {off} {BLOCK}", "-c", "flush"])
        p = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], capture_output=True, text=True, timeout=120)
        if p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower():
            acked[off] = pat


def test_acknowledged_writes_survive_kill9(tmp_path: Path) -> None:
    _need_tools()
    rounds = int(os.environ.get("UVMBUS_KILL_ROUNDS", "4"))
    rnd = random.Random(int(os.environ.get("UVMBUS_KILL_SEED", "12")))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    offsets = [i * BLOCK for i in range(SIZE // BLOCK)]
    rnd.shuffle(offsets)
    acked: dict[int, int] = {}
    victims = []
    for r in range(rounds):
        victim = "sim" if r % 2 else "export"
        victims.append(victim)
        with run_sim(tmp_path / f"r{r}", "--echo", "0", "--no-ic", "--disk", str(image), "--bind",
                     check_exit=False) as sim:
            dev = sim.device("storvsc")["device_id"]
            nbd = tmp_path / f"r{r}.nbd"
            exp = _export(sim.root, dev, nbd, tmp_path / "export.log")
            stop = threading.Event()
            before = len(acked)
            t = threading.Thread(target=_writer, args=(f"nbd+unix:///?socket={nbd}", offsets, acked, stop, rnd))
            t.start()
            time.sleep(rnd.uniform(0.3, 1.5))
            (exp if victim == "export" else sim.proc).send_signal(signal.SIGKILL)
            time.sleep(0.3)
            stop.set()
            t.join(120)
            if exp.poll() is None:
                exp.terminate()
            exp.wait(30)
            assert len(acked) > before or r > 0, "no write was acknowledged before the kill"
        data = image.read_bytes()
        lost = [off for off, pat in acked.items() if data[off:off + BLOCK] != bytes([pat]) * BLOCK]
        assert not lost, f"round {r} ({victim} killed): {len(lost)} of {len(acked)} acknowledged writes lost"
    print(f"kill -9 durability: {rounds} rounds ({victims.count('export')} export, "
          f"{victims.count('sim')} simulator), {len(acked)} acknowledged writes, 0 lost")


def test_soak_rss_and_fds_stay_flat(tmp_path: Path) -> None:
    _need_tools()
    seconds = float(os.environ.get("UVMBUS_SOAK_SECONDS", "8"))
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--disk", str(image), "--bind") as sim:
        dev = sim.device("storvsc")["device_id"]
        nbd = tmp_path / "soak.nbd"
        exp = _export(sim.root, dev, nbd, tmp_path / "export.log")
        proc = psutil.Process(exp.pid)
        uri = f"nbd+unix:///?socket={nbd}"
        stop = threading.Event()
        done = [0]

        def load() -> None:
            rnd = random.Random(3)
            while not stop.is_set():
                off = rnd.randrange(SIZE // 65536) * 65536
                p = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 7 {off} 65536", "-c",
                                    f"read -P 7 {off} 65536", "-c", "flush", uri],
                                   capture_output=True, text=True, timeout=120)
                assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
                done[0] += 1

        t = threading.Thread(target=load)
        t.start()
        samples = []
        t_end = time.monotonic() + seconds
        try:
            while time.monotonic() < t_end and t.is_alive():
                samples.append((proc.memory_info().rss, proc.num_fds()))
                time.sleep(0.5)
        finally:
            stop.set()
            t.join(120)
            exp.terminate()
            assert exp.wait(30) == 0, (tmp_path / "export.log").read_text()[-3000:]
    assert done[0] > 3 and len(samples) >= 8, (done, samples)
    warm = samples[len(samples) // 4:]
    rss0, fds0 = warm[0]
    rss_max, fds_max = max(s[0] for s in warm), max(s[1] for s in warm)
    print(f"soak {seconds:g} s: {done[0]} request batches, RSS {rss0 >> 20} -> max {rss_max >> 20} MiB, "
          f"fds {fds0} -> max {fds_max}")
    assert fds_max <= fds0 + 4, samples
    assert rss_max - rss0 < (24 << 20), samples

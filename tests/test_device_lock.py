"""One user per device (issue 10.1): the Python API takes the same per-device lock as the CLI.

A script holding a NIC and a SCSI controller open through ``uvmbus.netvsc.open`` /
``uvmbus.storvsc.open`` makes ``uvmbus net info`` / ``blk info`` from another process fail at
once naming it ("in use by pid N (cmdline)") — before, they re-initialised the device under
the script (10 s "no completion" for the NIC, a LUN reset for the disk) — and the script's
traffic and I/O go on unharmed.  ``uvmbus status`` shows the holder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from simhelpers import run_sim

from uvmbus.bus import device_holder, hold_device, lock_device
from uvmbus.errors import DeviceBusy

pytestmark = pytest.mark.timeout(300)

HOLDER = textwrap.dedent("""
    import json, os, select, struct, sys
    import uvmbus.netvsc as nv, uvmbus.storvsc as sv
    root, nic_id, disk_id = sys.argv[1:4]
    frame = bytes.fromhex("020000000002020000000001") + b"\\x08\\x00" + bytes(range(86))
    counts = {"frames": 0, "ios": 0}

    def one_round(i):
        data = struct.pack("<Q", i) * 512
        assert nic.tx_burst([frame], timeout=5) == 1
        got = []
        for _ in range(50):
            got += nic.rx_burst(0, 16, timeout=0.2).frames()
            if got:
                break
        assert got == [frame], got
        disk.write(4096 * (i % 8), data)
        assert disk.read(4096 * (i % 8), 4096) == data
        counts["frames"] += 1
        counts["ios"] += 1

    with nv.open(nic_id, root) as nic, sv.open(disk_id, root, subchannels=0) as hba:
        disk = hba.luns[0]
        one_round(0)
        print("ready", flush=True)
        i = 1
        while not select.select([sys.stdin], [], [], 0)[0]:
            one_round(i)
            i += 1
        before = dict(counts)
        for k in range(20):                     # after the intruders: still unharmed
            one_round(i + k)
        print(json.dumps({"before": before, "after": counts}), flush=True)
""")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_api_holder_blocks_cli_at_once_and_keeps_working(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 << 20))
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1", "--disk", str(img)) as sim:
        nic = sim.device("netvsc")["device_id"]
        disk = sim.device("storvsc")["device_id"]
        root = str(sim.root)
        sim.bind(nic)
        sim.bind(disk)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, root, nic, disk], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdin is not None
            line = holder.stdout.readline()
            assert line.strip() == "ready", (line, holder.stderr.read() if holder.poll() is not None else "")
            # the CLI would wait 30 s per answer if it reached the protocol: it must not get there
            for group, dev in (("net", nic), ("blk", disk)):
                t0 = time.monotonic()
                r = _cli(group, "info", dev, "--root", root, "--timeout", "30")
                took = time.monotonic() - t0
                assert r.returncode == 1, (r.stdout, r.stderr)
                err = r.stderr.strip()
                assert f"{dev} is in use by pid {holder.pid} (" in err and "-c" in err, err
                assert len(err.splitlines()) == 1, err      # the holder's multi-line -c script, on one line
                assert took < 25, f"{group} info waited {took:.1f} s: it reached the protocol"
            # the API refuses in this process too, naming the holder
            import uvmbus.netvsc as nv
            import uvmbus.storvsc as sv
            with pytest.raises(DeviceBusy) as ei:
                nv.open(nic, root, timeout=30)
            assert ei.value.pid == holder.pid
            with pytest.raises(DeviceBusy, match=f"in use by pid {holder.pid}"):
                sv.open(disk, root, timeout=30)
            # status names the holder of each device
            r = _cli("status", "--root", root, "--json")
            assert r.returncode == 0, r.stderr
            rows = {d["device_id"]: d for d in json.loads(r.stdout)["devices"]}
            assert rows[nic]["holder"]["pid"] == holder.pid and rows[disk]["holder"]["pid"] == holder.pid
            r = _cli("status", "--root", root)
            assert f"in use by pid {holder.pid}" in r.stdout
            out, err = holder.communicate("stop\n", timeout=120)
            assert holder.returncode == 0, err
            res = json.loads(out.strip().splitlines()[-1])
            assert res["after"]["frames"] == res["before"]["frames"] + 20
            assert res["after"]["ios"] == res["before"]["ios"] + 20
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        # released when the holder is gone: the CLI works again
        r = _cli("net", "info", nic, "--root", root, "--json")
        assert r.returncode == 0, r.stderr
        r = _cli("status", "--root", root, "--json")
        assert all(d["holder"] is None for d in json.loads(r.stdout)["devices"])


def _fake(tmp_path: Path, name: str = "dev0") -> SimpleNamespace:
    p = tmp_path / name
    p.mkdir(exist_ok=True)
    return SimpleNamespace(path=p, device_id=name)


def test_lock_in_process_rules(tmp_path: Path) -> None:
    dev = _fake(tmp_path)
    assert device_holder(dev) is None
    a = lock_device(dev)
    assert device_holder(dev) == {"pid": os.getpid(), "holder": device_holder(dev)["holder"]}
    with pytest.raises(DeviceBusy, match="already open in this process"):
        lock_device(dev)                        # a second open in the same process
    a.release()
    assert device_holder(dev) is None
    with hold_device(dev, what="do X"):         # a command-wide hold nests with its opens
        b = lock_device(dev)
        b.release()
        assert device_holder(dev) is not None
    assert device_holder(dev) is None


def test_lock_held_by_another_process_fails_at_once(tmp_path: Path) -> None:
    dev = _fake(tmp_path)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(dev.path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(DeviceBusy, match=rf"dev0 is in use by pid {p.pid} \(.*before you unbind it") as ei:
            lock_device(dev, what="unbind it")
        assert ei.value.pid == p.pid
        assert device_holder(dev)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()
    lock_device(dev).release()                  # free again once the holder is gone

"""End to end with real tools: simulated disk ↔ storvsc driver ↔ `uvmbus blk export` daemon
↔ nbdkit (python plugin) ↔ nbdcopy / qemu-io / nbdinfo.  The export reads back
byte-identical to the image, and writes (plain, unaligned, FUA, zeroes), trims and flushes
land in the image.  Under a fake NOTIFY_SOCKET with a watchdog; clean SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim
from test_services_helpers import NotifyListener, first_order, start_daemon

from uvmbus.services.daemon import call_control

pytestmark = pytest.mark.timeout(300)

SIZE = 16 << 20


def need_tools() -> None:
    for tool in ("nbdkit", "nbdcopy", "nbdinfo", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/install-deps)")
    if subprocess.run(["nbdkit", "--dump-plugin", "python"], capture_output=True).returncode != 0:
        pytest.skip("nbdkit python plugin not installed (nbdkit-plugin-python)")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def disk_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, str, Path]]:
    need_tools()
    tmp = tmp_path_factory.mktemp("e2e-blk")
    image = tmp / "disk.img"
    image.write_bytes(os.urandom(SIZE))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--disk", str(image)) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        yield sim, dev, image
        totals = sim.totals()
        assert totals["needless_signals"] == 0, sim.needless_report()


def qemu_io(uri: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)


def test_export_read_write_trim_flush_notify(disk_sim, tmp_path):
    sim, dev, image = disk_sim
    lst = NotifyListener(tmp_path / "notify")
    nbd = tmp_path / "export.nbd"
    d = start_daemon(["blk", "export", dev, "--root", str(sim.root), "--socket", str(nbd),
                      "--metrics-file", str(tmp_path / "blk.prom"), "--metrics-interval", "0.2",
                      "--log-format", "json"],
                     notify=lst, log=tmp_path / "export.log", watchdog_usec=1_000_000)
    try:
        uri = f"nbd+unix:///?socket={nbd}"
        assert oct(nbd.stat().st_mode & 0o777) == "0o600"
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        exp = json.loads(info.stdout)["exports"][0]
        assert exp["export-size"] == SIZE
        assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"]

        # the export reads back byte-identical to the image
        out = tmp_path / "copy.img"
        p = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr + d.output
        assert sha256(out) == sha256(image)

        # writes land in the image: aligned, unaligned (read-modify-write), FUA, zeroes, trim
        before = image.read_bytes()
        p = qemu_io(uri, "write -P 0xab 4096 8192", "write -f -P 0xcd 1000 100",
                    "write -z 2097152 10000", "discard 1048576 65536", "flush")
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
        want = bytearray(before)
        want[4096:4096 + 8192] = b"\xab" * 8192
        want[1000:1100] = b"\xcd" * 100
        want[2097152:2097152 + 10000] = bytes(10000)
        after = image.read_bytes()
        trimmed = after[1048576:1048576 + 65536]
        assert after[:1048576] == want[:1048576]                  # incl. bytes around the RMW edges
        assert after[1048576 + 65536:] == want[1048576 + 65536:]
        assert trimmed == bytes(65536)                            # the model's UNMAP reads zeros

        # a whole-image write through NBD, then read back through the export and the file
        src = tmp_path / "src.img"
        src.write_bytes(os.urandom(SIZE))
        p = subprocess.run(["nbdcopy", "--flush", str(src), uri], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr + d.output
        assert sha256(image) == sha256(src)

        # status and metrics
        st = call_control(next(Path(sim.root, "run", "uvmbus").glob("blk-*.sock")), "status")["status"]
        assert st["healthy"] and st["device_id"] == dev and st["io"]["errors"] == 0
        assert st["io"]["write_ops"] >= 4 and st["io"]["flush_ops"] >= 2 and st["io"]["trim_ops"] == 1
        assert st["io"]["read_bytes"] >= SIZE
        from uvmbus.services.status import collect_status

        full = collect_status(sim.root, run_dir=str(Path(sim.root, "run", "uvmbus")), sample=0)
        svc = [x for x in full["services"] if x["kind"] == "blk"][0]
        assert [(c["pid"], c["kind"]) for c in svc["children"]] == [(st["nbdkit_pid"], "nbdkit (blk export)")]
        # the daemon pings the watchdog at half of WATCHDOG_USEC (1 s): wait for one before
        # stopping, so the order check below does not depend on how fast the I/O ran
        assert lst.wait_for("WATCHDOG", 5), lst.keys()
    finally:
        rc = d.stop()
    assert rc == 0, d.output
    assert lst.wait_for("STOPPING", 5)
    keys = lst.keys()
    lst.close()
    assert first_order(keys, ["READY", "STATUS", "WATCHDOG", "STOPPING"]) == \
        ["READY", "STATUS", "WATCHDOG", "STOPPING"], keys
    assert keys[0] == "READY"
    assert not nbd.exists(), "the NBD socket must be removed at exit"
    assert list(Path(sim.root, "run", "uvmbus").iterdir()) == []
    prom = (tmp_path / "blk.prom").read_text()             # the last textfile: final figures
    from uvmbus.services.metrics import parse_text

    fams = parse_text(prom)
    reqs = {s.labels["op"]: s.value for s in fams["uvmbus_blk_requests_total"].samples}
    assert reqs["read"] > 0 and reqs["write"] >= 4 and reqs["trim"] == 1
    assert sum(s.value for s in fams["uvmbus_blk_request_seconds"].samples if s.name.endswith("_count")) > 0
    lines = [json.loads(x) for x in d.output.splitlines() if x.startswith("{")]
    assert any(x["msg"].startswith("ready:") for x in lines), d.output    # JSON log lines


def test_export_readonly_over_tcp(disk_sim, tmp_path):
    sim, dev, image = disk_sim
    with socket.socket() as s:                 # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lst = NotifyListener(tmp_path / "notify")
    d = start_daemon(["blk", "export", dev, "--root", str(sim.root), "--port", str(port), "--readonly"],
                     notify=lst, log=tmp_path / "export.log")
    try:
        uri = f"nbd://127.0.0.1:{port}/"
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["is_read_only"] is True
        before = sha256(image)
        p = qemu_io(uri, "write -P 0x11 0 4096")
        assert p.returncode != 0 or "failed" in (p.stdout + p.stderr).lower(), p.stdout
        assert sha256(image) == before
        out = tmp_path / "copy.img"
        p = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and sha256(out) == before, p.stderr
    finally:
        rc = d.stop()
        lst.close()
    assert rc == 0, d.output


def test_export_fails_loudly_without_device(tmp_path):
    need_tools()
    p = subprocess.run([sys.executable, "-m", "uvmbus", "blk", "export", "storvsc", "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "uvmbus: error:" in p.stderr

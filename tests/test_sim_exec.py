"""`uvmbus sim exec`: the mount plan (no privileges needed) and the preload library's uio
semantics, checked with a plain Python program as the unmodified guest (DPDK: tests/dpdk/)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from simhelpers import run_sim

from uvmbus.sim.execns import plan_mounts, preload_library


def _tree(base: Path, entries: dict[str, str | None]) -> None:
    for rel, link in entries.items():
        p = base / rel
        if link is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(link)
        elif rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x\n")


def test_plan_merges_any_tree_shape(tmp_path: Path) -> None:
    sim, host = tmp_path / "sim", tmp_path / "host"
    _tree(host, {"bus/pci/": None, "class/net/eth0/": None, "devices/pci0000:00/": None,
                 "devices/LNXSYSTM:00/LNXPWRBN:00/": None, "kernel/": None})
    _tree(sim, {"bus/vmbus/devices/": None, "bus/vmbus/drivers_probe": None,
                "class/uio/uio0/": None, "class/net/": None,
                "devices/LNXSYSTM:00/VMBUS:00/abc/": None,
                "bus/vmbus/devices/abc": "../../../devices/LNXSYSTM:00/VMBUS:00/abc"})
    plan = plan_mounts(sim, host)
    # host dirs lacking a simulator entry are overlaid (their own entries bound back)
    assert set(plan.overlays) == {host / "bus", host / "class", host / "devices/LNXSYSTM:00"}
    binds = {(s.relative_to(sim).as_posix(), t.relative_to(host).as_posix()) for s, t in plan.binds}
    assert ("bus/vmbus", "bus/vmbus") in binds
    assert ("class/uio", "class/uio") in binds
    assert ("devices/LNXSYSTM:00/VMBUS:00", "devices/LNXSYSTM:00/VMBUS:00") in binds
    # a directory both have is merged below, not replaced: the host's class/net stays
    assert not any(t == "class/net" for _, t in binds)
    assert host / "class/net" not in plan.overlays
    assert plan.describe()


def test_preload_library_is_installed() -> None:
    lib = preload_library()
    assert lib.is_file() and lib.suffix == ".so"


GUEST = textwrap.dedent('''
    import errno, mmap, os, select, stat, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    assert stat.S_ISCHR(os.fstat(fd).st_mode)
    for n in (3, 8):
        try:
            os.read(fd, n)
            raise SystemExit(f"read of {n} bytes must fail")
        except OSError as e:
            assert e.errno == errno.EINVAL, e
    try:
        os.read(fd, 4)
        raise SystemExit("non-blocking read without an interrupt must fail")
    except BlockingIOError:
        pass
    assert os.write(fd, (0).to_bytes(4, "little")) == 4            # irqcontrol: mask
    ring = mmap.mmap(fd, 4096, offset=0)                            # map 0 at offset 0
    intpage = mmap.mmap(fd, 4096, offset=1 * mmap.PAGESIZE)         # map 1 at one page
    ring.close(); intpage.close()
    try:
        mmap.mmap(fd, 4096, offset=9 * mmap.PAGESIZE)
        raise SystemExit("mmap of a missing map must fail")
    except OSError as e:
        assert e.errno == errno.EINVAL, e
    standin = os.open(sys.argv[2], os.O_RDWR)      # a closed channel's ring: mmap -> ENODEV
    try:
        mmap.mmap(standin, 4096)
        raise SystemExit("mmap of a closed channel's ring must fail")
    except OSError as e:
        assert e.errno == errno.ENODEV, e
    os.close(standin)
    p = select.poll(); p.register(fd, select.POLLIN)
    assert p.poll(0) == []
    print("READY", flush=True)
    assert p.poll(20000), "no interrupt within 20 s"
    count = int.from_bytes(os.read(fd, 4), "little")
    assert count >= 1, count
    ep = select.epoll(); ep.register(fd, select.EPOLLIN)           # epoll works natively too
    os.set_blocking(fd, True)
    print("COUNT", count, flush=True)
    os.close(fd)
    print("CLOSED", flush=True)
''')


@pytest.mark.root
def test_preload_uio_semantics(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("uvmbus sim exec needs root")
    with run_sim(tmp_path, "--no-ic", "--device", "echo:bind=uio_hv_generic") as sim:
        dev = sim.device("echo")["device_id"]
        uio = sorted((sim.root / "sys/bus/vmbus/devices" / dev / "uio").iterdir())[0].name
        script = tmp_path / "guest.py"
        script.write_text(GUEST)
        standin = sim.root / "sim" / "rings" / "99999.closed"   # what a closed ring links to
        standin.write_bytes(bytes(4096))
        proc = subprocess.Popen([sys.executable, "-m", "uvmbus", "sim", "exec", "--root",
                                 str(sim.root), "--", sys.executable, str(script), f"/dev/{uio}",
                                 str(standin)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "READY", line + proc.communicate(timeout=30)[1]
            sim.fault("spurious_interrupt", 2, device=dev)
            out, err = proc.communicate(timeout=60)
        finally:
            standin.unlink(missing_ok=True)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out + err
        assert "COUNT" in out and "CLOSED" in out, out + err
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()

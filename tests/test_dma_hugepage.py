"""HugepageMemory on the real kernel: hugepages, mlock, pagemap PFNs and their error paths.

The tests that map hugepages need root: they reserve what they need through
/proc/sys/vm/nr_hugepages (only if too few are free) and restore the old value.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from uvmbus.dma import DmaPool, HugepageMemory
from uvmbus.dma.hugepage import hugepage_shortage_message, meminfo
from uvmbus.errors import ResourceError

NR = "/proc/sys/vm/nr_hugepages"
HP = 2 * 1024 * 1024


def reserve(n: int) -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root to reserve hugepages and read physical addresses")
    if meminfo().get("Hugepagesize", 0) * 1024 != HP:
        pytest.skip("default hugepage size is not 2 MiB")
    free = meminfo()["HugePages_Free"]
    if free >= n:
        yield
        return
    with open(NR) as f:
        old = int(f.read())
    with open(NR, "w") as f:
        f.write(str(old + n - free))
    try:
        if meminfo()["HugePages_Free"] < n:
            pytest.skip(f"the kernel could not reserve {n} hugepages (memory fragmented?)")
        yield
    finally:
        with open(NR, "w") as f:
            f.write(str(old))


@pytest.fixture
def hugepages4() -> Iterator[None]:
    yield from reserve(4)


@pytest.fixture
def hugepages1() -> Iterator[None]:
    yield from reserve(1)


def kernel_page_size_kb(address: int) -> int:
    """KernelPageSize of the mapping containing ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "KernelPageSize:":
                return int(line.split()[1])
    raise AssertionError(f"{address:#x} is not mapped")


@pytest.mark.root
def test_hugepage_region_is_pinned_and_physically_plausible(hugepages4: None) -> None:
    with HugepageMemory() as mem:
        assert mem.granularity == HP
        region = mem.alloc_region(HP + 1)                    # rounded up to two hugepages
        assert region.size == 2 * HP and region.npages == 1024 and region.align == HP
        assert region.address % HP == 0
        assert kernel_page_size_kb(region.address) == 2048   # really backed by hugepages
        pfns = region.pfns(0, region.npages)
        assert all(pfns)
        for h in (0, 512):                                   # per 2 MiB hugepage:
            first = pfns[h]
            assert first % 512 == 0                          # naturally aligned, and
            assert pfns[h:h + 512] == list(range(first, first + 512))   # consecutive
        assert region.pfn_of(HP + 4096 * 7 + 5) == pfns[512 + 7]
        assert len(set(pfns)) == 1024
        region.view[:4] = b"abcd"
        region.view[-4:] = b"wxyz"
        assert bytes(region.view[:4]) == b"abcd" and bytes(region.view[-4:]) == b"wxyz"
        other = mem.alloc_region(HP)
        assert not set(other.pfns(0, 512)) & set(pfns)
        region.close()
        assert mem.regions == [other]


@pytest.mark.root
def test_pool_on_hugepages(hugepages1: None) -> None:
    with HugepageMemory() as mem, DmaPool(mem, buffer_size=256 * 1024, max_regions=1) as pool:
        bufs = [pool.alloc() for _ in range(8)]
        with pytest.raises(ResourceError):
            pool.alloc()
        count, offset, pfns = bufs[3].gpa_range(100, 5000)
        assert (count, offset, len(pfns)) == (5000, 100, 2)
        assert pfns == [bufs[3].region.pfn_of(3 * 256 * 1024) + k for k in (0, 1)]


@pytest.mark.root
def test_not_enough_hugepages_message() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with open("/proc/sys/vm/nr_overcommit_hugepages") as f:
        if int(f.read()):
            pytest.skip("surplus hugepages (nr_overcommit_hugepages) could satisfy the request")
    # Ask for more than are free instead of emptying the global pool, which
    # other processes on this machine may be using; mmap fails the same way.
    info = meminfo()
    need = info["HugePages_Free"] + 64
    with HugepageMemory() as mem, pytest.raises(ResourceError) as err:
        mem.alloc_region(need * HP)
    text = str(err.value)
    assert f"cannot map {need} hugepage(s) of 2048 kB" in text
    assert "sysctl -w vm.nr_hugepages=" in text and "/proc/sys/vm/nr_hugepages" in text
    target = int(text.split("vm.nr_hugepages=")[1].split("`")[0])
    assert target >= info["HugePages_Total"] + 64


def test_shortage_message_when_none_reserved() -> None:
    text = hugepage_shortage_message(3, 0, 0, HP)
    assert "no hugepages are reserved" in text
    assert "Reserve 3 more with `sysctl -w vm.nr_hugepages=3`" in text
    assert "write 3 to /proc/sys/vm/nr_hugepages" in text
    text = hugepage_shortage_message(4, 1, 10, HP)
    assert "only 1 of 10" in text and "vm.nr_hugepages=13" in text


CHILD = textwrap.dedent("""
    import resource, sys
    from uvmbus.dma import HugepageMemory
    from uvmbus.errors import UvmbusError
    if len(sys.argv) > 1:
        lim = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (lim, lim))
    eff = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
    try:
        r = HugepageMemory().alloc_region(1)
    except UvmbusError as e:
        print(f"{eff} {type(e).__name__}: {e}")
        sys.exit(3)
    print(f"{eff} ok {r.pfn_of(0):#x}")
""")

CAP_SYS_ADMIN = 21
CAP_IPC_LOCK = 14


def run_child(drop: str | None, *args: str) -> tuple[int, int, str]:
    """Run CHILD, optionally without capability ``drop``: (exit code, CapEff, message)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to have, and then drop, capabilities)")
    cmd = [sys.executable, "-c", CHILD, *args]
    if drop is not None:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed; cannot drop capabilities")
        cmd = [setpriv, f"--bounding-set=-{drop}", f"--inh-caps=-{drop}", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 3), p.stderr
    eff, _, msg = p.stdout.strip().partition(" ")
    return p.returncode, int(eff, 16), msg


@pytest.mark.root
def test_pagemap_without_cap_sys_admin_is_a_privilege_error(hugepages1: None) -> None:
    rc, eff, msg = run_child(None)                      # control: with the capability
    assert eff & (1 << CAP_SYS_ADMIN) and rc == 0 and msg.startswith("ok 0x"), msg
    rc, eff, msg = run_child("sys_admin")
    assert not eff & (1 << CAP_SYS_ADMIN)
    assert rc == 3 and msg.startswith("PrivilegeError:"), msg
    assert "PFN 0" in msg and "CAP_SYS_ADMIN" in msg


@pytest.mark.root
def test_mlock_failures_name_the_fix(hugepages1: None) -> None:
    rc, eff, msg = run_child("ipc_lock", "0")          # no capability, no allowance
    assert not eff & (1 << CAP_IPC_LOCK)
    assert rc == 3 and msg.startswith("PrivilegeError:"), msg
    assert "CAP_IPC_LOCK" in msg and "ulimit -l" in msg and "LimitMEMLOCK" in msg
    rc, _, msg = run_child("ipc_lock", "65536")        # allowance smaller than a hugepage
    assert rc == 3 and msg.startswith("ResourceError:"), msg
    assert "CAP_IPC_LOCK" in msg and "ulimit -l" in msg
    rc, _, msg = run_child("ipc_lock", str(4 * HP))    # allowance big enough: fine
    assert rc == 0, msg

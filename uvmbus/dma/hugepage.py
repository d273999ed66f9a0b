"""DMA memory on a real guest: pinned hugepages with physical addresses from pagemap.

Each region is an anonymous ``MAP_SHARED | MAP_HUGETLB`` mapping of whole
hugepages (the default size, ``Hugepagesize`` in /proc/meminfo), locked with
``mlock`` and touched so every page is resident.  Hugetlb pages are never
migrated, swapped or merged, so their physical addresses stay valid while
mapped.  Those addresses come from ``/proc/self/pagemap`` (8 bytes per system
page: bit 63 present, bits 0-54 PFN), which reports them only to holders of
CAP_SYS_ADMIN (others read PFN 0).  System PFNs are converted to Hyper-V
4 KiB PFNs: ``pfn * (PAGE_SIZE // 4096) + i``.

Needs: reserved hugepages (``sysctl -w vm.nr_hugepages=N``), CAP_SYS_ADMIN
(pagemap) and CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK (mlock).
"""

from __future__ import annotations

import errno
import mmap
import os
from array import array

from uvmbus.dma.memory import HV_PAGE_SIZE, DmaMemory, DmaRegion
from uvmbus.errors import PrivilegeError, ResourceError, from_oserror
from uvmbus.native import ffi, lib

__all__ = ["HugepageMemory", "meminfo", "hugepage_size", "hugepage_shortage_message",
           "physical_pfns", "MAP_HUGETLB"]

MAP_HUGETLB = 0x40000
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGEMAP = "/proc/self/pagemap"


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as ``{field: number}`` (kB fields stay in kB)."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0])
    return out


def hugepage_size(info: dict[str, int] | None = None) -> int:
    """The default hugepage size in bytes."""
    info = meminfo() if info is None else info
    kb = info.get("Hugepagesize", 0)
    if kb <= 0:
        raise ResourceError("this kernel has no hugetlb support (no Hugepagesize in "
                            "/proc/meminfo); DMA memory needs CONFIG_HUGETLBFS")
    return kb * 1024


def hugepage_shortage_message(need: int, free: int, total: int, size: int) -> str:
    """The text of the error raised when ``need`` hugepages cannot be mapped."""
    target = total + max(need - free, 1)
    kb = size // 1024
    have = ("no hugepages are reserved" if total == 0
            else f"only {free} of {total} reserved hugepages are free")
    return (f"cannot map {need} hugepage(s) of {kb} kB for DMA memory: {have}. Reserve "
            f"{target - total} more with `sysctl -w vm.nr_hugepages={target}` (or write "
            f"{target} to /proc/sys/vm/nr_hugepages; persist it in /etc/sysctl.d/ or with "
            "hugepages= on the kernel command line).")


def physical_pfns(address: int, size: int, *, pagemap: str = PAGEMAP) -> list[int]:
    """Hyper-V 4 KiB PFNs of the resident pages ``[address, address + size)`` of this process.

    Raises :class:`PrivilegeError` when pagemap hides PFNs (no CAP_SYS_ADMIN)
    and :class:`ResourceError` when a page is not resident."""
    ps = mmap.PAGESIZE
    first, count = address // ps, -(-(address % ps + size) // ps)
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"open {pagemap}") from exc
    try:
        raw = os.pread(fd, 8 * count, 8 * first)
    except OSError as exc:
        raise from_oserror(exc, f"read {pagemap}") from exc
    finally:
        os.close(fd)
    if len(raw) != 8 * count:
        raise ResourceError(f"{pagemap}: short read ({len(raw)} of {8 * count} bytes)")
    entries = array("Q")
    entries.frombytes(raw)
    per = ps // HV_PAGE_SIZE
    out: list[int] = []
    for i, e in enumerate(entries):
        if not e & PAGEMAP_PRESENT:
            raise ResourceError(f"page at {(first + i) * ps:#x} is not resident after being "
                                "touched and locked; cannot get its physical address")
        pfn = e & PAGEMAP_PFN_MASK
        if pfn == 0:
            raise PrivilegeError(
                f"{pagemap} reports PFN 0 for a resident page: reading physical addresses "
                "needs CAP_SYS_ADMIN. Run as root, or give the service CAP_SYS_ADMIN "
                "(systemd: AmbientCapabilities=/CapabilityBoundingSet=CAP_SYS_ADMIN).")
        out.extend(range(pfn * per, pfn * per + per))
    return out


class HugepageMemory(DmaMemory):
    """Pinned hugepage regions of a real guest (see the module docstring)."""

    kind = "hugepage"

    def __init__(self) -> None:
        super().__init__()
        self._hp = hugepage_size()

    @property
    def granularity(self) -> int:
        return self._hp

    def _alloc(self, size: int, name: str) -> DmaRegion:
        need = size // self._hp
        try:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                info = meminfo()
                raise ResourceError(hugepage_shortage_message(
                    need, info.get("HugePages_Free", 0), info.get("HugePages_Total", 0),
                    self._hp)) from exc
            raise from_oserror(exc, f"mmap of {need} hugepage(s)") from exc
        try:
            pfns = self._pin(mm, size)
        except BaseException:
            mm.close()
            raise
        return DmaRegion(mm, pfns, align=self._hp, on_close=self._forget, name=name)

    def _pin(self, mm: mmap.mmap, size: int) -> list[int]:
        ptr = ffi.from_buffer("uint8_t[]", mm)
        try:
            err = lib.uvb_dma_mlock(ptr, size)
            address = int(ffi.cast("uintptr_t", ptr))
        finally:
            ffi.release(ptr)
        if err:
            text = (f"mlock of {size} bytes of DMA memory failed ({os.strerror(err)}): pinning "
                    "needs CAP_IPC_LOCK or a locked-memory limit of at least that size "
                    "(`ulimit -l`, systemd LimitMEMLOCK=, /etc/security/limits.conf memlock)")
            raise PrivilegeError(text) if err == errno.EPERM else ResourceError(text)
        for off in range(0, size, mmap.PAGESIZE):   # fault in every page (write access)
            mm[off] = 0
        pfns = physical_pfns(address, size)
        per = self._hp // HV_PAGE_SIZE
        for h in range(0, len(pfns), per):
            base = pfns[h]
            if pfns[h:h + per] != list(range(base, base + per)):
                raise ResourceError(
                    f"pagemap returned non-contiguous PFNs inside hugepage {h // per} "
                    f"(first {base:#x}); physical addresses are unreliable here")
        return pfns

"""DMA memory for VFIO devices, as :class:`uvmbus.dma.DmaMemory` providers.

- :class:`IommuDmaMemory` (type1, or iommufd with the cdev API): anonymous memory mapped
  with ``VFIO_IOMMU_MAP_DMA`` (``IOMMU_IOAS_MAP``) at IOVAs this provider hands out (the
  kernel pins the pages);
  a region's ``pfn_table`` holds ``IOVA >> 12`` per 4 KiB page.
- no-IOMMU: :class:`uvmbus.dma.HugepageMemory` (pinned hugepages, guest-physical page
  numbers from ``/proc/self/pagemap``): the device sees physical addresses.

Either way a driver builds its DMA addresses as ``pfn_table[i] << 12``, the same
:class:`~uvmbus.dma.DmaRegion` the storvsc driver uses for GPA lists.
"""

from __future__ import annotations

import mmap
import threading

from uvmbus.dma import DmaMemory, DmaRegion, HugepageMemory
from uvmbus.dma.hugepage import MAP_HUGETLB, meminfo
from uvmbus.errors import VfioError
from uvmbus.native import ffi
from uvmbus.vfio.device import Container, Iommufd, VfioHandle

__all__ = ["IommuDmaMemory", "dma_memory_for", "IOVA_BASE"]

#: first IOVA handed out (above the 32-bit MSI window and low reserved ranges)
IOVA_BASE = 1 << 32
_GRANULE = 2 * 1024 * 1024


class IommuDmaMemory(DmaMemory):
    """Regions mapped through a type1 container (see the module docstring)."""

    kind = "vfio-iommu"

    def __init__(self, container: Container | Iommufd, *, iova_base: int = IOVA_BASE,
                 hugepages: bool | None = None) -> None:
        super().__init__()
        if container.noiommu or container.iommu_type is None:
            raise VfioError("IommuDmaMemory needs a container with a type1 IOMMU set")
        self.container = container
        self._next_iova = iova_base
        self._iova_lock = threading.Lock()
        if hugepages is None:
            try:
                info = meminfo()
                hugepages = info.get("Hugepagesize", 0) == 2048 and info.get("HugePages_Free", 0) > 0
            except OSError:
                hugepages = False
        self._huge = hugepages
        self._iovas: dict[int, tuple[int, int]] = {}

    @property
    def granularity(self) -> int:
        return _GRANULE

    def _alloc(self, size: int, name: str) -> DmaRegion:
        flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        mm = None
        if self._huge:
            try:
                mm = mmap.mmap(-1, size, flags=flags | MAP_HUGETLB,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                mm = None
        if mm is None:
            mm = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for off in range(0, size, mmap.PAGESIZE):
            mm[off] = 0
        with self._iova_lock:
            iova = self._next_iova
            self._next_iova += size
        ptr = ffi.from_buffer("uint8_t[]", mm)
        vaddr = int(ffi.cast("uintptr_t", ptr))
        ffi.release(ptr)
        try:
            self.container.map_dma(vaddr, iova, size)
        except BaseException:
            mm.close()
            raise
        pfns = range(iova >> 12, (iova + size) >> 12)
        region = DmaRegion(mm, pfns, align=_GRANULE, on_close=self._release, name=name)
        self._iovas[id(region)] = (iova, size)
        return region

    def _release(self, region: DmaRegion) -> None:
        iova, size = self._iovas.pop(id(region), (0, 0))
        if size and self.container.fd >= 0:
            try:
                self.container.unmap_dma(iova, size)
            except VfioError:
                pass
        self._forget(region)


def dma_memory_for(handle: VfioHandle) -> DmaMemory:
    """The DMA provider matching the device's container: IOMMU-mapped or physical."""
    if handle.noiommu:
        return HugepageMemory()
    return IommuDmaMemory(handle.container)

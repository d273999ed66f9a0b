"""DMA memory interface: regions, buffers, providers and a buffer pool.

GPA-direct packets (VMBus type 9) name guest memory by *Hyper-V page number*:
the guest-physical address shifted right by 12, always in 4 KiB units whatever
the guest page size.  A :class:`DmaRegion` is a pinned chunk of memory whose
page numbers are known; it keeps them in :attr:`DmaRegion.pfn_table`, a
``uint64_t[]`` with one entry per 4 KiB page, so C code can build PFN lists
without Python.  A :class:`DmaBuffer` is a slice of a region and turns itself
(or part of itself) into the ``(byte_count, byte_offset, pfns)`` range that
:meth:`uvmbus.ring.OutRing.put_gpa_direct` takes.

Providers (:class:`DmaMemory`) hand out regions: real hugepages on a guest
(:mod:`uvmbus.dma.hugepage`) or chunks of the simulator's guest-RAM file
(:mod:`uvmbus.dma.sim`).  :class:`DmaPool` carves buffers out of regions.

Lifetime: a buffer's ``view`` and ``ptr`` are valid until the buffer is freed;
a region's until it is closed.  Closing unmaps, so drop every memoryview
derived from a buffer before closing its pool or provider.
"""

from __future__ import annotations

import bisect
import mmap
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from uvmbus.errors import ConfigError, ResourceError
from uvmbus.native import ffi

__all__ = ["HV_PAGE_SIZE", "HV_PAGE_SHIFT", "MAX_GPA_BYTES", "DmaRegion", "DmaBuffer",
           "DmaMemory", "DmaPool", "round_up"]

HV_PAGE_SHIFT = 12
HV_PAGE_SIZE = 1 << HV_PAGE_SHIFT
#: the largest ``byte_count`` one GPA range can carry (u32 on the wire)
MAX_GPA_BYTES = 0xFFFFFFFF


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit


class DmaRegion:
    """A pinned, physically described chunk of memory.

    ``size`` is a multiple of 4 KiB; ``pfn_table[i]`` is the Hyper-V PFN of
    bytes ``[i*4096, (i+1)*4096)``.  ``align`` is the alignment of the region's
    start, both virtual and guest-physical (2 MiB for hugepages, the chunk
    size for simulated guest RAM).
    """

    def __init__(self, mm: mmap.mmap, pfns: Sequence[int], *, align: int = HV_PAGE_SIZE,
                 on_close: Callable[[DmaRegion], None] | None = None, name: str = "") -> None:
        size = len(mm)
        if size % HV_PAGE_SIZE or len(pfns) != size // HV_PAGE_SIZE:
            raise ConfigError(f"DMA region {name!r}: {size} bytes need {size // HV_PAGE_SIZE} "
                              f"PFNs (a multiple of 4096 bytes), got {len(pfns)}")
        self.name = name
        self.size = size
        self.align = align
        self._mm: mmap.mmap | None = mm
        self._on_close = on_close
        self.view: memoryview = memoryview(mm)
        #: ``uint8_t *`` to byte 0 (cffi cdata; keeps the mapping exported)
        self.ptr: Any = ffi.from_buffer("uint8_t[]", mm)
        #: ``uint64_t[size // 4096]``: Hyper-V PFN of each 4 KiB page
        self.pfn_table: Any = ffi.new("uint64_t[]", list(pfns))
        self.npages = len(pfns)

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def address(self) -> int:
        """The virtual address of byte 0."""
        return int(ffi.cast("uintptr_t", self.ptr))

    def pfn_of(self, offset: int) -> int:
        """Hyper-V (4 KiB) PFN of the page holding byte ``offset``."""
        if not 0 <= offset < self.size:
            raise ConfigError(f"DMA region {self.name!r}: offset {offset} outside 0..{self.size - 1}")
        return int(self.pfn_table[offset >> HV_PAGE_SHIFT])

    def pfns(self, first_page: int, count: int) -> list[int]:
        """``count`` PFNs starting at 4 KiB page ``first_page`` of the region."""
        if first_page < 0 or count < 0 or first_page + count > self.npages:
            raise ConfigError(f"DMA region {self.name!r}: pages {first_page}+{count} outside "
                              f"0..{self.npages}")
        return ffi.unpack(self.pfn_table + first_page, count) if count else []

    def close(self) -> None:
        """Unmap the region and give it back to its provider (idempotent).

        Raises :class:`ResourceError` (and stays open) while memoryviews derived
        from it are still alive."""
        mm = self._mm
        if mm is None:
            return
        self.view.release()
        ffi.release(self.ptr)
        try:
            mm.close()
        except BufferError:
            # someone still holds a view into the mapping: stay usable
            self.view = memoryview(mm)
            self.ptr = ffi.from_buffer("uint8_t[]", mm)
            raise ResourceError(
                f"DMA region {self.name!r} is still in use: release every memoryview/"
                "buffer derived from its DMA buffers before closing it") from None
        self._mm = None
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> DmaRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pfn0={int(self.pfn_table[0]):#x}"
        return f"<DmaRegion {self.name!r} {self.size} bytes {state}>"


class DmaBuffer:
    """A slice ``[offset, offset + size)`` of a :class:`DmaRegion`.

    ``view`` is a writable memoryview of exactly ``size`` bytes, ``ptr`` a
    ``uint8_t *`` to its first byte.  ``pfn_ptr`` points at the region's PFN
    table entry for the buffer's first page and ``page_offset`` is the
    buffer's offset inside that 4 KiB page: C code can emit a GPA range from
    those two without Python.
    """

    __slots__ = ("region", "offset", "size", "view", "ptr", "_pool", "_span")

    def __init__(self, region: DmaRegion, offset: int, size: int, *,
                 pool: DmaPool | None = None, span: int = 0) -> None:
        if size <= 0 or offset < 0 or offset + size > region.size:
            raise ConfigError(f"DMA buffer [{offset}, {offset + size}) does not fit region "
                              f"{region.name!r} of {region.size} bytes")
        self.region = region
        self.offset = offset
        self.size = size
        self.view: memoryview = region.view[offset:offset + size]
        self.ptr: Any = region.ptr + offset
        self._pool = pool
        self._span = span

    @property
    def freed(self) -> bool:
        return self.view is None or self.region.closed

    @property
    def pfn_ptr(self) -> Any:
        """``uint64_t *`` to the PFN of the buffer's first 4 KiB page."""
        return self.region.pfn_table + (self.offset >> HV_PAGE_SHIFT)

    @property
    def page_offset(self) -> int:
        """The buffer start's offset inside its first 4 KiB page."""
        return self.offset & (HV_PAGE_SIZE - 1)

    def gpa_range(self, offset: int = 0, length: int | None = None) -> tuple[int, int, list[int]]:
        """``(byte_count, byte_offset, pfns)`` describing ``[offset, offset+length)`` of the buffer.

        ``byte_offset`` is the start's offset in its first 4 KiB page and there
        are ``ceil((byte_offset + byte_count) / 4096)`` PFNs: one GPA-direct
        range, as :meth:`OutRing.put_gpa_direct` takes it.
        """
        if self.freed:
            raise ConfigError("DMA buffer was freed (or its region closed); it has no pages")
        if length is None:
            length = self.size - offset
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ConfigError(f"GPA range [{offset}, {offset}+{length}) is empty or outside "
                              f"the {self.size}-byte DMA buffer")
        if length > MAX_GPA_BYTES:
            raise ConfigError(f"GPA range of {length} bytes exceeds the 32-bit byte_count")
        start = self.offset + offset
        byte_offset = start & (HV_PAGE_SIZE - 1)
        first = start >> HV_PAGE_SHIFT
        n = (byte_offset + length + HV_PAGE_SIZE - 1) >> HV_PAGE_SHIFT
        return length, byte_offset, ffi.unpack(self.region.pfn_table + first, n)

    def free(self) -> None:
        """Return the buffer to its pool (same as ``pool.free(buf)``)."""
        if self._pool is None:
            raise ConfigError("this DMA buffer does not belong to a pool")
        self._pool.free(self)

    def _invalidate(self) -> None:
        view = self.view
        self.view = None  # type: ignore[assignment]
        self.ptr = ffi.NULL
        if view is not None:
            try:
                view.release()
            except BufferError:  # the caller exported it (e.g. ffi.from_buffer); GC will
                pass

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.freed and self._pool is not None:
            self.free()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<DmaBuffer {self.region.name!r}+{self.offset} {self.size} bytes>"


class DmaMemory(ABC):
    """A provider of :class:`DmaRegion` s (hugepages, simulated guest RAM)."""

    #: short name of the provider ("hugepage", "sim")
    kind: str = ""

    def __init__(self) -> None:
        self._regions: list[DmaRegion] = []
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def granularity(self) -> int:
        """Region sizes are rounded up to a multiple of this (2 MiB typically)."""

    @abstractmethod
    def _alloc(self, size: int, name: str) -> DmaRegion:
        """Allocate a region of exactly ``size`` bytes (a multiple of granularity)."""

    def alloc_region(self, size: int, *, name: str = "") -> DmaRegion:
        """A new pinned region of at least ``size`` bytes (rounded up to :attr:`granularity`)."""
        if size <= 0:
            raise ConfigError(f"DMA region size must be positive, not {size}")
        region = self._alloc(round_up(size, self.granularity), name)
        with self._lock:
            self._regions.append(region)
        return region

    def _forget(self, region: DmaRegion) -> None:
        with self._lock:
            if region in self._regions:
                self._regions.remove(region)

    @property
    def regions(self) -> list[DmaRegion]:
        """Regions handed out and not yet closed."""
        with self._lock:
            return list(self._regions)

    def close(self) -> None:
        """Close every region this provider handed out.

        Raises the first region's :class:`ResourceError` (after trying them all)
        when some are still in use."""
        first: ResourceError | None = None
        for region in self.regions:
            try:
                region.close()
            except ResourceError as exc:
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> DmaMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DmaPool:
    """Buffers carved out of regions from one :class:`DmaMemory`.

    Fixed-size mode (``buffer_size`` given): every buffer occupies one slot of
    ``round_up(buffer_size, align)`` bytes; alloc/free are O(1) on a free list.
    Variable-size mode (``buffer_size=None``): first fit over each region's
    sorted free extents, coalesced on free; sizes are rounded up to ``align``.

    Regions of ``region_size`` bytes (default: the provider's granularity) are
    allocated on demand, at most ``max_regions``.  A buffer never crosses a
    region boundary.  ``align`` (a power of two, default 4096) applies to
    offsets inside a region, whose start is aligned to at least ``region.align``
    physically, so buffer GPAs are aligned too.  Thread-safe.
    """

    def __init__(self, memory: DmaMemory, *, buffer_size: int | None = None,
                 region_size: int | None = None, max_regions: int = 8, align: int = HV_PAGE_SIZE,
                 name: str = "dma") -> None:
        if align <= 0 or align & (align - 1):
            raise ConfigError(f"DMA pool alignment must be a power of two, not {align}")
        if max_regions <= 0:
            raise ConfigError(f"max_regions must be positive, not {max_regions}")
        self.memory = memory
        self.name = name
        self.align = align
        self.max_regions = max_regions
        self.region_size = round_up(region_size or memory.granularity, memory.granularity)
        if align > self.region_size:
            raise ConfigError(f"alignment {align} exceeds the region size {self.region_size}")
        self.buffer_size = buffer_size
        self._stride = 0
        if buffer_size is not None:
            if buffer_size <= 0:
                raise ConfigError(f"buffer_size must be positive, not {buffer_size}")
            self._stride = round_up(buffer_size, align)
            if self._stride > self.region_size:
                raise ConfigError(f"DMA pool {name!r}: {buffer_size}-byte buffers do not fit "
                                  f"{self.region_size}-byte regions; raise region_size")
        self.regions: list[DmaRegion] = []
        self._slots: list[tuple[int, int]] = []           # fixed: (region index, offset)
        self._extents: list[list[tuple[int, int]]] = []   # variable: per region [(off, len)]
        self._live: dict[int, DmaBuffer] = {}
        self._in_use_bytes = 0
        self._lock = threading.Lock()
        self._closed = False

    # -- statistics ---------------------------------------------------------
    @property
    def in_use(self) -> int:
        """Buffers allocated and not freed."""
        return len(self._live)

    @property
    def in_use_bytes(self) -> int:
        """Bytes reserved by live buffers (after alignment rounding)."""
        return self._in_use_bytes

    @property
    def capacity(self) -> int:
        """Fixed mode: buffers the pool can hold at most; variable mode: bytes."""
        if self._stride:
            return self.max_regions * (self.region_size // self._stride)
        return self.max_regions * self.region_size

    # -- allocation ---------------------------------------------------------
    def _grow(self) -> int | None:
        """Add a region (lock held). Its index, or None when at max_regions."""
        if len(self.regions) >= self.max_regions:
            return None
        idx = len(self.regions)
        region = self.memory.alloc_region(self.region_size, name=f"{self.name}[{idx}]")
        self.regions.append(region)
        if self._stride:
            per = region.size // self._stride
            self._slots.extend((idx, k * self._stride) for k in range(per - 1, -1, -1))
        self._extents.append([(0, region.size)])
        return idx

    def alloc(self, size: int | None = None) -> DmaBuffer:
        """A buffer of ``size`` bytes (fixed mode: default and maximum ``buffer_size``).

        Raises :class:`ResourceError` when the pool is exhausted."""
        with self._lock:
            if self._closed:
                raise ConfigError(f"DMA pool {self.name!r} is closed")
            if self._stride:
                return self._alloc_fixed(size)
            return self._alloc_var(size)

    def _alloc_fixed(self, size: int | None) -> DmaBuffer:
        bs = self.buffer_size or 0
        if size is None:
            size = bs
        if not 0 < size <= bs:
            raise ConfigError(f"DMA pool {self.name!r} hands out buffers of 1..{bs} bytes, "
                              f"not {size}")
        if not self._slots and self._grow() is None:
            raise ResourceError(
                f"DMA pool {self.name!r} exhausted: all {self.capacity} buffers of {bs} bytes "
                f"are in use ({self.max_regions} regions of {self.region_size} bytes). Free "
                "buffers (complete outstanding I/O) or create the pool with a larger max_regions.")
        idx, off = self._slots.pop()
        buf = DmaBuffer(self.regions[idx], off, size, pool=self, span=self._stride)
        self._live[id(buf)] = buf
        self._in_use_bytes += self._stride
        return buf

    def _alloc_var(self, size: int | None) -> DmaBuffer:
        if size is None or size <= 0:
            raise ConfigError(f"DMA pool {self.name!r}: alloc() needs a positive size, not {size}")
        need = round_up(size, self.align)
        if need > self.region_size:
            raise ConfigError(f"DMA pool {self.name!r}: {size} bytes exceed the region size "
                              f"{self.region_size}; a buffer cannot span regions")
        found: tuple[int, int] | None = None
        for idx, ext in enumerate(self._extents):
            for j, (_off, length) in enumerate(ext):
                if length >= need:
                    found = (idx, j)
                    break
            if found:
                break
        if found is None:
            idx_new = self._grow()
            if idx_new is None:
                raise ResourceError(
                    f"DMA pool {self.name!r} exhausted: no free {need}-byte extent in "
                    f"{self.max_regions} regions of {self.region_size} bytes "
                    f"({self._in_use_bytes} bytes in use by {len(self._live)} buffers). Free "
                    "buffers or create the pool with a larger max_regions.")
            found = (idx_new, 0)
        idx, j = found
        ext = self._extents[idx]
        off, length = ext[j]
        if length == need:
            del ext[j]
        else:
            ext[j] = (off + need, length - need)
        buf = DmaBuffer(self.regions[idx], off, size, pool=self, span=need)
        self._live[id(buf)] = buf
        self._in_use_bytes += need
        return buf

    def free(self, buf: DmaBuffer) -> None:
        """Return ``buf`` to the pool; its view and pointer become invalid."""
        with self._lock:
            if self._live.pop(id(buf), None) is not buf:
                raise ConfigError(f"{buf!r} is not a live buffer of DMA pool {self.name!r} "
                                  "(freed twice, or from another pool)")
            self._in_use_bytes -= buf._span
            buf._invalidate()
            idx = self.regions.index(buf.region)
            if self._stride:
                self._slots.append((idx, buf.offset))
                return
            ext = self._extents[idx]
            start, end = buf.offset, buf.offset + buf._span
            j = bisect.bisect_left(ext, (start, 0))
            if j < len(ext) and ext[j][0] == end:          # merge with the next extent
                end += ext[j][1]
                del ext[j]
            if j > 0 and ext[j - 1][0] + ext[j - 1][1] == start:  # ... and the previous
                start = ext[j - 1][0]
                j -= 1
                del ext[j]
            ext.insert(j, (start, end - start))

    def close(self) -> None:
        """Invalidate every live buffer and close the pool's regions (idempotent)."""
        with self._lock:
            self._closed = True
            for buf in self._live.values():
                buf._invalidate()
            self._live.clear()
            self._slots.clear()
            self._extents.clear()
            self._in_use_bytes = 0
            regions, self.regions = self.regions, []
        for region in regions:
            region.close()

    def __enter__(self) -> DmaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = f"{self.buffer_size}-byte buffers" if self._stride else "variable"
        return (f"<DmaPool {self.name!r} {mode}, {len(self.regions)}/{self.max_regions} regions, "
                f"{self.in_use} in use>")

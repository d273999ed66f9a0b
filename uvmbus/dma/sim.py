"""Simulated guest RAM: the file the simulated host reads and writes by PFN.

The simulator creates it at startup with :func:`create_guest_ram`; guest
processes allocate DMA regions from it with :class:`SimGuestMemory`; the host
side maps all of it with :class:`GuestRam`.  Format, under ``<root>/sim/``:

``guest-ram``
    The memory: a sparse file of ``size`` bytes.  Byte ``(pfn - base_pfn) * 4096``
    is the start of Hyper-V page ``pfn``.
``guest-ram.json``
    ``{"format": 1, "base_pfn": B, "size": S, "chunk": C}``.  ``base_pfn`` is
    nonzero (PFN 0 is never valid guest RAM); ``size`` is a multiple of ``chunk``
    (default 2 MiB), the allocation unit.  Written last: its presence means the
    other two files are complete (and selects simulated memory in
    :func:`uvmbus.dma.open_dma_memory`).
``guest-ram.alloc``
    One 16-byte record per chunk, little endian ``{u32 pid; u32 reserved;
    u64 start_time}``: the owning process and its start time (field 22 of
    ``/proc/<pid>/stat``, so a recycled PID is not mistaken for the owner).
    pid 0 = free.  Read and updated only under ``flock(LOCK_EX)`` on this file.
    Chunks whose owner has exited are free for the taking.  All guests of one
    guest RAM must therefore share a PID namespace and /proc.

A region is a run of contiguous chunks, mapped ``MAP_SHARED``; it is zeroed
(hole-punched) when taken and when given back.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvmbus.dma.memory import HV_PAGE_SHIFT, HV_PAGE_SIZE, DmaMemory, DmaRegion, round_up
from uvmbus.errors import ConfigError, ResourceError, from_oserror
from uvmbus.native import ffi, lib

__all__ = ["GuestRamLayout", "create_guest_ram", "load_guest_ram_layout", "SimGuestMemory",
           "GuestRam", "DEFAULT_BASE_PFN", "DEFAULT_CHUNK", "ALLOC_RECORD"]

DEFAULT_BASE_PFN = 0x100000          # 4 GiB: PFN 0 is never guest RAM
DEFAULT_CHUNK = 2 * 1024 * 1024
FORMAT = 1
#: one allocation-table record per chunk: pid, reserved, process start time
ALLOC_RECORD = struct.Struct("<IIQ")
_MAX_PFN = 1 << 52                   # GPA must fit 64 bits


@dataclass(frozen=True)
class GuestRamLayout:
    """Where the guest RAM of a simulator root lives and how it is shaped."""

    root: Path
    size: int
    base_pfn: int
    chunk: int

    @property
    def dir(self) -> Path:
        return self.root / "sim"

    @property
    def ram_path(self) -> Path:
        return self.dir / "guest-ram"

    @property
    def meta_path(self) -> Path:
        return self.dir / "guest-ram.json"

    @property
    def alloc_path(self) -> Path:
        return self.dir / "guest-ram.alloc"

    @property
    def nchunks(self) -> int:
        return self.size // self.chunk

    @property
    def npages(self) -> int:
        """Number of 4 KiB pages."""
        return self.size >> HV_PAGE_SHIFT

    @property
    def end_pfn(self) -> int:
        """One past the last valid PFN."""
        return self.base_pfn + self.npages


def _check_shape(size: int, base_pfn: int, chunk: int, where: str) -> None:
    if chunk <= 0 or chunk % mmap.ALLOCATIONGRANULARITY or chunk % HV_PAGE_SIZE:
        raise ConfigError(f"{where}: chunk {chunk} must be a positive multiple of "
                          f"{max(mmap.ALLOCATIONGRANULARITY, HV_PAGE_SIZE)}")
    if size <= 0 or size % chunk:
        raise ConfigError(f"{where}: size {size} must be a positive multiple of the chunk {chunk}")
    if not 0 < base_pfn or base_pfn + (size >> HV_PAGE_SHIFT) > _MAX_PFN:
        raise ConfigError(f"{where}: base_pfn {base_pfn:#x} must be nonzero and keep every "
                          "GPA below 2**64 (PFN 0 is never guest RAM)")


def create_guest_ram(root: str | os.PathLike[str], size: int, *, base_pfn: int = DEFAULT_BASE_PFN,
                     chunk: int = DEFAULT_CHUNK) -> GuestRamLayout:
    """Create (or recreate, empty) the guest RAM of a simulator root.

    ``size`` is rounded up to ``chunk``.  The RAM file is sparse: memory is
    used only for pages guests touch.  Call at simulator startup, before any
    guest runs: recreating drops every allocation."""
    size = round_up(size, chunk) if size > 0 and chunk > 0 else size
    layout = GuestRamLayout(Path(root), size, base_pfn, chunk)
    _check_shape(size, base_pfn, chunk, "create_guest_ram")
    layout.dir.mkdir(parents=True, exist_ok=True)
    layout.meta_path.unlink(missing_ok=True)     # nobody may use a half-made RAM
    with open(layout.ram_path, "wb") as f:       # truncation drops old contents
        f.truncate(size)
    tmp = layout.alloc_path.with_suffix(".alloc.tmp")
    with open(tmp, "wb") as f:
        f.write(bytes(ALLOC_RECORD.size * layout.nchunks))
    os.replace(tmp, layout.alloc_path)
    tmp = layout.meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "base_pfn": base_pfn, "size": size,
                               "chunk": chunk}) + "\n")
    os.replace(tmp, layout.meta_path)
    return layout


def load_guest_ram_layout(root: str | os.PathLike[str]) -> GuestRamLayout:
    """Read ``<root>/sim/guest-ram.json``."""
    path = Path(root) / "sim" / "guest-ram.json"
    try:
        meta = json.loads(path.read_text())
        layout = GuestRamLayout(Path(root), int(meta["size"]), int(meta["base_pfn"]),
                                int(meta["chunk"]))
    except OSError as exc:
        raise from_oserror(exc, "simulated guest RAM") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a guest RAM description ({exc}); recreate it with "
                          "create_guest_ram()") from exc
    if meta.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{path}: guest RAM format {meta.get('format')} is not {FORMAT}")
    _check_shape(layout.size, layout.base_pfn, layout.chunk, str(path))
    return layout


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a live process, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):   # zombie: exited, not yet reaped
        return None
    return int(fields[19])


def _owner_alive(pid: int, start: int) -> bool:
    now = process_start_time(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


class SimGuestMemory(DmaMemory):
    """DMA regions carved out of a simulator's guest RAM file (see the module docstring).

    Several processes (and several instances in one process) may allocate
    from the same guest RAM; chunks are exclusive to their owner until the
    region is closed or the owner exits."""

    kind = "sim"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.layout = load_guest_ram_layout(root)
        try:
            self._ram_fd = os.open(self.layout.ram_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                self._alloc_fd = os.open(self.layout.alloc_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                os.close(self._ram_fd)
                raise
        except OSError as exc:
            raise from_oserror(exc, "simulated guest RAM") from exc
        have = os.fstat(self._alloc_fd).st_size
        if have < ALLOC_RECORD.size * self.layout.nchunks or \
                os.fstat(self._ram_fd).st_size < self.layout.size:
            self._close_fds()
            raise ConfigError(f"{self.layout.dir}: guest RAM files are smaller than "
                              "guest-ram.json says; recreate them with create_guest_ram()")
        self._table_lock = threading.Lock()
        # id(region) -> (first chunk, count, pid that allocated it)
        self._owned: dict[int, tuple[int, int, int]] = {}

    @property
    def granularity(self) -> int:
        return self.layout.chunk

    # -- allocation table -----------------------------------------------------
    def _read_table(self) -> list[tuple[int, int, int]]:
        raw = os.pread(self._alloc_fd, ALLOC_RECORD.size * self.layout.nchunks, 0)
        return [ALLOC_RECORD.unpack_from(raw, i * ALLOC_RECORD.size)
                for i in range(self.layout.nchunks)]

    def _write_records(self, first: int, count: int, pid: int, start: int) -> None:
        rec = ALLOC_RECORD.pack(pid, 0, start)
        os.pwrite(self._alloc_fd, rec * count, first * ALLOC_RECORD.size)

    def _claim(self, count: int) -> int:
        """Take ``count`` contiguous free (or orphaned) chunks; their first index."""
        pid = os.getpid()
        start = process_start_time(pid) or 0
        with self._table_lock:
            fcntl.flock(self._alloc_fd, fcntl.LOCK_EX)
            try:
                table = self._read_table()
                alive: dict[tuple[int, int], bool] = {}
                run = 0
                for i, (opid, _, ostart) in enumerate(table):
                    free = opid == 0
                    if not free:
                        key = (opid, ostart)
                        if key not in alive:
                            alive[key] = _owner_alive(opid, ostart)
                        free = not alive[key]
                    run = run + 1 if free else 0
                    if run == count:
                        first = i - count + 1
                        self._write_records(first, count, pid, start)
                        return first
                owners = sorted({p for (p, _), a in alive.items() if a})
            finally:
                fcntl.flock(self._alloc_fd, fcntl.LOCK_UN)
        lay = self.layout
        raise ResourceError(
            f"simulated guest RAM {lay.ram_path} ({lay.size} bytes, {lay.nchunks} chunks of "
            f"{lay.chunk}) has no {count} free contiguous chunks; chunks are held by live "
            f"processes {owners}. Free DMA regions, or start the simulator with more guest RAM.")

    def _release(self, first: int, count: int) -> None:
        pid = os.getpid()
        with self._table_lock:
            fcntl.flock(self._alloc_fd, fcntl.LOCK_EX)
            try:
                table = self._read_table()
                for i in range(first, first + count):
                    if table[i][0] == pid:
                        self._write_records(i, 1, 0, 0)
            finally:
                fcntl.flock(self._alloc_fd, fcntl.LOCK_UN)

    def _zero(self, mm: mmap.mmap, first: int, size: int) -> None:
        err = lib.uvb_dma_punch(self._ram_fd, first * self.layout.chunk, size)
        if err:   # filesystem without hole punching: write zeros instead
            for off in range(0, size, self.layout.chunk):
                mm[off:off + self.layout.chunk] = bytes(self.layout.chunk)

    # -- DmaMemory -------------------------------------------------------------
    def _alloc(self, size: int, name: str) -> DmaRegion:
        if self._ram_fd < 0:
            raise ConfigError("SimGuestMemory is closed")
        count = size // self.layout.chunk
        first = self._claim(count)
        try:
            mm = mmap.mmap(self._ram_fd, size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=first * self.layout.chunk)
            self._zero(mm, first, size)
        except BaseException:
            self._release(first, count)
            raise
        pfn0 = self.layout.base_pfn + first * (self.layout.chunk >> HV_PAGE_SHIFT)
        region = DmaRegion(mm, range(pfn0, pfn0 + (size >> HV_PAGE_SHIFT)),
                           align=self.layout.chunk, on_close=self._region_closed, name=name)
        self._owned[id(region)] = (first, count, os.getpid())
        return region

    def _region_closed(self, region: DmaRegion) -> None:
        self._forget(region)
        first, count, pid = self._owned.pop(id(region))
        if self._ram_fd >= 0 and pid == os.getpid():   # a forked child must not free them
            # zero before giving the chunks away, never after
            err = lib.uvb_dma_punch(self._ram_fd, first * self.layout.chunk,
                                    count * self.layout.chunk)
            if err and err != errno.EOPNOTSUPP:
                raise ResourceError(f"cannot release guest RAM chunks: {os.strerror(err)}")
            self._release(first, count)

    def _close_fds(self) -> None:
        for attr in ("_ram_fd", "_alloc_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
            setattr(self, attr, -1)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if not self._owned:
                self._close_fds()

    def __del__(self) -> None:
        if getattr(self, "_owned", None) == {}:
            self._close_fds()


class GuestRam:
    """The host's view of all guest RAM: PFN -> bytes, bounds-checked.

    ``ptr`` (``uint8_t *``), ``size`` and ``base_pfn`` are exposed so C host
    code can do its own copies with ``lib.uvb_gpa_copy(ptr, size, base_pfn, ...)``.

    Guest RAM is the RAM file followed by *segments*: shared memory objects the simulated
    kernel made guest memory (the NIC receive/send buffers, which uio_hv_generic vzalloc()s
    from ordinary guest pages).  One address range is reserved at start; the file is mapped
    at its beginning and each segment right after the previous one, so ``[ptr, ptr + size)``
    is always fully mapped and PFN ``p`` is byte ``(p - base_pfn) * 4096``.
    """

    #: address space reserved after the RAM file for segments (NIC buffers): 64 GiB
    SEGMENT_SPACE = 64 << 30

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.layout = load_guest_ram_layout(root)
        try:
            fd = os.open(self.layout.ram_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, "simulated guest RAM") from exc
        self._reserved = self.layout.size + self.SEGMENT_SPACE
        try:
            base = lib.uvb_dma_reserve(self._reserved)
            if base == ffi.NULL:
                raise ConfigError(f"cannot reserve {self._reserved} bytes of address space for "
                                  "the simulated guest RAM")
            err = lib.uvb_dma_map_fixed(base, self.layout.size, fd, 0)
            if err:
                lib.uvb_dma_unmap(base, self._reserved)
                raise ConfigError(f"{self.layout.ram_path}: cannot map {self.layout.size} bytes "
                                  f"({os.strerror(err)}); recreate it with create_guest_ram()")
        finally:
            os.close(fd)
        self._base: Any = base
        self._open = True
        #: bytes mapped from byte 0 (the RAM file, then every segment); C bounds use it
        self.size = self.layout.size
        self.base_pfn = self.layout.base_pfn
        self.end_pfn = self.layout.end_pfn
        self.ptr: Any = ffi.cast("uint8_t *", base)
        self.view: memoryview = memoryview(ffi.buffer(self.ptr, self.layout.size))
        #: segments: first pfn -> (size, in use)
        self._segments: dict[int, list[Any]] = {}
        self._seg_lock = threading.Lock()
        self._bad = ffi.new("uint32_t *")

    # -- segments: guest memory that is not in the RAM file -------------------------------
    def add_segment(self, fd: int, size: int) -> int:
        """Make the shared memory object ``fd`` (``size`` bytes, from offset 0) guest RAM, as
        the pages the guest kernel allocated for a NIC buffer are on Hyper-V.  Returns its
        first PFN; its GPAs are contiguous.  A freed segment of the same size is reused."""
        size = round_up(size, HV_PAGE_SIZE)
        with self._seg_lock:
            if not self._open:
                raise ConfigError("GuestRam is closed")
            pfn = next((p for p, (s, used) in sorted(self._segments.items()) if not used and s == size),
                       None)
            if pfn is None:
                pfn = self.end_pfn
                if self.size + size > self._reserved:
                    raise ResourceError(f"simulated guest RAM: no address space left for a "
                                        f"{size}-byte segment (NIC buffers)")
            off = (pfn - self.base_pfn) << HV_PAGE_SHIFT
            err = lib.uvb_dma_map_fixed(self.ptr + off, size, fd, 0)
            if err:
                raise ResourceError(f"cannot map a {size}-byte guest RAM segment: {os.strerror(err)}")
            self._segments[pfn] = [size, True]
            if pfn == self.end_pfn:
                self.size += size
                self.end_pfn += size >> HV_PAGE_SHIFT
            return pfn

    def remove_segment(self, pfn: int) -> None:
        """The segment at ``pfn`` is no longer guest memory the host may reach through that
        object: its GPAs read as zeros until a new segment reuses them."""
        with self._seg_lock:
            seg = self._segments.get(pfn)
            if seg is None or not seg[1] or not self._open:
                return
            off = (pfn - self.base_pfn) << HV_PAGE_SHIFT
            lib.uvb_dma_zero_fixed(self.ptr + off, seg[0])
            seg[1] = False

    def pfn_to_offset(self, pfn: int) -> int:
        """Byte offset of page ``pfn`` in the host view; :class:`ConfigError` if outside."""
        if not self.base_pfn <= pfn < self.end_pfn:
            raise ConfigError(f"PFN {pfn:#x} is outside simulated guest RAM "
                              f"[{self.base_pfn:#x}, {self.end_pfn:#x})")
        return (pfn - self.base_pfn) << HV_PAGE_SHIFT

    def _copy(self, pfns: Sequence[int] | Any, byte_offset: int, buf: Any, length: int,
              direction: int) -> None:
        if not self._open:
            raise ConfigError("GuestRam is closed")
        arr = pfns if isinstance(pfns, ffi.CData) else ffi.new("uint64_t[]", list(pfns))
        n = len(arr)
        if not (0 <= byte_offset <= 0xFFFFFFFF and 0 <= length <= 0xFFFFFFFF):
            raise ConfigError(f"GPA range offset {byte_offset} / length {length} out of range")
        rc = lib.uvb_gpa_copy(self.ptr, self.size, self.base_pfn, arr, n, byte_offset,
                              length, buf, direction, self._bad)
        if rc == lib.UVB_GPA_EFAULT:
            i = self._bad[0]
            raise ConfigError(f"GPA range PFN {int(arr[i]):#x} (entry {i}) is outside simulated "
                              f"guest RAM [{self.base_pfn:#x}, {self.end_pfn:#x})")
        if rc != lib.UVB_GPA_OK:
            raise ConfigError(
                f"malformed GPA range: byte_count {length}, byte_offset {byte_offset} with {n} "
                f"PFNs (byte_count must be > 0, byte_offset <= 0xfff and "
                f"ceil((offset + count) / 4096) PFNs present)")

    def read(self, pfns: Sequence[int] | Any, byte_offset: int, length: int) -> bytes:
        """``length`` bytes of the GPA range ``(length, byte_offset, pfns)``."""
        out = ffi.new("uint8_t[]", max(length, 1))
        self._copy(pfns, byte_offset, out, length, lib.UVB_GPA_FROM_RAM)
        return ffi.buffer(out, length)[:]

    def readinto(self, pfns: Sequence[int] | Any, byte_offset: int, buf: Any) -> None:
        """Fill the writable buffer ``buf`` from the GPA range starting at ``byte_offset``."""
        p = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        try:
            self._copy(pfns, byte_offset, p, len(p), lib.UVB_GPA_FROM_RAM)
        finally:
            ffi.release(p)

    def write(self, pfns: Sequence[int] | Any, byte_offset: int, data: Any) -> None:
        """Store ``data`` (bytes-like) into the GPA range ``(len(data), byte_offset, pfns)``."""
        p = ffi.from_buffer("uint8_t[]", data)
        try:
            self._copy(pfns, byte_offset, p, len(p), lib.UVB_GPA_TO_RAM)
        finally:
            ffi.release(p)

    def close(self) -> None:
        """Unmap (idempotent)."""
        with self._seg_lock:
            if not self._open:
                return
            self._open = False
            self.view.release()
            lib.uvb_dma_unmap(self._base, self._reserved)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

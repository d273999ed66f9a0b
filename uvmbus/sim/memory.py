"""Shared memory of the simulated VM: ring backing files and memfds.

* A channel's ring pair lives in a file under ``sim/rings/`` (tmpfs when the root is under
  /dev/shm).  The primary channel's file is uio map 0 (its fd travels in the endpoint hello)
  and, while the channel is open, is hard-linked as ``channels/<relid>/ring``; a sub-channel's
  file is only ever seen as its ``ring``.  The file may be larger than the two rings: before
  6.15 the kernel reported a constant ``ring`` size (§1.5), and the file is that size.
* The int page, the monitor page and the NIC buffers are memfds.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvmbus.native import buffer_pointer, lib, release

__all__ = ["GpadlBuffer", "RingMemory", "SharedMemfd"]


class SharedMemfd:
    """An anonymous shared memory object mapped by the host; its fd goes to the guest."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.fd = os.memfd_create(f"uvmbus-sim-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(size, mmap.PAGESIZE))
        self.mm = mmap.mmap(self.fd, max(size, mmap.PAGESIZE))
        self.ptr: Any = buffer_pointer(self.mm)

    def close(self) -> None:
        if self.ptr is not None:
            release(self.ptr)
            self.ptr = None
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover - a view is still alive
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingMemory:
    """The two rings of one channel: ``[TX header][TX data][RX header][RX data]``."""

    def __init__(self, path: Path, ring_bytes: int, file_bytes: int, header_bytes: int):
        self.path = path
        self.ring_bytes = ring_bytes
        self.header_bytes = header_bytes
        size = max(file_bytes, 2 * ring_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)           # zeroed, as vmbus_alloc_ring at probe
            self.mm = mmap.mmap(fd, 2 * ring_bytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.ptr: Any = buffer_pointer(self.mm)

    @property
    def tx_header(self) -> Any:
        """Guest TX ring header (the host reads this direction)."""
        return self.ptr

    @property
    def rx_header(self) -> Any:
        return self.ptr + self.ring_bytes

    def ringbuffer_init(self) -> None:
        """What hv_ringbuffer_init does at every channel open: zero both indices and set
        feature_bits = 1; interrupt_mask and pending_send_sz keep what the last user left
        (§1.2: the ring pages are zeroed only when allocated, at probe)."""
        for header in (self.tx_header, self.rx_header):
            lib.uvb_ring_store(header, 0, 0)      # write_index
            lib.uvb_ring_store(header, 1, 0)      # read_index
            lib.uvb_ring_store(header, 4, lib.VMBUS_RING_FEAT_PENDING_SEND_SZ)

    def close(self, unlink: bool = True) -> None:
        if self.ptr is not None:
            release(self.ptr)
            self.ptr = None
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unlink:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


@dataclass
class GpadlBuffer:
    """A NIC receive/send buffer (uio map 3/4): memory shared with the guest plus its GPADL."""

    kind: str          # "recv" or "send"
    gpadl: int
    mem: SharedMemfd
    #: first PFN of the buffer in simulated guest RAM (a segment), None without guest RAM
    pfn: int | None = None

    @property
    def size(self) -> int:
        return self.mem.size

    @property
    def view(self) -> memoryview:
        return memoryview(self.mem.mm)[:self.mem.size]

    @property
    def ptr(self) -> Any:
        return self.mem.ptr

    @property
    def map_name(self) -> str:
        return f"{self.kind}:{self.gpadl}"

"""Queue leases: how a NIC tells queues attached in other processes that they are gone.

A queue handed to another process (:meth:`~uvmbus.netvsc.Nic.export_queue`,
:func:`~uvmbus.netvsc.attach_queue`) shares nothing with its owner but memory the host also
sees, so when the owner re-initialises the NIC (``set_queues``, ``set_mtu``) or closes it, the
attached queue would otherwise go on writing into a channel that no longer exists.  The
owner therefore keeps one small *lease file* per NIC (in ``/dev/shm``, made at the first
export, removed when the NIC closes):

* bytes 0..7: the NIC's generation (u64, little endian), bumped when its queues become
  invalid; every call of an attached queue compares it with the generation in its
  ``QueueSpec`` (one memory read) and raises :class:`~uvmbus.errors.QueueInvalidated` (after
  closing itself) when they differ;
* bytes 8..11: why (1 = set_queues, 2 = set_mtu, 3 = close);
* bytes 64 + 4·k: the pid of the process attached to queue *k* (0 = none), for messages;
* an attached queue holds a shared ``flock`` on the file while it is open.  The owner bumps
  the generation, then waits for an exclusive lock: it gets it once every attached queue has
  noticed and closed (or its process exited — the kernel drops the lock), so no attached
  process still has the device's channels open when the owner tears them down (uio closes
  a channel only on the last close of the device, uio_vmbus.md §1.2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import tempfile
import time

from uvmbus.errors import ConfigError, QueueInvalidated
from uvmbus.native import ffi

__all__ = ["REASONS", "Lease", "LeaseHolder"]

SIZE = 4096
PID_BASE = 64
MAX_SLOTS = (SIZE - PID_BASE) // 4
REASONS = {0: "", 1: "set_queues", 2: "set_mtu", 3: "close"}
_REASON_CODES = {v: k for k, v in REASONS.items() if v}


class Lease:
    """The owner's side: one per :class:`~uvmbus.netvsc.Nic` that exported a queue."""

    def __init__(self, device_id: str):
        fd, self.path = tempfile.mkstemp(prefix=f"uvb-nvq-{device_id[:8]}-{os.getpid()}-", dir=_dir())
        try:
            os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd = fd

    @property
    def generation(self) -> int:
        return int(struct.unpack_from("<Q", self._mm, 0)[0])

    def set_generation(self, gen: int, reason: str) -> None:
        struct.pack_into("<I", self._mm, 8, _REASON_CODES.get(reason, 0))
        struct.pack_into("<Q", self._mm, 0, gen)

    def holders(self) -> dict[int, int]:
        """{queue index: pid} of the queues attached now (as they registered)."""
        out = {}
        for k in range(MAX_SLOTS):
            pid = struct.unpack_from("<I", self._mm, PID_BASE + 4 * k)[0]
            if pid:
                out[k] = int(pid)
        return out

    def wait_released(self, timeout: float) -> bool:
        """True once no attached queue holds the lease (waits up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
                continue
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return True

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._mm.close()
        os.close(self._fd)
        self._fd = -1


class LeaseHolder:
    """An attached queue's side: a shared lock plus a view of the owner's generation."""

    def __init__(self, path: str, generation: int, index: int):
        self.index = index
        self.generation = generation
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueInvalidated(f"queue {index}: the NIC that exported it is closed (its lease "
                                   f"{path} is gone): get a new QueueSpec from the owner") from None
        except OSError as exc:
            raise ConfigError(f"queue {index}: cannot open the owner's lease file {path} ({exc}); "
                              "both processes need the same /dev/shm") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise QueueInvalidated(f"queue {index}: its NIC is being re-initialised by the owner "
                                       "process: get a new QueueSpec from export_queue afterwards") from None
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._gen = ffi.from_buffer("uint64_t[]", self._mm)
        if not self.valid():
            err = self.error()
            self.close()
            raise err
        if index < MAX_SLOTS:
            struct.pack_into("<I", self._mm, PID_BASE + 4 * index, os.getpid())

    def valid(self) -> bool:
        return self._fd >= 0 and int(self._gen[0]) == self.generation

    def reason(self) -> str:
        if self._fd < 0:
            return "close"
        return REASONS.get(int(struct.unpack_from("<I", self._mm, 8)[0]), "")

    def error(self) -> QueueInvalidated:
        why = self.reason()
        what = {"set_queues": "changed its number of queues (set_queues)", "set_mtu": "changed its MTU "
                "(set_mtu)", "close": "was closed"}.get(why, "was re-initialised")
        return QueueInvalidated(f"queue {self.index}: the NIC that exported it {what}, so this queue's "
                                "channel is gone; this queue is now closed. Get a new QueueSpec from the "
                                "owner's export_queue and attach again")

    def check(self) -> None:
        if not self.valid():
            raise self.error()

    def close(self) -> None:
        if self._fd < 0:
            return
        if self.index < MAX_SLOTS:
            with contextlib.suppress(ValueError):
                if struct.unpack_from("<I", self._mm, PID_BASE + 4 * self.index)[0] == os.getpid():
                    struct.pack_into("<I", self._mm, PID_BASE + 4 * self.index, 0)
        ffi.release(self._gen)
        self._mm.close()
        os.close(self._fd)          # drops the shared lock
        self._fd = -1


def _dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


"""inotify through ctypes: notice the guest's writes to sysfs attribute files.

The binding files (``drivers/*/{new_id,bind,unbind}``, ``drivers_probe``,
``devices/*/driver_override``) are regular files; a guest write is an open, write, close.
Directories are watched (not files), so files the simulator replaces atomically stay
covered; only ``IN_CLOSE_WRITE`` on the real names counts, which the simulator's own
rename-based writes never produce.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

from uvmbus.errors import SimulatorError

__all__ = ["DirWatcher"]

IN_CLOSE_WRITE = 0x00000008
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class DirWatcher:
    """Watches directories for files closed after writing; events come as paths."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise SimulatorError(f"inotify_init1 failed: {os.strerror(err)}")
        self._dirs: dict[int, Path] = {}

    def add(self, directory: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_CLOSE_WRITE)
        if wd < 0:
            err = ctypes.get_errno()
            raise SimulatorError(f"cannot watch {directory}: {os.strerror(err)}")
        self._dirs[wd] = directory

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[Path]:
        """Files written and closed since the last call (in order)."""
        out: list[Path] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0")
                off += _EVENT.size + length
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
                    continue
                d = self._dirs.get(wd)
                if d is not None and name and mask & IN_CLOSE_WRITE:
                    out.append(d / os.fsdecode(name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

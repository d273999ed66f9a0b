"""File copy ("guest services") IC (type 7): the host's Copy-VMFile into a target root (§7.9).

The protocol and errors are those of Linux's ``tools/hv/hv_fcopy_uio_daemon.c``:

* START_FILE_COPY — ``path_name + "/" + file_name``; a missing directory is created (0755)
  with CREATE_PATH, else E_FAIL; an existing file without OVER_WRITE is
  ``ALREADY_EXISTS`` (0x80070050); the file is created mode 0744;
* WRITE_TO_FILE — ``size`` bytes (≤ 6144) at ``offset``; a short write from ENOSPC is
  ``DISK_FULL`` (0x80070070), other failures E_FAIL;
* COMPLETE_FCOPY — the file is closed, S_OK; CANCEL_FCOPY — the partial file is removed
  (the older daemon's behaviour; the UIO daemon answers E_FAIL and leaves it).

Where uvmbus goes further (hostile host, nothing lost on failure):

* every path is resolved *under* ``target_root``: the host's absolute path is taken relative
  to it, ``..`` components, NUL-less or over-long (260 UTF-16 units) names, invalid UTF-16 and a
  ``/`` inside the file name are refused (E_FAIL / INVALIDARG), and each component is opened
  with ``O_NOFOLLOW`` relative to its parent so a symlink cannot lead outside the root;
* data goes to a hidden temporary file (``.uvmbus-fcopy-PID-N``) next to the target and is
  renamed over it only at
  COMPLETE_FCOPY, so a cancelled or broken copy never destroys an existing file;
* non-ASCII names keep their characters (UTF-8) instead of becoming 'X'.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uvmbus.errors import ProtocolError
from uvmbus.ic import wire
from uvmbus.ic.framework import IcService
from uvmbus.ic.wire import FcopyOp, MsgType, Status
from uvmbus.native import lib

__all__ = ["FcopyService", "CopyResult", "decode_name"]

log = logging.getLogger("uvmbus.ic")

MAX_PATH: int = lib.IC_FCOPY_MAX_PATH               # 260 UTF-16 units
DATA_FRAGMENT: int = lib.IC_FCOPY_DATA_FRAGMENT     # 6144
OVER_WRITE: int = lib.IC_FCOPY_OVER_WRITE
CREATE_PATH: int = lib.IC_FCOPY_CREATE_PATH
FILE_MODE = 0o744
DIR_MODE = 0o755
_HDR = wire.sizeof("ic_fcopy_hdr")
_START = wire.sizeof("ic_fcopy_start")
_WRITE_FIXED = wire.offsetof("ic_fcopy_write", "data")


def decode_name(raw: bytes, what: str) -> str:
    """A NUL-terminated UTF-16LE name of at most 260 units (NUL included)."""
    for i in range(0, min(len(raw), 2 * MAX_PATH), 2):
        if raw[i:i + 2] == b"\0\0":
            try:
                return raw[:i].decode("utf-16-le")
            except UnicodeDecodeError:
                raise ProtocolError(f"{what}: invalid UTF-16") from None
    raise ProtocolError(f"{what}: no NUL within {MAX_PATH} UTF-16 units (oversized name)")


@dataclass
class CopyResult:
    path: str
    size: int
    status: str


class _Copy:
    def __init__(self, dir_fd: int, name: str, tmp: str, fd: int, overwrite: bool, shown: str):
        self.dir_fd = dir_fd
        self.name = name
        self.tmp = tmp
        self.fd = fd
        self.overwrite = overwrite
        self.shown = shown
        self.written = 0


class FcopyService(IcService):
    name = "fcopy"
    msgtype = MsgType.FCOPY
    framework_versions = ((3, 0),)                   # the UIO daemon: UTIL_FW_VERSION only
    message_versions = ((1, 1),)                     # WIN8_SRV_VERSION
    min_body = _HDR

    def __init__(self, target_root: str | os.PathLike[str], *,
                 on_done: Callable[[CopyResult], None] | None = None) -> None:
        super().__init__()
        self.target_root = Path(target_root)
        self.on_done = on_done
        self._copy: _Copy | None = None
        self._serial = 0
        self.completed: list[CopyResult] = []

    # -- dispatch --------------------------------------------------------------------------
    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        op = struct.unpack_from("<I", body, 0)[0]
        try:
            if op == FcopyOp.START_FILE_COPY:
                return self._start(body), None
            if op == FcopyOp.WRITE_TO_FILE:
                return self._write(body), None
            if op == FcopyOp.COMPLETE_FCOPY:
                return self._complete()
            if op == FcopyOp.CANCEL_FCOPY:
                return self._cancel(), None
        except ProtocolError as exc:
            self._problem("refused", str(exc))
            return int(Status.E_FAIL), None
        self._problem("refused", f"operation {op} unknown")
        return int(Status.E_FAIL), None

    # -- START -----------------------------------------------------------------------------
    def _resolve_dir(self, parts: list[str], create: bool) -> int:
        """An O_PATH-free directory fd for ``root/parts``, opened component by component
        with O_NOFOLLOW (a symlink, even inside the root, is refused)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.target_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise ProtocolError(f"directory {part!r} does not exist (no CREATE_PATH)") from None
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    nfd = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ProtocolError(f"path component {part!r} is not a directory "
                                            "(symlinks are refused)") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _start(self, body: memoryview) -> int:
        if len(body) < _START:
            raise ProtocolError(f"START_FILE_COPY of {len(body)} bytes, needs {_START}")
        if self._copy is not None:                        # a new copy replaces an unfinished one
            self._problem("abandoned", f"copy of {self._copy.shown} abandoned by a new START")
            self._discard()
        raw = bytes(body[:_START])
        off_file = wire.offsetof("ic_fcopy_start", "file_name")
        off_path = wire.offsetof("ic_fcopy_start", "path_name")
        file_name = decode_name(raw[off_file:off_file + 2 * MAX_PATH], "file name")
        path_name = decode_name(raw[off_path:off_path + 2 * MAX_PATH], "path name")
        flags = struct.unpack_from("<I", raw, wire.offsetof("ic_fcopy_start", "copy_flags"))[0]
        if not file_name or "/" in file_name or file_name in (".", "..") or "\0" in file_name:
            raise ProtocolError(f"file name {file_name!r} refused")
        parts = [p for p in path_name.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise ProtocolError(f"path {path_name!r} refused: '..' would leave the target root")
        shown = "/" + "/".join([*parts, file_name])
        try:
            dir_fd = self._resolve_dir(parts, bool(flags & CREATE_PATH))
        except OSError as exc:
            self._problem("errors", f"{shown}: {exc}")
            return int(Status.E_FAIL)
        try:
            try:
                st = os.stat(file_name, dir_fd=dir_fd, follow_symlinks=False)
                exists = True
            except FileNotFoundError:
                exists, st = False, None
            if exists and not flags & OVER_WRITE:
                os.close(dir_fd)
                self.counters["exists"] += 1
                return int(Status.ALREADY_EXISTS)
            if st is not None and not (st.st_mode & 0o170000 == 0o100000):
                raise ProtocolError(f"{shown} exists and is not a regular file")
            self._serial += 1                       # short: any file name fits NAME_MAX
            tmp = f".uvmbus-fcopy-{os.getpid()}-{self._serial}"
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE, dir_fd=dir_fd)
            os.fchmod(fd, FILE_MODE)
        except ProtocolError:
            os.close(dir_fd)
            raise
        except OSError as exc:
            os.close(dir_fd)
            self._problem("errors", f"{shown}: {exc}")
            return int(Status.E_FAIL)
        self._copy = _Copy(dir_fd, file_name, tmp, fd, bool(flags & OVER_WRITE), shown)
        self.counters["started"] += 1
        log.info("fcopy: receiving %s", shown)
        return int(Status.S_OK)

    # -- WRITE / COMPLETE / CANCEL ------------------------------------------------------------
    def _write(self, body: memoryview) -> int:
        c = self._copy
        if c is None:
            raise ProtocolError("WRITE_TO_FILE without a file copy in progress")
        if len(body) < _WRITE_FIXED:
            raise ProtocolError(f"WRITE_TO_FILE of {len(body)} bytes, needs {_WRITE_FIXED}")
        offset = struct.unpack_from("<Q", body, wire.offsetof("ic_fcopy_write", "offset"))[0]
        size = struct.unpack_from("<I", body, wire.offsetof("ic_fcopy_write", "size"))[0]
        if size > DATA_FRAGMENT or _WRITE_FIXED + size > len(body):
            raise ProtocolError(f"WRITE_TO_FILE of {size} bytes (max {DATA_FRAGMENT}, "
                                f"{len(body) - _WRITE_FIXED} in the packet)")
        if offset > 1 << 62:
            raise ProtocolError(f"WRITE_TO_FILE offset {offset} out of range")
        data = bytes(body[_WRITE_FIXED:_WRITE_FIXED + size])
        try:
            n = os.pwrite(c.fd, data, offset)
        except OSError as exc:
            self._problem("errors", f"{c.shown}: write at {offset}: {exc}")
            return int(Status.DISK_FULL if exc.errno == errno.ENOSPC else Status.E_FAIL)
        if n != size:
            self._problem("errors", f"{c.shown}: short write ({n} of {size})")
            return int(Status.DISK_FULL)
        c.written += size
        return int(Status.S_OK)

    def _complete(self) -> tuple[int, Callable[[], None] | None]:
        c = self._copy
        if c is None:
            raise ProtocolError("COMPLETE_FCOPY without a file copy in progress")
        self._copy = None
        try:
            os.fsync(c.fd)
            os.close(c.fd)
            if c.overwrite:
                os.replace(c.tmp, c.name, src_dir_fd=c.dir_fd, dst_dir_fd=c.dir_fd)
            else:
                os.link(c.tmp, c.name, src_dir_fd=c.dir_fd, dst_dir_fd=c.dir_fd,
                        follow_symlinks=False)
                os.unlink(c.tmp, dir_fd=c.dir_fd)
            size = os.stat(c.name, dir_fd=c.dir_fd, follow_symlinks=False).st_size
        except FileExistsError:
            self._unlink_tmp(c)
            self.counters["exists"] += 1
            return int(Status.ALREADY_EXISTS), None
        except OSError as exc:
            self._unlink_tmp(c)
            self._problem("errors", f"{c.shown}: completing: {exc}")
            return int(Status.E_FAIL), None
        finally:
            os.close(c.dir_fd)
        result = CopyResult(c.shown, size, "copied")
        self.completed.append(result)
        self.counters["completed"] += 1
        log.info("fcopy: %s copied (%d bytes)", c.shown, size)
        cb = self.on_done
        return int(Status.S_OK), (None if cb is None else (lambda: cb(result)))

    @staticmethod
    def _unlink_tmp(c: _Copy) -> None:
        try:
            os.unlink(c.tmp, dir_fd=c.dir_fd)
        except OSError:
            pass

    def _discard(self) -> None:
        c, self._copy = self._copy, None
        if c is None:
            return
        try:
            os.close(c.fd)
        except OSError:
            pass
        self._unlink_tmp(c)
        os.close(c.dir_fd)

    def _cancel(self) -> int:
        if self._copy is not None:
            log.info("fcopy: copy of %s cancelled by the host", self._copy.shown)
            self._discard()
        self.counters["cancelled"] += 1
        return int(Status.S_OK)

    def close(self) -> None:
        """Drop an unfinished copy (its temporary file) — on daemon exit."""
        self._discard()

"""One user per device: an exclusive advisory lock (``flock``) on the device's sysfs directory.

Whoever opens a device's channels (:class:`uvmbus.uio.UioDevice`, hence ``uvmbus.netvsc.open``,
``uvmbus.storvsc.open``, ``uvmbus.channel.open_device``, every CLI command and daemon) takes
the lock first, so a second opener in another process fails at once with
``... is in use by pid N (command line)`` instead of opening the channel a second time and
breaking the first session (a second NVSP INIT or a VSTOR re-initialisation is a reset for
the host).  The kernel drops the lock when the holder exits, however it exits (also SIGKILL).

Within one process the lock is counted: a *scope* (:func:`hold_device`, used by the CLI around
a whole command) nests with anything; a second *open* of a device this process already has
open fails too ("already open in this process").  Experts who share a device on purpose
(a queue attached from another process, a test driving both sides) pass ``lock=False``.

:func:`device_holder` tells who holds a device without taking it (``uvmbus status``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uvmbus.errors import DeviceBusy

__all__ = ["DeviceLock", "device_holder", "hold_device", "lock_device"]

_mutex = threading.Lock()
_held: dict[tuple[int, int], _Held] = {}


class _Held:
    __slots__ = ("fd", "opens", "scopes")

    def __init__(self, fd: int):
        self.fd = fd
        self.opens = 0
        self.scopes = 0


def _holder_of(st: os.stat_result) -> tuple[int | None, str]:
    """(pid, ``pid N (command line)``) of the process holding a flock on the file (/proc/locks)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None, "another process"
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want and f[4].isdigit():
            pid = int(f[4])
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                cmd = " ".join(raw.decode(errors="replace").split())     # one line (python -c ...)
                if len(cmd) > 160:
                    cmd = cmd[:157] + "..."
            except OSError:
                cmd = ""
            return pid, f"pid {pid}" + (f" ({cmd})" if cmd else "")
    return None, "another process"


class DeviceLock:
    """A held device lock; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, key: tuple[int, int] | None, device_id: str, scope: bool):
        self._key = key
        self.device_id = device_id
        self._scope = scope
        self.held = key is not None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _mutex:
            h = _held.get(self._key) if self._key is not None else None
            if h is None:
                return
            if self._scope:
                h.scopes -= 1
            else:
                h.opens -= 1
            if h.opens <= 0 and h.scopes <= 0:
                del _held[self._key]        # type: ignore[arg-type]
                os.close(h.fd)

    def __enter__(self) -> DeviceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _busy_message(device_id: str, holder: str, what: str | None, api: bool) -> str:
    when = f"before you {what}" if what else "first"
    return (f"{device_id} is in use by {holder}; stop that {when} (`uvmbus status` shows who "
            "holds each device)" + (", or pass lock=False if sharing it is intended" if api else ""))


def lock_device(dev: Any, *, what: str | None = None, scope: bool = False) -> DeviceLock:
    """Take the lock of ``dev`` (a :class:`~uvmbus.bus.VmbusDevice`) or raise
    :class:`~uvmbus.errors.DeviceBusy` at once.  ``scope=True``: a command-wide hold that
    nests with this process's own opens (see the module docstring)."""
    try:
        fd = os.open(dev.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return DeviceLock(None, dev.device_id, scope)   # no directory: the open will say so
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _mutex:
        h = _held.get(key)
        if h is not None:
            os.close(fd)
            if not scope and h.opens:
                raise DeviceBusy(f"{dev.device_id} is already open in this process (pid "
                                 f"{os.getpid()}): close the other handle first, or pass "
                                 "lock=False if sharing it is intended", pid=os.getpid())
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                pid, holder = _holder_of(st)
                raise DeviceBusy(_busy_message(dev.device_id, holder, what, not scope), pid=pid) from None
            h = _held[key] = _Held(fd)
        if scope:
            h.scopes += 1
        else:
            h.opens += 1
    return DeviceLock(key, dev.device_id, scope)


@contextlib.contextmanager
def hold_device(dev: Any, *, what: str | None = None) -> Iterator[DeviceLock]:
    """Hold ``dev`` for a whole command (nests with the opens the command makes)."""
    lk = lock_device(dev, what=what, scope=True)
    try:
        yield lk
    finally:
        lk.release()


def device_holder(dev: Any) -> dict[str, Any] | None:
    """``{"pid", "holder"}`` of the process holding ``dev``'s lock, None when it is free."""
    try:
        st = os.stat(dev.path)
    except OSError:
        return None
    pid, text = _holder_of(st)
    if pid is None:
        return None
    return {"pid": pid, "holder": text}

"""Defensive reading and writing of sysfs attribute files.

Reads: a missing attribute (or one the kernel refuses to show, e.g. ``-ENODEV`` for a
channel that is not initialised, uio_vmbus.md §1.8/§1.9) is ``None``; a present attribute
with unexpected content raises :class:`BusError` naming the file.

Writes: one ``write()`` per value, as sysfs requires.  Selected errnos can be declared
"success" (the kernel's idempotency signals: EEXIST from ``new_id``, ENODEV from ``unbind``,
EBUSY from ``bind``, uio_vmbus.md §1.1).  Permission problems become
:class:`PrivilegeError`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from uvmbus.bus.classes import normalize_guid
from uvmbus.errors import BusError, from_oserror

__all__ = ["read_guid", "read_int", "read_text", "write_attr"]

# errnos meaning "this attribute has no value right now" rather than a failure.
_ABSENT = {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EINVAL, errno.EIO, errno.ENOTDIR}


def read_text(path: Path) -> str | None:
    """Contents of ``path`` stripped of surrounding whitespace, or None if unavailable."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as exc:
        if exc.errno in _ABSENT or exc.errno == errno.EISDIR:
            return None
        raise from_oserror(exc, f"reading {path}") from exc
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise BusError(f"{path}: expected text, got binary data", path=str(path)) from None


def parse_number(text: str, path: Path) -> int:
    """Decimal, or hexadecimal with ``0x`` (UIO prints map sizes/addresses as ``0x…``)."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise BusError(f"{path}: expected a number, got {text!r}", path=str(path)) from None


def read_int(path: Path) -> int | None:
    """Integer in ``path`` (decimal or 0x-hex), None if the file is absent."""
    text = read_text(path)
    return None if text is None else parse_number(text, path)


def read_guid(path: Path) -> str | None:
    """GUID in ``path`` (sysfs prints ``{…}``), normalised lowercase without braces."""
    text = read_text(path)
    if text is None:
        return None
    guid = normalize_guid(text)
    if guid is None:
        raise BusError(f"{path}: expected a GUID, got {text!r}", path=str(path))
    return guid


def write_attr(path: Path, value: str, *, ok_errnos: tuple[int, ...] = ()) -> None:
    """Write ``value`` to the sysfs attribute ``path`` in a single write.

    Errnos in ``ok_errnos`` are treated as success.  The file is never created: a missing
    attribute is an error (it means a driver or feature is absent).
    """
    data = value.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in ok_errnos:
            return
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise from_oserror(exc, f"writing {value!r} to {path}") from exc
        raise BusError(
            f"writing {value!r} to {path} failed: {exc.strerror or exc}",
            errno=exc.errno, path=str(path),
        ) from exc

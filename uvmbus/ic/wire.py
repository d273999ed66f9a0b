"""IC wire layouts as Python sees them: the constants and structs of ``native/ic_wire.h``.

This module holds layout facts only (sizes, offsets, codes and a way to copy a struct in or
out of bytes), so the guest services and the simulator's host models can share it without
sharing any message logic.  Reference: ../shared/reference/storvsc_ic.md §7.
"""

from __future__ import annotations

import enum
from typing import Any

from uvmbus.errors import ProtocolError
from uvmbus.native import ffi, lib

__all__ = [
    "PIPE_HDR_SIZE", "MSG_HDR_SIZE", "HDR_SIZE", "PIPE_TYPE_DATA", "MAX_VERSION_COUNT",
    "NEGOTIATE_RESP_SIZE", "MsgType", "Flag", "Status", "KvpOp", "KvpPool", "FcopyOp",
    "REQUEST_FLAGS", "RESPONSE_FLAGS", "sizeof", "offsetof", "load", "dump", "version_pack",
    "version_str", "parse_version", "status_name", "CLASS_IDS",
]

PIPE_HDR_SIZE: int = lib.IC_PIPE_HDR_SIZE              # 8
MSG_HDR_SIZE: int = lib.IC_MSG_HDR_SIZE                # 20
HDR_SIZE: int = lib.IC_HDR_SIZE                        # 28: where every message body starts
PIPE_TYPE_DATA: int = lib.IC_PIPE_TYPE_DATA
MAX_VERSION_COUNT: int = lib.IC_MAX_VERSION_COUNT      # 100
NEGOTIATE_RESP_SIZE: int = lib.IC_NEGOTIATE_RESP_SIZE  # 16
NEGOTIATE_SIZE: int = ffi.sizeof("struct ic_negotiate")

#: (short name, class GUID) of the ICs uvmbus serves (storvsc_ic.md §8)
CLASS_IDS: dict[str, str] = {
    "heartbeat": "57164f39-9115-4e78-ab55-382f3bd5422d",
    "shutdown": "0e0b6031-5213-4934-818b-38d90ced39db",
    "timesync": "9527e630-d0ae-497b-adce-e80ab0175caf",
    "kvp": "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
    "fcopy": "34d14be3-dee4-41c8-9ae7-6b174977c192",
}


class MsgType(enum.IntEnum):
    NEGOTIATE = lib.IC_MSGTYPE_NEGOTIATE
    HEARTBEAT = lib.IC_MSGTYPE_HEARTBEAT
    KVPEXCHANGE = lib.IC_MSGTYPE_KVPEXCHANGE
    SHUTDOWN = lib.IC_MSGTYPE_SHUTDOWN
    TIMESYNC = lib.IC_MSGTYPE_TIMESYNC
    VSS = lib.IC_MSGTYPE_VSS
    FCOPY = lib.IC_MSGTYPE_FCOPY


class Flag(enum.IntFlag):
    TRANSACTION = lib.IC_FLAG_TRANSACTION
    REQUEST = lib.IC_FLAG_REQUEST
    RESPONSE = lib.IC_FLAG_RESPONSE


REQUEST_FLAGS = int(Flag.TRANSACTION | Flag.REQUEST)       # 0x03, what a host sends
RESPONSE_FLAGS = int(Flag.TRANSACTION | Flag.RESPONSE)     # 0x05, what a guest answers


class Status(enum.IntEnum):
    S_OK = lib.IC_S_OK
    E_FAIL = lib.IC_E_FAIL
    S_CONT = lib.IC_S_CONT
    NOT_SUPPORTED = lib.IC_ERROR_NOT_SUPPORTED
    MACHINE_LOCKED = lib.IC_ERROR_MACHINE_LOCKED
    DEVICE_NOT_CONNECTED = lib.IC_ERROR_DEVICE_NOT_CONNECTED
    INVALIDARG = lib.IC_INVALIDARG
    GUID_NOTFOUND = lib.IC_GUID_NOTFOUND
    ALREADY_EXISTS = lib.IC_ERROR_ALREADY_EXISTS
    DISK_FULL = lib.IC_ERROR_DISK_FULL


class KvpOp(enum.IntEnum):
    GET = lib.IC_KVP_OP_GET
    SET = lib.IC_KVP_OP_SET
    DELETE = lib.IC_KVP_OP_DELETE
    ENUMERATE = lib.IC_KVP_OP_ENUMERATE
    GET_IP_INFO = lib.IC_KVP_OP_GET_IP_INFO
    SET_IP_INFO = lib.IC_KVP_OP_SET_IP_INFO


class KvpPool(enum.IntEnum):
    EXTERNAL = lib.IC_KVP_POOL_EXTERNAL
    GUEST = lib.IC_KVP_POOL_GUEST
    AUTO = lib.IC_KVP_POOL_AUTO
    AUTO_EXTERNAL = lib.IC_KVP_POOL_AUTO_EXTERNAL
    AUTO_INTERNAL = lib.IC_KVP_POOL_AUTO_INTERNAL


class FcopyOp(enum.IntEnum):
    START_FILE_COPY = lib.IC_FCOPY_START_FILE_COPY
    WRITE_TO_FILE = lib.IC_FCOPY_WRITE_TO_FILE
    COMPLETE_FCOPY = lib.IC_FCOPY_COMPLETE
    CANCEL_FCOPY = lib.IC_FCOPY_CANCEL


def sizeof(name: str) -> int:
    """Size of ``struct <name>`` (e.g. ``"ic_heartbeat"``)."""
    return int(ffi.sizeof(f"struct {name}"))


def offsetof(name: str, field: str) -> int:
    return int(ffi.offsetof(f"struct {name}", field))


def load(name: str, data: bytes | bytearray | memoryview, offset: int = 0) -> Any:
    """A private copy of ``struct <name>`` read from ``data[offset:]``.

    Raises :class:`ProtocolError` when ``data`` is too short: the caller decides whether a
    short message is dropped or answered with an error."""
    size = sizeof(name)
    if offset < 0 or len(data) - offset < size:
        raise ProtocolError(f"{name}: {max(0, len(data) - offset)} bytes, needs {size}")
    p = ffi.new(f"struct {name} *")
    ffi.memmove(p, bytes(data[offset:offset + size]), size)
    return p


def dump(cdata: Any) -> bytes:
    """The bytes of a struct made by :func:`load` or ``ffi.new``."""
    return bytes(ffi.buffer(cdata))


def version_pack(major: int, minor: int) -> int:
    """``major << 16 | minor``, the kernel's integer form of a version."""
    return (major & 0xFFFF) << 16 | (minor & 0xFFFF)


def version_str(v: int | tuple[int, int]) -> str:
    major, minor = (v >> 16, v & 0xFFFF) if isinstance(v, int) else v
    return f"{major}.{minor}"


def parse_version(text: str) -> tuple[int, int]:
    """``"3.2"`` -> ``(3, 2)``."""
    major, sep, minor = text.strip().partition(".")
    try:
        v = (int(major), int(minor or 0))
    except ValueError:
        raise ProtocolError(f"version {text!r}: expected MAJOR.MINOR") from None
    if not (0 <= v[0] <= 0xFFFF and 0 <= v[1] <= 0xFFFF):
        raise ProtocolError(f"version {text!r} out of range")
    return v


def status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"{status:#010x}"

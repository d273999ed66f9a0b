"""nbdkit python plugin for ``uvmbus blk export`` (runs inside nbdkit's process).

The export daemon owns the storvsc controller; this plugin is a thin NBD ↔ IPC adapter.  It
needs only the standard library and nbdkit's ``nbdkit`` module — not uvmbus, its native
extension, DMA memory or any capability — so nbdkit's embedded interpreter can load it
from any Python environment.  Started by the daemon as::

    nbdkit --exit-with-parent -f ... python /path/to/nbdplugin.py ipc=/run/uvmbus/blk-GUID.io

Each NBD connection opens its own IPC connection (``open``); requests on one connection are
serialised (``SERIALIZE_REQUESTS``), the daemon serialises them all on the device.

IPC wire format (little endian), one request → one reply:

* request: ``op u8, flags u8, pad u16, length u32, offset u64`` (16 bytes), followed by
  ``length`` bytes of data for WRITE;
* reply: ``errno i32, length u32`` (8 bytes), followed by ``length`` bytes (READ data, or the
  HELLO JSON).

Ops: HELLO (export facts), READ, WRITE, FLUSH, TRIM, ZERO.  Flags: FUA, MAY_TRIM.  This
module is also imported by the daemon for the constants (importing it outside nbdkit works;
only the callbacks need the ``nbdkit`` module).
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
from typing import Any, NoReturn

try:  # inside nbdkit
    import nbdkit
except ImportError:  # imported by the daemon or tests for the constants
    nbdkit = None
else:
    # nbdkit logs a failed callback with traceback.format_exception; every failure here is
    # the daemon's answer or its transport, so "Type: message" on one line is the whole story
    # (a refused connection while the device is gone must not log a traceback each time)
    sys.tracebacklimit = 0

API_VERSION = 2

REQ = struct.Struct("<BBHIQ")
REP = struct.Struct("<iI")

OP_HELLO = 0
OP_READ = 1
OP_WRITE = 2
OP_FLUSH = 3
OP_TRIM = 4
OP_ZERO = 5
OP_NAMES = {OP_HELLO: "hello", OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush",
            OP_TRIM: "trim", OP_ZERO: "zero"}

F_FUA = 1
F_MAY_TRIM = 2

_ipc_path = ""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ``ConnectionError`` at EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the IPC connection")
        got += k
    return bytes(buf)


class DaemonError(OSError):
    """The daemon answered the request with this errno (EIO, ENOSPC, ...): passed on as is."""


class ConnectionRefusedByExport(OSError):
    """A new NBD connection could not be opened (the daemon refused it or is unreachable)."""


class Client:
    """One IPC connection to the export daemon."""

    def __init__(self, path: str, timeout: float | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if timeout is not None:
            self.sock.settimeout(timeout)
        self.sock.connect(path)
        try:
            self.info: dict[str, Any] = json.loads(self.call(OP_HELLO))
        except BaseException:
            self.sock.close()
            raise

    def call(self, op: int, offset: int = 0, length: int = 0, flags: int = 0,
             data: bytes | bytearray | memoryview | None = None) -> bytes:
        if data is not None:
            length = len(data)
        self.sock.sendall(REQ.pack(op, flags, 0, length, offset))
        if data is not None:
            self.sock.sendall(data)
        err, n = REP.unpack(recv_exact(self.sock, REP.size))
        body = recv_exact(self.sock, n) if n else b""
        if err:
            where = "" if op == OP_HELLO else f"{OP_NAMES.get(op, op)} at {offset}+{length}: "
            raise DaemonError(err, where + (body.decode(errors="replace") or errno.errorcode.get(err, str(err))))
        return body

    def close(self) -> None:
        self.sock.close()


# ---- nbdkit callbacks ------------------------------------------------------------------------------

def error_code(exc: BaseException) -> int:
    """The errno an NBD client gets.  A reply of the daemon keeps its errno; anything else
    is a failure of the transport to the daemon (it died, restarts, closed the connection:
    ECONNRESET, EPIPE, EOF, a timeout...), which is ESHUTDOWN for the client — nbdkit
    turns errnos it does not know, such as ECONNRESET, into EINVAL, which would tell the
    client its request was wrong."""
    if isinstance(exc, DaemonError) and exc.errno:
        return int(exc.errno)
    return errno.ESHUTDOWN


def _fail(exc: BaseException) -> NoReturn:
    nbdkit.set_error(error_code(exc))
    raise exc


def config(key: str, value: str) -> None:
    global _ipc_path
    if key == "ipc":
        _ipc_path = value
    else:
        raise RuntimeError(f"unknown parameter {key!r} (expected ipc=PATH)")


def config_complete() -> None:
    if not _ipc_path:
        raise RuntimeError("ipc=PATH is required (the export daemon's IPC socket)")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def open(readonly: bool) -> Client:          # nbdkit's callback name (shadows builtins.open)
    try:
        return Client(_ipc_path)
    except DaemonError as exc:
        nbdkit.set_error(error_code(exc))
        raise ConnectionRefusedByExport(
            f"new NBD connection refused by the export daemon: {exc.strerror}") from None
    except (OSError, ValueError) as exc:
        nbdkit.set_error(error_code(exc))
        raise ConnectionRefusedByExport(
            f"new NBD connection refused: the export daemon at {_ipc_path} does not answer "
            f"({exc}); is `uvmbus blk export` running?") from None


def close(h: Client) -> None:
    h.close()


def get_size(h: Client) -> int:
    return int(h.info["size"])


def block_size(h: Client) -> tuple[int, int, int]:
    return (1, int(h.info["preferred_block"]), int(h.info["max_request"]))


def can_write(h: Client) -> bool:
    return not h.info["readonly"]


def can_flush(h: Client) -> bool:
    return True


def can_fua(h: Client) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_trim(h: Client) -> bool:
    return bool(h.info["can_trim"]) and not h.info["readonly"]


def can_zero(h: Client) -> bool:
    return not h.info["readonly"]


def can_fast_zero(h: Client) -> bool:
    return False


def can_multi_conn(h: Client) -> bool:
    return True          # one device owner: a flush on any connection covers every connection


def pread(h: Client, buf: bytearray, offset: int, flags: int) -> None:
    try:
        data = h.call(OP_READ, offset, len(buf))
    except OSError as exc:
        _fail(exc)
    buf[:] = data


def pwrite(h: Client, buf: bytes, offset: int, flags: int) -> None:
    fua = F_FUA if flags & nbdkit.FLAG_FUA else 0
    try:
        h.call(OP_WRITE, offset, flags=fua, data=buf)
    except OSError as exc:
        _fail(exc)


def flush(h: Client, flags: int) -> None:
    try:
        h.call(OP_FLUSH)
    except OSError as exc:
        _fail(exc)


def trim(h: Client, count: int, offset: int, flags: int) -> None:
    fua = F_FUA if flags & nbdkit.FLAG_FUA else 0
    try:
        h.call(OP_TRIM, offset, count, fua)
    except OSError as exc:
        _fail(exc)


def zero(h: Client, count: int, offset: int, flags: int) -> None:
    f = (F_FUA if flags & nbdkit.FLAG_FUA else 0) | (F_MAY_TRIM if flags & nbdkit.FLAG_MAY_TRIM else 0)
    try:
        h.call(OP_ZERO, offset, count, f)
    except OSError as exc:
        _fail(exc)

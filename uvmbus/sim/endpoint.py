"""The server side of ``dev/uioN``: the simulator's stand-in for a uio character device.

Protocol version 1 (the client is :class:`uvmbus.uio.endpoint.SimEndpoint`):

* the endpoint is an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket at ``<root>/dev/uioN`` (mode 0600);
* on connect the server sends a hello, UTF-8 JSON
  ``{"proto": 1, "page_size": P, "maps": [{"index": K, "size": S}, ...]}``, carrying the fds
  ``[eventfd, fd(map0), fd(map1), ...]`` (SCM_RIGHTS) in the order of ``maps``; each map is
  mapped from offset 0 of its fd.  With simulated guest RAM, the NIC buffers (maps 3/4) also
  carry ``"gpa": G``: the guest physical address of their first byte (their pages are
  contiguous guest RAM from G), which a guest uses for GPA-direct ranges pointing into them
  (where a real guest would read ``/proc/self/pagemap``); ``uvmbus sim exec --guest-ram``
  maps them at virtual address G so that IOVA = VA = GPA;
* every 4-byte message from the guest is an irqcontrol write (little-endian u32);
* an interrupt is ``write(eventfd, 1)`` on every open connection of the device (each open
  file has its own event count, as with ``/dev/uioN``);
* rescind: the server sends ``{"event": "rescind"}`` and closes the connection;
* close: the guest sends ``{"op": "close"}``; the server closes that file (the channel too, if
  it was the last one) and answers ``{"event": "closed"}`` before closing its end, so the
  guest's close returns after the teardown, as ``close()`` of a real uio fd does.  A guest
  that just drops the connection (or dies) is handled the same way, without the answer.

The first connection opens the channel and the last close closes it (uio's first open / last
release).  This module only moves bytes; :mod:`uvmbus.sim.device` decides what they mean.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

from uvmbus.sockets import listen_private

__all__ = ["PROTO", "Connection", "EndpointServer", "irqcontrol_value", "is_close_request"]

PROTO = 1
_U32 = struct.Struct("<I")


class Connection:
    """One open "file" of the endpoint."""

    def __init__(self, sock: socket.socket, number: int):
        self.sock = sock
        self.sock.setblocking(False)
        self.number = number
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_hello(self, page_size: int, maps: list[tuple[int, int, int, int | None]]) -> None:
        """``maps`` = (index, size, fd, GPA or None)."""
        entries: list[dict[str, int]] = []
        for i, s, _, gpa in maps:
            entries.append({"index": i, "size": s} if gpa is None else {"index": i, "size": s, "gpa": gpa})
        hello = {"proto": PROTO, "page_size": page_size, "maps": entries}
        fds = [self.eventfd] + [fd for _, _, fd, _ in maps]
        self.sock.setblocking(True)
        try:
            socket.send_fds(self.sock, [json.dumps(hello).encode()], fds)
        finally:
            self.sock.setblocking(False)

    def receive(self) -> tuple[list[bytes], bool]:
        """Pending messages, and whether the guest closed its end."""
        out: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                return out, False
            except OSError:
                return out, True
            if not data:
                return out, True
            out.append(data)

    def ack_close(self) -> None:
        try:
            self.sock.send(json.dumps({"event": "closed"}).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def rescind(self) -> None:
        try:
            self.sock.send(json.dumps({"event": "rescind"}).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        finally:
            os.close(self.eventfd)


def is_close_request(message: bytes) -> bool:
    """True for the guest's ``{"op": "close"}``."""
    if not message.startswith(b"{"):
        return False
    try:
        return bool(json.loads(message.decode()).get("op") == "close")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return False


def irqcontrol_value(message: bytes) -> int | None:
    """The u32 of a 4-byte irqcontrol message, None for anything else (EINVAL on a real
    uio device)."""
    if len(message) != 4:
        return None
    return int(_U32.unpack(message)[0])


class EndpointServer:
    """The listening socket at ``dev/uioN``."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = listen_private(path, socket.SOCK_SEQPACKET, backlog=64)
        self._numbers = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Connection | None:
        try:
            s, _ = self.sock.accept()
        except BlockingIOError:
            return None
        self._numbers += 1
        return Connection(s, self._numbers)

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

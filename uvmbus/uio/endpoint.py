"""The device endpoint: how ``/dev/uioN`` is opened, mapped, waited on and written.

This is the ONE place where a real guest and the simulated host differ
(uio_vmbus.md §1.4, §1.6, §1.10):

* :class:`UioEndpoint` — a real ``/dev/uioN`` character device: map K is
  ``mmap(fd, offset=K * PAGE_SIZE)``; an interrupt wait is ``poll`` + a 4-byte
  ``read`` returning the cumulative event count; irqcontrol is a 4-byte
  ``write``; ``EIO`` means the channel was rescinded.
* :class:`SimEndpoint` — ``<root>/dev/uioN`` is a Unix ``SOCK_SEQPACKET``
  socket served by ``uvmbus sim``.  On connect the simulator sends a hello
  (JSON) with one memfd per map and an eventfd for interrupts (SCM_RIGHTS);
  a 4-byte message from the guest is an irqcontrol write; a ``rescind``
  message or EOF plays the role of ``EIO``.  Connecting opens the channel,
  closing the last connection closes it — as the first open / last release
  of ``/dev/uioN`` do.

Everything above this class (sysfs, map names and sizes, sub-channel ``ring``
files, monitor-page signalling, every protocol byte) is the same code on
Azure and in the simulator.  :func:`open_endpoint` picks the class from the
kind of file it finds.

Simulator wire protocol (version 1), for the server side in ``uvmbus.sim``:

* hello (server → guest, first message): UTF-8 JSON
  ``{"proto": 1, "page_size": P, "maps": [{"index": K, "size": S}, ...]}``
  with ancillary fds ``[eventfd, memfd(map0), memfd(map1), ...]`` in the
  order of ``maps``.  NIC buffers in simulated guest RAM also carry ``"gpa"``
  (their first byte's guest physical address; :attr:`SimEndpoint.map_gpas`).
* irqcontrol (guest → server): 4 bytes, little-endian u32 value.
* interrupt (server → guest): ``write(eventfd, 1)``; reads coalesce.
* rescind (server → guest): JSON ``{"event": "rescind"}``; the server then
  stops serving; every later guest operation raises :class:`ChannelRevoked`.
* close (guest → server): JSON ``{"op": "close"}``; the server closes this
  file (and the channel, if it was the last) and answers ``{"event": "closed"}``:
  like ``close()`` of a real uio fd, our close returns after the teardown.
"""

from __future__ import annotations

import array
import errno
import json
import mmap
import os
import select
import socket
import stat
import struct
import time
from abc import ABC, abstractmethod
from pathlib import Path

from uvmbus.errors import (
    ChannelRevoked,
    ChannelTimeout,
    ConfigError,
    NotFound,
    PrivilegeError,
    UvmbusError,
)

_U32 = struct.Struct("<I")
SIM_PROTO = 1
#: default seconds a simulator endpoint waits for the server to accept and send its hello
OPEN_TIMEOUT = 10.0


class Endpoint(ABC):
    """What the uio layer needs from a device endpoint."""

    #: guest page size: the ring header page size and the map offset unit
    page_size: int
    #: path of the node that was opened
    path: str

    @abstractmethod
    def map(self, index: int, size: int) -> mmap.mmap:
        """Map uio map ``index`` (``size`` bytes, read/write, shared)."""

    @abstractmethod
    def wait(self, timeout: float | None) -> int | None:
        """Block until an interrupt arrives; return the cumulative event count,
        or None on timeout.  Raises ChannelRevoked when the device is gone."""

    @abstractmethod
    def irqcontrol(self, value: int) -> None:
        """The 4-byte write to ``/dev/uioN`` (1 = enable/unmask + signal, 0 = mask)."""

    @abstractmethod
    def fileno(self) -> int:
        """An fd that becomes readable when an interrupt is pending (for selectors)."""

    @property
    @abstractmethod
    def signal_fd(self) -> int:
        """The fd the native signal path writes its 4-byte ``1`` to."""

    @property
    @abstractmethod
    def signal_fd_is_socket(self) -> bool:
        """True when :attr:`signal_fd` must be written with send(MSG_NOSIGNAL)."""

    @abstractmethod
    def close(self) -> None:
        """Release the endpoint (the last close closes the channel)."""

    @property
    def revoked(self) -> bool:
        return False

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _timeout_ms(timeout: float | None) -> int:
    if timeout is None:
        return -1
    return max(0, int(timeout * 1000 + 0.999))


class UioEndpoint(Endpoint):
    """A real ``/dev/uioN`` (kernel uio_hv_generic)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self.page_size = mmap.PAGESIZE
        try:
            # Non-blocking: when several threads wait on one fd, poll wakes them all but only
            # the first read sees the new count; the others must get EAGAIN, not block.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except PermissionError as exc:
            raise PrivilegeError(
                f"cannot open {self.path}: permission denied. Run as root, or grant access to the "
                "uio node (udev rule / systemd DeviceAllow=char-uio rw)."
            ) from exc
        except FileNotFoundError as exc:
            raise NotFound(f"{self.path} does not exist: is the device bound to uio_hv_generic?") from exc
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._revoked = False

    def map(self, index: int, size: int) -> mmap.mmap:
        length = (size + self.page_size - 1) // self.page_size * self.page_size
        try:
            return mmap.mmap(self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=index * self.page_size)
        except OSError as exc:
            if exc.errno == errno.EIO or exc.errno == errno.ENODEV:
                raise ChannelRevoked(f"{self.path}: map {index} unavailable ({exc.strerror})") from exc
            raise UvmbusError(f"{self.path}: mmap of map {index} ({size} bytes) failed: {exc}") from exc

    def wait(self, timeout: float | None) -> int | None:
        if self._revoked:
            raise ChannelRevoked(f"{self.path}: device was rescinded")
        try:
            events = self._poll.poll(_timeout_ms(timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            return None
        if not events:
            return None
        _, ev = events[0]
        if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            self._revoked = True
            raise ChannelRevoked(f"{self.path}: device was rescinded (poll error)")
        try:
            data = os.read(self._fd, 4)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._revoked = True
                raise ChannelRevoked(f"{self.path}: device was rescinded (EIO)") from exc
            raise
        return struct.unpack("<i", data)[0]

    def irqcontrol(self, value: int) -> None:
        try:
            os.write(self._fd, _U32.pack(value))
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._revoked = True
                raise ChannelRevoked(f"{self.path}: device was rescinded (EIO)") from exc
            raise UvmbusError(f"{self.path}: irqcontrol write failed: {exc}") from exc

    def fileno(self) -> int:
        return self._fd

    @property
    def signal_fd(self) -> int:
        return self._fd

    @property
    def signal_fd_is_socket(self) -> bool:
        return False

    @property
    def revoked(self) -> bool:
        return self._revoked

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SimEndpoint(Endpoint):
    """The simulator's stand-in for ``/dev/uioN`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, connect_timeout: float = OPEN_TIMEOUT):
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + connect_timeout
        dev = os.path.dirname(self.path)
        root = os.path.dirname(dev) if os.path.basename(dev) == "dev" else "ROOT"
        # a wedged server's full listen backlog would block a blocking connect for ever
        self._sock.settimeout(max(connect_timeout, 0.001))
        while True:
            try:
                self._sock.connect(self.path)
                break
            except (ConnectionRefusedError, FileNotFoundError, BlockingIOError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    self._sock.close()
                    if isinstance(exc, (BlockingIOError, TimeoutError)):
                        raise ChannelTimeout(
                            f"{self.path}: the simulator did not accept the connection within "
                            f"{connect_timeout:g} s: is it stopped (SIGSTOP) or hung? "
                            f"`uvmbus sim ctl --root {root} ping` checks it") from exc
                    raise NotFound(f"{self.path}: the simulator does not answer ({exc.strerror}); "
                                   "is `uvmbus sim` running with this root?") from exc
                time.sleep(0.01)
        # the whole open (connect + hello) is bounded by connect_timeout
        self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            msg, fds = self._recv_fds()
        except TimeoutError as exc:
            self._sock.close()
            raise ChannelTimeout(f"{self.path}: the simulator accepted the connection but sent "
                                 f"nothing within {connect_timeout:g} s: is it stopped (SIGSTOP) "
                                 f"or hung? `uvmbus sim ctl --root {root} ping` checks it") from exc
        except OSError as exc:
            # ECONNRESET & co: the simulator dropped the connection before its hello — the
            # device is being rescinded (a reattach that looked too early), or it stopped
            self._sock.close()
            raise ChannelRevoked(f"{self.path}: the simulator closed the endpoint while it was being "
                                 f"opened ({exc.strerror or exc}): the device is being removed, or "
                                 "the simulator stopped; open it again once it is offered") from exc
        except ChannelRevoked:
            self._sock.close()
            raise
        self._sock.settimeout(None)
        hello = json.loads(msg.decode())
        if hello.get("proto") != SIM_PROTO:
            for fd in fds:
                os.close(fd)
            self._sock.close()
            raise ConfigError(f"{self.path}: simulator speaks protocol {hello.get('proto')}, "
                              f"this guest speaks {SIM_PROTO}")
        maps = hello["maps"]
        if len(fds) != 1 + len(maps):
            for fd in fds:
                os.close(fd)
            self._sock.close()
            raise ConfigError(f"{self.path}: hello carried {len(fds)} fds for {len(maps)} maps")
        self.page_size = int(hello["page_size"])
        self._event_fd = fds[0]
        self._map_fds = {int(m["index"]): fd for m, fd in zip(maps, fds[1:], strict=True)}
        self._map_sizes = {int(m["index"]): int(m["size"]) for m in maps}
        #: guest physical address of a map's first byte (NIC buffers in guest RAM), if given
        self.map_gpas: dict[int, int] = {int(m["index"]): int(m["gpa"]) for m in maps if "gpa" in m}
        self._poll = select.poll()
        self._poll.register(self._event_fd, select.POLLIN)
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._count = 0
        self._revoked = False

    def _recv_fds(self, maxfds: int = 16) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        msg, ancdata, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(maxfds * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not msg:
            raise ChannelRevoked(f"{self.path}: the simulator closed the endpoint")
        return msg, list(fds)

    def map(self, index: int, size: int) -> mmap.mmap:
        fd = self._map_fds.get(index)
        if fd is None:
            raise NotFound(f"{self.path}: the simulator offers no map {index}")
        if size > self._map_sizes[index]:
            raise ConfigError(f"{self.path}: map {index} is {self._map_sizes[index]} bytes, {size} requested")
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _control(self) -> None:
        """Handle a message from the server (only rescind is defined)."""
        try:
            data = self._sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._revoked = True
            raise ChannelRevoked(f"{self.path}: endpoint failed ({exc})") from exc
        if not data:
            self._revoked = True
            raise ChannelRevoked(f"{self.path}: the simulator closed the endpoint")
        try:
            msg = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError):
            return
        if msg.get("event") == "rescind":
            self._revoked = True
            raise ChannelRevoked(f"{self.path}: device was rescinded by the host")

    def wait(self, timeout: float | None) -> int | None:
        if self._revoked:
            raise ChannelRevoked(f"{self.path}: device was rescinded")
        events = self._poll.poll(_timeout_ms(timeout))
        got = False
        for fd, ev in events:
            if fd == self._event_fd:
                try:
                    self._count = (self._count + int.from_bytes(os.read(self._event_fd, 8), "little")) & 0x7FFFFFFF
                    got = True
                except BlockingIOError:
                    pass
            elif ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._control()
        return self._count if got else None

    def irqcontrol(self, value: int) -> None:
        if self._revoked:
            raise ChannelRevoked(f"{self.path}: device was rescinded")
        try:
            self._sock.send(_U32.pack(value), socket.MSG_NOSIGNAL)
        except OSError as exc:
            self._revoked = True
            raise ChannelRevoked(f"{self.path}: device was rescinded ({exc.strerror})") from exc

    def fileno(self) -> int:
        return self._event_fd

    @property
    def signal_fd(self) -> int:
        return self._sock.fileno()

    @property
    def signal_fd_is_socket(self) -> bool:
        return True

    @property
    def revoked(self) -> bool:
        if not self._revoked:
            r, _, _ = select.select([self._sock], [], [], 0)
            if r:
                try:
                    self._control()
                except ChannelRevoked:
                    pass
        return self._revoked

    def close(self, timeout: float = 10.0) -> None:
        if self._sock.fileno() >= 0 and not self._revoked:
            try:
                self._sock.send(json.dumps({"op": "close"}).encode(), socket.MSG_NOSIGNAL)
                self._sock.settimeout(timeout)
                while True:          # wait for the teardown (or the server going away)
                    data = self._sock.recv(65536)
                    if not data or json.loads(data.decode()).get("event") in ("closed", "rescind"):
                        break
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                pass
        for fd in list(self._map_fds.values()) + [self._event_fd]:
            if fd >= 0:
                os.close(fd)
        self._map_fds = {}
        self._event_fd = -1
        self._sock.close()


def open_endpoint(path: str | os.PathLike[str], *, timeout: float = OPEN_TIMEOUT) -> Endpoint:
    """Open ``path`` as a uio endpoint: a character device is a real ``/dev/uioN``,
    a socket is the simulator's stand-in.  ``timeout``: seconds the simulator's socket may
    take to accept and send its hello (a real ``/dev/uioN`` opens at once)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        root = p.parent.parent if p.parent.name == "dev" else None      # ROOT/dev/uioN
        opt = "" if root is None or root == Path("/") else f" --root {root}"
        raise NotFound(f"{p} does not exist: is the device bound to uio_hv_generic "
                       f"(`uvmbus bind DEVICE{opt}`)?") from exc
    if stat.S_ISCHR(st.st_mode):
        return UioEndpoint(p)
    if stat.S_ISSOCK(st.st_mode):
        return SimEndpoint(p, connect_timeout=timeout)
    raise ConfigError(f"{p} is neither a character device nor a simulator socket")

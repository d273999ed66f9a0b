"""The device endpoint: the simulator's socket protocol (against a minimal fake
server written here from the documented protocol) and the real-uio class
against a character device."""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import threading
import time

import pytest

from uvmbus.errors import ChannelRevoked, ConfigError, NotFound
from uvmbus.uio import SimEndpoint, UioEndpoint, open_endpoint


class FakeSimServer:
    """Speaks protocol 1: hello + fds, irqcontrol messages, eventfd interrupts, rescind."""

    def __init__(self, path: str, sizes: list[int], page_size: int = 4096):
        self.path = path
        self.sizes = sizes
        self.page_size = page_size
        self.irq: list[int] = []
        self.memfds = [os.memfd_create(f"map{i}") for i in range(len(sizes))]
        for fd, size in zip(self.memfds, sizes, strict=True):
            os.ftruncate(fd, size)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lsock.bind(path)
        self.lsock.listen(4)
        self.conn: socket.socket | None = None
        self.got_irq = threading.Event()
        self.torn_down = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.lsock.accept()
        self.conn = conn
        hello = json.dumps({"proto": 1, "page_size": self.page_size,
                            "maps": [{"index": i, "size": s} for i, s in enumerate(self.sizes)]}).encode()
        fds = array.array("i", [self.efd, *self.memfds])
        conn.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        while True:
            data = conn.recv(64)
            if not data:
                return
            if data.startswith(b"{"):
                assert json.loads(data) == {"op": "close"}
                time.sleep(0.05)              # the teardown takes a while ...
                self.torn_down = True         # ... and is complete before the answer
                conn.send(json.dumps({"event": "closed"}).encode())
                return
            self.irq.append(struct.unpack("<I", data)[0])
            self.got_irq.set()

    def interrupt(self, n: int = 1) -> None:
        os.eventfd_write(self.efd, n)

    def rescind(self) -> None:
        assert self.conn is not None
        self.conn.send(json.dumps({"event": "rescind"}).encode())

    def close(self) -> None:
        if self.conn:
            self.conn.close()
        self.lsock.close()
        for fd in self.memfds:
            os.close(fd)
        os.close(self.efd)


@pytest.fixture
def server(tmp_path):
    s = FakeSimServer(str(tmp_path / "uio0"), [2 * 69632, 4096, 4096])
    yield s
    s.close()


def test_sim_endpoint_hello_maps_and_shared_memory(server):
    ep = open_endpoint(server.path)
    assert isinstance(ep, SimEndpoint)
    assert ep.page_size == 4096
    mm = ep.map(0, 2 * 69632)
    mm[100:105] = b"hello"
    # the server's memfd sees the guest's write: same memory
    assert os.pread(server.memfds[0], 5, 100) == b"hello"
    with pytest.raises(ConfigError):
        ep.map(1, 8192)          # larger than the map
    with pytest.raises(NotFound):
        ep.map(7, 4096)
    mm.close()
    ep.close()


def test_sim_endpoint_interrupts_accumulate_and_coalesce(server):
    ep = open_endpoint(server.path)
    assert ep.wait(0.01) is None
    server.interrupt()
    server.interrupt()
    assert ep.wait(1.0) == 2          # cumulative count, both coalesced into one wake-up
    server.interrupt()
    assert ep.wait(1.0) == 3
    ep.close()


def test_sim_endpoint_irqcontrol_and_signal_fd(server):
    ep = open_endpoint(server.path)
    ep.irqcontrol(1)
    assert server.got_irq.wait(1)
    server.got_irq.clear()
    # the native signal path writes the same 4 bytes to signal_fd
    assert ep.signal_fd_is_socket
    socket.socket(fileno=os.dup(ep.signal_fd)).send(struct.pack("<I", 1))
    assert server.got_irq.wait(1)
    assert server.irq == [1, 1]
    ep.close()


def test_sim_endpoint_rescind_is_channel_revoked(server):
    ep = open_endpoint(server.path)
    server.rescind()
    with pytest.raises(ChannelRevoked, match="rescinded"):
        ep.wait(1.0)
    assert ep.revoked
    with pytest.raises(ChannelRevoked):
        ep.irqcontrol(1)
    ep.close()


def test_sim_endpoint_server_gone_is_channel_revoked(server):
    ep = open_endpoint(server.path)
    server.thread.join(0.1)
    assert server.conn is not None
    server.conn.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ChannelRevoked):
        ep.wait(1.0)
    ep.close()


def test_sim_endpoint_rejects_other_protocol(tmp_path):
    path = str(tmp_path / "uio9")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ls.bind(path)
    ls.listen(1)

    def serve():
        c, _ = ls.accept()
        c.send(json.dumps({"proto": 99, "page_size": 4096, "maps": []}).encode())
        c.recv(1)
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(ConfigError, match="protocol 99"):
        SimEndpoint(path)
    ls.close()


def test_open_endpoint_picks_by_file_kind(tmp_path):
    with pytest.raises(NotFound, match="uio_hv_generic"):
        open_endpoint(tmp_path / "missing")
    regular = tmp_path / "file"
    regular.write_bytes(b"")
    with pytest.raises(ConfigError, match="neither"):
        open_endpoint(regular)


def test_uio_endpoint_on_a_character_device():
    """The real-uio class against /dev/zero: a char device that maps, reads and writes."""
    ep = open_endpoint("/dev/zero")
    assert isinstance(ep, UioEndpoint)
    assert ep.page_size == os.sysconf("SC_PAGE_SIZE")
    mm = ep.map(0, 4096)
    assert len(mm) == 4096
    mm.close()
    assert ep.wait(0.1) == 0              # 4-byte read = event count (zeros here)
    ep.irqcontrol(1)                      # 4-byte write accepted
    assert not ep.signal_fd_is_socket and ep.signal_fd == ep.fileno()
    ep.close()


def test_sim_endpoint_close_returns_after_the_teardown(server):
    """close() of a real uio fd tears the channel down before returning; so does ours."""
    ep = open_endpoint(server.path)
    ep.close()
    assert server.torn_down


def test_sim_endpoint_reset_before_hello_is_channel_revoked(tmp_path):
    """The simulator drops a connection before its hello (the device is being rescinded: a
    daemon's reattach that came too early): ChannelRevoked (a UvmbusError the reattach loop
    retries on), not a bare ConnectionResetError that kills the daemon; no fd leaks."""
    path = str(tmp_path / "uio0")
    before = len(os.listdir("/proc/self/fd"))
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(4)
    got: list[BaseException] = []

    def opener() -> None:
        try:
            SimEndpoint(path, connect_timeout=10.0)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=opener)
    t.start()
    r, _, _ = select.select([lsock], [], [], 10.0)       # the connection is queued, not accepted
    assert r, "the endpoint never connected"
    lsock.close()                                        # resets the queued connection
    t.join(10.0)
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], ChannelRevoked), got
    assert "closed the endpoint while it was being opened" in str(got[0])
    assert len(os.listdir("/proc/self/fd")) == before

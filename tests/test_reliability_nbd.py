"""NBD errno mapping of the nbdkit plugin (issue 12.5): every failure of the transport to the
export daemon reaches the NBD client as ESHUTDOWN (EIO for errors the daemon reports), never
as the socket's own errno (ECONNRESET, EPIPE...), which nbdkit turns into EINVAL."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uvmbus.services import nbdplugin as P


class FakeNbdkit(types.SimpleNamespace):
    FLAG_FUA = 1
    FLAG_MAY_TRIM = 2
    THREAD_MODEL_SERIALIZE_REQUESTS = 2

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[int] = []

    def set_error(self, code: int) -> None:
        self.errors.append(code)


@pytest.fixture
def nbdkit(monkeypatch: pytest.MonkeyPatch) -> FakeNbdkit:
    fake = FakeNbdkit()
    monkeypatch.setattr(P, "nbdkit", fake)
    return fake


def _daemon(path: Path, behaviour: Callable[[socket.socket], None]) -> Iterator[None]:
    """A fake export daemon: answers HELLO, then does ``behaviour`` with the next request."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            P.recv_exact(conn, P.REQ.size)
            hello = b'{"size": 1048576}'
            conn.sendall(P.REP.pack(0, len(hello)) + hello)
            behaviour(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        srv.close()
        t.join(5)


def _reset(conn: socket.socket) -> None:        # the daemon dies mid-request (RST)
    P.recv_exact(conn, P.REQ.size)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _eof(conn: socket.socket) -> None:          # closes after reading the request
    P.recv_exact(conn, P.REQ.size)


def _half_reply(conn: socket.socket) -> None:   # dies in the middle of its reply
    P.recv_exact(conn, P.REQ.size)
    conn.sendall(P.REP.pack(0, 4096) + bytes(100))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _eio(conn: socket.socket) -> None:          # the daemon reports a device error
    P.recv_exact(conn, P.REQ.size)
    msg = b"device rescinded"
    conn.sendall(P.REP.pack(errno.EIO, len(msg)) + msg)


@pytest.mark.parametrize("behaviour,expected", [
    (_reset, errno.ESHUTDOWN), (_eof, errno.ESHUTDOWN), (_half_reply, errno.ESHUTDOWN),
    (_eio, errno.EIO)])
def test_transport_failures_map_to_eshutdown(tmp_path: Path, nbdkit: FakeNbdkit,
                                             behaviour: Callable[[socket.socket], None],
                                             expected: int) -> None:
    path = tmp_path / "ipc"
    for _ in _daemon(path, behaviour):
        h = P.Client(str(path), timeout=10)
        with pytest.raises(OSError):
            P.pread(h, bytearray(4096), 0, 0)
        # later requests on the broken connection fail the same way (EPIPE/EBADF locally)
        if expected == errno.ESHUTDOWN:
            with pytest.raises(OSError):
                P.pwrite(h, b"x" * 512, 0, 0)
            with pytest.raises(OSError):
                P.flush(h, 0)
        h.close()
    assert nbdkit.errors and all(e == expected for e in nbdkit.errors), nbdkit.errors
    assert errno.EINVAL not in nbdkit.errors


def test_open_without_a_daemon_is_not_einval(tmp_path: Path, nbdkit: FakeNbdkit,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_ipc_path", str(tmp_path / "missing"))
    with pytest.raises(OSError):
        P.open(False)
    assert nbdkit.errors == [errno.ESHUTDOWN]


def _refuse_hello(path: Path) -> Iterator[None]:
    """A fake export daemon whose device is gone: every HELLO is answered EIO."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                P.recv_exact(conn, P.REQ.size)
                msg = b"the device is gone (rescinded); waiting for a re-offer"
                conn.sendall(P.REP.pack(errno.EIO, len(msg)) + msg)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


def test_refused_open_is_one_clear_error(tmp_path: Path, nbdkit: FakeNbdkit,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_ipc_path", str(tmp_path / "ipc"))
    for _ in _refuse_hello(tmp_path / "ipc"):
        with pytest.raises(P.ConnectionRefusedByExport) as ei:
            P.open(False)
    assert str(ei.value) == ("new NBD connection refused by the export daemon: the device is gone "
                             "(rescinded); waiting for a re-offer")
    assert ei.value.__cause__ is None and ei.value.__suppress_context__
    assert nbdkit.errors == [errno.EIO]


def test_real_nbdkit_logs_one_line_per_refused_connection(tmp_path: Path) -> None:
    """Under nbdkit, a refused handshake logs one line naming the cause, no traceback."""
    import shutil
    import subprocess
    import time

    if shutil.which("nbdkit") is None or shutil.which("nbdinfo") is None:
        pytest.skip("nbdkit / nbdinfo not installed (.ci/install-deps)")
    if subprocess.run(["nbdkit", "--dump-plugin", "python"], capture_output=True).returncode != 0:
        pytest.skip("nbdkit python plugin not installed (nbdkit-plugin-python)")
    ipc, nbd = tmp_path / "ipc", tmp_path / "nbd"
    for _ in _refuse_hello(ipc):
        err = tmp_path / "nbdkit.err"
        with open(err, "w") as ef:
            proc = subprocess.Popen(["nbdkit", "-f", "-U", str(nbd), "python", P.__file__, f"ipc={ipc}"],
                                    stderr=ef)
        try:
            deadline = time.monotonic() + 30
            while not nbd.exists():
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
                time.sleep(0.05)
            r = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={nbd}"], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode != 0
        finally:
            proc.terminate()
            proc.wait(20)
    lines = [ln for ln in err.read_text().splitlines() if ln.strip()]
    assert lines, "nbdkit logged nothing"
    assert all("open: error: ConnectionRefusedByExport: new NBD connection refused by the export "
               "daemon: the device is gone" in ln for ln in lines), lines
    assert "Traceback" not in err.read_text()

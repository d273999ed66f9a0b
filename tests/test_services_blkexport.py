"""The export daemon's request mapping against an in-memory disk: unaligned reads/writes
(read-modify-write of edge blocks), trim of whole blocks only, zeroes, FUA and flush
forwarding, errors as errno; plus the IPC protocol through a real socket."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uvmbus.errors import DataProtect, MediumError
from uvmbus.services import nbdplugin as P
from uvmbus.services.blkexport import BlockExport, ExportOptions

pytestmark = pytest.mark.timeout(120)

BS = 512
SIZE = 64 * BS


class MemDisk:
    """Block-granular disk: refuses unaligned I/O like uvmbus.storvsc.Disk."""

    def __init__(self, size=SIZE, bs=BS, unmap=True):
        self.data = bytearray(bytes((i * 7) & 0xFF for i in range(size)))
        self.size, self.block_size, self.unmap_supported = size, bs, unmap
        self.calls: list[tuple] = []
        self.gone = False
        self.fail_read = False

    def _chk(self, off, n):
        assert off % self.block_size == 0 and n % self.block_size == 0, (off, n)
        assert 0 <= off and off + n <= self.size

    def read(self, off, n):
        self._chk(off, n)
        if self.fail_read:
            raise MediumError("unrecoverable read error", sense_key=3)
        self.calls.append(("read", off, n))
        return bytes(self.data[off:off + n])

    def write(self, off, data, *, fua=False):
        self._chk(off, len(data))
        self.calls.append(("write", off, len(data), fua))
        self.data[off:off + len(data)] = data

    def flush(self):
        self.calls.append(("flush",))

    def discard(self, off, n):
        self._chk(off, n)
        self.calls.append(("discard", off, n))
        self.data[off:off + n] = bytes(n)


def export(disk=None, readonly=False) -> BlockExport:
    e = BlockExport(ExportOptions(device="d", readonly=readonly), daemon=None)  # type: ignore[arg-type]
    e.disk = disk or MemDisk()
    return e


@settings(max_examples=300, deadline=None)
@given(off=st.integers(0, SIZE - 1), n=st.integers(0, 5 * BS), fua=st.booleans(), seed=st.integers(0, 255))
def test_unaligned_writes_and_reads_match_a_byte_model(off, n, fua, seed):
    n = min(n, SIZE - off)
    e = export()
    model = bytearray(e.disk.data)
    data = bytes((seed + i) & 0xFF for i in range(n))
    e._execute(P.OP_WRITE, P.F_FUA if fua else 0, n, off, data)
    model[off:off + n] = data
    assert e.disk.data == model
    assert all(c[3] == fua for c in e.disk.calls if c[0] == "write")
    assert e._execute(P.OP_READ, 0, n, off, b"") == bytes(model[off:off + n])


def test_aligned_write_needs_no_read():
    e = export()
    e._execute(P.OP_WRITE, 0, 2 * BS, BS, b"z" * 2 * BS)
    assert e.disk.calls == [("write", BS, 2 * BS, False)]


def test_single_block_rmw_reads_it_once():
    e = export()
    e._execute(P.OP_WRITE, 0, 10, BS + 5, b"q" * 10)
    assert [c for c in e.disk.calls if c[0] == "read"] == [("read", BS, BS)]


def test_trim_only_whole_blocks_and_fua_flushes():
    e = export()
    e._execute(P.OP_TRIM, P.F_FUA, 3 * BS, 100, b"")
    assert ("discard", BS, 2 * BS) in e.disk.calls and e.disk.calls[-1] == ("flush",)
    e.disk.calls.clear()
    e._execute(P.OP_TRIM, 0, 100, 10, b"")                       # no whole block inside: no-op
    assert e.disk.calls == []


def test_zero_and_flush():
    e = export()
    e._execute(P.OP_ZERO, 0, 3000, 700, b"")
    assert e.disk.data[700:3700] == bytes(3000)
    assert e.disk.data[699] == (699 * 7) & 0xFF and e.disk.data[3700] == (3700 * 7) & 0xFF   # edges kept
    e._execute(P.OP_FLUSH, 0, 0, 0, b"")
    assert e.disk.calls[-1] == ("flush",)


def test_readonly_and_bounds():
    e = export(readonly=True)
    with pytest.raises(DataProtect):
        e._execute(P.OP_WRITE, 0, BS, 0, bytes(BS))
    e = export()
    with pytest.raises(ValueError):
        e._execute(P.OP_READ, 0, BS, SIZE, b"")


def test_trim_unsupported():
    from uvmbus.errors import StorageError

    e = export(MemDisk(unmap=False))
    with pytest.raises(StorageError):
        e._execute(P.OP_TRIM, 0, BS, 0, b"")


def test_ipc_round_trip_and_errno(tmp_path: Path):
    """The plugin's client against the daemon's serving code over a real Unix socket."""

    class D:
        def beat(self, name):
            pass

    e = export()
    e.daemon = D()  # type: ignore[assignment]
    e._device_id = "dev"
    e.start_ipc(tmp_path)
    assert oct(e.ipc_path.stat().st_mode & 0o777) == "0o600"
    t = threading.Thread(target=e.io_loop, daemon=True)
    t.start()
    try:
        c = P.Client(str(e.ipc_path), timeout=10)
        assert c.info["size"] == SIZE and c.info["block_size"] == BS and c.info["can_trim"]
        c.call(P.OP_WRITE, 3, data=b"hello")
        assert c.call(P.OP_READ, 0, 10) == bytes(e.disk.data[:10]) and e.disk.data[3:8] == b"hello"
        big = bytes(range(256)) * 1024                            # > 64 KiB reply path
        c.call(P.OP_WRITE, 0, data=big[:SIZE])
        assert c.call(P.OP_READ, 0, SIZE) == big[:SIZE]
        e.disk.fail_read = True
        with pytest.raises(OSError) as ei:
            c.call(P.OP_READ, 0, BS)
        assert ei.value.errno == errno.EIO and "unrecoverable" in str(ei.value)
        assert e.ops["read"].errors == 1
        c.close()
    finally:
        e.stop_io()
        t.join(5)
    assert not t.is_alive()

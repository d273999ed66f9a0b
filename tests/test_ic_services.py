"""The IC services on hand-built host messages: heartbeat, shutdown, time sync, KVP (pool files in
hv_kvp_daemon's format), file copy (hv_fcopy_uio_daemon's behaviour, traversal refused)."""

from __future__ import annotations

import os
import struct

import pytest
from ichelpers import ic_packet, negotiate_body, reply_fields, u16

from uvmbus.ic import wire
from uvmbus.ic.fcopy import FcopyService
from uvmbus.ic.heartbeat import HeartbeatService
from uvmbus.ic.kvp import IpInfo, KvpPools, KvpService
from uvmbus.ic.shutdown import ShutdownService
from uvmbus.ic.timesync import WLTIMEDELTA, TimeSyncService

S_OK, E_FAIL = 0, 0x80004005


def status(reply) -> int:
    return reply_fields(reply.data)["status"]


def negotiate(svc, fw=((3, 0),), msg=None):
    msg = msg or svc.message_versions
    r = svc.handle(ic_packet(0, negotiate_body(list(fw), list(msg))))
    assert status(r) == S_OK


# ---- heartbeat -----------------------------------------------------------------------------------

def test_heartbeat_increments_and_keeps_the_rest():
    s = HeartbeatService()
    body = struct.pack("<Q", 41) + bytes(range(32))
    r = s.handle(ic_packet(1, body))
    assert status(r) == S_OK
    assert struct.unpack_from("<Q", r.data, 28)[0] == 42 and r.data[36:] == bytes(range(32))
    r = s.handle(ic_packet(1, struct.pack("<Q", 2**64 - 1)))      # wraps
    assert struct.unpack_from("<Q", r.data, 28)[0] == 0


# ---- shutdown ------------------------------------------------------------------------------------

def shutdown_msg(flags: int, text: bytes = b"bye") -> bytes:
    return ic_packet(3, struct.pack("<III", 0x80000000, 0, flags) + text.ljust(2048, b"\0"))


@pytest.mark.parametrize("flags,action", [(0, "poweroff"), (1, "poweroff"), (2, "reboot"),
                                          (3, "reboot"), (4, "hibernate"), (5, "hibernate")])
def test_shutdown_actions_after_the_reply(flags, action):
    got = []
    s = ShutdownService(got.append, can_hibernate=lambda: True)
    r = s.handle(shutdown_msg(flags))
    assert status(r) == S_OK and got == []          # nothing happens before the reply is sent
    r.after()
    assert got[0].action == action and got[0].force == bool(flags & 1) and got[0].message == "bye"


def test_shutdown_refusals():
    got = []
    s = ShutdownService(got.append, can_hibernate=lambda: False)
    assert status(s.handle(shutdown_msg(4))) == E_FAIL
    assert status(s.handle(shutdown_msg(8))) == E_FAIL
    assert s.handle(ic_packet(3, bytes(100))) is None             # truncated: dropped (Linux)
    assert got == []


# ---- time sync -----------------------------------------------------------------------------------

def test_timesync_v4_offset():
    got = []
    s = TimeSyncService(got.append, clock=lambda: 1000.0)
    negotiate(s, msg=[(4, 0)])
    ft = int(1010.5 * 1e7) + WLTIMEDELTA
    r = s.handle(ic_packet(4, struct.pack("<QQBBB3s", ft, 0, 1, 0, 0, b"")))
    assert status(r) == S_OK
    r.after()
    assert got[0].offset == pytest.approx(10.5) and got[0].kind == "sync"


def test_timesync_v3_layout():
    s = TimeSyncService(clock=lambda: 50.0)
    negotiate(s, msg=[(3, 0)])
    ft = int(49.0 * 1e7) + WLTIMEDELTA
    r = s.handle(ic_packet(4, struct.pack("<QQQB", ft, 0, 0, 2)))
    assert status(r) == S_OK and s.last.offset == pytest.approx(-1.0) and s.last.kind == "sample"
    assert s.handle(ic_packet(4, bytes(10))) is None


# ---- KVP -----------------------------------------------------------------------------------------

def kvp_value(key: str, value: str | None = None, vtype: int = 1, raw: bytes | None = None) -> bytes:
    k = key.encode("utf-16-le") + b"\0\0"
    v = raw if raw is not None else (b"" if value is None else value.encode("utf-16-le") + b"\0\0")
    return struct.pack("<III", vtype, len(k), len(v)) + k.ljust(512, b"\0") + v.ljust(2048, b"\0")


def kvp(op: int, pool: int, rest: bytes) -> bytes:
    return ic_packet(2, struct.pack("<BBH", op, pool, 0) + rest)


@pytest.fixture
def kvps(tmp_path):
    info = IpInfo(["10.0.0.5", "fd00::5"], ["255.255.255.0", "64"], ["10.0.0.1"], ["10.0.0.53"], True)
    return KvpService(KvpPools(tmp_path), root=tmp_path, ip_info=lambda mac: info if mac in (None, "00:15:5D:00:00:01") else None)


def test_kvp_set_get_delete_enumerate_and_file_format(kvps, tmp_path):
    assert status(kvps.handle(kvp(1, 0, kvp_value("Name", "välue")))) == S_OK
    assert status(kvps.handle(kvp(1, 0, kvp_value("Num", raw=struct.pack("<I", 7), vtype=4)))) == S_OK
    r = kvps.handle(kvp(0, 0, kvp_value("Name")))
    assert status(r) == S_OK
    vsize = struct.unpack_from("<I", r.data, 28 + 4 + 8)[0]
    assert r.data[28 + 4 + 12 + 512:28 + 4 + 12 + 512 + vsize] == "välue".encode("utf-16-le") + b"\0\0"
    # hv_kvp_daemon's record format: key[512] value[2048], UTF-8, NUL padded
    raw = (tmp_path / ".kvp_pool_0").read_bytes()
    assert len(raw) == 2 * 2560 and raw[:5] == b"Name\0" and raw[512:519] == "välue".encode() + b"\0"
    assert raw[2560:2564] == b"Num\0" and raw[2560 + 512:2560 + 514] == b"7\0"
    r = kvps.handle(kvp(3, 0, struct.pack("<I", 1) + kvp_value("")))
    assert status(r) == S_OK
    assert status(kvps.handle(kvp(3, 0, struct.pack("<I", 2) + kvp_value("")))) == wire.Status.S_CONT
    d = "Name".encode("utf-16-le") + b"\0\0"
    assert status(kvps.handle(kvp(2, 0, struct.pack("<I", len(d)) + d.ljust(512, b"\0")))) == S_OK
    assert status(kvps.handle(kvp(0, 0, kvp_value("Name")))) == E_FAIL
    assert KvpPools(tmp_path).records(0) == [("Num", "7")]


def test_kvp_auto_pool_and_ip_query(kvps):
    r = kvps.handle(kvp(3, 2, struct.pack("<I", 2) + kvp_value("")))
    ks = struct.unpack_from("<I", r.data, 28 + 8 + 4)[0]
    assert r.data[28 + 20:28 + 20 + ks - 2].decode("utf-16-le") == "NetworkAddressIPv4"
    ip = bytearray(struct.pack("<BB", 4, 0) + bytes(wire.sizeof("ic_kvp_ipaddr_value")))
    ip[2:258] = u16("00:15:5D:00:00:01", 128)
    r = kvps.handle(ic_packet(2, bytes(ip)))
    assert status(r) == S_OK
    off = 28 + 2 + wire.offsetof("ic_kvp_ipaddr_value", "ip_addr")
    assert r.data[off:off + 2048].decode("utf-16-le").rstrip("\0") == "10.0.0.5;fd00::5"
    assert r.data[28 + 2 + wire.offsetof("ic_kvp_ipaddr_value", "dhcp_enabled")] == 1
    ip[2:258] = u16("00:15:5D:99:99:99", 128)
    assert status(kvps.handle(ic_packet(2, bytes(ip)))) == E_FAIL


@pytest.mark.parametrize("bad", ["key_too_big", "odd", "no_nul", "value_too_big", "pool", "short"])
def test_kvp_hostile_sizes(kvps, tmp_path, bad):
    body = bytearray(kvp_value("k", "v"))
    pool = 0
    if bad == "key_too_big":
        struct.pack_into("<I", body, 4, 514)
    elif bad == "odd":
        struct.pack_into("<I", body, 4, 3)
    elif bad == "no_nul":
        body[12:12 + 512] = b"A\0" * 256
        struct.pack_into("<I", body, 4, 512)
    elif bad == "value_too_big":
        struct.pack_into("<I", body, 8, 4096)
    elif bad == "pool":
        pool = 9
    elif bad == "short":
        body = body[:100]
    assert status(kvps.handle(kvp(1, pool, bytes(body)))) == E_FAIL
    assert not (tmp_path / ".kvp_pool_0").exists() or KvpPools(tmp_path).records(0) == []


# ---- fcopy -----------------------------------------------------------------------------------------

def fcopy_start(name: str | bytes, path: str | bytes, flags: int = 0, size: int = 0) -> bytes:
    fn = name if isinstance(name, bytes) else u16(name, 260)
    pn = path if isinstance(path, bytes) else u16(path, 260)
    return ic_packet(7, struct.pack("<I", 0) + bytes(32) + fn + pn + struct.pack("<IQ", flags, size))


def fcopy_write(offset: int, data: bytes) -> bytes:
    return ic_packet(7, struct.pack("<I", 1) + bytes(32) + struct.pack("<IQI", 0, offset, len(data))
                     + data.ljust(6144, b"\0"))


def fcopy_op(op: int) -> bytes:
    return ic_packet(7, struct.pack("<I", op) + bytes(32))


def copy(svc, name, path, data, flags=2):
    sts = [status(svc.handle(fcopy_start(name, path, flags, len(data))))]
    if sts[0] != S_OK:
        return sts
    for off in range(0, len(data), 6144):
        sts.append(status(svc.handle(fcopy_write(off, data[off:off + 6144]))))
    sts.append(status(svc.handle(fcopy_op(2))))
    return sts


def test_fcopy_copies_content_and_mode(tmp_path):
    s = FcopyService(tmp_path)
    negotiate(s, msg=[(1, 1)])
    data = os.urandom(20000)
    assert copy(s, "f.bin", "/tmp/in", data) == [S_OK] * 6
    p = tmp_path / "tmp/in/f.bin"
    assert p.read_bytes() == data and (p.stat().st_mode & 0o777) == 0o744
    assert (tmp_path / "tmp").stat().st_mode & 0o777 == 0o755
    assert [e.name for e in (tmp_path / "tmp/in").iterdir()] == ["f.bin"]    # no temp file left


def test_fcopy_flags_like_the_uio_daemon(tmp_path):
    s = FcopyService(tmp_path)
    assert copy(s, "a", "/missing", b"x", flags=0) == [E_FAIL]                 # no CREATE_PATH
    assert copy(s, "a", "/d", b"one", flags=2)[-1] == S_OK
    assert copy(s, "a", "/d", b"two", flags=2) == [wire.Status.ALREADY_EXISTS]  # no OVER_WRITE
    assert (tmp_path / "d/a").read_bytes() == b"one"
    assert copy(s, "a", "/d", b"three", flags=3)[-1] == S_OK
    assert (tmp_path / "d/a").read_bytes() == b"three"


def test_fcopy_cancel_keeps_the_old_file(tmp_path):
    s = FcopyService(tmp_path)
    (tmp_path / "keep").write_bytes(b"precious")
    assert status(s.handle(fcopy_start("keep", "/", 1, 10))) == S_OK
    assert status(s.handle(fcopy_write(0, b"partial"))) == S_OK
    assert status(s.handle(fcopy_op(3))) == S_OK
    assert (tmp_path / "keep").read_bytes() == b"precious"
    assert sorted(e.name for e in tmp_path.iterdir()) == ["keep"]
    assert status(s.handle(fcopy_write(0, b"x"))) == E_FAIL                  # no copy in progress
    assert status(s.handle(fcopy_op(2))) == E_FAIL


@pytest.mark.parametrize("name,path", [
    ("x", "/../../etc"), ("x", "/a/../../b"), ("../x", "/"), ("a/b", "/"), ("..", "/"), ("", "/"),
    ("x", "\\..\\..\\etc"),
])
def test_fcopy_traversal_refused(tmp_path, name, path):
    root = tmp_path / "root"
    root.mkdir()
    s = FcopyService(root)
    assert copy(s, name, path, b"evil", flags=3) == [E_FAIL]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fcopy_symlinks_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "flink").symlink_to(outside / "target")
    s = FcopyService(root)
    assert copy(s, "x", "/link", b"evil", flags=3) == [E_FAIL]
    assert copy(s, "flink", "/", b"evil", flags=3) == [E_FAIL]
    assert list(outside.iterdir()) == []


def test_fcopy_hostile_names_and_sizes(tmp_path):
    s = FcopyService(tmp_path)
    no_nul = ("A" * 260).encode("utf-16-le")
    assert copy(s, no_nul, "/", b"x") == [E_FAIL]                               # oversized name
    assert copy(s, "x", no_nul, b"x") == [E_FAIL]
    assert copy(s, b"\x00\xd8\x00\x00".ljust(520, b"\0"), "/", b"x") == [E_FAIL]  # lone surrogate
    assert copy(s, "ok", "/", b"") == [S_OK, S_OK]
    assert status(s.handle(fcopy_start("big", "/", 2))) == S_OK
    w = bytearray(fcopy_write(0, b"x"))
    struct.pack_into("<I", w, 28 + 48, 7000)                                   # size > 6144
    assert status(s.handle(bytes(w))) == E_FAIL
    assert s.handle(fcopy_write(0, b"x")[:40]) is None                         # truncated: dropped
    assert list(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ok"]
    s.close()
    assert list(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_fcopy_non_ascii_names_kept(tmp_path):
    s = FcopyService(tmp_path)
    assert copy(s, "résumé.txt", "/données", b"x")[-1] == S_OK
    assert (tmp_path / "données" / "résumé.txt").read_bytes() == b"x"


def test_kvp_pool_file_read_by_another_reader_while_locked(tmp_path):
    pools = KvpPools(tmp_path)
    for i in range(50):
        pools.set(1, f"k{i}", "v" * i)
    assert len(pools.records(1)) == 50 and pools.get(1, "k49") == "v" * 49
    assert pools.delete(1, "k0") and not pools.delete(1, "k0")
    assert (tmp_path / ".kvp_pool_1").stat().st_size == 49 * 2560


def test_timesync_chrony_socket_gets_sock_samples(tmp_path):
    """--timesync chrony:PATH: chronyd's SOCK refclock format (timeval, offset, pulse, leap,
    pad, magic 0x534f434b)."""
    import socket

    path = str(tmp_path / "chrony.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(5)
    s = TimeSyncService(f"chrony:{path}", clock=lambda: 1000.25)
    negotiate(s, msg=[(4, 0)])
    ft = int(1003.25 * 1e7) + WLTIMEDELTA
    r = s.handle(ic_packet(4, struct.pack("<QQBBB3s", ft, 0, 2, 0, 0, b"")))
    r.after()
    sec, usec, offset, pulse, leap, _pad, magic = struct.unpack("<qqdiiii", srv.recv(64))
    assert (sec, usec, pulse, leap, magic) == (1000, 250000, 0, 0, 0x534F434B)
    assert offset == pytest.approx(3.0)
    srv.close()


def test_timesync_apply_spec_errors():
    from uvmbus.errors import ConfigError
    with pytest.raises(ConfigError, match="adjtimex or chrony"):
        TimeSyncService("ntp")


def test_hibernate_support_read_under_root(tmp_path):
    from uvmbus.ic.shutdown import hibernate_supported
    assert not hibernate_supported(tmp_path)
    (tmp_path / "sys/power").mkdir(parents=True)
    (tmp_path / "sys/power/state").write_text("freeze mem disk\n")
    (tmp_path / "sys/power/disk").write_text("[platform] shutdown reboot\n")
    assert hibernate_supported(tmp_path)
    (tmp_path / "sys/power/disk").write_text("[disabled]\n")
    assert not hibernate_supported(tmp_path)

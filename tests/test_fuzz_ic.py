"""Hostile-host fuzzing of the IC services: whatever bytes the host sends, ``handle`` returns
None (dropped) or a reply of exactly the request's length with TRANSACTION|RESPONSE set — it
never raises; fcopy never creates anything outside its target root; KVP never writes a record
the pool format cannot hold.  Example counts: ``UVMBUS_FUZZ_FAST`` (see test_fuzz_ring)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ichelpers import ic_packet, negotiate_body, u16
from test_fuzz_ring import FAST

from uvmbus.ic.fcopy import FcopyService
from uvmbus.ic.framework import negotiate_in_place
from uvmbus.ic.heartbeat import HeartbeatService
from uvmbus.ic.kvp import KEY_SIZE, RECORD_SIZE, IpInfo, KvpPools, KvpService
from uvmbus.ic.shutdown import ShutdownService
from uvmbus.ic.timesync import TimeSyncService

pytestmark = pytest.mark.timeout(180)

u16s = st.one_of(st.sampled_from([0, 1, 2, 3, 99, 100, 101, 0xFFFF]), st.integers(0, 0xFFFF))
u32s = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 511, 512, 513, 2047, 2048, 2049, 6144,
                                  6145, 0x7FFFFFFF, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


def message(msgtypes: list[int], body: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A host packet: pipe + icmsg header with hostile fields, a body, cut anywhere."""
    return st.tuples(st.sampled_from(msgtypes), u32s, u16s, st.integers(0, 255), body,
                     st.one_of(st.none(), st.integers(0, 8000))).map(
        lambda t: (struct.pack("<II", 1, t[1]) + struct.pack("<HHHHHHIBBH", 3, 0, t[0], 3, 0, t[2], 0, 0, t[3], 0)
                   + t[4])[:t[5]])


def check_reply(svc, data: bytes) -> None:
    r = svc.handle(data)
    if r is not None:
        assert len(r.data) == len(data) and r.data[25] == 5


def structs(*fields) -> st.SearchStrategy[bytes]:
    return st.tuples(*fields).map(lambda parts: b"".join(parts))


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    for svc in (HeartbeatService(), ShutdownService(lambda r: None, lambda: True), TimeSyncService()):
        check_reply(svc, data)


@FAST
@given(st.lists(st.tuples(u16s, u16s), max_size=8), u16s, u16s, st.integers(0, 64))
def test_negotiate_hostile_counts(versions, fc, mc, cut):
    body = struct.pack("<HHI", fc, mc, 0) + b"".join(struct.pack("<HH", *v) for v in versions)
    buf = bytearray(ic_packet(0, body))[:28 + max(0, len(body) - cut)]
    n = len(buf)
    got = negotiate_in_place(buf, ((3, 0), (1, 0)), ((3, 0), (1, 0)))
    assert len(buf) == n
    if got is not None:
        assert got[0] in ((3, 0), (1, 0)) and struct.unpack_from("<HH", buf, 28) == (1, 1)


@FAST
@given(message([1, 3, 4, 0, 9], st.binary(max_size=2100)))
def test_ic_messages(data):
    for svc in (HeartbeatService(), ShutdownService(lambda r: None, lambda: False), TimeSyncService()):
        check_reply(svc, data)


kvp_value = structs(u32s.map(lambda v: struct.pack("<I", v)), u32s.map(lambda v: struct.pack("<I", v)),
                    u32s.map(lambda v: struct.pack("<I", v)),
                    st.one_of(st.binary(max_size=512), st.text(max_size=300).map(lambda t: u16(t, 256))),
                    st.binary(max_size=2048))
kvp_body = structs(st.integers(0, 7).map(lambda o: bytes([o])), st.integers(0, 6).map(lambda p: bytes([p])),
                   st.binary(min_size=2, max_size=2), st.one_of(kvp_value, structs(
                       u32s.map(lambda v: struct.pack("<I", v)), kvp_value), st.binary(max_size=8000)))


@FAST
@given(st.lists(message([2, 0], kvp_body), min_size=1, max_size=6))
def test_kvp_hostile(tmp_path_factory, msgs):
    d = tmp_path_factory.mktemp("kvp")
    info = IpInfo(["10.0.0.1"], ["255.0.0.0"], [], [], False)
    svc = KvpService(KvpPools(d), root=d, ip_info=lambda mac: info)
    for m in msgs:
        check_reply(svc, m)
    for pool in range(5):
        p = d / f".kvp_pool_{pool}"
        if p.exists():
            assert p.stat().st_size % RECORD_SIZE == 0
            for k, _ in KvpPools(d).records(pool):
                assert len(k.encode()) < KEY_SIZE


names = st.one_of(
    st.sampled_from(["a", "..", ".", "../x", "x/y", "", "/", "\\..\\x", "a" * 259, "a" * 260]),
    st.text(max_size=40)).map(lambda t: (t.encode("utf-16-le", "surrogatepass") + b"\0\0")[:520].ljust(520, b"\0"))
paths = st.one_of(
    st.sampled_from(["/", "/a", "/a/../..", "../../etc", "/a/./b", "//", "/\\../x"]),
    st.text(max_size=40)).map(lambda t: (t.encode("utf-16-le", "surrogatepass") + b"\0\0")[:520].ljust(520, b"\0"))
fcopy_body = st.one_of(
    structs(st.just(struct.pack("<I", 0) + bytes(32)), st.one_of(names, st.binary(min_size=520, max_size=520)),
            paths, u32s.map(lambda v: struct.pack("<I", v & 3 if v < 100 else v)), st.binary(min_size=8, max_size=8)),
    structs(st.just(struct.pack("<I", 1) + bytes(32) + bytes(4)), st.integers(0, 1 << 20).map(lambda v: struct.pack("<Q", v)),
            u32s.map(lambda v: struct.pack("<I", v)), st.binary(max_size=6200)),
    st.sampled_from([2, 3, 4, 0xFFFFFFFF]).map(lambda op: struct.pack("<I", op) + bytes(32)),
    st.binary(max_size=1200))


@FAST
@given(st.lists(message([7, 0], fcopy_body), min_size=1, max_size=8))
def test_fcopy_hostile_stays_in_root(tmp_path_factory, msgs):
    top = tmp_path_factory.mktemp("fc")
    root = top / "root"
    root.mkdir()
    svc = FcopyService(root)
    negotiate_in_place(bytearray(ic_packet(0, negotiate_body([(3, 0)], [(1, 1)]))), ((3, 0),), ((1, 1),))
    for m in msgs:
        check_reply(svc, m)
    svc.close()
    outside = [p for p in top.rglob("*") if root not in p.parents and p != root]
    assert outside == []
    assert not [p for p in root.rglob(".*uvmbus-fcopy*")]       # no temp file left after close

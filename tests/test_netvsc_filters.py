"""Filters, MAC address change and host statistics (issue 14.4): the netvsc driver against the
NetVSP model, with the values pinned from the sources, not from either side's code:

* packet filter values: Linux ``rndis_set_multicast`` / ``rndis_filter_open_device``
  (PROMISCUOUS 0x20 alone; DIRECTED|ALL_MULTICAST|BROADCAST 0x0D; DIRECTED|BROADCAST 0x09);
  an unchanged filter is not sent again (``rndis_filter_set_packet_filter``);
* MAC change: Linux ``rndis_filter_set_device_mac`` (OID_GEN_RNDIS_CONFIG_PARAMETER,
  "NetworkAddress", 12 hex digits in UTF-16, a 72-byte info buffer); the reference host
  (OpenVMM ``oid_set_rndis_config_parameter``) accepts and ignores it, limits name and value to
  255 bytes;
* OpenVMM ``handle_oid_set`` has no OID_802_3_MULTICAST_LIST (NOT_SUPPORTED) and
  ``handle_oid_query`` answers only the three OID_802_3 error counters (0).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim

import uvmbus.netvsc as nv
from uvmbus.errors import ConfigError, MacChangeRefused, RequestFailed
from uvmbus.netvsc import protocol as P

pytestmark = pytest.mark.timeout(180)

REF, APPLY, REFUSE, COUNTERS = range(4)


@pytest.fixture(scope="module")
def fsim(tmp_path_factory) -> Any:
    args = ["--echo", "0", "--no-ic",
            "--device", "netvsc:backend=loopback",
            "--device", "netvsc:backend=loopback,mac_change=apply",
            "--device", "netvsc:backend=loopback,mac_change=refuse",
            "--device", "netvsc:backend=loopback,stats=counters"]
    with run_sim(tmp_path_factory.mktemp("nvflt"), *args) as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield sim


def dev(sim: SimProcess, index: int) -> str:
    return sim.device("netvsc", index)["device_id"]


def host(sim: SimProcess, device: str) -> dict[str, Any]:
    return sim.device_stats(device)["netvsp"]


def frame(i: int, dst: bytes = b"\xff" * 6) -> bytes:
    return dst + b"\x02\x00\x00\x00\x00\x07" + b"\x08\x00" + i.to_bytes(4, "little") + bytes(60)


def test_kernel_filter_values():
    # L-r rndis_set_multicast, bit values from §4.5 (DIRECTED 1, ALL_MULTICAST 4, BROADCAST 8,
    # PROMISCUOUS 0x20)
    assert P.kernel_filter(promiscuous=False, all_multicast=False, multicast=False) == 0x09
    assert P.kernel_filter(promiscuous=False, all_multicast=True, multicast=False) == 0x0D
    assert P.kernel_filter(promiscuous=False, all_multicast=False, multicast=True) == 0x0D
    assert P.kernel_filter(promiscuous=True, all_multicast=True, multicast=True) == 0x20
    assert P.filter_names(0x2D) == ["directed", "all-multicast", "broadcast", "promiscuous"]
    assert P.filter_names(0x100) == ["0x100"]


def test_mac_parameter_layout_matches_linux():
    info = P.mac_config_parameter(bytes.fromhex("02AABBCCDDEE"))
    assert len(info) == 20 + 2 * 14 + 4 * 6                  # Linux extlen
    name_off, name_len, ptype, val_off, val_len = struct.unpack_from("<5I", info)
    assert (name_off, name_len, ptype, val_off, val_len) == (20, 28, 2, 48, 24)
    assert info[20:48].decode("utf-16-le") == "NetworkAddress"
    assert info[48:].decode("utf-16-le") == "02aabbccddee"     # %pm: lowercase, no separators


def test_filter_toggles_reach_the_host_exactly_as_linux_sends_them(fsim):
    d = dev(fsim, REF)
    with nv.open(d, fsim.root) as nic:
        assert host(fsim, d)["filter"] == 0x0D == nic.packet_filter     # open: 0x0D
        before = host(fsim, d)["rndis_requests"]
        nic.set_all_multicast(True)                 # still 0x0D: not sent again (Linux)
        assert host(fsim, d)["rndis_requests"] == before
        nic.set_all_multicast(False)
        assert host(fsim, d)["filter"] == 0x09
        nic.set_promiscuous(True)
        assert host(fsim, d)["filter"] == 0x20
        assert nic.info().packet_filter_names == ["promiscuous"]
        nic.set_multicast_list(["01:00:5e:00:00:01", "33-33-00-00-00-01"])
        assert host(fsim, d)["filter"] == 0x20      # promiscuous wins, list kept
        nic.set_promiscuous(False)
        assert host(fsim, d)["filter"] == 0x0D      # a joined group → ALL_MULTICAST
        info = nic.info()
        assert info.multicast == ["01:00:5e:00:00:01", "33:33:00:00:00:01"]
        assert not info.promiscuous and not info.all_multicast
        nic.set_multicast_list([])
        assert host(fsim, d)["filter"] == 0x09
        # the reference host filters nothing by bits: broadcast and other stations' unicast
        # still loop back with filter 0x09 (netvsc.md §6)
        frames = [frame(1), frame(2, dst=b"\x02\x99\x99\x99\x99\x99"), frame(3, dst=b"\x01\x00\x5e\x00\x00\x09")]
        assert nic.tx_burst(frames, timeout=5) == 3
        got: list[bytes] = []
        for _ in range(200):
            b = nic.rx_burst(0, 16, timeout=0.05)
            got += b.frames()
            b.release()
            if len(got) == 3:
                break
        assert sorted(got) == sorted(frames)
        # a re-initialisation (MTU change) restores the user's filter, not the open default
        nic.set_all_multicast(True)
        nic.set_all_multicast(False)
        nic.set_mtu(1400)
        assert host(fsim, d)["filter"] == 0x09 == nic.packet_filter
    assert host(fsim, d)["filter"] == 0                 # closed: filter 0


def test_bad_filter_arguments_are_refused_before_the_host(fsim):
    with nv.open(dev(fsim, REF), fsim.root) as nic:
        with pytest.raises(ConfigError, match="not a multicast address"):
            nic.set_multicast_list(["02:00:00:00:00:01"])
        with pytest.raises(ConfigError, match="not a MAC address"):
            nic.set_multicast_list(["01:00:5e"])
        with pytest.raises(ConfigError, match="unicast"):
            nic.set_mac("01:00:5e:00:00:01")
        with pytest.raises(ConfigError, match="unicast"):
            nic.set_mac("00:00:00:00:00:00")
        assert nic.info().multicast == []


def test_reference_host_refuses_a_multicast_list(fsim):
    d = dev(fsim, REF)
    with nv.open(d, fsim.root) as nic:
        assert struct.unpack("<I", nic.query(P.OID_802_3_MAXIMUM_LIST_SIZE))[0] == 0
        with pytest.raises(RequestFailed) as ei:
            nic.set(P.OID_802_3_MULTICAST_LIST, bytes.fromhex("01005e000001"))
        assert ei.value.status == P.ST_NOT_SUPPORTED
        lst = nic.query(P.OID_GEN_SUPPORTED_LIST)
        oids = set(struct.unpack(f"<{len(lst) // 4}I", lst))
        assert {P.OID_802_3_MULTICAST_LIST, P.OID_GEN_RNDIS_CONFIG_PARAMETER,
                P.OID_GEN_BYTES_RCV, P.OID_802_3_XMIT_ONE_COLLISION} <= oids


def test_mac_change_on_the_reference_host_is_accepted_but_not_applied(fsim):
    d = dev(fsim, REF)
    with nv.open(d, fsim.root) as nic:
        perm = nic.mac
        with pytest.raises(MacChangeRefused, match="still reports") as ei:
            nic.set_mac("02:00:00:12:34:56")
        assert ei.value.status is None
        assert nic.mac == perm
        h = host(fsim, d)
        assert h["config_params"] == {"NetworkAddress": "020000123456"}
        assert h["current_mac"] == perm


def test_mac_change_where_the_host_allows_it(fsim):
    d = dev(fsim, APPLY)
    with nv.open(d, fsim.root) as nic:
        perm = nic.mac
        nic.set_mac("02:00:00:ab:cd:ef")
        assert nic.mac == "02:00:00:ab:cd:ef" == host(fsim, d)["current_mac"]
        info = nic.info()
        assert info.mac == "02:00:00:ab:cd:ef" and info.permanent_mac == perm
        nic.set_mtu(1400)                       # re-initialisation keeps the user's address
        assert nic.mac == "02:00:00:ab:cd:ef" == host(fsim, d)["current_mac"]
        nic.set_mac(perm)                       # back to the permanent address
        assert host(fsim, d)["current_mac"] == perm
    with nv.open(d, fsim.root) as nic:          # a new session starts with the permanent one
        assert nic.mac == perm


def test_mac_change_refused_by_the_host(fsim):
    d = dev(fsim, REFUSE)
    with nv.open(d, fsim.root) as nic:
        perm = nic.mac
        with pytest.raises(MacChangeRefused, match="MAC address spoofing") as ei:
            nic.set_mac("02:00:00:00:00:42")
        assert ei.value.status == 0xC0000001              # RNDIS_STATUS_FAILURE
        assert nic.mac == perm
        nic.set_promiscuous(True)                         # the session is still usable
        assert host(fsim, d)["filter"] == 0x20


def _param(name: bytes, value: bytes, *, ptype: int = 2, name_len: int | None = None,
           value_off: int | None = None) -> bytes:
    nl = len(name) if name_len is None else name_len
    vo = 20 + len(name) if value_off is None else value_off
    return struct.pack("<5I", 20, nl, ptype, vo, len(value)) + name + value


def test_config_parameter_validation_of_the_reference_host(fsim):
    with nv.open(dev(fsim, REF), fsim.root) as nic:
        def status(info: bytes) -> int:
            try:
                nic.set(P.OID_GEN_RNDIS_CONFIG_PARAMETER, info)
            except RequestFailed as exc:
                return exc.status or 0
            return P.ST_SUCCESS

        ok = _param("*LsoV2IPv4".encode("utf-16-le"), "0".encode("utf-16-le"))
        assert status(ok) == P.ST_SUCCESS
        assert status(_param(b"A\0", b"x" * 256)) == P.ST_INVALID_DATA            # value > 255
        assert status(_param(b"A\0", b"", name_len=256)) == P.ST_INVALID_DATA      # name > 255
        assert status(_param(b"\x00\xd8", b"1\0")) == P.ST_INVALID_DATA           # lone surrogate
        assert status(_param(b"A\0", b"1\0", value_off=4000)) == 0xC0000001       # outside: FAILURE
        assert status(b"\x14\0\0\0") == 0xC0000001                                # truncated header
        assert status(_param(b"N\0", struct.pack("<I", 7), ptype=0)) == P.ST_SUCCESS   # integer


def test_host_stats_reference_host(fsim):
    with nv.open(dev(fsim, REF), fsim.root) as nic:
        st = nic.host_stats()
    assert set(st) == set(P.STATS_OIDS)
    # OpenVMM answers only the three 802.3 error counters, with 0
    assert {k: v for k, v in st.items() if v is not None} == {
        "rcv_error_alignment": 0, "xmit_one_collision": 0, "xmit_more_collisions": 0}


def test_host_stats_count_what_went_through(fsim):
    d = dev(fsim, COUNTERS)
    with nv.open(d, fsim.root) as nic:
        frames = [frame(i) for i in range(25)]
        assert nic.tx_burst(frames, timeout=5) == 25
        n = 0
        for _ in range(200):
            b = nic.rx_burst(0, 64, timeout=0.05)
            n += len(b.frames())
            b.release()
            if n == 25:
                break
        assert n == 25
        st = nic.host_stats()
        q = host(fsim, d)["queues"]["0"]
    assert st["xmit_ok"] == 25 == q["tx_frames"] and st["rcv_ok"] == 25 == q["rx_frames"]
    assert st["bytes_xmit"] == sum(map(len, frames)) == st["bytes_rcv"]
    assert st["xmit_error"] == 0 and st["rcv_no_buffer"] == 0


def test_cli_net_info_shows_filter_and_counters(fsim):
    def uvmbus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True, text=True,
                              timeout=90)

    r = uvmbus("net", "info", dev(fsim, COUNTERS), "--root", str(fsim.root), "--json", "--stats")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["packet_filter"] == 0x0D
    assert info["packet_filter_names"] == ["directed", "all-multicast", "broadcast"]
    assert info["host_stats"]["xmit_ok"] is not None
    r = uvmbus("net", "info", dev(fsim, REF), "--root", str(fsim.root), "--stats")
    assert r.returncode == 0, r.stderr
    assert "packet filter: 0xd (directed, all-multicast, broadcast)" in r.stdout
    assert "host counters: rcv_error_alignment 0" in r.stdout and "not answered: xmit_ok" in r.stdout
    r = uvmbus("net", "info", dev(fsim, REF), "--root", str(fsim.root), "--json")
    assert r.returncode == 0, r.stderr
    assert "host_stats" not in json.loads(r.stdout)        # counters only when asked (--stats)



def test_config_parameter_reader_survives_random_input():
    """The host's reader of guest bytes: anything malformed is a BadRequest, never a crash or
    a read outside the buffer (fixed seed: reproducible)."""
    import random

    from uvmbus.sim.models import netvsp_msg as M

    rng = random.Random(1404)
    good = P.mac_config_parameter(bytes.fromhex("020000000001"))
    seen = {"ok": 0, "bad": 0}
    for i in range(3000):
        if i % 2:
            buf = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf[:rng.randint(0, len(buf))])
        else:
            data = rng.randbytes(rng.randint(0, 120))
        try:
            p = M.read_config_parameter(data)
        except M.BadRequest:
            seen["bad"] += 1
            continue
        seen["ok"] += 1
        assert isinstance(p.name, str) and len(p.name) <= 127
    assert seen["ok"] and seen["bad"]
    assert M.read_config_parameter(good).value == "020000000001"

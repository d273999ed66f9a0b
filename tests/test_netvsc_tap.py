"""Real kernel traffic through the TAP backend: the simulator creates a TAP interface inside a
network namespace; frames written there by an AF_PACKET socket reach the netvsc driver
intact, and frames the driver sends come out of that TAP."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from simhelpers import run_sim

import uvmbus.netvsc as nv

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5          # IEEE local experimental: nothing else in the namespace uses it


def need_root() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")


def frame(dst: bytes, src: bytes, i: int, size: int) -> bytes:
    body = struct.pack(">I", i) + bytes((i + k) & 0xFF for k in range(size - 18))
    return dst + src + struct.pack(">H", ETHERTYPE) + body


def test_tap_backend_in_a_namespace(tmp_path):
    need_root()
    from pyroute2 import netns

    tag = f"{os.getpid() % 100000}"
    ns, ifname = f"uvbns{tag}", f"uvbtap{tag}"
    assert ns not in netns.listnetns()
    try:
        with run_sim(tmp_path, "--echo", "0", "--no-ic", "--nic", "1",
                     "--nic-backend", f"tap:{ifname}@{ns}") as sim:
            d = sim.device("netvsc")["device_id"]
            sim.bind(d)
            with nv.open(d, sim.root, queues=2) as nic:
                assert ns in netns.listnetns()            # the simulator made the namespace
                mac = bytes.fromhex(nic.mac.replace(":", ""))
                s = netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                try:
                    s.bind((ifname, 0))
                    s.settimeout(5)
                    peer = b"\x02\x11\x22\x33\x44\x55"
                    # host side -> guest
                    sent = [frame(mac, peer, i, 60 + 97 * i) for i in range(14)]
                    tagged = frame(mac, peer, 100, 200)
                    tagged = tagged[:12] + struct.pack(">HH", 0x8100, (2 << 13) | 300) + tagged[12:]
                    for f in sent + [tagged]:
                        s.send(f)
                    got: list[bytes] = []
                    metas = []
                    deadline = time.monotonic() + 10
                    while len(got) < len(sent) + 1 and time.monotonic() < deadline:
                        for q in range(nic.num_queues):
                            b = nic.rx_burst(q, 64, timeout=0.05)
                            for i in range(len(b)):
                                f = bytes(b[i])
                                if f[12:14] == struct.pack(">H", ETHERTYPE):   # skip IPv6 ND etc.
                                    got.append(f)
                                    metas.append(b.meta(i))
                    assert sorted(got) == sorted(sent + [frame(mac, peer, 100, 200)])
                    m = metas[got.index(frame(mac, peer, 100, 200))]
                    assert m.vlan is not None and m.vlan_id == 300 and m.vlan >> 13 == 2   # tag -> PPI
                    # guest -> host side
                    out = [frame(peer, mac, 1000 + i, 64 + 131 * i) for i in range(10)]
                    assert nic.tx_burst(out, timeout=5) == len(out)
                    seen: list[bytes] = []
                    deadline = time.monotonic() + 10
                    while len(seen) < len(out) and time.monotonic() < deadline:
                        try:
                            f = s.recv(65536)
                        except TimeoutError:
                            break
                        if f[12:14] == struct.pack(">H", ETHERTYPE) and f[6:12] == mac:
                            seen.append(f)
                    assert seen == out
                finally:
                    s.close()
            st = sim.device_stats(d)["netvsp"]
            assert st["backend"] == f"tap:{ifname}@{ns}"
            assert sim.totals()["needless_signals"] == 0
            # the guest closed the NIC: the TAP and the namespace the simulator made are gone
            assert ns not in netns.listnetns()
    finally:
        if ns in netns.listnetns():          # the simulator removes it at exit; make sure
            netns.remove(ns)
    assert ns not in netns.listnetns()

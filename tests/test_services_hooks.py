"""Frame hooks: loading, the burst/per-frame conventions, the example hooks, and how the
bridge applies them (pass / change / drop / fail closed)."""

from __future__ import annotations

import struct
import textwrap

import pytest

from uvmbus.errors import ConfigError
from uvmbus.services import hooks
from uvmbus.services.hooks import drop_icmp, is_icmp, load_hook, per_frame

pytestmark = pytest.mark.timeout(60)

MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def ipv4(proto: int) -> bytes:
    return MAC + b"\x08\x00" + bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, proto]) + bytes(10) + bytes(8)


def ipv6(nh: int) -> bytes:
    return MAC + b"\x86\xdd" + bytes([0x60, 0, 0, 0, 0, 8, nh, 64]) + bytes(32) + bytes(8)


def vlan(frame: bytes) -> bytes:
    return frame[:12] + struct.pack(">HH", 0x8100, 42) + frame[12:]


@pytest.mark.parametrize(("frame", "icmp"), [
    (ipv4(1), True), (ipv4(6), False), (ipv4(17), False),
    (ipv6(58), True), (ipv6(6), False),
    (vlan(ipv4(1)), True), (vlan(ipv6(17)), False),
    (MAC + b"\x08\x06" + bytes(28), False),          # ARP
    (b"\x00" * 10, False),                           # runt
])
def test_is_icmp(frame, icmp):
    assert is_icmp(frame) is icmp


def test_drop_icmp_keeps_order_of_the_rest():
    frames = [ipv4(6), ipv4(1), ipv6(58), ipv4(17)]
    assert drop_icmp("tx", frames) == [ipv4(6), ipv4(17)]


def test_per_frame_wrapper():
    @per_frame
    def upper(direction, frame):
        return None if frame == b"drop" else frame.upper()

    assert upper("rx", [b"a", b"drop", b"b"]) == [b"A", b"B"]


def test_load_by_module_and_by_file(tmp_path):
    fn, setup = load_hook("uvmbus.services.hooks:count_only")
    assert fn is hooks.count_only and setup is None
    f = tmp_path / "myhook.py"
    f.write_text(textwrap.dedent("""
        seen = {}
        def setup(info):
            seen.update(info)
        def process(direction, frames):
            return frames[::-1]
    """))
    fn, setup = load_hook(f"{f}:process")
    assert fn("rx", [b"1", b"2"]) == [b"2", b"1"]
    assert setup is not None
    setup({"mtu": 1500})


@pytest.mark.parametrize("spec", ["nocolon", "uvmbus.services.hooks:", ":fn", "no.such.mod:fn",
                                  "uvmbus.services.hooks:missing", "/nonexistent/x.py:f",
                                  "uvmbus.services.hooks:COUNTS"])
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        load_hook(spec)


class FakeDaemon:
    def beat(self, name):
        pass

    def join_workers(self, timeout):        # no worker threads here
        return []


def make_bridge(hook):
    from uvmbus.services.netbridge import BridgeOptions, NetBridge

    b = NetBridge(BridgeOptions(device="x", tap="t0"), FakeDaemon())  # type: ignore[arg-type]
    b.hook = hook
    return b


def test_bridge_hook_semantics():
    b = make_bridge(lambda d, fr: None)
    assert b._apply_hook("rx", [b"a"]) is None                     # pass unchanged
    b = make_bridge(lambda d, fr: [f for f in fr if f != b"x"])
    assert b._apply_hook("tx", [b"a", b"x", b"b"]) == [b"a", b"b"]
    assert b.stats["tx"].hook_drops == 1
    b = make_bridge(lambda d, fr: fr + [b"extra"])
    assert b._apply_hook("rx", [b"a"]) == [b"a", b"extra"]
    assert b.stats["rx"].hook_added == 1

    def boom(d, fr):
        raise RuntimeError("bug in the hook")

    b = make_bridge(boom)
    assert b._apply_hook("rx", [b"a", b"b"]) == []                 # fail closed
    assert b.stats["rx"].hook_errors == 1 and b.stats["rx"].hook_drops == 2
    b.close()

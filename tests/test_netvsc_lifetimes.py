"""What a received frame is and what tx_burst reports (issue 10.2 and 10.3), against a
loopback NIC of the simulated host:

* frames of a default (copy=True) burst are the caller's: the next rx_burst does not change
  them (before: a kept frame changed its source IP between two reads);
* zero-copy frames raise once given back (release() or the next rx_burst), instead of
  showing whatever the host wrote there since;
* tx_burst returns what was really queued: a runt or oversize frame raises FrameRejected
  (before: counted as sent, only stats() showed the drop), or is reported per frame with
  ``rejected=``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from simhelpers import run_sim
from test_netvsc_driver import udp_frame

import uvmbus.netvsc as nv
from uvmbus.errors import FrameRejected, NetError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with run_sim(tmp_path_factory.mktemp("life"), "--echo", "0", "--no-ic",
                 "--device", "netvsc:backend=loopback") as sim:
        d = sim.device("netvsc")["device_id"]
        sim.bind(d)
        with nv.open(d, sim.root) as nic:
            yield nic


def _recv(nic: nv.Nic, want: int, *, copy: bool = True) -> nv.RxBurst:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        b = nic.rx_burst(0, want, timeout=0.2, copy=copy)
        if len(b):
            assert len(b) == want, len(b)
            return b
    raise AssertionError("nothing received")


def _frames(nic: nv.Nic, want: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < want and time.monotonic() < deadline:
        got += nic.rx_burst(0, want - len(got), timeout=0.2).frames()
    return got


def test_copied_frames_survive_the_next_burst(loop: nv.Nic) -> None:
    first = [udp_frame(i, 120, flow=i) for i in range(8)]
    second = [udp_frame(100 + i, 120, flow=200 + i) for i in range(8)]
    assert loop.tx_burst(first, timeout=5) == 8
    b1 = _recv(loop, 8)
    kept = b1[0]
    meta = b1.meta(0)
    assert loop.tx_burst(second, timeout=5) == 8
    b2 = _recv(loop, 8)
    assert b2.frames() == second
    assert bytes(kept) == first[0]               # the source IP of the kept frame did not change
    assert b1.frames() == first and b1.meta(0) == meta
    del b2
    import gc
    gc.collect()
    for _ in range(3):                            # many more bursts: still untouched
        assert loop.tx_burst(second, timeout=5) == 8
        _frames(loop, 8)
    assert bytes(kept) == first[0] and b1.frames() == first
    assert loop.tx_burst(b1, timeout=5) == 8      # a copied burst still forwards as is
    assert _frames(loop, 8) == first


def test_zero_copy_frames_raise_after_release(loop: nv.Nic) -> None:
    frames = [udp_frame(i, 200) for i in range(4)]
    assert loop.tx_burst(frames, timeout=5) == 4
    b = _recv(loop, 4, copy=False)
    v = b[1]
    assert bytes(v) == frames[1]
    b.release()
    with pytest.raises(ValueError):
        bytes(v)
    with pytest.raises(NetError, match="released"):
        b[0]
    with pytest.raises(NetError, match="released"):
        b.frames()
    with pytest.raises(NetError, match="released"):
        loop.tx_burst(b)                          # its descriptors point at host memory now
    # the next rx_burst gives the previous zero-copy burst back too
    assert loop.tx_burst(frames, timeout=5) == 4
    b = _recv(loop, 4, copy=False)
    views = list(b)
    loop.rx_burst(0, 8, timeout=0.05)
    with pytest.raises(ValueError):
        bytes(views[0])
    with pytest.raises(NetError):
        list(b)


def test_tx_burst_rejects_frames_that_can_never_be_sent(loop: nv.Nic) -> None:
    good = [udp_frame(i, 100) for i in range(3)]
    runt = b"\x01" * 9                            # the old netvsc.md quick-start frame
    drops0 = loop.stats()["total"]["tx_drops"]
    with pytest.raises(FrameRejected, match="9 bytes: shorter than an Ethernet header") as ei:
        loop.tx_burst([runt])
    assert (ei.value.index, ei.value.length, ei.value.queued) == (0, 9, 0)
    with pytest.raises(FrameRejected) as ei:
        loop.tx_burst([good[0], runt, good[1]], timeout=5)
    assert (ei.value.index, ei.value.queued) == (1, 1)
    assert _frames(loop, 1) == [good[0]]
    big = udp_frame(7, loop.mtu + 14 + 1)
    with pytest.raises(FrameRejected, match=f"{len(big)} bytes: longer than this NIC sends"):
        loop.tx_burst([big])
    rejected: list[int] = []
    n = loop.tx_burst([good[0], runt, good[1], big, good[2]], timeout=5, rejected=rejected)
    assert n == 3 and rejected == [1, 3]
    assert _frames(loop, 3) == good
    assert loop.stats()["total"]["tx_drops"] == drops0 + 5

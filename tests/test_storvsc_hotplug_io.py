"""Hot add / remove under I/O (issue 14, item 9): a LUN removed while requests to it are in
flight fails those with LunGone and nothing else; requests to other LUNs complete with the
right data; a LUN added while a batch runs shows up after it, the batch unharmed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim, wait_closed

import uvmbus.storvsc as storvsc
from uvmbus.errors import LunGone

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20
SLOW_US = 50000         # every guest packet waits 50 ms in the host: requests stay in flight


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[SimProcess, Path, bytes, bytes]]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(os.urandom(2 * MiB))
    b.write_bytes(os.urandom(2 * MiB))
    with run_sim(tmp_path, "--disk", str(a), "--disk", str(b), "--bind", "--no-ic",
                 "--echo", "0") as s:
        yield s, tmp_path, a.read_bytes(), b.read_bytes()
        wait_closed(s)
        assert s.totals()["needless_signals"] == 0, s.needless_report()


def _detach(s: SimProcess, lun: int) -> None:
    s.control("model", device="storvsc", op="detach", args={"lun": lun})


def test_remove_under_commands(sim: tuple[SimProcess, Path, bytes, bytes]) -> None:
    s, _, img0, img1 = sim
    with storvsc.open("storvsc", s.root, subchannels=0, timeout=20.0) as h:
        d0, d1 = h.disk(0), h.disk(1)
        bufs = [h.alloc_buffer(4096) for _ in range(16)]
        cmds = [(d0 if i % 2 == 0 else d1).read_command(i * 4096, bufs[i], user=i)
                for i in range(16)]
        dev = s.device("storvsc")["device_id"]
        s.fault("slow_us", SLOW_US, device=dev)
        h.submit(cmds)
        _detach(s, 1)                           # while the host is still working through them
        got = []
        while len(got) < 16:
            got += h.reap(16 - len(got), timeout=20)
        s.fault("slow_us", 0, device=dev)
        gone = 0
        for c in got:
            img = img0 if c.lun == 0 else img1
            if c.lun == 1 and isinstance(c.error, LunGone):
                gone += 1
                assert "removed" in str(c.error)
                continue
            assert c.error is None, c.error           # LUN 0: all fine; LUN 1: done before
            assert bytes(bufs[c.user].view) == img[c.user * 4096:(c.user + 1) * 4096]
        assert gone >= 1
        change = h.wait_for_change(10)
        assert change.removed == (1,) and [d.lun for d in h.luns] == [0]
        assert d1.gone
        with pytest.raises(LunGone):
            d1.read(0, 4096)
        assert d0.read(0, 4096) == img0[:4096]


def test_remove_under_a_batch(sim: tuple[SimProcess, Path, bytes, bytes]) -> None:
    s, _, img0, _ = sim
    with storvsc.open("storvsc", s.root, subchannels=1, timeout=20.0) as h:
        dev = s.device("storvsc")["device_id"]
        d0, d1 = h.disk(0), h.disk(1)
        with d1.batch(8, 4096) as b1, d0.batch(8, 4096) as b0:
            s.fault("slow_us", SLOW_US, device=dev)
            assert b1.submit(range(8), [i * 8 for i in range(8)]) == 8
            assert b0.submit(range(8), [i * 8 for i in range(8)]) == 8
            _detach(s, 1)
            errors = []
            done1 = 0
            while done1 < 8:
                n = b1.reap(timeout=20)
                assert n
                for i in range(n):
                    done1 += 1
                    if not b1.ok[i]:
                        errors.append(b1.error(i))
            done0 = 0
            while done0 < 8:
                n = b0.reap(timeout=20)
                assert n
                for i in range(n):
                    assert b0.ok[i], b0.error(i)
                    slot = int(b0.tags[i])
                    assert bytes(b0.buffers[slot].view) == img0[slot * 4096:(slot + 1) * 4096]
                    done0 += 1
            s.fault("slow_us", 0, device=dev)
            assert errors and all(isinstance(e, LunGone) for e in errors), errors
        change = h.wait_for_change(10)
        assert change.removed == (1,)


def test_add_under_a_batch(sim: tuple[SimProcess, Path, bytes, bytes]) -> None:
    s, tmp, img0, _ = sim
    with storvsc.open("storvsc", s.root, subchannels=0, timeout=20.0) as h:
        dev = s.device("storvsc")["device_id"]
        d0 = h.disk(0)
        with d0.batch(8, 4096) as b:        # holds the only channel: the ENUMERATE_BUS meets the batch
            s.fault("slow_us", SLOW_US, device=dev)
            assert b.submit(range(8), [i * 8 for i in range(8)]) == 8
            s.control("model", device="storvsc", op="attach",
                      args={"spec": f"{tmp / 'new.img'}:size=1M", "lun": 3})
            done = 0
            while done < 8:
                n = b.reap(timeout=20)
                assert n
                for i in range(n):
                    assert b.ok[i], b.error(i)
                    slot = int(b.tags[i])
                    assert bytes(b.buffers[slot].view) == img0[slot * 4096:(slot + 1) * 4096]
                    done += 1
            s.fault("slow_us", 0, device=dev)
        change = h.wait_for_change(10)
        assert change.added == (3,)
        assert h.disk(3).size == MiB

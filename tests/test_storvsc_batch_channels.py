"""One IoBatch over several channels (issue 14, item 7): slot i runs on claimed channel
i % N, checked from the host side (the simulator's per-channel completion counts), with data
integrity, zero needless signals, and `blk bench --channels N`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from simhelpers import SimProcess, run_sim, wait_closed

import uvmbus.storvsc as storvsc
from uvmbus.errors import ConfigError
from uvmbus.services.cli import main

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, str]]:
    tmp = tmp_path_factory.mktemp("chans")
    img = tmp / "a.img"
    img.write_bytes(os.urandom(8 * MiB))
    with run_sim(tmp, "--device", f"storvsc:disks={img},max_subchannels=3,bind=uio_hv_generic",
                 "--no-ic", "--echo", "0") as s:
        yield s, str(img)


def _host_completions(s: SimProcess) -> dict[int, int]:
    """Requests the host's fast path completed per open channel, by relid (counted by each
    channel's pump).  Signals are no measure of the spread: a host still polling from the
    last round takes new requests without one."""
    chans = s.device_stats(s.device("storvsc")["device_id"])["storvsp"]["channels"]
    return {int(r): int(c["fast_completions"]) for r, c in chans.items()}


@pytest.fixture
def hba(sim: tuple[SimProcess, str]) -> Iterator[storvsc.Controller]:
    wait_closed(sim[0])
    with storvsc.open("storvsc", sim[0].root, subchannels=3, timeout=10.0) as h:
        assert h.channels == 4
        yield h
    wait_closed(sim[0])


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_batch_spreads_slots_over_channels(hba: storvsc.Controller, sim: tuple[SimProcess, str],
                                           channels: int) -> None:
    d = hba.disk(0)
    bs, slots, rounds = 4096, 8, 3
    with d.batch(slots, bs, write=True, channels=channels) as b:
        assert len(b.queues) == channels
        before = _host_completions(sim[0])
        start = {q.channel.name: q.stats()["submitted"] for q in b.queues}
        for r in range(rounds):
            for s in range(slots):
                b.buffers[s].view[:] = bytes([r * slots + s + 1]) * bs
            lbas = [(r * slots + s) * 8 for s in range(slots)]
            assert b.submit(range(slots), lbas) == slots
            done = []
            while len(done) < slots:
                n = b.reap(timeout=10)
                assert n, "no completion within 10 s"
                for i in range(n):
                    assert b.ok[i], b.error(i)
                    done.append(int(b.tags[i]))
                    # each completion came back on the channel its slot was sent to
                    assert b.queues.index(b.last_queue) == int(b.tags[i]) % channels
            assert sorted(done) == list(range(slots))
        per_queue = {q.channel.name: q.stats()["submitted"] - start[q.channel.name]
                     for q in b.queues}
        sub_ids = [q.channel.relid for q in b.queues]
        after = _host_completions(sim[0])
    # each claimed channel got exactly its share of the requests, counted on both sides:
    # sent by the guest, completed by that channel's host worker; no other channel got any
    share = rounds * slots // channels
    assert all(n == share for n in per_queue.values()), per_queue
    assert set(sub_ids) <= set(after), (sub_ids, after)
    for sid in after:
        got = after[sid] - before.get(sid, 0)
        assert got == (share if sid in sub_ids else 0), (sid, got, sub_ids, before, after)
    image = d.read(0, rounds * slots * bs)
    for k in range(rounds * slots):
        assert image[k * bs:(k + 1) * bs] == bytes([k + 1]) * bs
    assert sim[0].totals()["needless_signals"] == 0, sim[0].needless_report()


def test_partial_submit_keeps_the_prefix_contract(hba: storvsc.Controller) -> None:
    """Whatever a submit sends, resubmitting the rest (slots + done) completes every slot."""
    from uvmbus.native import ffi

    d = hba.disk(0)
    with d.batch(32, 256 * 1024, channels=2) as b:
        slots = ffi.new("uint64_t[]", list(range(32)))
        lbas = ffi.new("uint64_t[]", [s * 512 for s in range(32)])
        done = b.submit(slots, lbas, n=32)
        seen = set()
        while done < 32 or b.inflight:
            n = b.reap(timeout=10)
            for i in range(n):
                assert b.ok[i], b.error(i)
                seen.add(int(b.tags[i]))
            if done < 32:
                done += b.submit(slots + done, lbas + done, n=32 - done)
        assert seen == set(range(32))


def test_batch_channel_limits(hba: storvsc.Controller) -> None:
    d = hba.disk(0)
    with pytest.raises(ConfigError, match="at least one slot per channel"):
        d.batch(2, 4096, channels=3)
    with pytest.raises(ConfigError, match="5 channel"):
        d.batch(8, 4096, channels=5)
    with d.batch(8, 4096, channels=4):
        with pytest.raises(ConfigError, match="no idle, unclaimed queue"):
            d.batch(1, 4096)
    with d.batch(4 * 256, 4096, channels=4) as b:      # exactly the depth on each channel
        assert len(b.queues) == 4
    with pytest.raises(ConfigError, match="queue depth"):
        d.batch(4 * 256 + 1, 4096, channels=4)


@pytest.mark.parametrize("channels", [1, 2])
def test_blk_bench_channels(sim: tuple[SimProcess, str], capsys: pytest.CaptureFixture[str],
                            channels: int) -> None:
    s, img = sim
    wait_closed(s)
    assert main(["blk", "bench", "storvsc", "--root", str(s.root), "--pattern", "randread",
                 "--bs", "4K", "--qd", "8", "--seconds", "0.3", "--channels", str(channels),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["channels"] == channels and r["errors"] == 0 and r["ios"] > 0
    assert r["reference"]["file"] == img
    assert r["host_stats"]["needless_signals"] == 0
    # the sleep counters of both sides (docs/performance.md uses them to explain a run)
    assert r["guest_waits"] >= 0 and r["host_stats"]["host_wakeups"] >= 0
    wait_closed(s)


def test_blk_bench_more_channels_than_the_host_gives(sim: tuple[SimProcess, str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    s, _ = sim
    wait_closed(s)
    assert main(["blk", "bench", "storvsc", "--root", str(s.root), "--channels", "8",
                 "--seconds", "0.1", "--no-reference"]) == 1
    assert "the host gave 4 channel(s)" in (err := capsys.readouterr().err) and "--channels 4 or fewer" in err
    wait_closed(s)

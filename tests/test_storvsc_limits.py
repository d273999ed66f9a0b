"""Host-side limits (issue 14, item 10): the host's max_transfer_bytes (QUERY_PROPERTIES), a
LUN's MAXIMUM TRANSFER LENGTH (VPD 0xB0) and the per-channel queue depth are honoured, tested
exactly at each limit and one block / one request over it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from simhelpers import SimProcess, run_sim, wait_closed

import uvmbus.storvsc as storvsc
from uvmbus.errors import ConfigError, IllegalRequest
from uvmbus.storvsc import scsi

pytestmark = pytest.mark.timeout(240)
KiB, MiB = 1 << 10, 1 << 20
#: announced by the model: not page aligned, so the driver must round it down (Linux:
#: round_down(max_transfer_bytes, PAGE_SIZE), storvsc_ic.md §2.11)
HOST_MAX = 128 * KiB + 512
LUN_MAX = 64 * KiB          # LUN 1's VPD 0xB0 MAXIMUM TRANSFER LENGTH (maxxfer=)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, bytes, bytes]]:
    tmp = tmp_path_factory.mktemp("limits")
    a, b = tmp / "a.img", tmp / "b.img"
    a.write_bytes(os.urandom(4 * MiB))
    b.write_bytes(os.urandom(2 * MiB))
    with run_sim(tmp, "--device", f"storvsc:disks={a}+{b}:maxxfer={LUN_MAX},"
                 f"max_transfer={HOST_MAX},bind=uio_hv_generic", "--no-ic", "--echo", "0") as s:
        yield s, a.read_bytes(), b.read_bytes()


def _model(s: SimProcess) -> dict:
    return s.device_stats(s.device("storvsc")["device_id"])["storvsp"]


@pytest.fixture
def hba(sim: tuple[SimProcess, bytes, bytes]) -> Iterator[storvsc.Controller]:
    s = sim[0]
    wait_closed(s)
    with storvsc.open("storvsc", s.root, subchannels=0, queue_depth=4, timeout=10.0) as h:
        yield h
    wait_closed(s)


def _sent(h: storvsc.Controller) -> int:
    return sum(q.stats()["submitted"] for q in h.queues)


def test_limits_are_read_from_the_host(hba: storvsc.Controller) -> None:
    assert hba.properties.max_transfer_bytes == HOST_MAX
    assert hba.max_transfer == 128 * KiB                  # page aligned
    assert hba.disk(0).max_transfer == 128 * KiB          # no limit in VPD 0xB0: the host caps
    assert hba.disk(1).block_limits.max_transfer_blocks == LUN_MAX // 512
    assert hba.disk(1).max_transfer == LUN_MAX            # the LUN caps
    assert hba.disk(1).describe()["max_transfer"] == LUN_MAX


@pytest.mark.parametrize("lun,limit", [(0, 128 * KiB), (1, LUN_MAX)])
def test_split_exactly_at_and_one_block_over(hba: storvsc.Controller,
                                             sim: tuple[SimProcess, bytes, bytes],
                                             lun: int, limit: int) -> None:
    image = sim[1] if lun == 0 else sim[2]
    d = hba.disk(lun)
    for length, requests in ((limit, 1), (limit + 512, 2), (3 * limit, 3), (3 * limit + 512, 4)):
        before = _sent(hba)
        assert d.read(512, length) == image[512:512 + length]
        assert _sent(hba) - before == requests, f"{length} bytes"
    data = os.urandom(limit + 512)
    before = _sent(hba)
    d.write(4096, data)
    assert _sent(hba) - before == 2
    assert d.read(4096, len(data)) == data
    assert _model(sim[0])["over_max_transfer"] == 0      # the host never saw an oversize request


def test_commands_and_batches_refuse_one_block_over(hba: storvsc.Controller) -> None:
    for lun, limit in ((0, 128 * KiB), (1, LUN_MAX)):
        d = hba.disk(lun)
        buf = hba.alloc_buffer(limit + 4096)
        try:
            cmd = d.read_command(0, buf, length=limit)           # exactly at: accepted
            hba.run([cmd])
            assert cmd.result() == limit
            with pytest.raises(ConfigError, match="maximum transfer"):
                d.read_command(0, buf, length=limit + 512)
        finally:
            buf.free()
        with d.batch(1, limit) as b:
            assert b.submit([0], [0]) == 1
            assert b.reap(timeout=10) == 1 and b.ok[0]
        with pytest.raises(ConfigError, match="maximum transfer"):
            d.batch(1, limit + 512)


def test_model_rejects_a_transfer_beyond_the_lun_maximum(hba: storvsc.Controller,
                                                         sim: tuple[SimProcess, bytes, bytes]) -> None:
    """SBC-3 6.6.4: a transfer longer than MAXIMUM TRANSFER LENGTH fails with INVALID FIELD
    IN CDB; the raw path (execute) bypasses the driver's split on purpose."""
    before = _model(sim[0])["over_max_transfer"]
    n = LUN_MAX + 512
    with pytest.raises(IllegalRequest):
        hba.execute(1, scsi.read16(0, n // 512), data_in=n, what="oversize READ(16)")
    assert _model(sim[0])["over_max_transfer"] == before + 1
    res = hba.execute(1, scsi.read16(MiB // 512, LUN_MAX // 512), data_in=LUN_MAX, what="READ(16)")
    assert res.data == sim[2][MiB:MiB + LUN_MAX]          # (the start was rewritten above)


@pytest.mark.parametrize("count", [4, 5, 9])
def test_requests_above_the_queue_depth_wait(hba: storvsc.Controller,
                                             sim: tuple[SimProcess, bytes, bytes], count: int) -> None:
    """queue_depth=4 on one channel: at most 4 requests are ever in flight; the rest wait in
    the driver's backlog and go out as completions free slots."""
    d = hba.disk(0)
    q = hba.queues[0]
    bufs = [hba.alloc_buffer(4096) for _ in range(count)]
    try:
        cmds = [d.read_command(MiB + i * 8192, bufs[i], user=i) for i in range(count)]
        hba.submit(cmds)
        assert q.inflight == min(count, 4)
        assert hba.inflight == count          # pending + backlog
        got = []
        peak = q.inflight
        while len(got) < count:
            got += hba.reap(1, timeout=10)
            peak = max(peak, q.inflight)
        assert peak <= 4
        assert sorted(c.user for c in got) == list(range(count))
        for c in got:
            assert c.result() == 4096
            off = MiB + c.user * 8192
            assert bytes(bufs[c.user].view) == sim[1][off:off + 4096]
    finally:
        for b in bufs:
            b.free()


def test_batch_slots_exactly_at_and_one_over_the_queue_depth(hba: storvsc.Controller) -> None:
    d = hba.disk(0)
    with d.batch(4, 4096) as b:
        assert b.submit(range(4), [0, 8, 16, 24]) == 4
        b.drain()
    with pytest.raises(ConfigError, match="queue depth 4"):
        d.batch(5, 4096)


def test_queue_depth_above_the_host_limit_is_refused(sim: tuple[SimProcess, bytes, bytes]) -> None:
    with pytest.raises(ConfigError, match="256"):
        storvsc.open("storvsc", sim[0].root, queue_depth=257)

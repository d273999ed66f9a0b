"""The storvsc guest driver against the simulated host (separate process): acceptance tests
of issue 5 (negotiation, LUN scan, data integrity, errors, queue depth, multichannel,
hot plug, media errors, malformed completions, recovery, signals)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

import uvmbus.storvsc as storvsc
from uvmbus.bus import BlockUser, Bus
from uvmbus.errors import (
    ChannelTimeout,
    ConfigError,
    DataProtect,
    IllegalRequest,
    LunGone,
    MediumError,
    NegotiationError,
    ProtocolError,
    StorageError,
    UnsafeDeviceError,
)
from uvmbus.native import ffi
from uvmbus.storvsc import protocol as P
from uvmbus.storvsc import scsi

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20


def make_image(path: Path, size: int, *, seed: int = 1) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rnd.randbytes(size))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("storvsc")
    imgs = {
        "a": make_image(tmp / "a.img", 16 * MiB, seed=1),
        "b": make_image(tmp / "b.img", 4 * MiB, seed=2),
        "ro": make_image(tmp / "ro.img", 2 * MiB, seed=3),
    }
    with run_sim(tmp, "--disk", str(imgs["a"]), "--disk", f"{imgs['b']}:bs=4096",
                 "--disk", f"{imgs['ro']}:ro:serial=RO-DISK-1", "--bind", "--no-ic",
                 "--echo", "0") as sim:
        yield sim, imgs


def settle(sim: SimProcess, timeout: float = 10.0) -> None:
    """Wait until the simulator has processed our last close (it does so asynchronously; a
    real kernel closes the channel inside close(2)), so the next open starts from Begin."""
    deadline = time.monotonic() + timeout
    dev = sim.device("storvsc")["device_id"]
    while sim.device_stats(dev)["connections"]:
        assert time.monotonic() < deadline, "simulator did not process the close"
        time.sleep(0.01)


@pytest.fixture
def hba(env: tuple[SimProcess, dict[str, Path]]) -> Iterator[storvsc.Controller]:
    sim, _ = env
    settle(sim)
    with storvsc.open("storvsc", sim.root, subchannels=0, timeout=5.0) as h:
        yield h
    settle(sim)


# ==== negotiation =============================================================================

@pytest.mark.parametrize("version", [0x0200, 0x0402, 0x0501, 0x0600, 0x0602])
def test_negotiates_each_version_the_host_accepts(tmp_path: Path, version: int) -> None:
    img = make_image(tmp_path / "v.img", MiB)
    with run_sim(tmp_path, "--device", f"storvsc:disks={img},versions={version:#06x},"
                 "bind=uio_hv_generic", "--no-ic", "--echo", "0") as sim:
        # the default proposal is Linux's (6.2, 6.0, 5.1); older versions only on request
        kw = {} if version >= 0x0501 else {"versions": (version,)}
        with storvsc.open("storvsc", sim.root, **kw) as h:
            assert h.version == version
            assert h.properties.multi_channel == (version >= 0x0501)
            assert h.properties.max_transfer_bytes == 0x40000
            d = h.luns[0]
            assert d.read(0, 4096) == img.read_bytes()[:4096]
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()


def test_default_proposal_stops_at_5_1(tmp_path: Path) -> None:
    """A host that only speaks pre-Win8 versions gets no common version by default."""
    img = make_image(tmp_path / "v.img", MiB)
    with run_sim(tmp_path, "--device", f"storvsc:disks={img},versions=0x0402,"
                 "bind=uio_hv_generic", "--no-ic", "--echo", "0") as sim:
        with pytest.raises(NegotiationError):
            storvsc.open("storvsc", sim.root)


def test_default_host_refuses_6_2_and_driver_falls_back(hba: storvsc.Controller) -> None:
    assert hba.version == 0x0600          # OpenVMM's set: 6.2 gets REVISION_MISMATCH


def test_no_common_version(env: tuple) -> None:
    sim, _ = env
    with pytest.raises(NegotiationError, match="accepted none"):
        storvsc.open("storvsc", sim.root, versions=[0x0602, 0x0100])
    settle(sim)


# ==== LUN scan ===================================================================================

def test_lun_scan(hba: storvsc.Controller) -> None:
    luns = hba.luns
    assert [d.lun for d in luns] == [0, 1, 2]
    a, b, ro = luns
    assert (a.size, a.block_size) == (16 * MiB, 512)
    assert (b.size, b.block_size) == (4 * MiB, 4096)
    assert (ro.size, ro.block_size) == (2 * MiB, 512)
    assert a.vendor == "Msft" and a.product == "Virtual Disk" and a.revision == "1.0"
    assert {0x00, 0x83, 0xB0, 0xB1, 0xB2} <= set(a.vpd_pages)
    assert ro.serial == "RO-DISK-1" and 0x80 in ro.vpd_pages and a.serial is None
    assert a.rotation_rate == 1 and a.unmap_supported and a.capacity.lbpme
    assert any(x.type == 3 for x in a.device_ids)        # NAA designator
    assert hba.report_luns() == [0, 1, 2]


# ==== data integrity ==============================================================================

def test_random_writes_verified_against_the_image(hba: storvsc.Controller, env: tuple) -> None:
    _, imgs = env
    for disk, path in ((hba.disk(0), imgs["a"]), (hba.disk(1), imgs["b"])):
        model = bytearray(path.read_bytes())
        rnd = random.Random(disk.lun + 7)
        bs = disk.block_size
        for _ in range(60):
            nblk = rnd.choice([1, 2, 7, 8, 64, 255, 513, 1100]) if bs == 512 else rnd.choice([1, 3, 64, 70])
            nblk = min(nblk, disk.blocks)
            off = rnd.randrange(disk.blocks - nblk + 1) * bs
            data = rnd.randbytes(nblk * bs)
            disk.write(off, data, fua=rnd.random() < 0.2)
            model[off:off + len(data)] = data
        assert path.read_bytes() == bytes(model)
        # and reading back through the driver gives the same bytes
        for _ in range(20):
            n = rnd.randrange(1, 600) * bs
            n = min(n, disk.size)
            off = rnd.randrange((disk.size - n) // bs + 1) * bs
            assert disk.read(off, n) == bytes(model[off:off + n])


def test_whole_disk_read_matches_sha256(hba: storvsc.Controller, env: tuple) -> None:
    _, imgs = env
    disk = hba.disk(0)
    data = disk.read(0, disk.size)          # 16 MiB: split into 64 transfers of 256 KiB
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(imgs["a"].read_bytes()).hexdigest()
    buf = bytearray(disk.size)
    assert disk.readinto(0, buf) == disk.size and bytes(buf) == data
    with hba.alloc_buffer(1 * MiB) as dma:                 # zero copy into a DMA buffer
        assert disk.readinto(3 * MiB, dma) == MiB and bytes(dma.view) == data[3 * MiB:4 * MiB]


def test_out_of_range_and_misaligned(hba: storvsc.Controller) -> None:
    d = hba.disk(0)
    with pytest.raises(ConfigError, match="multiples of the 512-byte block size"):
        d.read(100, 512)
    with pytest.raises(ConfigError, match="multiples"):
        d.write(0, b"x" * 100)
    with pytest.raises(ConfigError, match="beyond the end"):
        d.read(d.size - 512, 1024)
    with pytest.raises(ConfigError, match="beyond the end"):
        d.discard(d.size, 512)
    with pytest.raises(ConfigError, match="4096-byte block size"):
        hba.disk(1).write(512, b"y" * 512)
    # the host's own checks, bypassing the driver's: ILLEGAL REQUEST / LBA out of range
    with pytest.raises(IllegalRequest) as ei:
        hba.execute(0, scsi.read16(d.blocks - 1, 8), data_in=4096, what="READ(16)")
    assert ei.value.sense_key == 5 and ei.value.asc == 0x21
    with pytest.raises(IllegalRequest) as ei:
        hba.execute(0, bytes([0xC7]) + bytes(9), what="vendor command")
    assert ei.value.asc == 0x20


def test_write_protected_lun(hba: storvsc.Controller, env: tuple) -> None:
    _, imgs = env
    before = imgs["ro"].read_bytes()
    with pytest.raises(DataProtect) as ei:
        hba.disk(2).write(0, b"z" * 512)
    assert ei.value.asc == 0x27
    assert imgs["ro"].read_bytes() == before


def test_flush_fua_and_unmap(hba: storvsc.Controller, env: tuple) -> None:
    _, imgs = env
    d = hba.disk(0)
    data = os.urandom(64 * 1024)
    d.write(MiB, data, fua=True)
    assert imgs["a"].read_bytes()[MiB:MiB + len(data)] == data
    d.flush()
    d.discard(MiB, 32 * 1024)
    got = d.read(MiB, 64 * 1024)
    assert got[:32 * 1024] == bytes(32 * 1024) and got[32 * 1024:] == data[32 * 1024:]
    assert imgs["a"].read_bytes()[MiB:MiB + 32 * 1024] == bytes(32 * 1024)
    b = hba.disk(1)
    b.discard(0, b.size)                                  # whole disk in one UNMAP
    assert b.read(0, 64 * 1024) == bytes(64 * 1024)


# ==== queue depth, batches, multichannel ============================================================

@pytest.mark.parametrize("qd", [1, 2, 32, 256])
def test_queue_depth(hba: storvsc.Controller, qd: int) -> None:
    d = hba.disk(0)
    bs = 4096
    slots = list(range(qd))
    rnd = random.Random(qd)
    lbas = rnd.sample(range(d.size // bs), qd)
    with d.batch(qd, bs, write=True) as b:
        for s in slots:
            b.buffers[s].view[:] = (lbas[s] * bs).to_bytes(8, "little") * (bs // 8)
        assert b.submit(slots, [x * 8 for x in lbas]) == qd
        assert b.inflight == qd
        done = []
        while len(done) < qd:
            n = b.reap(timeout=10)
            assert n, "no completion within 10 s"
            for i in range(n):
                assert b.ok[i], b.error(i)
                done.append(int(b.tags[i]))
        assert sorted(done) == slots
    # read them back through the Command interface, all in flight at once
    bufs = [hba.alloc_buffer(bs) for _ in range(qd)]
    cmds = [d.read_command(lba * bs, bufs[i], user=i) for i, lba in enumerate(lbas)]
    hba.submit(cmds)
    got = []
    while len(got) < qd:
        got += hba.reap(qd - len(got), timeout=10)
    assert {c.user for c in got} == set(range(qd))
    for c in got:
        assert c.result() == bs
        assert bytes(bufs[c.user].view[:8]) == (lbas[c.user] * bs).to_bytes(8, "little")
    for b in bufs:
        b.free()


def test_transfer_larger_than_host_maximum_is_split(hba: storvsc.Controller, env: tuple) -> None:
    d = hba.disk(0)
    assert hba.max_transfer == 256 * 1024
    data = os.urandom(3 * MiB + 512)
    d.write(512, data)
    assert d.read(512, len(data)) == data
    buf = hba.alloc_buffer(512 * 1024)
    with pytest.raises(ConfigError, match="maximum transfer"):
        d.read_command(0, buf)
    cmd = d.read_command(0, buf, length=256 * 1024)
    cmd.length = 512 * 1024                       # a hand-made oversize command
    with pytest.raises(ConfigError, match="maximum transfer"):
        hba.submit([cmd])


def test_multichannel_spreads_requests(env: tuple) -> None:
    sim, imgs = env
    settle(sim)
    with storvsc.open("storvsc", sim.root, subchannels=2) as h:
        assert h.channels == 3 and len(h.queues) == 3
        d = h.disk(0)
        bufs = [h.alloc_buffer(4096) for _ in range(96)]
        cmds = [d.read_command(i * 4096, bufs[i]) for i in range(96)]
        h.submit(cmds)
        done = []
        while len(done) < 96:
            done += h.reap(96 - len(done), timeout=10)
        image = imgs["a"].read_bytes()
        for i, c in enumerate(cmds):
            assert c.result() == 4096 and bytes(bufs[i].view) == image[i * 4096:(i + 1) * 4096]
        per_queue = [q.stats()["submitted"] for q in h.queues]
        assert all(n > 0 for n in per_queue), per_queue
        # completions come back on the channel that carried the request
        assert all(c.queue is not None for c in cmds)
        for b in bufs:
            b.free()
        with d.batch(8, 4096) as b1, d.batch(8, 4096) as b2:
            assert b1.queue is not b2.queue
    assert sim.totals()["needless_signals"] == 0, sim.needless_report()


# ==== errors from the host ==========================================================================

def test_media_errors_surface_as_exceptions(hba: storvsc.Controller, env: tuple) -> None:
    sim, _ = env
    sim.control("model", device="storvsc", op="media_error",
                args={"lun": 0, "start": 2048, "count": 8, "kinds": ["read"]})
    try:
        with pytest.raises(MediumError) as ei:
            hba.disk(0).read(2048 * 512, 8192)
        assert ei.value.sense_key == 3 and ei.value.asc == 0x11
        hba.disk(0).read(0, 8192)                           # other blocks still read
        hba.disk(0).write(2048 * 512, b"w" * 4096)          # writes are not affected
    finally:
        sim.control("model", device="storvsc", op="clear_media_errors", args={"lun": 0})
    assert hba.disk(0).read(2048 * 512, 4096) == b"w" * 4096


@pytest.mark.parametrize("kind", ["short", "op", "type"])
def test_malformed_completion_is_a_clear_error(hba: storvsc.Controller, env: tuple, kind: str) -> None:
    sim, _ = env
    sim.control("model", device="storvsc", op="malformed", args={"kinds": [kind]})
    with pytest.raises(ProtocolError, match="malformed completion"):
        hba.disk(0).read(0, 4096)
    assert hba.counters["malformed_completions"] == 1
    hba.disk(0).read(0, 4096)                               # and the driver carries on


def test_completion_with_unknown_id_then_recovery(hba: storvsc.Controller, env: tuple) -> None:
    sim, _ = env
    hba.timeout = 1.0
    sim.control("model", device="storvsc", op="malformed", args={"kinds": ["tid"]})
    with pytest.raises(ChannelTimeout, match="LUN was reset"):
        hba.disk(0).read(0, 4096)
    assert hba.counters["bogus_completions"] == 1 and hba.counters["lun_resets"] == 1
    assert "transaction id" in (hba.last_protocol_error or "")
    assert hba.disk(0).read(4096, 4096)


def test_dropped_completion_times_out_and_resets(hba: storvsc.Controller, env: tuple) -> None:
    sim, _ = env
    hba.timeout = 1.0
    sim.fault("drop_completions", 1, device="storvsc")
    try:
        with pytest.raises(ChannelTimeout):
            hba.disk(0).read(0, 4096)
    finally:
        sim.clear_faults()
    assert hba.counters["timeouts"] == 1 and hba.counters["lun_resets"] == 1
    assert len(hba.disk(0).read(0, 8192)) == 8192


def test_host_worker_death_fails_the_controller_clearly(env: tuple) -> None:
    sim, _ = env
    settle(sim)
    with storvsc.open("storvsc", sim.root, subchannels=0, timeout=0.5) as h:
        h.reset_timeout = 0.5
        ch = h.queues[0].channel
        # REMOVE_DEVICE is not a guest operation: fatal for the host's worker (§5.1)
        assert ch.tx.put(P.build_packet(P.Op.REMOVE_DEVICE), trans_id=1, flags=1)
        ch.flush()
        with pytest.raises(ChannelTimeout, match="no reset either"):
            h.disk(0).read(0, 4096)
        assert h.counters["lun_resets"] == 1 and h.counters["bus_resets"] == 1
        with pytest.raises(StorageError, match="failed earlier"):
            h.disk(0).read(0, 4096)
    assert "UnrecognizedOperation" in sim.stderr or sim.device_stats(
        sim.device("storvsc")["device_id"])["storvsp"]["fatal_errors"] >= 1


def test_duplicated_completions_are_ignored(hba: storvsc.Controller, env: tuple) -> None:
    sim, _ = env
    sim.fault("dup_completions", 3, device="storvsc")
    try:
        for i in range(3):
            hba.disk(0).read(i * 4096, 4096)
        hba.disk(0).read(0, 4096)
    finally:
        sim.clear_faults()
    assert hba.counters["bogus_completions"] == 3


def test_unit_attention_is_retried_after_a_resize(tmp_path: Path) -> None:
    img = make_image(tmp_path / "grow.img", 2 * MiB)
    with run_sim(tmp_path, "--disk", str(img), "--bind", "--no-ic", "--echo", "0") as sim:
        with storvsc.open("storvsc", sim.root) as h:
            d = h.disk(0)
            assert d.size == 2 * MiB
            sim.control("model", device="storvsc", op="resize", args={"lun": 0, "size": 4 * MiB})
            assert d.read(0, 4096) == img.read_bytes()[:4096]      # UA, retried
            assert h.counters["unit_attention_retries"] == 1
            assert d.size == 2 * MiB        # not refreshed yet: it is at the next API call
            assert h.disk(0).size == 4 * MiB
            d.write(4 * MiB - 4096, b"e" * 4096)


# ==== hot add / remove ===============================================================================

def test_hot_add_and_remove(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.img", MiB)
    extra = tmp_path / "extra.img"
    with run_sim(tmp_path, "--disk", str(base), "--bind", "--no-ic", "--echo", "0") as sim:
        with storvsc.open("storvsc", sim.root) as h:
            assert [d.lun for d in h.luns] == [0]
            sim.control("model", device="storvsc", op="attach",
                        args={"spec": f"{extra}:size=2M:bs=4096", "lun": 5})
            change = h.wait_for_change(10)
            assert change.added == (5,) and not change.removed
            new = h.disk(5)
            assert (new.size, new.block_size) == (2 * MiB, 4096)
            new.write(0, b"n" * 4096)
            assert extra.read_bytes()[:4096] == b"n" * 4096
            sim.control("model", device="storvsc", op="detach", args={"lun": 5})
            change = h.wait_for_change(10)
            assert change.removed == (5,) and [d.lun for d in h.luns] == [0]
            assert new.gone
            with pytest.raises(LunGone):
                new.read(0, 4096)
            # a raw command to the removed LUN: INVALID_LUN from the host
            with pytest.raises(LunGone):
                h.execute(5, scsi.test_unit_ready(), what="TEST UNIT READY")
            assert h.changes == [storvsc.LunChange(added=(0,)),          # the first scan
                                 storvsc.LunChange(added=(5,)), storvsc.LunChange(removed=(5,))]
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()


# ==== the OS-disk guard ==================================================================================

class _MountedSystem:
    """A live system whose root filesystem sits on the simulated disk ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def block_users(self) -> list[BlockUser]:
        return [BlockUser(f"/dev/{self.name}", "/"), BlockUser("/dev/vda1", "/boot")]

    def interface_addresses(self, ifname: str) -> list[str]:
        return []

    def default_route_interfaces(self) -> set[str]:
        return set()


def test_controller_holding_the_os_disk_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "os.img", MiB)
    with run_sim(tmp_path, "--device", f"storvsc:disks={img},bind=hv_storvsc", "--no-ic",
                 "--echo", "0") as sim:
        dev = Bus(sim.root).device("storvsc")
        disks = dev.block_device_paths()
        assert dev.driver == "hv_storvsc" and disks
        system = _MountedSystem(disks[0].name)
        with pytest.raises(UnsafeDeviceError, match="mounted on /"):
            storvsc.open("storvsc", sim.root, bind=True, system=system)
        assert Bus(sim.root).device("storvsc").driver == "hv_storvsc"   # left alone
        with storvsc.open("storvsc", sim.root, bind=True, force=True, system=system) as h:
            assert h.disk(0).read(0, 4096) == img.read_bytes()[:4096]


# ==== signals ===========================================================================================

def test_zero_needless_signals(env: tuple) -> None:
    sim, _ = env
    settle(sim)
    with storvsc.open("storvsc", sim.root, subchannels=1) as h:
        d = h.disk(0)
        for i in range(200):
            d.read((i % 64) * 4096, 4096)
        with d.batch(32, 4096) as b:
            b.submit(range(32), [i * 8 for i in range(32)])
            b.drain()
    t = sim.totals()
    assert t["needless_signals"] == 0, sim.needless_report()
    assert t["guest_signals"] > 0 and t["kernel_oops"] == 0


def test_protocol_helpers_match_the_native_layout() -> None:
    # the driver's packets are 64 bytes with the request flag set (§10.1-2)
    pkt = P.build_packet(P.Op.BEGIN_INITIALIZATION)
    assert len(pkt) == 64 and pkt[4] == 1
    assert ffi.sizeof("struct uvb_stor_cpl") >= 64

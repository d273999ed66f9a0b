"""SCSI-3 persistent reservations (issue 14, item 8) between two initiators: two simulated
SCSI controllers with a LUN on the same image (a shared VHDX), each opened by the guest.
An initiator is a controller (docs/simulator.md), so A and B are two Controllers."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import pytest
from simhelpers import SimProcess, run_sim, wait_closed

import uvmbus.storvsc as storvsc
from uvmbus.block import PersistentReservations
from uvmbus.errors import ConfigError, IllegalRequest, ReservationConflict
from uvmbus.services.cli import main
from uvmbus.storvsc import scsi
from uvmbus.storvsc.disk import Disk

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20
KA, KB = 0xAAAA0001, 0xBBBB0002
WE, EA = scsi.PrType.WRITE_EXCLUSIVE, scsi.PrType.EXCLUSIVE_ACCESS


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("pr")
    shared, plain = tmp / "shared.img", tmp / "plain.img"
    shared.write_bytes(os.urandom(4 * MiB))
    spec = f"storvsc:disks={shared}:pr+{plain}:size=1M,bind=uio_hv_generic"
    with run_sim(tmp, "--device", spec, "--device", f"storvsc:disks={shared}:pr,bind=uio_hv_generic",
                 "--no-ic", "--echo", "0") as s:
        yield s


def _ids(sim: SimProcess) -> tuple[str, str]:
    return sim.device("storvsc", 0)["device_id"], sim.device("storvsc", 1)["device_id"]


@pytest.fixture
def ab(sim: SimProcess) -> Iterator[tuple[Disk, Disk]]:
    a_id, b_id = _ids(sim)
    wait_closed(sim)
    with storvsc.open(a_id, sim.root, subchannels=1, timeout=10.0) as A, \
            storvsc.open(b_id, sim.root, subchannels=0, timeout=10.0) as B:
        a, b = A.disk(0), B.disk(0)
        yield a, b
        # leave no state behind for the next test
        a.pr_register(0, KA, ignore=True)
        a.pr_clear(KA)
    wait_closed(sim)


def _conflicts(sim: SimProcess) -> int:
    return sum(sim.device_stats(d)["storvsp"]["reservation_conflicts"] for d in _ids(sim))


def test_register_reserve_conflict_release(ab: tuple[Disk, Disk], sim: SimProcess) -> None:
    a, b = ab
    assert isinstance(a, PersistentReservations)            # the block interface's names
    assert a.pr_read_keys().keys == [] and a.pr_read_reservation() is None
    gen0 = a.pr_read_keys().generation
    a.pr_register(0, KA)
    a.pr_reserve(KA, WE)
    keys = b.pr_read_keys()
    assert keys.keys == [KA] and keys.generation == gen0 + 1      # RESERVE does not bump it
    res = b.pr_read_reservation()
    assert res is not None and res.key == KA and res.type == WE and res.type_name == "write-exclusive"
    before = _conflicts(sim)
    data = os.urandom(4096)
    with pytest.raises(ReservationConflict, match="RESERVATION CONFLICT"):
        b.write(0, data)                                   # B is not the holder: no writes
    with pytest.raises(ReservationConflict):
        b.flush()
    with pytest.raises(ReservationConflict):
        b.discard(0, 4096)
    assert b.read(0, 4096) == a.read(0, 4096)              # write exclusive: reads are fine
    a.write(0, data)                                       # the holder writes (on 2 channels)
    a.flush()
    assert _conflicts(sim) - before == 3
    # B registering does not make it a writer under WRITE EXCLUSIVE
    b.pr_register(0, KB)
    with pytest.raises(ReservationConflict):
        b.write(0, data)
    # a RELEASE of another type is refused; the holder releases with its type
    with pytest.raises(IllegalRequest, match="invalid release"):
        a.pr_release(KA, EA)
    a.pr_release(KA, WE)
    assert b.pr_read_reservation() is None
    b.write(4096, data)
    assert a.read(4096, 4096) == data
    _, full = a.pr_full_status()
    assert sorted(r.key for r in full) == [KA, KB] and not any(r.holder for r in full)
    assert len({r.transport_id for r in full}) == 2          # two initiators


def test_exclusive_access_blocks_reads_and_batches(ab: tuple[Disk, Disk]) -> None:
    a, b = ab
    a.pr_register(0, KA)
    a.pr_reserve(KA, EA)
    with pytest.raises(ReservationConflict):
        b.read(0, 512)
    with b.batch(4, 4096) as batch:                        # the array interface reports it too
        batch.submit([0, 1], [0, 8])
        batch.drain()
    assert batch.errors == 2
    a.read(0, 512)
    # reserving again with the same type is fine for the holder, another type is a conflict
    a.pr_reserve(KA, EA)
    with pytest.raises(ReservationConflict):
        a.pr_reserve(KA, WE)


def test_wrong_key_and_unregistered(ab: tuple[Disk, Disk]) -> None:
    a, b = ab
    a.pr_register(0, KA)
    with pytest.raises(ReservationConflict):
        a.pr_register(0x1234, KA + 1)                     # not the registered key
    with pytest.raises(ReservationConflict):
        b.pr_reserve(KB, WE)                              # B never registered
    with pytest.raises(ReservationConflict):
        b.pr_clear(KB)
    a.pr_register(KA, KA + 1)                             # key change
    assert b.pr_read_keys().keys == [KA + 1]
    a.pr_register(KA + 1, 0)                              # unregister
    assert b.pr_read_keys().keys == []


def test_preempt_takes_the_reservation(ab: tuple[Disk, Disk]) -> None:
    a, b = ab
    a.pr_register(0, KA)
    b.pr_register(0, KB)
    a.pr_reserve(KA, EA)
    with pytest.raises(ReservationConflict):
        b.read(0, 512)
    gen = a.pr_read_keys().generation
    b.pr_preempt(KB, KA, WE)                              # B removes A and holds WE
    res = a.pr_read_reservation()
    assert res is not None and res.key == KB and res.type == WE
    keys = a.pr_read_keys()
    assert keys.keys == [KB] and keys.generation == gen + 1
    with pytest.raises(ReservationConflict):
        a.write(0, bytes(512))                           # A's registration is gone
    with pytest.raises(ReservationConflict):
        a.pr_reserve(KA, WE)
    a.read(0, 512)                                        # WE: reads still allowed
    b.write(0, bytes(512))
    # preempting a key nobody has is a conflict; victim key 0 without a holder is illegal
    with pytest.raises(ReservationConflict):
        b.pr_preempt(KB, 0x9999, WE)


def test_registrants_only_and_clear(ab: tuple[Disk, Disk]) -> None:
    a, b = ab
    a.pr_register(0, KA)
    a.pr_reserve(KA, "we-ro")
    with pytest.raises(ReservationConflict):
        b.write(0, bytes(512))                           # not registered
    b.pr_register(0, KB)
    b.write(0, bytes(512))                               # registrants may write
    b.pr_clear(KB)                                       # any registrant may clear
    assert a.pr_read_keys().keys == [] and a.pr_read_reservation() is None
    a.write(0, bytes(512))
    b.write(0, bytes(512))
    caps = a.pr_capabilities()
    assert caps.tmv and caps.atp_c and not caps.ptpl_c
    assert set(caps.types) == {int(t) for t in scsi.PrType}


def test_all_registrants_release_with_the_last(ab: tuple[Disk, Disk]) -> None:
    a, b = ab
    a.pr_register(0, KA)
    b.pr_register(0, KB)
    a.pr_reserve(KA, "ea-ar")
    res = b.pr_read_reservation()
    assert res is not None and res.key == 0                # all-registrants: key 0
    b.read(0, 512)                                         # every registrant holds it
    a.pr_register(KA, 0)
    assert b.pr_read_reservation() is not None             # B still registered
    b.pr_register(KB, 0)
    assert b.pr_read_reservation() is None


def test_reservations_survive_reconnect_and_refusals(sim: SimProcess) -> None:
    a_id, _ = _ids(sim)
    wait_closed(sim)
    with storvsc.open(a_id, sim.root, subchannels=0, timeout=10.0) as A:
        A.disk(0).pr_register(0, KA)
        A.disk(0).pr_reserve(KA, WE)
        plain = A.disk(1)
        with pytest.raises(IllegalRequest, match="does not support persistent reservations.*:pr"):
            plain.pr_read_keys()
        with pytest.raises(IllegalRequest, match="does not support persistent reservations"):
            plain.pr_register(0, KA)
        with pytest.raises(ConfigError):
            A.disk(0).pr_reserve(KA, "bogus")
        with pytest.raises(ConfigError):
            A.disk(0).pr_register(0, 1 << 64)
    wait_closed(sim)
    with storvsc.open(a_id, sim.root, subchannels=0, timeout=10.0) as A:
        res = A.disk(0).pr_read_reservation()            # persistent across the I_T nexus loss
        assert res is not None and res.key == KA
        A.disk(0).write(0, bytes(512))
        A.disk(0).pr_clear(KA)
    wait_closed(sim)


def test_cli(sim: SimProcess, capsys: pytest.CaptureFixture[str]) -> None:
    a_id, b_id = _ids(sim)

    def run(dev: str, *args: str) -> int:
        wait_closed(sim)
        return main(["blk", "pr", dev, "--root", str(sim.root), *args])

    assert run(a_id, "register", "--key", "0x10", "--json") == 0
    assert json.loads(capsys.readouterr().out)["keys"] == ["0x10"]
    assert run(a_id, "reserve", "--key", "0x10", "--type", "we") == 0
    assert "write-exclusive held with key 0x10" in capsys.readouterr().out
    assert run(b_id, "read", "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["reservation"] == {"key": "0x10", "type": "write-exclusive"}
    assert "exclusive-access" in st["types"]
    assert run(b_id, "reserve", "--key", "0x20", "--type", "we") != 0   # not registered
    assert "RESERVATION CONFLICT" in capsys.readouterr().err
    assert run(a_id, "reserve", "--key", "0x10") != 0                   # no --type
    assert "--type" in capsys.readouterr().err
    assert run(b_id, "register") != 0                   # no --key: an error, not a silent no-op
    assert "needs --key" in capsys.readouterr().err
    assert run(a_id, "release", "--key", "0x10", "--type", "we") == 0
    capsys.readouterr()
    assert run(a_id, "clear", "--key", "0x10", "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["keys"] == [] and st["reservation"] is None
    wait_closed(sim)


def test_checks_before_the_state(ab: tuple[Disk, Disk]) -> None:
    """OpenVMM's PERSISTENT RESERVE OUT checks (reservation.rs), raw CDBs."""
    a, _ = ab
    hba = a.controller
    params = scsi.pr_out_parameters(KA, 0)

    def out(cdb: bytes, data: bytes = params) -> IllegalRequest:
        with pytest.raises(IllegalRequest) as e:
            hba.execute(0, cdb, data_out=data, what="PR OUT")
        return e.value

    assert out(scsi.persistent_reserve_out(scsi.PROUT_REGISTER, 0, 23)).asc == 0x1A   # length
    spec_i_pt = params[:20] + bytes([0x08]) + params[21:]
    assert out(scsi.persistent_reserve_out(scsi.PROUT_REGISTER), spec_i_pt).asc == 0x26
    assert out(scsi.persistent_reserve_out(scsi.PROUT_RESERVE, 2)).asc == 0x24         # type 2
    scoped = bytearray(scsi.persistent_reserve_out(scsi.PROUT_RESERVE, 1))
    scoped[2] |= 0x10                                                                  # scope 1
    assert out(bytes(scoped)).asc == 0x24
    assert out(scsi.persistent_reserve_out(scsi.PROUT_REGISTER), params[:16]).asc == 0x24  # buffer < 24
    # APTPL is ignored (PTPL_C = 0), as OpenVMM does without a PTPL-capable backend
    aptpl = scsi.pr_out_parameters(0, KA, aptpl=True)
    res = hba.execute(0, scsi.persistent_reserve_out(scsi.PROUT_REGISTER), data_out=aptpl)
    assert res.transferred == 24 and a.pr_read_keys().keys == [KA]
    # PR IN: allocation length beyond the buffer, unknown service action
    with pytest.raises(IllegalRequest) as e:
        hba.execute(0, scsi.persistent_reserve_in(0, 64), data_in=32, what="PR IN")
    assert e.value.asc == 0x24
    with pytest.raises(IllegalRequest):
        hba.execute(0, scsi.persistent_reserve_in(9, 64), data_in=64, what="PR IN")
    # a short allocation length gets the header only
    res = hba.execute(0, scsi.persistent_reserve_in(0, 8), data_in=8, what="PR IN")
    assert res.transferred == 8 and struct.unpack(">I", res.data[4:8])[0] == 8


def test_many_keys_are_read_in_full_and_a_lying_host_does_not_loop() -> None:
    from uvmbus.storvsc.command import ScsiResult

    keys = list(range(1, 301))                      # 300 keys: more than the first 2 KiB

    class Host:
        max_transfer = 1 << 20
        calls: list[int] = []

        def _api_entry(self) -> None:
            pass

        def execute(self, lun: int, cdb: bytes, **kw: object) -> ScsiResult:
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            self.calls.append(alloc)
            full = struct.pack(">II", 9, 8 * len(keys)) + b"".join(struct.pack(">Q", k) for k in keys)
            data = full[:alloc]
            return ScsiResult(data, len(data), 1, 0, None)

    d = Disk(Host(), 0, scsi.parse_inquiry(bytes(36)))      # type: ignore[arg-type]
    got = d.pr_read_keys()
    assert got.keys == keys and got.generation == 9 and Host.calls == [2048, 8 + 8 * 300]

    class Liar(Host):
        calls: list[int] = []

        def execute(self, lun: int, cdb: bytes, **kw: object) -> ScsiResult:
            self.calls.append(struct.unpack_from(">H", cdb, 7)[0])
            data = struct.pack(">II", 1, 60000) + struct.pack(">Q", 5)   # claims 7500 keys, sends 1
            return ScsiResult(data, len(data), 1, 0, None)

    d.controller = Liar()
    assert d.pr_read_keys().keys == [5] and len(Liar.calls) == 2

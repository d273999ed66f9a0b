"""Inquiry and status a disk driver asks for (issue 14, item 8): VPD 0x8F / 0xB0 / 0xB1 /
0xB2 (and Microsoft's 0xCE / 0xCF) with the values OpenVMM's SimpleScsiDisk reports, MODE
SENSE caching / control, GET LBA STATUS from a sparse image's holes, REPORT SUPPORTED
OPERATION CODES; and hostile pages from an untrusted host (copied, then validated)."""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from simhelpers import SimProcess, run_sim, wait_closed

import uvmbus.storvsc as storvsc
from uvmbus.errors import ConfigError, IllegalRequest, ProtocolError
from uvmbus.services.cli import main
from uvmbus.storvsc import scsi
from uvmbus.storvsc.command import ScsiResult
from uvmbus.storvsc.disk import Disk

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20


def _holes_supported(d: Path) -> bool:
    p = d / "probe.img"
    with open(p, "wb") as f:
        f.truncate(1 * MiB)
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) == 0
    except OSError:
        return False
    finally:
        os.close(fd)
        p.unlink()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("vpd")
    a, b, c = tmp / "a.img", tmp / "b.img", tmp / "c.img"
    c.write_bytes(os.urandom(MiB))
    spec = (f"storvsc:disks={a}:size=16M:odx:rsoc+{b}:size=8M:bs=4096:nolbastatus:rotation=7200"
            f"+{c}:nounmap,bind=uio_hv_generic")
    with run_sim(tmp, "--device", spec, "--no-ic", "--echo", "0") as s:
        s.tmp = tmp            # type: ignore[attr-defined]
        yield s


@pytest.fixture
def hba(sim: SimProcess) -> Iterator[storvsc.Controller]:
    wait_closed(sim)
    with storvsc.open("storvsc", sim.root, subchannels=0, timeout=10.0) as h:
        yield h
    wait_closed(sim)


# ---- every page parsed, with the model's (OpenVMM's) values --------------------------------

def test_vpd_pages_listed(hba: storvsc.Controller) -> None:
    a, b, c = hba.disk(0), hba.disk(1), hba.disk(2)
    # OpenVMM handle_vpd_supported_pages: 0x00, 0x83, 0xCE, 0xCF always; 0x8F with ODX;
    # 0xB0-0xB2 with unmap; sorted
    assert a.vpd_pages == [0x00, 0x83, 0x8F, 0xB0, 0xB1, 0xB2, 0xCE, 0xCF]
    assert b.vpd_pages == [0x00, 0x83, 0xB0, 0xB1, 0xB2, 0xCE, 0xCF]
    assert c.vpd_pages == [0x00, 0x83, 0xCE, 0xCF]
    assert scsi.parse_vpd_supported(a.vpd(0x00)) == a.vpd_pages


def test_block_limits_b0(hba: storvsc.Controller) -> None:
    a, b = hba.disk(0), hba.disk(1)
    bl = a.block_limits
    assert bl.max_transfer_blocks == 0                  # OpenVMM: not reported (no limit)
    assert bl.max_unmap_blocks == 0xFFFFFFFF
    assert bl.max_unmap_descriptors == 4096
    assert bl.unmap_granularity == 1                    # OpenVMM optimal_unmap_sectors
    assert bl.unmap_granularity_alignment == 0          # UGAVALID set, alignment 0
    assert bl.max_write_same_blocks == 8 * MiB // 512
    assert bl.max_compare_and_write_blocks == 0 and bl.optimal_transfer_blocks == 0
    assert bl.body_length == 0x3C
    assert a.optimal_transfer == 0
    assert b.block_limits.max_transfer_blocks == 0
    assert b.block_limits.max_write_same_blocks == 8 * MiB // 4096
    assert b.block_limits.unmap_granularity == 1
    assert hba.disk(2).block_limits == scsi.BlockLimits()     # no page 0xB0 without unmap


def test_characteristics_b1(hba: storvsc.Controller) -> None:
    a, b = hba.disk(0), hba.disk(1)
    assert a.characteristics is not None and a.characteristics.non_rotating
    assert a.rotation_rate == 1
    assert b.characteristics is not None and b.characteristics.rotation_rate == 7200
    assert not b.characteristics.non_rotating
    assert hba.disk(2).characteristics is None
    raw = a.vpd(0xB1)
    assert raw[:4] == bytes([0, 0xB1, 0, 0x3C]) and len(raw) == 64


def test_provisioning_b2(hba: storvsc.Controller) -> None:
    p = hba.disk(0).provisioning
    assert p is not None
    assert p.lbpu and not p.lbpws and not p.lbpws10 and not p.lbprz
    assert p.provisioning == "thin" and p.threshold_exponent == 1
    assert hba.disk(0).unmap_supported and hba.disk(0).capacity.lbpme
    assert hba.disk(2).provisioning is None and not hba.disk(2).unmap_supported


def test_third_party_copy_8f(hba: storvsc.Controller) -> None:
    t = hba.disk(0).third_party_copy
    assert t is not None
    assert t.descriptor_types == (0,)
    assert t.vendor == bytes([0x4D, 0x1F, 0x83, 0x84])     # 'M', cmd id/version, opcodes
    assert t.max_range_descriptors == 8
    assert t.max_token_transfer_blocks == 64 * MiB // 512
    assert t.optimal_transfer_count == 64 * MiB // 512
    assert hba.disk(1).third_party_copy is None


def test_microsoft_pages_and_raw_vpd(hba: storvsc.Controller) -> None:
    a = hba.disk(0)
    cf = a.vpd(0xCF)
    assert cf[4] == 1 and uuid.UUID(bytes_le=cf[8:24]) == uuid.UUID("89a98f15-c928-4d8b-94cd-ef51faa99d33")
    assert a.vpd(0xCE)[4:8] == bytes([1, 1, 0, 0])
    with pytest.raises(IllegalRequest, match=r"does not report VPD page 0x8f .*lists 0x00, 0x83"):
        hba.disk(2).vpd(0x8F)
    with pytest.raises(ConfigError):
        a.vpd(256)


def test_mode_pages(hba: storvsc.Controller) -> None:
    a = hba.disk(0)
    assert a.volatile_write_cache is True and a.read_cache is True
    assert a.control is None                      # OpenVMM answers only page 0x08 (and 0x3F)
    page = a.mode_page(0x08)
    assert page is not None and page[:2] == bytes([0x08, 0x0A]) and page[2] & 0x04
    changeable = a.mode_page(0x08, pc=1)
    assert changeable is not None and not changeable[2] & 0x04
    assert a.mode_page(0x0A) is None
    assert a.mode_page(0x08, pc=3 - 1) is not None     # defaults
    with pytest.raises(ConfigError):
        a.mode_page(0x08, pc=3)


# ---- GET LBA STATUS -------------------------------------------------------------------------

def test_lba_status_follows_the_sparse_image(hba: storvsc.Controller, sim: SimProcess) -> None:
    if not _holes_supported(sim.tmp):                   # type: ignore[attr-defined]
        pytest.skip("the test directory's file system does not report holes")
    a = hba.disk(0)
    a.discard(0, a.size)
    assert a.lba_status() == [scsi.LbaStatus(0, a.blocks, 1)]
    a.write(MiB, os.urandom(8192))
    runs = a.lba_status()
    mapped = [r for r in runs if r.mapped]
    assert len(mapped) == 1 and mapped[0].lba <= MiB // 512 and \
        mapped[0].lba + mapped[0].count >= (MiB + 8192) // 512
    assert sum(r.count for r in runs) == a.blocks and runs[0].state == "deallocated"
    # a window, starting inside the mapped run
    part = a.lba_status(MiB // 512 + 1, 100)
    assert part[0].lba == MiB // 512 + 1 and part[0].mapped
    assert sum(r.count for r in part) == 100
    a.discard(MiB, 8192)
    assert a.lba_status() == [scsi.LbaStatus(0, a.blocks, 1)]


def test_cli_lba_status(sim: SimProcess, hba: storvsc.Controller,
                        capsys: pytest.CaptureFixture[str]) -> None:
    if not _holes_supported(sim.tmp):                   # type: ignore[attr-defined]
        pytest.skip("the test directory's file system does not report holes")
    a = hba.disk(0)
    a.discard(0, a.size)
    a.write(2 * MiB, os.urandom(4096))
    hba.close()
    wait_closed(sim)
    assert main(["blk", "lba-status", "storvsc", "--root", str(sim.root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["mapped_bytes"] >= 4096 and st["total_bytes"] == 16 * MiB
    assert [r["state"] for r in st["ranges"]] == ["deallocated", "mapped", "deallocated"]
    assert st["ranges"][1]["offset"] <= 2 * MiB < st["ranges"][1]["offset"] + st["ranges"][1]["length"]
    wait_closed(sim)
    assert main(["blk", "lba-status", "storvsc", "--root", str(sim.root)]) == 0
    assert f"{st['mapped_bytes']} of {16 * MiB} bytes mapped (1 mapped range(s) of 3)" in capsys.readouterr().out
    wait_closed(sim)
    assert main(["blk", "lba-status", "storvsc", "--root", str(sim.root), "--lun", "1"]) != 0
    assert "does not support the command" in capsys.readouterr().err
    wait_closed(sim)
    assert main(["blk", "lba-status", "storvsc", "--root", str(sim.root), "--offset", "100"]) != 0
    for bad in (["--offset", "16M"], ["--offset", "15M", "--length", "2M"], ["--length", "0"]):
        wait_closed(sim)
        assert main(["blk", "lba-status", "storvsc", "--root", str(sim.root), *bad]) != 0
        assert f"inside LUN 0 ({16 * MiB} bytes)" in capsys.readouterr().err


def test_lba_status_not_supported_and_bounds(hba: storvsc.Controller) -> None:
    with pytest.raises(IllegalRequest, match="does not support the command"):
        hba.disk(1).lba_status()
    with pytest.raises(ConfigError):
        hba.disk(0).lba_status(hba.disk(0).blocks, 1)


# ---- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------

def test_supported_opcodes(hba: storvsc.Controller) -> None:
    ops = hba.disk(0).supported_opcodes()
    assert ops is not None
    table = {(o.opcode, o.service_action): o.cdb_length for o in ops}
    for op, length in ((0x28, 10), (0x2A, 10), (0x88, 16), (0x8A, 16), (0x42, 10), (0x12, 6),
                       (0x35, 10), (0x91, 16), (0xA8, 12)):
        assert table[(op, None)] == length, hex(op)
    assert table[(0x9E, 0x10)] == 16 and table[(0x9E, 0x12)] == 16
    assert table[(0xA3, 0x0C)] == 12
    assert (0x5E, 0) not in table                       # no reservations on this disk
    assert (0x83, None) not in table                    # ODX tokens: VPD only, no command
    a = hba.disk(0)
    assert a.opcode_supported(0x28) is True
    assert a.opcode_supported(0x9E, 0x12) is True
    assert a.opcode_supported(0x5F, 0) is False
    # the default, as Hyper-V/OpenVMM: ILLEGAL REQUEST -> "cannot say"
    assert hba.disk(1).supported_opcodes() is None
    assert hba.disk(1).opcode_supported(0x28) is None


def test_describe_and_cli_info(hba: storvsc.Controller, sim: SimProcess,
                               capsys: pytest.CaptureFixture[str]) -> None:
    d = hba.disk(0).describe()
    json.dumps(d)
    assert d["volatile_write_cache"] is True
    assert d["provisioning"]["type"] == "thin" and d["provisioning"]["lbpu"]
    assert d["third_party_copy"]["max_range_descriptors"] == 8
    assert d["block_limits"]["unmap_granularity_alignment"] == 0
    hba.close()
    wait_closed(sim)
    assert main(["blk", "info", "storvsc", "--root", str(sim.root), "--json"]) == 0
    luns = json.loads(capsys.readouterr().out)["luns"]
    assert luns[1]["rotation_rate"] == 7200 and luns[0]["third_party_copy"] is not None
    assert luns[2]["provisioning"] is None
    wait_closed(sim)
    assert main(["blk", "info", "storvsc", "--root", str(sim.root)]) == 0
    text = capsys.readouterr().out
    assert "write cache on" in text and "thin provisioned" in text and "7200 rpm" in text
    assert "ODX" in text


# ---- an untrusted host: short, lying and hostile pages ----------------------------------------

class _Host:
    """A LunController stand-in answering each CDB from ``answers`` (by opcode/page)."""

    max_transfer = 1 << 20

    def __init__(self, answers: dict[Any, bytes]) -> None:
        self.answers = answers

    def _api_entry(self) -> None:
        pass

    def execute(self, lun: int, cdb: bytes, **kw: Any) -> Any:
        key: Any = (cdb[0], cdb[2]) if cdb[0] == 0x12 else cdb[0]
        data = self.answers[key]
        if isinstance(data, Exception):
            raise data
        return ScsiResult(data, len(data), 1, 0, None)


def _disk(answers: dict[Any, bytes]) -> Disk:
    d = Disk(_Host(answers), 0, scsi.parse_inquiry(bytes(36)))   # type: ignore[arg-type]
    d.capacity = scsi.Capacity(1023, 512)
    return d


def test_short_pages_leave_fields_unreported() -> None:
    d = _disk({(0x12, 0): bytes([0, 0, 0, 3, 0x00, 0xB0, 0xB1]), (0x12, 0xB0): bytes([0, 0xB0, 0, 8]) +
               struct.pack(">4xI", 128), (0x12, 0xB1): bytes([0, 0xB1, 0, 0])})
    d.read_vpd()
    assert d.block_limits.max_transfer_blocks == 128 and d.block_limits.max_unmap_blocks == 0
    assert d.block_limits.body_length == 8 and d.block_limits.unmap_granularity_alignment is None
    assert d.rotation_rate == 0 and d.characteristics == scsi.BlockCharacteristics()


def test_a_listed_page_that_is_refused_or_malformed_is_left_unreported() -> None:
    refused = IllegalRequest("refused", sense_key=5, asc=0x24)
    d = _disk({(0x12, 0): bytes([0, 0, 0, 3, 0x8F, 0xB0, 0xB2]), (0x12, 0xB0): refused,
               (0x12, 0x8F): bytes([0, 0x8F, 0, 8]) + struct.pack(">HH", 0, 200) + bytes(4),
               (0x12, 0xB2): bytes([0, 0xB2, 0, 4, 1, 0x80, 2, 0])})
    d.read_vpd()
    assert d.block_limits == scsi.BlockLimits() and d.third_party_copy is None
    assert d.provisioning is not None and d.unmap_supported          # the good page is used
    assert set(d.vpd_errors) == {0xB0, 0x8F} and "overruns" in d.vpd_errors[0x8F]
    assert d.max_transfer == _Host.max_transfer                     # no 0xB0 limit: the host's
    assert d.describe()["vpd_errors"]["0x8f"]


def test_a_page_longer_than_its_answer_is_cut_to_what_came() -> None:
    # the header claims 200 bytes, 4 arrived: nothing is read past the data
    assert scsi.parse_vpd_block_limits(bytes([0, 0xB0, 0, 200])) == scsi.BlockLimits()
    with pytest.raises(ProtocolError, match="asked for VPD page 0xb0, got page 0xb2"):
        scsi.parse_vpd_block_limits(bytes([0, 0xB2, 0, 4, 1, 2, 3, 4]))
    d = _disk({(0x12, 0x8F): bytes([0, 0xB0, 0, 0])})
    with pytest.raises(ProtocolError, match="returned 4 bytes of page 0xb0"):
        d.vpd(0x8F)


def test_hostile_third_party_copy() -> None:
    with pytest.raises(ProtocolError, match="overruns"):
        scsi.parse_vpd_third_party_copy(bytes([0, 0x8F, 0, 8]) + struct.pack(">HH", 0, 0xFFFF) + bytes(4))
    # an unknown descriptor type is skipped, a short ROD descriptor leaves the limits at 0
    t = scsi.parse_vpd_third_party_copy(bytes([0, 0x8F, 0, 12]) + struct.pack(">HH", 0x8001, 0) +
                                        struct.pack(">HH", 0, 4) + bytes(4))
    assert t.descriptor_types == (0x8001, 0) and t.max_range_descriptors == 0


def test_hostile_lba_status() -> None:
    hdr = struct.pack(">I4x", 4 + 32)
    overlap = hdr + struct.pack(">QIB3x", 0, 10, 0) + struct.pack(">QIB3x", 5, 10, 1)
    with pytest.raises(ProtocolError, match="overlaps"):
        scsi.parse_lba_status(overlap)
    beyond = struct.pack(">I4x", 20) + struct.pack(">QIB3x", 1000, 100, 0)
    with pytest.raises(ProtocolError, match="beyond"):
        scsi.parse_lba_status(beyond, blocks=1024)
    with pytest.raises(ProtocolError, match="4 \\+ 16 n"):
        scsi.parse_lba_status(struct.pack(">I4x", 7))
    with pytest.raises(ProtocolError, match="no blocks"):
        scsi.parse_lba_status(struct.pack(">I4x", 20) + struct.pack(">QIB3x", 0, 0, 0))
    # a host that answers from the wrong LBA: refused, not looped on
    d = _disk({0x9E: struct.pack(">I4x", 20) + struct.pack(">QIB3x", 500, 10, 0)})
    with pytest.raises(ProtocolError, match="does not cover the LBA"):
        d.lba_status(0, 100)
    # a host that answers one block at a time: the driver keeps asking, and merges the runs
    class OneByOne(_Host):
        def execute(self, lun: int, cdb: bytes, **kw: Any) -> Any:
            lba = struct.unpack_from(">Q", cdb, 2)[0]
            data = struct.pack(">I4x", 20) + struct.pack(">QIB3x", lba, 1, lba >= 3)
            return ScsiResult(data, len(data), 1, 0, None)
    d.controller = OneByOne({})
    assert d.lba_status(0, 6) == [scsi.LbaStatus(0, 3, 0), scsi.LbaStatus(3, 3, 1)]


def test_hostile_mode_sense_and_opcodes() -> None:
    # mode data length longer than the data; a page length running past it
    dsp, pages = scsi.parse_mode_pages(bytes([250, 0, 0x90, 0, 0x08, 0x40, 0x04]))
    assert dsp == 0x90 and pages == {0x08: bytes([0x08, 0x40, 0x04])}
    assert scsi.parse_caching_page(pages[0x08]) == scsi.CachingPage(True, False)
    assert scsi.parse_caching_page(bytes([0x08, 1])) is None
    with pytest.raises(ProtocolError):
        scsi.parse_mode_pages(bytes(3))
    ctl = scsi.parse_control_page(bytes([0x0A, 0x0A, 0x04, 0x02, 0x08, 0x80]) + bytes(6))
    assert ctl == scsi.ControlPage(0, 1, True, True, True)
    # RSOC list length beyond the data: only whole descriptors that arrived
    data = struct.pack(">I", 800) + struct.pack(">BxHxBH", 0x28, 0, 0, 10) + bytes(5)
    assert [(o.opcode, o.cdb_length) for o in scsi.parse_supported_opcodes(data)] == [(0x28, 10)]
    assert scsi.parse_one_opcode(bytes([0, 3, 0, 1, 0x28])) is True
    assert scsi.parse_one_opcode(bytes([0, 1])) is False and scsi.parse_one_opcode(bytes(2)) is None


def test_hostile_reservation_data() -> None:
    with pytest.raises(ProtocolError):
        scsi.parse_pr_keys(bytes(7))
    # additional length claims 4096 keys, 2 arrived
    gen, keys = scsi.parse_pr_keys(struct.pack(">II", 5, 4096 * 8) + struct.pack(">QQ", 1, 2) + bytes(3))
    assert gen == 5 and keys == [1, 2]
    assert scsi.parse_pr_reservation(struct.pack(">II", 1, 16) + bytes(8))[1] is None
    gen, regs = scsi.parse_pr_full_status(struct.pack(">II", 2, 64) + struct.pack(">Q4xBB4xHI", 7, 3, 1, 1, 9999) + b"x")
    assert regs[0].key == 7 and regs[0].holder and regs[0].transport_id == b"x"

"""The StorVSP model (simulator, separate process) driven with hand-built packets.

No storvsc driver code here: every packet is assembled with ``struct`` from the tables of
storvsc_ic.md (§2.2 header, §2.3 vmscsi_request, §3.1 GPA-direct), sent with the raw ring
API, and every expectation comes from §2.8 (negotiation), §5.1 (parsing, fatal errors, reply
sizes), §5.2 (completion format, SRB -> NTSTATUS), §5.3-§5.6 (controller/disk commands,
errors, hot add/remove).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.channel import Channel, ChannelDevice, open_device
from uvmbus.dma import DmaPool, open_dma_memory
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_INBAND

pytestmark = pytest.mark.timeout(180)

# §2.1 / §2.6 values, written out independently of uvmbus.storvsc.protocol
COMPLETE_IO, REMOVE_DEVICE, EXECUTE_SRB, RESET_LUN, RESET_ADAPTER, RESET_BUS = 1, 2, 3, 4, 5, 6
BEGIN, END, QUERY_VERSION, QUERY_PROPERTIES, ENUMERATE_BUS, FCHBA = 7, 8, 9, 10, 11, 12
CREATE_SUB_CHANNELS, EVENT_NOTIFICATION = 13, 14
SUCCESS = 0
INVALID_PARAMETER = 0xC000000D
REVISION_MISMATCH = 0xC0000059
DEVICE_DOES_NOT_EXIST = 0xC00000C0
INVALID_DEVICE_STATE = 0xC0000184
IO_DEVICE_ERROR = 0xC0000185
BUFFER_OVERFLOW = 0x80000005
SRB_SUCCESS, SRB_ERROR, SRB_INVALID_REQUEST, SRB_DATA_OVERRUN, SRB_INVALID_LUN = 1, 4, 6, 0x12, 0x20
AUTOSENSE = 0x80
GOOD, CHECK = 0, 2
READ, WRITE, NODATA = 1, 0, 2
MiB = 1 << 20


def header(op: int, status: int = 0, flags: int = 1) -> bytes:
    return struct.pack("<III", op, flags, status)


def srb(cdb: bytes, *, data_in: int = NODATA, length: int = 0, lun: int = 0, path: int = 0,
        target: int = 0) -> bytes:
    """A 52-byte vmscsi_request (§2.3): length 0x34, sense_info_length 0x14, Win8 fields."""
    body = struct.pack("<HBBBBBBBBBBI", 0x34, 0, 0, 0, path, target, lun, len(cdb), 0x14,
                       data_in, 0, length)
    body += cdb.ljust(20, b"\0")
    body += struct.pack("<HBBIII", 0, 0, 0, 0x08 | (0x40 if data_in == READ else 0x80 if data_in == WRITE and length else 0), 60, 0)
    assert len(body) == 52
    return body


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


class Reply:
    def __init__(self, ptype: int, trans_id: int, payload: bytes):
        self.type, self.trans_id, self.payload = ptype, trans_id, payload
        self.op, self.flags, self.status = struct.unpack_from("<III", payload.ljust(12, b"\0"))

    @property
    def srb(self) -> dict[str, int | bytes]:
        b = self.payload[12:64].ljust(52, b"\0")
        f = struct.unpack_from("<HBBBBBBBBBBI", b)
        return {"length": f[0], "srb_status": f[1], "scsi_status": f[2], "path_id": f[4],
                "target_id": f[5], "lun": f[6], "cdb_length": f[7], "sense_info_length": f[8],
                "data_in": f[9], "transferred": f[11], "sense": b[16:36],
                "win8": b[36:52]}


class Guest:
    """A raw guest: one channel, DMA memory, hand-built packets."""

    def __init__(self, sim: SimProcess, ref: str = "storvsc"):
        self.sim = sim
        self.cd: ChannelDevice = open_device(ref, sim.root)
        self.ch: Channel = self.cd.primary
        self.tid = 100
        self.mem = open_dma_memory(sim.root)
        self.pool = DmaPool(self.mem, buffer_size=None, region_size=4 * MiB, max_regions=4)

    def close(self) -> None:
        self.pool.close()
        self.mem.close()
        self.cd.close()

    def next_tid(self) -> int:
        self.tid += 1
        return self.tid

    def send(self, payload: bytes, *, ch: Channel | None = None, tid: int | None = None,
             flags: int = FLAG_COMPLETION_REQUESTED, ptype: int = PKT_INBAND,
             ranges: list[tuple[int, int, list[int]]] | None = None) -> int:
        ch = ch or self.ch
        tid = self.next_tid() if tid is None else tid
        if ranges is not None:
            assert ch.tx.put_gpa_direct(ranges, payload, trans_id=tid, flags=flags)
        else:
            assert ch.tx.put(payload, trans_id=tid, flags=flags, type=ptype)
        ch.flush()
        return tid

    def recv(self, *, ch: Channel | None = None, timeout: float = 10.0) -> Reply:
        ch = ch or self.ch
        pkts = ch.recv(timeout=timeout, max_packets=1)
        assert pkts, f"no packet from the host within {timeout} s"
        p = pkts[0]
        return Reply(p.type, p.trans_id, bytes(p.payload))

    def nothing(self, *, ch: Channel | None = None, wait: float = 0.5) -> None:
        """The host sends nothing (a stopped worker, a held packet)."""
        ch = ch or self.ch
        assert ch.recv(timeout=wait) == []

    def call(self, payload: bytes, **kw: object) -> Reply:
        tid = self.send(payload, **kw)  # type: ignore[arg-type]
        r = self.recv(ch=kw.get("ch"))  # type: ignore[arg-type]
        assert r.type == PKT_COMP and r.trans_id == tid, (r.type, r.trans_id, tid)
        return r

    def init(self, version: int = 0x0600, *, end: bool = True) -> Reply:
        assert self.call(header(BEGIN).ljust(64, b"\0")).status == SUCCESS
        r = self.call((header(QUERY_VERSION) + struct.pack("<HH", version, 0)).ljust(64, b"\0"))
        assert r.status == SUCCESS, hex(r.status)
        props = self.call(header(QUERY_PROPERTIES).ljust(64, b"\0"))
        if end:
            assert self.call(header(END).ljust(64, b"\0")).status == SUCCESS
        return props

    def scsi(self, cdb: bytes, *, data_in: int = NODATA, length: int = 0, lun: int = 0,
             buf: object = None, buf_len: int | None = None, data: bytes = b"", path: int = 0,
             target: int = 0, ch: Channel | None = None) -> tuple[Reply, bytes]:
        """Run one EXECUTE_SRB; returns the completion and the buffer's bytes after it."""
        ranges = None
        b = None
        if length:
            b = self.pool.alloc(buf_len or length) if buf is None else buf
            if data:
                b.view[:len(data)] = data
            ranges = [b.gpa_range(0, buf_len or length)]
        r = self.call(header(EXECUTE_SRB) + srb(cdb, data_in=data_in, length=length, lun=lun,
                                                path=path, target=target), ranges=ranges, ch=ch)
        out = bytes(b.view[:length]) if b is not None else b""
        if b is not None and buf is None:
            self.pool.free(b)
        return r, out


def image(tmp_path: Path, name: str, size: int, fill: bool = True) -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        if fill:
            f.write(os.urandom(size))
        else:
            f.truncate(size)
    return p


@pytest.fixture(scope="module")
def disk_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("storvsp")
    d0 = image(tmp, "lun0.img", 8 * MiB)
    d1 = image(tmp, "lun1.img", 4 * MiB)
    with run_sim(tmp, "--disk", str(d0), "--disk", f"{d1}:ro:bs=4096", "--bind", "--no-ic",
                 "--echo", "0") as sim:
        yield sim, d0, d1


def settle(sim: SimProcess, timeout: float = 10.0) -> None:
    """Wait until the simulator processed our last close (asynchronous there; inside
    close(2) on a real kernel): the next open then starts from a reset model."""
    deadline = time.monotonic() + timeout
    dev = sim.device("storvsc")["device_id"]
    while sim.device_stats(dev)["connections"]:
        assert time.monotonic() < deadline, "simulator did not process the close"
        time.sleep(0.01)


@pytest.fixture
def guest(disk_sim: tuple[SimProcess, Path, Path]) -> Iterator[Guest]:
    settle(disk_sim[0])
    g = Guest(disk_sim[0])
    yield g
    g.close()
    settle(disk_sim[0])


def storvsp_stats(sim: SimProcess) -> dict:
    return sim.device_stats(sim.device("storvsc")["device_id"])["storvsp"]


# ==== §2.8 negotiation ==========================================================================

def test_negotiation_state_machine(guest: Guest) -> None:
    # anything before BEGIN: INVALID_DEVICE_STATE, state unchanged
    assert guest.call(header(QUERY_PROPERTIES).ljust(64, b"\0")).status == INVALID_DEVICE_STATE
    r = guest.call(header(BEGIN).ljust(64, b"\0"))
    assert (r.op, r.flags, r.status) == (COMPLETE_IO, 0, SUCCESS)
    assert guest.call(header(END).ljust(64, b"\0")).status == INVALID_DEVICE_STATE
    # 6.2 is not OpenVMM's: REVISION_MISMATCH echoing the version, still in QueryVersion
    r = guest.call((header(QUERY_VERSION) + struct.pack("<HH", 0x0602, 0)).ljust(64, b"\0"))
    assert r.status == REVISION_MISMATCH and r.payload[12:14] == b"\x02\x06"
    r = guest.call((header(QUERY_VERSION) + struct.pack("<HH", 0x0600, 0)).ljust(64, b"\0"))
    assert r.status == SUCCESS and struct.unpack_from("<HH", r.payload, 12) == (0x0600, 0)
    r = guest.call(header(QUERY_PROPERTIES).ljust(64, b"\0"))
    reserved, max_ch, _r1, flags, max_xfer, _r2 = struct.unpack_from("<IHHIIQ", r.payload, 12)
    assert r.status == SUCCESS and max_ch == 4 and flags & 1 and max_xfer == 0x40000
    assert guest.call(header(END).ljust(64, b"\0")).status == SUCCESS
    # Ready: repeated init operations are refused, resets are no-ops
    for op in (BEGIN, QUERY_VERSION, QUERY_PROPERTIES, END):
        assert guest.call(header(op).ljust(64, b"\0")).status == INVALID_DEVICE_STATE
    for op in (RESET_LUN, RESET_BUS, RESET_ADAPTER):
        assert guest.call(header(op).ljust(64, b"\0")).status == SUCCESS


def test_io_before_ready_is_refused(guest: Guest) -> None:
    r, _ = guest.scsi(bytes(6))      # TEST UNIT READY in Begin state
    assert r.status == INVALID_DEVICE_STATE


@pytest.mark.parametrize("version,multi", [(0x0200, False), (0x0402, False), (0x0501, True),
                                           (0x0600, True)])
def test_each_openvmm_version(guest: Guest, version: int, multi: bool) -> None:
    props = guest.init(version)
    _res, max_ch, _r1, flags, max_xfer, _r2 = struct.unpack_from("<IHHIIQ", props.payload, 12)
    assert bool(flags & 1) == multi and (max_ch > 0) == multi and max_xfer == 0x40000
    r, _ = guest.scsi(bytes(6))
    assert r.srb["srb_status"] == SRB_SUCCESS
    if not multi:   # CREATE_SUB_CHANNELS needs >= 5.1 (§4)
        r = guest.call((header(CREATE_SUB_CHANNELS) + struct.pack("<H", 1)).ljust(64, b"\0"))
        assert r.status == INVALID_DEVICE_STATE


@pytest.mark.parametrize("req_len,reply_len", [(48, 48), (50, 56), (56, 56), (64, 64), (72, 64)])
def test_reply_is_sized_to_the_request(guest: Guest, req_len: int, reply_len: int) -> None:
    # §5.1: reply = 12 + min(len - 12, 52), seen after the ring's 8-byte padding
    tid = guest.send(header(BEGIN).ljust(req_len, b"\0"))
    r = guest.recv()
    assert r.trans_id == tid and r.status == SUCCESS and len(r.payload) == reply_len


def test_hyperv_versions_option(tmp_path: Path) -> None:
    d = image(tmp_path, "x.img", MiB)
    with run_sim(tmp_path, "--device", f"storvsc:disks={d},versions=hyperv,bind=uio_hv_generic",
                 "--no-ic", "--echo", "0") as sim:
        g = Guest(sim)
        try:
            g.init(0x0602)
            r, _ = g.scsi(bytes(6))
            assert r.srb["srb_status"] == SRB_SUCCESS
            assert storvsp_stats(sim)["version"] == "0x0602"
        finally:
            g.close()
        assert storvsp_stats(sim)["version"] is None           # last close: back to Begin


# ==== §5.1 fatal packets ==========================================================================

FATAL_CASES: dict[str, dict] = {
    "completion packet": {"payload": header(BEGIN).ljust(64, b"\0"), "ptype": PKT_COMP},
    "not transactional": {"payload": header(BEGIN).ljust(64, b"\0"), "flags": 0},
    "short payload": {"payload": struct.pack("<II", BEGIN, 1)},
    "COMPLETE_IO": {"payload": header(COMPLETE_IO).ljust(64, b"\0")},
    "REMOVE_DEVICE": {"payload": header(REMOVE_DEVICE).ljust(64, b"\0")},
    "ENUMERATE_BUS": {"payload": header(ENUMERATE_BUS).ljust(64, b"\0")},
    "FCHBA_DATA": {"payload": header(FCHBA).ljust(64, b"\0")},
    "EVENT_NOTIFICATION": {"payload": header(EVENT_NOTIFICATION).ljust(64, b"\0")},
    "operation 15": {"payload": header(15).ljust(64, b"\0")},
    "operation 0": {"payload": header(0).ljust(64, b"\0")},
}


def test_fatal_transfer_page_packet(guest: Guest, disk_sim: tuple) -> None:
    # a type-7 packet is no StorVSP request either (InvalidPacketType, like a completion)
    sim = disk_sim[0]
    before = storvsp_stats(sim)["fatal_errors"]
    assert guest.ch.tx.put_xfer_pages(0, [(64, 0)], header(BEGIN).ljust(64, b"\0"), trans_id=5)
    guest.ch.flush()
    guest.nothing()
    assert storvsp_stats(sim)["fatal_errors"] == before + 1


@pytest.mark.parametrize("case", list(FATAL_CASES))
def test_fatal_packets_stop_the_worker(guest: Guest, disk_sim: tuple, case: str) -> None:
    sim = disk_sim[0]
    before = storvsp_stats(sim)["fatal_errors"]
    guest.send(**FATAL_CASES[case])
    guest.nothing()
    # the worker is gone: even a valid request is never answered
    guest.send(header(BEGIN).ljust(64, b"\0"))
    guest.nothing()
    st = storvsp_stats(sim)
    assert st["fatal_errors"] == before + 1, st
    chans = sim.device_stats(sim.device("storvsc")["device_id"])["channels"]
    assert any("fatal packet error" in str(c.get("error", "")) for c in chans.values() if c.get("open"))


@pytest.mark.parametrize("case", ["two ranges", "length without range", "range too short"])
def test_fatal_srb_ranges(guest: Guest, disk_sim: tuple, case: str) -> None:
    sim = disk_sim[0]
    guest.init()
    before = storvsp_stats(sim)["fatal_errors"]
    b = guest.pool.alloc(8192)
    read = cdb16(0x88, 0, 8)
    if case == "two ranges":
        guest.send(header(EXECUTE_SRB) + srb(read, data_in=READ, length=4096),
                   ranges=[b.gpa_range(0, 4096), b.gpa_range(4096, 4096)])
    elif case == "length without range":
        guest.send(header(EXECUTE_SRB) + srb(read, data_in=READ, length=4096))
    else:
        guest.send(header(EXECUTE_SRB) + srb(read, data_in=READ, length=4096),
                   ranges=[b.gpa_range(0, 2048)])
    guest.nothing()
    assert storvsp_stats(sim)["fatal_errors"] == before + 1


# ==== §5.2 completion format, §5.3 controller-level SCSI ==========================================

def test_completion_format_and_read(guest: Guest, disk_sim: tuple) -> None:
    _sim, d0, _ = disk_sim
    guest.init()
    r, data = guest.scsi(cdb16(0x88, 3, 8), data_in=READ, length=4096, lun=0)
    s = r.srb
    assert (r.op, r.flags, r.status) == (COMPLETE_IO, 0, SUCCESS) and len(r.payload) == 64
    assert s["length"] == 0x34 and s["srb_status"] == SRB_SUCCESS and s["scsi_status"] == GOOD
    assert s["cdb_length"] == 16 and s["sense_info_length"] == 20 and s["transferred"] == 4096
    # path/target/lun, data_in and the Win8 fields are not echoed
    assert (s["path_id"], s["target_id"], s["lun"], s["data_in"]) == (0, 0, 0, 0)
    assert s["win8"] == bytes(16)
    assert data == d0.read_bytes()[3 * 512:3 * 512 + 4096]


def test_report_luns_any_path(guest: Guest) -> None:
    guest.init()
    r, data = guest.scsi(struct.pack(">BB4xIBB", 0xA0, 0, 4096, 0, 0), data_in=READ, length=4096)
    assert r.srb["srb_status"] == SRB_SUCCESS and r.srb["transferred"] == 8 + 16
    n = struct.unpack_from(">I", data)[0]
    assert n == 16 and data[8:10] == b"\x00\x00" and data[16:18] == b"\x00\x01"
    # another (path, target): answered, with no LUNs
    r, data = guest.scsi(struct.pack(">BB4xIBB", 0xA0, 0, 4096, 0, 0), data_in=READ, length=4096,
                         path=1, target=1, lun=7)
    assert r.srb["srb_status"] == SRB_SUCCESS and r.srb["transferred"] == 8
    # a buffer < 8: SUCCESS, nothing moved; the CDB allocation length is ignored
    r, _ = guest.scsi(struct.pack(">BB4xIBB", 0xA0, 0, 4096, 0, 0), data_in=READ, length=4)
    assert r.srb["srb_status"] == SRB_SUCCESS and r.srb["transferred"] == 0


def test_missing_lun(guest: Guest) -> None:
    guest.init()
    r, data = guest.scsi(struct.pack(">BBBHB", 0x12, 0, 0, 96, 0), data_in=READ, length=96, lun=9)
    assert r.srb["srb_status"] == SRB_SUCCESS and r.srb["transferred"] == 96
    assert data[0] == 0x7F and data[8:36] == bytes(28)        # vendor strings only for LUN 0
    r, _ = guest.scsi(struct.pack(">BBBHB", 0x12, 1, 0x83, 96, 0), data_in=READ, length=96, lun=9)
    assert r.srb["srb_status"] == SRB_INVALID_REQUEST | AUTOSENSE and r.srb["scsi_status"] == CHECK
    assert r.srb["sense"][2] == 0x05 and r.srb["sense"][12] == 0x24
    r, _ = guest.scsi(bytes(6), lun=9)                         # TEST UNIT READY
    assert r.srb["srb_status"] == SRB_INVALID_LUN and r.srb["scsi_status"] == CHECK
    assert r.status == DEVICE_DOES_NOT_EXIST and r.srb["sense"] == bytes(20)


# ==== §5.4/§5.5 disk commands and errors ==========================================================

def _sense(r: Reply) -> tuple[int, int, int]:
    s = r.srb["sense"]
    assert isinstance(s, bytes) and s[0] == 0x70 and s[7] == 10
    return s[2], s[12], s[13]


def test_read_write_errors(guest: Guest) -> None:
    guest.init()
    blocks = 8 * MiB // 512
    cases = [
        (cdb16(0x88, 0, 0), 4096, (5, 0x21, 0)),              # zero blocks: ILLEGAL BLOCK
        (cdb16(0x88, blocks - 4, 8), 4096, (5, 0x21, 0)),     # beyond the end
        (cdb16(0x88, 0, 16), 4096, (5, 0x21, 0)),             # more than the buffer holds
        (bytes([0x28, 1, 0, 0, 0, 0, 0, 0, 8, 0]), 4096, (5, 0x24, 0)),   # RelAdr
    ]
    for cdb, length, sense in cases:
        r, _ = guest.scsi(cdb, data_in=READ, length=length)
        assert r.srb["srb_status"] == SRB_INVALID_REQUEST | AUTOSENSE, cdb.hex()
        assert r.srb["scsi_status"] == CHECK and _sense(r) == sense and r.status == IO_DEVICE_ERROR
    # unknown command: ILLEGAL REQUEST / invalid command operation code
    r, _ = guest.scsi(bytes([0xC1]) + bytes(9))
    assert r.srb["srb_status"] == SRB_INVALID_REQUEST | AUTOSENSE and _sense(r) == (5, 0x20, 0)
    # REQUEST SENSE returns the saved sense once, then NO SENSE
    r, data = guest.scsi(bytes([0x03, 0, 0, 0, 18, 0]), data_in=READ, length=18)
    assert r.srb["srb_status"] == SRB_SUCCESS and data[2] == 5 and data[12] == 0x20
    r, data = guest.scsi(bytes([0x03, 0, 0, 0, 18, 0]), data_in=READ, length=18)
    assert data[0] == 0x70 and data[2] == 0


def test_write_protected_lun(guest: Guest, disk_sim: tuple) -> None:
    guest.init()
    r, _ = guest.scsi(cdb16(0x8A, 0, 1), data_in=WRITE, length=4096, lun=1, data=b"x" * 4096)
    assert r.srb["srb_status"] == SRB_ERROR | AUTOSENSE and _sense(r) == (7, 0x27, 0)
    assert r.status == IO_DEVICE_ERROR
    assert disk_sim[2].read_bytes()[:4096] != b"x" * 4096


def test_read_capacity_overrun_and_values(guest: Guest) -> None:
    guest.init()
    r, _ = guest.scsi(bytes([0x25]) + bytes(9), data_in=READ, length=4)
    assert r.srb["srb_status"] == SRB_DATA_OVERRUN | AUTOSENSE and r.status == BUFFER_OVERFLOW
    r, _ = guest.scsi(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in=READ, length=8)
    assert r.srb["srb_status"] == SRB_DATA_OVERRUN | AUTOSENSE
    r, data = guest.scsi(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), data_in=READ, length=32, lun=1)
    last, bs = struct.unpack_from(">QI", data)
    assert (last, bs) == (4 * MiB // 4096 - 1, 4096) and data[14] & 0x80   # LBPME
    r, data = guest.scsi(bytes([0x25]) + bytes(9), data_in=READ, length=8)
    assert struct.unpack(">II", data) == (8 * MiB // 512 - 1, 512)


def test_inquiry_vpd_and_mode_sense(guest: Guest) -> None:
    guest.init()
    r, data = guest.scsi(struct.pack(">BBBHB", 0x12, 0, 0, 104, 0), data_in=READ, length=104)
    assert r.srb["transferred"] == 104 and data[0] == 0 and data[2] == 5 and data[4] == 99
    assert data[7] & 2 and data[8:16] == b"Msft    " and data[16:32] == b"Virtual Disk    "
    # allocation length above the buffer: INVALID CDB
    r, _ = guest.scsi(struct.pack(">BBBHB", 0x12, 0, 0, 200, 0), data_in=READ, length=104)
    assert _sense(r) == (5, 0x24, 0)
    r, data = guest.scsi(struct.pack(">BBBHB", 0x12, 1, 0, 64, 0), data_in=READ, length=64)
    pages = list(data[4:4 + data[3]])
    assert pages == sorted(pages) and {0x00, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    r, data = guest.scsi(struct.pack(">BBBHB", 0x12, 1, 0xB2, 64, 0), data_in=READ, length=64)
    assert data[1] == 0xB2 and data[5] & 0x80                   # LBPU
    r, _ = guest.scsi(struct.pack(">BBBHB", 0x12, 1, 0x99, 64, 0), data_in=READ, length=64)
    assert _sense(r) == (5, 0x24, 0)
    r, data = guest.scsi(bytes([0x1A, 0, 0x08, 0, 64, 0]), data_in=READ, length=64)
    assert r.srb["transferred"] == 16 and data[4] == 0x08 and data[6] & 0x04   # WCE
    r, _ = guest.scsi(bytes([0x1A, 0, 0xC8, 0, 64, 0]), data_in=READ, length=64)   # PC = saved
    assert _sense(r) == (5, 0x24, 0)


def test_pfn_outside_guest_ram_fails_the_request(guest: Guest) -> None:
    guest.init()
    bad = [(4096, 0, [0x10])]     # far below the simulated RAM's base PFN
    tid = guest.send(header(EXECUTE_SRB) + srb(cdb16(0x88, 0, 8), data_in=READ, length=4096),
                     ranges=bad)
    r = guest.recv()
    assert r.trans_id == tid and r.srb["srb_status"] == SRB_INVALID_REQUEST | AUTOSENSE
    assert _sense(r) == (5, 0x24, 0)


def test_write_flush_unmap_via_python_path(guest: Guest, disk_sim: tuple) -> None:
    sim, d0, _ = disk_sim
    guest.init()
    sim.fault("slow_us", 1, device="storvsc")          # every packet through the Python model
    try:
        data = os.urandom(8192)
        r, _ = guest.scsi(cdb16(0x8A, 64, 16, flags=0x08), data_in=WRITE, length=8192, data=data)
        assert r.srb["srb_status"] == SRB_SUCCESS and r.srb["transferred"] == 8192
        r, _ = guest.scsi(struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0))
        assert r.srb["srb_status"] == SRB_SUCCESS
        assert d0.read_bytes()[64 * 512:64 * 512 + 8192] == data
        params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 64, 8)
        r, _ = guest.scsi(bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", len(params), 0),
                          data_in=WRITE, length=len(params), data=params)
        assert r.srb["srb_status"] == SRB_SUCCESS
        img = d0.read_bytes()
        assert img[64 * 512:72 * 512] == bytes(4096) and img[72 * 512:80 * 512] == data[4096:]
        bad = struct.pack(">HH4x", 99, 16) + struct.pack(">QI4x", 64, 8)      # wrong data length
        r, _ = guest.scsi(bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", len(bad), 0),
                          data_in=WRITE, length=len(bad), data=bad)
        assert _sense(r) == (5, 0x26, 0)
    finally:
        sim.clear_faults()


def test_media_error_ranges(guest: Guest, disk_sim: tuple) -> None:
    sim = disk_sim[0]
    guest.init()
    sim.control("model", device="storvsc", op="media_error", args={"lun": 0, "start": 100, "count": 4})
    try:
        r, _ = guest.scsi(cdb16(0x88, 96, 8), data_in=READ, length=4096)
        assert r.srb["srb_status"] == SRB_ERROR | AUTOSENSE and _sense(r) == (3, 0x11, 0)
        r, _ = guest.scsi(cdb16(0x88, 0, 8), data_in=READ, length=4096)     # elsewhere: fine
        assert r.srb["srb_status"] == SRB_SUCCESS
    finally:
        sim.control("model", device="storvsc", op="clear_media_errors", args={"lun": 0})
    r, _ = guest.scsi(cdb16(0x88, 96, 8), data_in=READ, length=4096)
    assert r.srb["srb_status"] == SRB_SUCCESS


# ==== §5.6 hot add / remove; §4 sub-channels ======================================================

def test_hot_add_remove(tmp_path: Path) -> None:
    base = image(tmp_path, "base.img", MiB)
    extra = tmp_path / "extra.img"
    with run_sim(tmp_path, "--disk", str(base), "--bind", "--no-ic", "--echo", "0") as sim:
        g = Guest(sim)
        try:
            g.init()

            def report() -> list[int]:
                r, data = g.scsi(struct.pack(">BB4xIBB", 0xA0, 0, 4096, 0, 0), data_in=READ, length=4096)
                n = struct.unpack_from(">I", data)[0] // 8
                return [struct.unpack_from(">H", data, 8 + 8 * i)[0] for i in range(n)]

            assert report() == [0]
            r, _ = g.scsi(cdb16(0x8A, 0, 1), data_in=WRITE, length=512, lun=3, data=b"a" * 512)
            assert r.srb["srb_status"] == SRB_INVALID_LUN
            sim.control("model", device="storvsc", op="attach", args={"spec": f"{extra}:size=1M", "lun": 3})
            e = g.recv()      # ENUMERATE_BUS: in-band, id 0, no completion, 64 bytes (Win8+)
            assert (e.type, e.trans_id, e.op, len(e.payload)) == (PKT_INBAND, 0, ENUMERATE_BUS, 64)
            assert report() == [0, 3]
            r, _ = g.scsi(cdb16(0x8A, 0, 1), data_in=WRITE, length=512, lun=3, data=b"a" * 512)
            assert r.srb["srb_status"] == SRB_SUCCESS and extra.read_bytes()[:512] == b"a" * 512
            sim.control("model", device="storvsc", op="detach", args={"lun": 3})
            e = g.recv()
            assert e.op == ENUMERATE_BUS and e.trans_id == 0
            assert report() == [0]
            r, _ = g.scsi(cdb16(0x88, 0, 1), data_in=READ, length=512, lun=3)
            assert r.srb["srb_status"] == SRB_INVALID_LUN
        finally:
            g.close()


def test_subchannels(guest: Guest, disk_sim: tuple) -> None:
    guest.init(end=False)
    r = guest.call((header(CREATE_SUB_CHANNELS) + struct.pack("<H", 5)).ljust(64, b"\0"))
    assert r.status == INVALID_PARAMETER                       # more than max (4)
    r = guest.call((header(CREATE_SUB_CHANNELS) + struct.pack("<H", 2)).ljust(64, b"\0"))
    assert r.status == SUCCESS
    subs = guest.cd.open_subchannels(2)
    # sub-channels serve nothing before the primary is Ready: the packet waits
    tid = guest.send(header(EXECUTE_SRB) + srb(bytes(6)), ch=subs[0])
    guest.nothing(ch=subs[0])
    assert guest.call(header(END).ljust(64, b"\0")).status == SUCCESS
    r = guest.recv(ch=subs[0])
    assert r.trans_id == tid and r.srb["srb_status"] == SRB_SUCCESS
    # CREATE_SUB_CHANNELS only once
    r = guest.call((header(CREATE_SUB_CHANNELS) + struct.pack("<H", 1)).ljust(64, b"\0"))
    assert r.status == INVALID_DEVICE_STATE
    # I/O on the second sub-channel completes on that channel
    r, _ = guest.scsi(cdb16(0x88, 0, 8), data_in=READ, length=4096, ch=subs[1])
    assert r.srb["srb_status"] == SRB_SUCCESS


def test_zero_needless_signals(disk_sim: tuple) -> None:
    sim = disk_sim[0]
    t = sim.totals()
    assert t["needless_signals"] == 0, sim.needless_report()
    assert t["kernel_oops"] == 0


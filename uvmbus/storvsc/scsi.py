"""SCSI for the guest driver: CDB builders, response parsers, sense decoding.

Everything SCSI is big-endian (SPC-4/SBC-3 layouts).  The host model in
``uvmbus.sim.models.storvsp`` deliberately does not use this module: it
decodes CDBs and builds its responses on its own, from the reference
(storvsc_ic.md §5), so a misunderstanding here is not silently shared.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from uvmbus.errors import (
    DataProtect,
    IllegalRequest,
    MediumError,
    NotReady,
    ProtocolError,
    ScsiError,
    UnitAttention,
)

__all__ = [
    "Opcode", "SenseKey", "Sense", "InquiryData", "Capacity", "BlockLimits", "Designator",
    "LogicalBlockProvisioning",
    "test_unit_ready", "inquiry", "report_luns", "read_capacity10", "read_capacity16", "read10",
    "write10", "read16", "write16", "synchronize_cache10", "synchronize_cache16", "unmap",
    "unmap_parameters", "request_sense", "mode_sense6", "mode_sense10", "write_same16",
    "start_stop_unit",
    "parse_inquiry", "parse_vpd_supported", "parse_vpd_serial", "parse_vpd_device_ids",
    "parse_vpd_block_limits", "parse_vpd_rotation_rate", "parse_vpd_lbp", "parse_report_luns",
    "parse_read_capacity10", "parse_read_capacity16", "parse_sense", "sense_exception",
    "encode_lun", "decode_lun",
]


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ6 = 0x08
    WRITE6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT6 = 0x15
    RESERVE6 = 0x16
    RELEASE6 = 0x17
    MODE_SENSE6 = 0x1A
    START_STOP_UNIT = 0x1B
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW = 0x1E
    READ_CAPACITY10 = 0x25
    READ10 = 0x28
    WRITE10 = 0x2A
    WRITE_VERIFY10 = 0x2E
    VERIFY10 = 0x2F
    SYNCHRONIZE_CACHE10 = 0x35
    WRITE_SAME10 = 0x41
    UNMAP = 0x42
    MODE_SELECT10 = 0x55
    MODE_SENSE10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ16 = 0x88
    WRITE16 = 0x8A
    WRITE_VERIFY16 = 0x8E
    VERIFY16 = 0x8F
    SYNCHRONIZE_CACHE16 = 0x91
    WRITE_SAME16 = 0x93
    SERVICE_ACTION_IN16 = 0x9E
    REPORT_LUNS = 0xA0
    READ12 = 0xA8
    WRITE12 = 0xAA
    WRITE_VERIFY12 = 0xAE
    VERIFY12 = 0xAF


SA_READ_CAPACITY16 = 0x10
SA_GET_LBA_STATUS = 0x12


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


# ---- CDB builders ------------------------------------------------------------------------

def test_unit_ready() -> bytes:
    return bytes(6)


def request_sense(alloc: int = 18) -> bytes:
    return bytes([Opcode.REQUEST_SENSE, 0, 0, 0, alloc & 0xFF, 0])


def inquiry(alloc: int, *, evpd: bool = False, page: int = 0) -> bytes:
    """INQUIRY: standard data (evpd False) or VPD page ``page``."""
    return struct.pack(">BBBHB", Opcode.INQUIRY, 1 if evpd else 0, page, alloc, 0)


def report_luns(alloc: int, select_report: int = 0) -> bytes:
    return struct.pack(">BBB3xIBB", Opcode.REPORT_LUNS, 0, select_report, alloc, 0, 0)


def read_capacity10() -> bytes:
    return bytes([Opcode.READ_CAPACITY10]) + bytes(9)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", Opcode.SERVICE_ACTION_IN16, SA_READ_CAPACITY16, 0, alloc, 0, 0)


def read10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", Opcode.READ10, 0x08 if fua else 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", Opcode.WRITE10, 0x08 if fua else 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", Opcode.READ16, 0x08 if fua else 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", Opcode.WRITE16, 0x08 if fua else 0, lba, blocks, 0, 0)


def synchronize_cache10(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBIBHB", Opcode.SYNCHRONIZE_CACHE10, 0, lba, 0, blocks, 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBQIBB", Opcode.SYNCHRONIZE_CACHE16, 0, lba, blocks, 0, 0)


def unmap_parameters(ranges: list[tuple[int, int]]) -> bytes:
    """UNMAP parameter list: 8-byte header + one 16-byte descriptor per ``(lba, blocks)``."""
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(desc), len(desc)) + desc


def unmap(param_len: int) -> bytes:
    return struct.pack(">BB4xBHB", Opcode.UNMAP, 0, 0, param_len, 0)


def mode_sense6(page: int, alloc: int = 255, *, pc: int = 0, dbd: bool = False) -> bytes:
    return bytes([Opcode.MODE_SENSE6, 0x08 if dbd else 0, (pc << 6) | (page & 0x3F), 0,
                  alloc & 0xFF, 0])


def mode_sense10(page: int, alloc: int = 1024, *, pc: int = 0, dbd: bool = False) -> bytes:
    return struct.pack(">BBBB3xHB", Opcode.MODE_SENSE10, 0x08 if dbd else 0,
                       (pc << 6) | (page & 0x3F), 0, alloc, 0)


def write_same16(lba: int, blocks: int, *, unmap_bit: bool = False) -> bytes:
    return struct.pack(">BBQIBB", Opcode.WRITE_SAME16, 0x08 if unmap_bit else 0, lba, blocks, 0, 0)


def start_stop_unit(start: bool, *, immed: bool = False) -> bytes:
    return bytes([Opcode.START_STOP_UNIT, 1 if immed else 0, 0, 0, 1 if start else 0, 0])


# ---- LUN addressing ------------------------------------------------------------------------

def encode_lun(lun: int) -> bytes:
    """8-byte LUN: peripheral device addressing (< 256) or flat space (< 16384)."""
    if 0 <= lun < 256:
        return bytes([0, lun]) + bytes(6)
    if lun < 0x4000:
        return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)
    raise ProtocolError(f"LUN {lun} cannot be encoded in single-level addressing")


def decode_lun(entry: bytes) -> int:
    """First level of an 8-byte LUN (peripheral or flat space addressing)."""
    method = entry[0] >> 6
    if method in (0, 1):
        return ((entry[0] & 0x3F) << 8) | entry[1]
    raise ProtocolError(f"LUN entry {entry.hex()} uses unsupported addressing method {method}")


# ---- response parsers ----------------------------------------------------------------------

@dataclass(frozen=True)
class InquiryData:
    peripheral_qualifier: int
    device_type: int
    removable: bool
    version: int
    response_format: int
    cmdque: bool
    vendor: str
    product: str
    revision: str

    @property
    def present(self) -> bool:
        """False for qualifier 3 / type 0x1F: "LU not present" (§5.3)."""
        return not (self.peripheral_qualifier == 3 and self.device_type == 0x1F)


def _ascii(b: bytes) -> str:
    return b.decode("ascii", errors="replace").rstrip(" \0")


def parse_inquiry(data: bytes) -> InquiryData:
    if len(data) < 5:
        raise ProtocolError(f"INQUIRY data of {len(data)} bytes (need at least 5)")
    d = data.ljust(36, b"\0")
    return InquiryData(
        peripheral_qualifier=d[0] >> 5, device_type=d[0] & 0x1F, removable=bool(d[1] & 0x80),
        version=d[2], response_format=d[3] & 0x0F, cmdque=bool(d[7] & 0x02),
        vendor=_ascii(d[8:16]), product=_ascii(d[16:32]), revision=_ascii(d[32:36]),
    )


def _vpd(data: bytes, page: int) -> bytes:
    if len(data) < 4:
        raise ProtocolError(f"VPD page {page:#04x}: {len(data)} bytes, need a 4-byte header")
    if data[1] != page:
        raise ProtocolError(f"asked for VPD page {page:#04x}, got page {data[1]:#04x}")
    n = struct.unpack_from(">H", data, 2)[0]
    return data[4:4 + n]


def parse_vpd_supported(data: bytes) -> list[int]:
    return list(_vpd(data, 0x00))


def parse_vpd_serial(data: bytes) -> str:
    return _ascii(_vpd(data, 0x80))


@dataclass(frozen=True)
class Designator:
    """One entry of the Device Identification page (0x83)."""

    code_set: int        # 1 binary, 2 ASCII, 3 UTF-8
    association: int     # 0 logical unit, 1 target port, 2 target device
    type: int            # 1 T10 vendor ID, 2 EUI-64, 3 NAA, ...
    value: bytes

    @property
    def text(self) -> str:
        return _ascii(self.value) if self.code_set in (2, 3) else self.value.hex()


def parse_vpd_device_ids(data: bytes) -> list[Designator]:
    body = _vpd(data, 0x83)
    out, i = [], 0
    while i + 4 <= len(body):
        n = body[i + 3]
        if i + 4 + n > len(body):
            raise ProtocolError(f"VPD 0x83: designator at {i} overruns the page")
        out.append(Designator(body[i] & 0x0F, (body[i + 1] >> 4) & 3, body[i + 1] & 0x0F,
                              bytes(body[i + 4:i + 4 + n])))
        i += 4 + n
    return out


@dataclass(frozen=True)
class BlockLimits:
    """Block Limits page (0xB0); 0 means "not reported"."""

    max_transfer_blocks: int = 0
    optimal_transfer_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0
    max_write_same_blocks: int = 0


def parse_vpd_block_limits(data: bytes) -> BlockLimits:
    b = _vpd(data, 0xB0).ljust(60, b"\0")
    # page offsets 8, 12, 20, 24, 28, 36 -> body offsets 4, 8, 16, 20, 24, 32
    return BlockLimits(
        max_transfer_blocks=struct.unpack_from(">I", b, 4)[0],
        optimal_transfer_blocks=struct.unpack_from(">I", b, 8)[0],
        max_unmap_blocks=struct.unpack_from(">I", b, 16)[0],
        max_unmap_descriptors=struct.unpack_from(">I", b, 20)[0],
        unmap_granularity=struct.unpack_from(">I", b, 24)[0] & 0x7FFFFFFF,
        max_write_same_blocks=struct.unpack_from(">Q", b, 32)[0],
    )


def parse_vpd_rotation_rate(data: bytes) -> int:
    """Medium rotation rate from page 0xB1 (1 = non-rotating, 0 = not reported)."""
    b = _vpd(data, 0xB1)
    return struct.unpack_from(">H", b.ljust(2, b"\0"), 0)[0]


@dataclass(frozen=True)
class LogicalBlockProvisioning:
    lbpu: bool           # UNMAP supported
    lbpws: bool          # WRITE SAME(16) with UNMAP supported
    lbpws10: bool
    provisioning_type: int   # 0 full, 1 resource, 2 thin


def parse_vpd_lbp(data: bytes) -> LogicalBlockProvisioning:
    b = _vpd(data, 0xB2).ljust(4, b"\0")
    return LogicalBlockProvisioning(bool(b[1] & 0x80), bool(b[1] & 0x40), bool(b[1] & 0x20),
                                    b[2] & 0x07)


def parse_report_luns(data: bytes) -> list[int]:
    if len(data) < 8:
        raise ProtocolError(f"REPORT LUNS data of {len(data)} bytes (need an 8-byte header)")
    n = struct.unpack_from(">I", data, 0)[0]
    if n % 8:
        raise ProtocolError(f"REPORT LUNS list length {n} is not a multiple of 8")
    avail = min(n, len(data) - 8)
    return sorted(decode_lun(data[8 + i:16 + i]) for i in range(0, avail - avail % 8, 8))


def report_luns_length(data: bytes) -> int:
    """Bytes the full LUN list needs (header included): resize and retry if more."""
    return 8 + struct.unpack_from(">I", data, 0)[0]


@dataclass(frozen=True)
class Capacity:
    last_lba: int
    block_size: int
    lbppbe: int = 0          # logical blocks per physical block exponent
    lbpme: bool = False      # logical block provisioning (thin) enabled

    @property
    def blocks(self) -> int:
        return self.last_lba + 1

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def parse_read_capacity10(data: bytes) -> Capacity:
    if len(data) < 8:
        raise ProtocolError(f"READ CAPACITY(10) data of {len(data)} bytes (need 8)")
    last, bs = struct.unpack_from(">II", data, 0)
    return Capacity(last, bs)


def parse_read_capacity16(data: bytes) -> Capacity:
    if len(data) < 12:
        raise ProtocolError(f"READ CAPACITY(16) data of {len(data)} bytes (need at least 12)")
    d = data.ljust(32, b"\0")
    last, bs = struct.unpack_from(">QI", d, 0)
    return Capacity(last, bs, d[13] & 0x0F, bool(d[14] & 0x80))


# ---- sense ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sense:
    key: int
    asc: int = 0
    ascq: int = 0
    raw: bytes = field(default=b"", repr=False)

    @property
    def key_name(self) -> str:
        try:
            return SenseKey(self.key).name
        except ValueError:
            return f"{self.key:#x}"

    def __str__(self) -> str:
        return f"{self.key_name} ({self.key:#x}/{self.asc:#04x}/{self.ascq:#04x}){_asc_text(self.asc, self.ascq)}"


_ASC_TEXT = {
    (0x04, None): "logical unit not ready",
    (0x11, None): "unrecovered read error",
    (0x10, None): "ID CRC or ECC error",
    (0x03, None): "peripheral device write fault",
    (0x0C, None): "write error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, None): "write protected",
    (0x28, None): "not ready to ready change, medium may have changed",
    (0x29, None): "power on, reset, or bus device reset occurred",
    (0x2A, 0x09): "capacity data has changed",
    (0x3F, None): "target operating conditions have changed",
}


def _asc_text(asc: int, ascq: int) -> str:
    t = _ASC_TEXT.get((asc, ascq)) or _ASC_TEXT.get((asc, None))
    return f": {t}" if t else ""


def parse_sense(data: bytes) -> Sense | None:
    """Decode fixed (0x70/0x71) or descriptor (0x72/0x73) format sense; None if neither."""
    if not data:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71) and len(data) >= 3:
        asc = data[12] if len(data) > 12 else 0
        ascq = data[13] if len(data) > 13 else 0
        return Sense(data[2] & 0x0F, asc, ascq, bytes(data))
    if code in (0x72, 0x73) and len(data) >= 2:
        asc = data[2] if len(data) > 2 else 0
        ascq = data[3] if len(data) > 3 else 0
        return Sense(data[1] & 0x0F, asc, ascq, bytes(data))
    return None


_KEY_EXC: dict[int, type[ScsiError]] = {
    SenseKey.NOT_READY: NotReady,
    SenseKey.MEDIUM_ERROR: MediumError,
    SenseKey.HARDWARE_ERROR: MediumError,
    SenseKey.ILLEGAL_REQUEST: IllegalRequest,
    SenseKey.UNIT_ATTENTION: UnitAttention,
    SenseKey.DATA_PROTECT: DataProtect,
}


def sense_exception(sense: Sense | None, what: str, *, srb_status: int = 0,
                    scsi_status: int = 0) -> ScsiError:
    """The :class:`ScsiError` subclass for ``sense`` (plain ScsiError without a known key)."""
    if sense is None:
        return ScsiError(f"{what} failed: SCSI status {scsi_status:#04x}, SRB status "
                         f"{srb_status:#04x}, no sense data", srb_status=srb_status,
                         scsi_status=scsi_status)
    cls = _KEY_EXC.get(sense.key, ScsiError)
    return cls(f"{what} failed: {sense}", srb_status=srb_status, scsi_status=scsi_status,
               sense_key=sense.key, asc=sense.asc, ascq=sense.ascq)

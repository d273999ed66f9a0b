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
from typing import Any

from uvmbus.errors import (
    ConfigError,
    DataProtect,
    IllegalRequest,
    MediumError,
    NotReady,
    ProtocolError,
    ScsiError,
    UnitAttention,
)
from uvmbus.native import lib

__all__ = [
    "Opcode", "SenseKey", "Sense", "InquiryData", "Capacity", "BlockLimits", "Designator",
    "LogicalBlockProvisioning", "BlockCharacteristics", "ThirdPartyCopy", "CachingPage",
    "ControlPage", "LbaStatus", "SupportedOpcode", "PrType", "PrCapabilities", "PrReservation",
    "PrRegistrant",
    "test_unit_ready", "inquiry", "report_luns", "read_capacity10", "read_capacity16", "read10",
    "write10", "read16", "write16", "synchronize_cache10", "synchronize_cache16", "unmap",
    "unmap_parameters", "request_sense", "mode_sense6", "mode_sense10", "write_same16",
    "start_stop_unit", "get_lba_status", "report_supported_opcodes", "persistent_reserve_in",
    "persistent_reserve_out", "pr_out_parameters",
    "parse_inquiry", "parse_vpd_supported", "parse_vpd_serial", "parse_vpd_device_ids",
    "parse_vpd_block_limits", "parse_vpd_rotation_rate", "parse_vpd_lbp", "parse_report_luns",
    "parse_read_capacity10", "parse_read_capacity16", "parse_sense", "sense_exception",
    "parse_vpd_block_characteristics", "parse_vpd_third_party_copy", "parse_mode_pages",
    "parse_lba_status", "parse_supported_opcodes", "parse_one_opcode", "parse_pr_keys",
    "parse_pr_reservation", "parse_pr_capabilities", "parse_pr_full_status", "parse_caching_page",
    "parse_control_page", "pr_type", "pr_type_name",
    "encode_lun", "decode_lun",
]


class Opcode(enum.IntEnum):
    """SCSI operation codes: the values are native/storvsc_wire.h's ``SCSI_OP_*`` (defined once
    there, where the trace decoder and the dissector read them too)."""

    TEST_UNIT_READY = lib.SCSI_OP_TEST_UNIT_READY
    REQUEST_SENSE = lib.SCSI_OP_REQUEST_SENSE
    FORMAT_UNIT = lib.SCSI_OP_FORMAT_UNIT
    READ6 = lib.SCSI_OP_READ6
    WRITE6 = lib.SCSI_OP_WRITE6
    INQUIRY = lib.SCSI_OP_INQUIRY
    MODE_SELECT6 = lib.SCSI_OP_MODE_SELECT6
    RESERVE6 = lib.SCSI_OP_RESERVE6
    RELEASE6 = lib.SCSI_OP_RELEASE6
    MODE_SENSE6 = lib.SCSI_OP_MODE_SENSE6
    START_STOP_UNIT = lib.SCSI_OP_START_STOP_UNIT
    SEND_DIAGNOSTIC = lib.SCSI_OP_SEND_DIAGNOSTIC
    PREVENT_ALLOW = lib.SCSI_OP_PREVENT_ALLOW
    READ_CAPACITY10 = lib.SCSI_OP_READ_CAPACITY10
    READ10 = lib.SCSI_OP_READ10
    WRITE10 = lib.SCSI_OP_WRITE10
    WRITE_VERIFY10 = lib.SCSI_OP_WRITE_VERIFY10
    VERIFY10 = lib.SCSI_OP_VERIFY10
    SYNCHRONIZE_CACHE10 = lib.SCSI_OP_SYNCHRONIZE_CACHE10
    WRITE_SAME10 = lib.SCSI_OP_WRITE_SAME10
    UNMAP = lib.SCSI_OP_UNMAP
    MODE_SELECT10 = lib.SCSI_OP_MODE_SELECT10
    MODE_SENSE10 = lib.SCSI_OP_MODE_SENSE10
    PERSISTENT_RESERVE_IN = lib.SCSI_OP_PERSISTENT_RESERVE_IN
    PERSISTENT_RESERVE_OUT = lib.SCSI_OP_PERSISTENT_RESERVE_OUT
    THIRD_PARTY_COPY_OUT = lib.SCSI_OP_THIRD_PARTY_COPY_OUT
    THIRD_PARTY_COPY_IN = lib.SCSI_OP_THIRD_PARTY_COPY_IN
    READ16 = lib.SCSI_OP_READ16
    WRITE16 = lib.SCSI_OP_WRITE16
    WRITE_VERIFY16 = lib.SCSI_OP_WRITE_VERIFY16
    VERIFY16 = lib.SCSI_OP_VERIFY16
    SYNCHRONIZE_CACHE16 = lib.SCSI_OP_SYNCHRONIZE_CACHE16
    WRITE_SAME16 = lib.SCSI_OP_WRITE_SAME16
    SERVICE_ACTION_IN16 = lib.SCSI_OP_SERVICE_ACTION_IN16
    REPORT_LUNS = lib.SCSI_OP_REPORT_LUNS
    MAINTENANCE_IN = lib.SCSI_OP_MAINTENANCE_IN
    READ12 = lib.SCSI_OP_READ12
    WRITE12 = lib.SCSI_OP_WRITE12
    WRITE_VERIFY12 = lib.SCSI_OP_WRITE_VERIFY12
    VERIFY12 = lib.SCSI_OP_VERIFY12


SA_READ_CAPACITY16 = 0x10
SA_GET_LBA_STATUS = 0x12
SA_REPORT_SUPPORTED_OPCODES = 0x0C      # MAINTENANCE IN (SPC-4 6.35)


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


def get_lba_status(lba: int, alloc: int) -> bytes:
    """SERVICE ACTION IN(16) / GET LBA STATUS (SBC-3 5.6) from ``lba``."""
    return struct.pack(">BBQIBB", Opcode.SERVICE_ACTION_IN16, SA_GET_LBA_STATUS, lba, alloc, 0, 0)


def report_supported_opcodes(alloc: int, *, opcode: int | None = None,
                             service_action: int | None = None) -> bytes:
    """MAINTENANCE IN / REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): all commands
    (reporting options 0), or one ``opcode`` (option 1; with ``service_action``: option 3)."""
    if opcode is None:
        opts, op, sa = 0, 0, 0
    elif service_action is None:
        opts, op, sa = 1, opcode, 0
    else:
        opts, op, sa = 3, opcode, service_action
    return struct.pack(">BBBBHIBB", Opcode.MAINTENANCE_IN, SA_REPORT_SUPPORTED_OPCODES, opts, op,
                       sa, alloc, 0, 0)


# PERSISTENT RESERVE IN service actions (SPC-4 6.15.1) and OUT ones (6.16.2)
PRIN_READ_KEYS, PRIN_READ_RESERVATION, PRIN_REPORT_CAPABILITIES, PRIN_READ_FULL_STATUS = 0, 1, 2, 3
PROUT_REGISTER, PROUT_RESERVE, PROUT_RELEASE, PROUT_CLEAR = 0, 1, 2, 3
PROUT_PREEMPT, PROUT_PREEMPT_AND_ABORT, PROUT_REGISTER_IGNORE = 4, 5, 6


def persistent_reserve_in(service_action: int, alloc: int) -> bytes:
    return struct.pack(">BB5xHB", Opcode.PERSISTENT_RESERVE_IN, service_action & 0x1F, alloc, 0)


def persistent_reserve_out(service_action: int, pr_type: int = 0, param_len: int = 24) -> bytes:
    """PERSISTENT RESERVE OUT; scope LU_SCOPE (0), ``pr_type`` in the low nibble."""
    return struct.pack(">BBB2xIB", Opcode.PERSISTENT_RESERVE_OUT, service_action & 0x1F,
                       pr_type & 0x0F, param_len, 0)


def pr_out_parameters(key: int = 0, sa_key: int = 0, *, aptpl: bool = False) -> bytes:
    """The 24-byte basic PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3)."""
    for name, v in (("key", key), ("service action key", sa_key)):
        if not 0 <= v < 1 << 64:
            raise ConfigError(f"reservation {name} {v} does not fit in 64 bits (0..2**64-1)")
    return struct.pack(">QQ4xBxH", key, sa_key, 1 if aptpl else 0, 0)


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
    """Block Limits page (0xB0, SBC-3 6.6.4); 0 means "not reported"."""

    max_transfer_blocks: int = 0
    optimal_transfer_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0          # OPTIMAL UNMAP GRANULARITY
    max_write_same_blocks: int = 0
    max_compare_and_write_blocks: int = 0
    optimal_transfer_granularity: int = 0
    max_prefetch_blocks: int = 0
    #: UNMAP GRANULARITY ALIGNMENT, None when UGAVALID is clear
    unmap_granularity_alignment: int | None = None
    #: bytes of page body the host sent (a short page leaves the rest "not reported")
    body_length: int = 0


def parse_vpd_block_limits(data: bytes) -> BlockLimits:
    body = _vpd(data, 0xB0)
    b = body.ljust(60, b"\0")
    # page offsets 5, 6, 8, 12, 16, 20, 24, 28, 32, 36 = body offsets + 4
    uga = struct.unpack_from(">I", b, 28)[0]
    return BlockLimits(
        max_transfer_blocks=struct.unpack_from(">I", b, 4)[0],
        optimal_transfer_blocks=struct.unpack_from(">I", b, 8)[0],
        max_unmap_blocks=struct.unpack_from(">I", b, 16)[0],
        max_unmap_descriptors=struct.unpack_from(">I", b, 20)[0],
        unmap_granularity=struct.unpack_from(">I", b, 24)[0] & 0x7FFFFFFF,
        max_write_same_blocks=struct.unpack_from(">Q", b, 32)[0],
        max_compare_and_write_blocks=b[1],
        optimal_transfer_granularity=struct.unpack_from(">H", b, 2)[0],
        max_prefetch_blocks=struct.unpack_from(">I", b, 12)[0],
        unmap_granularity_alignment=(uga & 0x7FFFFFFF) if uga & 0x80000000 else None,
        body_length=len(body),
    )


@dataclass(frozen=True)
class BlockCharacteristics:
    """Block Device Characteristics page (0xB1, SBC-3 6.6.2)."""

    rotation_rate: int = 0       # 0 not reported, 1 non-rotating (SSD), else RPM
    product_type: int = 0
    nominal_form_factor: int = 0
    zoned: int = 0
    fuab: bool = False
    vbuls: bool = False

    @property
    def non_rotating(self) -> bool:
        return self.rotation_rate == 1


def parse_vpd_block_characteristics(data: bytes) -> BlockCharacteristics:
    b = _vpd(data, 0xB1).ljust(5, b"\0")
    return BlockCharacteristics(struct.unpack_from(">H", b, 0)[0], b[2], b[3] & 0x0F,
                                (b[4] >> 4) & 3, bool(b[4] & 2), bool(b[4] & 1))


def parse_vpd_rotation_rate(data: bytes) -> int:
    """Medium rotation rate from page 0xB1 (1 = non-rotating, 0 = not reported)."""
    return parse_vpd_block_characteristics(data).rotation_rate


@dataclass(frozen=True)
class LogicalBlockProvisioning:
    """Logical Block Provisioning page (0xB2, SBC-3 6.6.5)."""

    lbpu: bool           # UNMAP supported
    lbpws: bool          # WRITE SAME(16) with UNMAP supported
    lbpws10: bool
    provisioning_type: int   # 0 full, 1 resource, 2 thin
    lbprz: bool = False      # unmapped blocks read as zeros
    anc_sup: bool = False    # anchor supported
    dp: bool = False         # a provisioning group descriptor follows
    threshold_exponent: int = 0

    @property
    def provisioning(self) -> str:
        return {0: "full", 1: "resource", 2: "thin"}.get(self.provisioning_type,
                                                       f"reserved ({self.provisioning_type})")


def parse_vpd_lbp(data: bytes) -> LogicalBlockProvisioning:
    b = _vpd(data, 0xB2).ljust(4, b"\0")
    return LogicalBlockProvisioning(bool(b[1] & 0x80), bool(b[1] & 0x40), bool(b[1] & 0x20),
                                    b[2] & 0x07, bool(b[1] & 0x1C), bool(b[1] & 0x02),
                                    bool(b[1] & 0x01), b[0])


@dataclass(frozen=True)
class ThirdPartyCopy:
    """Third-party Copy page (0x8F, SPC-4 7.8.17): the Block Device ROD Token Limits
    descriptor (type 0) when present (ODX: POPULATE TOKEN / WRITE USING TOKEN)."""

    descriptor_types: tuple[int, ...] = ()
    max_range_descriptors: int = 0
    max_inactivity_timeout: int = 0
    default_inactivity_timeout: int = 0
    max_token_transfer_blocks: int = 0
    optimal_transfer_count: int = 0
    #: bytes 4-7 of the ROD limits descriptor (Hyper-V puts 'M', 0x1F, 0x83, 0x84 there)
    vendor: bytes = b""


def parse_vpd_third_party_copy(data: bytes) -> ThirdPartyCopy:
    body = _vpd(data, 0x8F)
    types: list[int] = []
    rod: dict[str, Any] = {}
    i = 0
    while i + 4 <= len(body):
        dtype, dlen = struct.unpack_from(">HH", body, i)
        if i + 4 + dlen > len(body):
            raise ProtocolError(f"VPD 0x8F: descriptor {dtype:#06x} at {i} ({dlen} bytes) overruns "
                                f"the {len(body)}-byte page")
        types.append(dtype)
        d = body[i + 4:i + 4 + dlen]
        if dtype == 0 and dlen >= 32:
            rod = {"vendor": bytes(d[0:4]),
                   "max_range_descriptors": struct.unpack_from(">H", d, 6)[0],
                   "max_inactivity_timeout": struct.unpack_from(">I", d, 8)[0],
                   "default_inactivity_timeout": struct.unpack_from(">I", d, 12)[0],
                   "max_token_transfer_blocks": struct.unpack_from(">Q", d, 16)[0],
                   "optimal_transfer_count": struct.unpack_from(">Q", d, 24)[0]}
        i += 4 + dlen
    return ThirdPartyCopy(descriptor_types=tuple(types), **rod)


# ---- MODE SENSE pages --------------------------------------------------------------------

@dataclass(frozen=True)
class CachingPage:
    """Caching mode page (0x08, SBC-3 6.4.5)."""

    wce: bool            # volatile write cache enabled
    rcd: bool            # read cache disabled


@dataclass(frozen=True)
class ControlPage:
    """Control mode page (0x0A, SPC-4 7.5.8)."""

    tst: int
    qerr: int
    d_sense: bool
    swp: bool
    ato: bool


def parse_mode_pages(data: bytes, *, ten: bool = False) -> tuple[int, dict[int, bytes]]:
    """MODE SENSE(6) (or (10) with ``ten``) data: the device-specific parameter byte and the
    mode pages by page code, each copied out and bounded by the mode data length."""
    hdr = 8 if ten else 4
    if len(data) < hdr:
        raise ProtocolError(f"MODE SENSE data of {len(data)} bytes (need a {hdr}-byte header)")
    if ten:
        total = 2 + struct.unpack_from(">H", data, 0)[0]
        dsp, bdl = data[3], struct.unpack_from(">H", data, 6)[0]
    else:
        total = 1 + data[0]
        dsp, bdl = data[2], data[3]
    end = min(total, len(data))
    pages: dict[int, bytes] = {}
    i = hdr + bdl
    while i + 2 <= end:
        code, spf = data[i] & 0x3F, bool(data[i] & 0x40)
        if spf:
            if i + 4 > end:
                break
            n, start = struct.unpack_from(">H", data, i + 2)[0], i + 4
        else:
            n, start = data[i + 1], i + 2
        if start + n > end:          # cut by the allocation length or a lying header
            pages.setdefault(code, bytes(data[i:end]))
            break
        pages.setdefault(code, bytes(data[i:start + n]))
        i = start + n
    return dsp, pages


def parse_caching_page(page: bytes) -> CachingPage | None:
    """None unless ``page`` is a caching page long enough to hold WCE/RCD."""
    if len(page) < 3 or page[0] & 0x3F != 0x08:
        return None
    return CachingPage(bool(page[2] & 0x04), bool(page[2] & 0x01))


def parse_control_page(page: bytes) -> ControlPage | None:
    if len(page) < 5 or page[0] & 0x3F != 0x0A:
        return None
    return ControlPage(page[2] >> 5, (page[3] >> 1) & 3, bool(page[2] & 0x04),
                       bool(page[4] & 0x08), bool(page[5] & 0x80) if len(page) > 5 else False)


# ---- GET LBA STATUS / REPORT SUPPORTED OPERATION CODES --------------------------------------

@dataclass(frozen=True)
class LbaStatus:
    """One LBA status descriptor (SBC-3 5.6.2): ``count`` blocks from ``lba``."""

    lba: int
    count: int
    status: int          # 0 mapped, 1 deallocated, 2 anchored

    @property
    def state(self) -> str:
        return {0: "mapped", 1: "deallocated", 2: "anchored"}.get(self.status,
                                                                 f"reserved ({self.status})")

    @property
    def mapped(self) -> bool:
        return self.status == 0


def parse_lba_status(data: bytes, *, blocks: int | None = None) -> list[LbaStatus]:
    """GET LBA STATUS parameter data; descriptors must ascend without overlap and (with
    ``blocks``) stay inside the disk."""
    if len(data) < 8:
        raise ProtocolError(f"GET LBA STATUS data of {len(data)} bytes (need an 8-byte header)")
    plen = struct.unpack_from(">I", data, 0)[0]
    if plen < 4 or (plen - 4) % 16:
        raise ProtocolError(f"GET LBA STATUS parameter length {plen} is not 4 + 16 n")
    avail = min(plen - 4, len(data) - 8)
    out: list[LbaStatus] = []
    nxt = 0
    for i in range(8, 8 + avail - avail % 16, 16):
        lba, count, st = struct.unpack_from(">QIB", data, i)
        if out and lba < nxt:
            raise ProtocolError(f"GET LBA STATUS: descriptor at LBA {lba} overlaps or precedes "
                                f"the previous one (which ends at {nxt})")
        if count == 0:
            raise ProtocolError(f"GET LBA STATUS: descriptor at LBA {lba} covers no blocks")
        if blocks is not None and lba + count > blocks:
            raise ProtocolError(f"GET LBA STATUS: descriptor [{lba}, {lba + count}) lies beyond "
                                f"the {blocks}-block disk")
        out.append(LbaStatus(lba, count, st & 0x0F))
        nxt = lba + count
    return out


@dataclass(frozen=True)
class SupportedOpcode:
    """One command descriptor of REPORT SUPPORTED OPERATION CODES (SPC-4 6.35.2)."""

    opcode: int
    service_action: int | None
    cdb_length: int

    @property
    def name(self) -> str:
        try:
            return Opcode(self.opcode).name
        except ValueError:
            return f"{self.opcode:#04x}"


def parse_supported_opcodes(data: bytes) -> list[SupportedOpcode]:
    """All-commands format (reporting options 0)."""
    if len(data) < 4:
        raise ProtocolError(f"REPORT SUPPORTED OPERATION CODES data of {len(data)} bytes")
    n = struct.unpack_from(">I", data, 0)[0]
    end = 4 + min(n, len(data) - 4)
    out: list[SupportedOpcode] = []
    i = 4
    while i + 8 <= end:
        op, flags = data[i], data[i + 5]
        sa, cdblen = struct.unpack_from(">H", data, i + 2)[0], struct.unpack_from(">H", data, i + 6)[0]
        out.append(SupportedOpcode(op, sa if flags & 1 else None, cdblen))
        i += 20 if flags & 2 else 8         # CTDP: a 12-byte timeouts descriptor follows
    return out


def parse_one_opcode(data: bytes) -> bool | None:
    """One-command format (reporting options 1-3): True supported, False not, None when the
    device has no data about it (SUPPORT 0)."""
    if len(data) < 2:
        raise ProtocolError(f"REPORT SUPPORTED OPERATION CODES data of {len(data)} bytes")
    support = data[1] & 7
    if support in (3, 5):
        return True
    if support == 1:
        return False
    return None


# ---- PERSISTENT RESERVE IN -------------------------------------------------------------

class PrType(enum.IntEnum):
    """Persistent reservation types (SPC-4 6.16.2 table)."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


def pr_type_name(t: int) -> str:
    try:
        return PrType(t).name.lower().replace("_", "-")
    except ValueError:
        return f"type {t:#x}"


def pr_type(value: int | str) -> PrType:
    """A PrType from its number or name (``write-exclusive``, ``exclusive-access-registrants-only``,
    short forms ``we``, ``ea``, ``we-ro``, ``ea-ro``, ``we-ar``, ``ea-ar``)."""
    short = {"we": 1, "ea": 3, "we-ro": 5, "ea-ro": 6, "we-ar": 7, "ea-ar": 8}
    try:
        if isinstance(value, str):
            v = value.strip().lower().replace("_", "-")
            if v in short:
                return PrType(short[v])
            if v.isdigit():
                return PrType(int(v))
            return PrType[v.upper().replace("-", "_")]
        return PrType(value)
    except (KeyError, ValueError):
        raise ConfigError(f"reservation type {value!r}: use one of "
                          f"{', '.join(pr_type_name(t) for t in PrType)} (or we, ea, we-ro, "
                          "ea-ro, we-ar, ea-ar)") from None


@dataclass(frozen=True)
class PrCapabilities:
    crh: bool
    sip_c: bool
    atp_c: bool
    ptpl_c: bool
    tmv: bool
    allow_commands: int
    ptpl_a: bool
    types: tuple[int, ...]


_PR_TYPE_MASK = {PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x0001, PrType.WRITE_EXCLUSIVE: 0x0200,
                 PrType.EXCLUSIVE_ACCESS: 0x0800, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 0x2000,
                 PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x4000,
                 PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x8000}


def parse_pr_capabilities(data: bytes) -> PrCapabilities:
    if len(data) < 8:
        raise ProtocolError(f"REPORT CAPABILITIES data of {len(data)} bytes (need 8)")
    mask = struct.unpack_from(">H", data, 4)[0]
    tmv = bool(data[3] & 0x80)
    types = tuple(sorted(int(t) for t, b in _PR_TYPE_MASK.items() if mask & b)) if tmv else ()
    return PrCapabilities(bool(data[2] & 0x10), bool(data[2] & 0x08), bool(data[2] & 0x04),
                          bool(data[2] & 0x01), tmv, (data[3] >> 4) & 7, bool(data[3] & 0x01),
                          types)


def _pr_header(data: bytes, what: str) -> tuple[int, bytes]:
    if len(data) < 8:
        raise ProtocolError(f"{what} data of {len(data)} bytes (need an 8-byte header)")
    gen, n = struct.unpack_from(">II", data, 0)
    return gen, bytes(data[8:8 + n])


def parse_pr_keys(data: bytes) -> tuple[int, list[int]]:
    """READ KEYS: (PRgeneration, registered keys)."""
    gen, body = _pr_header(data, "READ KEYS")
    return gen, [struct.unpack_from(">Q", body, i)[0] for i in range(0, len(body) - 7, 8)]


@dataclass(frozen=True)
class PrReservation:
    generation: int
    key: int
    type: int
    scope: int = 0

    @property
    def type_name(self) -> str:
        return pr_type_name(self.type)


def parse_pr_reservation(data: bytes) -> tuple[int, PrReservation | None]:
    """READ RESERVATION: (PRgeneration, the reservation or None)."""
    gen, body = _pr_header(data, "READ RESERVATION")
    if len(body) < 16:
        return gen, None
    return gen, PrReservation(gen, struct.unpack_from(">Q", body, 0)[0], body[13] & 0x0F,
                              body[13] >> 4)


@dataclass(frozen=True)
class PrRegistrant:
    key: int
    holder: bool
    all_target_ports: bool
    type: int
    relative_target_port: int
    transport_id: bytes


def parse_pr_full_status(data: bytes) -> tuple[int, list[PrRegistrant]]:
    """READ FULL STATUS: (PRgeneration, one entry per registered I_T nexus)."""
    gen, body = _pr_header(data, "READ FULL STATUS")
    out: list[PrRegistrant] = []
    i = 0
    while i + 24 <= len(body):
        key = struct.unpack_from(">Q", body, i)[0]
        flags, scope_type = body[i + 12], body[i + 13]
        rtp = struct.unpack_from(">H", body, i + 18)[0]
        n = struct.unpack_from(">I", body, i + 20)[0]
        tid = bytes(body[i + 24:i + 24 + n])
        out.append(PrRegistrant(key, bool(flags & 1), bool(flags & 2), scope_type & 0x0F, rtp, tid))
        i += 24 + n
    return gen, out


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
    (0x26, 0x04): "invalid release of persistent reservation",
    (0x1A, 0x00): "parameter list length error",
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

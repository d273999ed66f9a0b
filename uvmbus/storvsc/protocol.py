"""VSTOR protocol: operations, versions, status codes and packet (de)serialisation.

Every layout comes from ``native/storvsc_wire.h`` through cffi (``struct
vstor_packet`` and friends), so Python and the C fast path share one
definition.  Reference: ../shared/reference/storvsc_ic.md §2.

A VSTOR packet is always 64 bytes here (header 12 + union 52): the host sizes
its reply to the request (``12 + min(len - 12, 52)``, §5.1), so a shorter
request would get a truncated reply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from uvmbus.errors import ProtocolError
from uvmbus.native import ffi, lib

__all__ = [
    "Op", "Version", "NtStatus", "SrbStatus", "SrbFlags", "ScsiStatus", "DataIn",
    "PACKET_SIZE", "HEADER_SIZE", "SRB_LEN_V2", "SRB_LEN_V1", "SENSE_SIZE", "MAX_CDB_LEN",
    "GUEST_VERSIONS", "HOST_VERSIONS_OPENVMM", "HOST_VERSIONS_HYPERV", "PROP_MULTI_CHANNEL",
    "ChannelProperties", "VstorPacket", "Srb",
    "build_packet", "parse_packet", "build_srb_packet", "parse_srb", "reply_size",
    "ntstatus_for_srb", "version_name", "op_name", "ntstatus_name", "srb_status_name",
    "version_body", "sub_channel_body", "SRB_AUTOSENSE_VALID", "SRB_QUEUE_FROZEN",
    "SRB_STATUS_MASK",
]

PACKET_SIZE: int = lib.VSTOR_PACKET_SIZE          # 64
HEADER_SIZE: int = lib.VSTOR_HEADER_SIZE          # 12
SRB_LEN_V2: int = lib.VSTOR_SRB_LEN_V2            # 0x34
SRB_LEN_V1: int = lib.VSTOR_SRB_LEN_V1            # 0x24
SENSE_SIZE: int = lib.VSTOR_SENSE_SIZE            # 20
MAX_CDB_LEN: int = lib.VSTOR_MAX_CDB_LEN          # 16
PROP_MULTI_CHANNEL: int = lib.VSTOR_PROP_MULTI_CHANNEL


class Op(enum.IntEnum):
    """``vstor_packet.operation`` (§2.1)."""

    COMPLETE_IO = lib.VSTOR_OP_COMPLETE_IO
    REMOVE_DEVICE = lib.VSTOR_OP_REMOVE_DEVICE
    EXECUTE_SRB = lib.VSTOR_OP_EXECUTE_SRB
    RESET_LUN = lib.VSTOR_OP_RESET_LUN
    RESET_ADAPTER = lib.VSTOR_OP_RESET_ADAPTER
    RESET_BUS = lib.VSTOR_OP_RESET_BUS
    BEGIN_INITIALIZATION = lib.VSTOR_OP_BEGIN_INITIALIZATION
    END_INITIALIZATION = lib.VSTOR_OP_END_INITIALIZATION
    QUERY_PROTOCOL_VERSION = lib.VSTOR_OP_QUERY_PROTOCOL_VERSION
    QUERY_PROPERTIES = lib.VSTOR_OP_QUERY_PROPERTIES
    ENUMERATE_BUS = lib.VSTOR_OP_ENUMERATE_BUS
    FCHBA_DATA = lib.VSTOR_OP_FCHBA_DATA
    CREATE_SUB_CHANNELS = lib.VSTOR_OP_CREATE_SUB_CHANNELS
    EVENT_NOTIFICATION = lib.VSTOR_OP_EVENT_NOTIFICATION


class Version(enum.IntEnum):
    """Storage protocol versions, ``major << 8 | minor`` (§2.5)."""

    WIN6 = lib.VSTOR_PROTO_WIN6
    WIN7 = lib.VSTOR_PROTO_WIN7
    WIN8 = lib.VSTOR_PROTO_WIN8
    WIN8_1 = lib.VSTOR_PROTO_WIN8_1
    WIN10 = lib.VSTOR_PROTO_WIN10


#: what the guest proposes, newest first — Linux ≥ 5.19's set (§2.3, §2.8). Pre-Win8 hosts
#: (4.2, 2.0) expect 48-byte packets, which this driver does not send; FreeBSD still proposes
#: them. Pass ``versions=`` to ``storvsc.open`` to try them anyway (unverified on real hosts).
GUEST_VERSIONS: tuple[int, ...] = (Version.WIN10, Version.WIN8_1, Version.WIN8)
#: what OpenVMM's StorVSP accepts (§2.5): 6.2 gets REVISION_MISMATCH
HOST_VERSIONS_OPENVMM: tuple[int, ...] = (Version.WIN6, Version.WIN7, Version.WIN8,
                                          Version.WIN8_1)
#: what real Hyper-V (WS2016+) very likely accepts ([UNVERIFIED] in the reference)
HOST_VERSIONS_HYPERV: tuple[int, ...] = (*HOST_VERSIONS_OPENVMM, Version.WIN10)


class NtStatus(enum.IntEnum):
    """Header ``status`` values (§2.6)."""

    SUCCESS = lib.NT_STATUS_SUCCESS
    BUFFER_OVERFLOW = lib.NT_STATUS_BUFFER_OVERFLOW
    DEVICE_BUSY = lib.NT_STATUS_DEVICE_BUSY
    UNSUCCESSFUL = lib.NT_STATUS_UNSUCCESSFUL
    INVALID_PARAMETER = lib.NT_STATUS_INVALID_PARAMETER
    INVALID_DEVICE_REQUEST = lib.NT_STATUS_INVALID_DEVICE_REQUEST
    REVISION_MISMATCH = lib.NT_STATUS_REVISION_MISMATCH
    DEVICE_NOT_CONNECTED = lib.NT_STATUS_DEVICE_NOT_CONNECTED
    IO_TIMEOUT = lib.NT_STATUS_IO_TIMEOUT
    DEVICE_DOES_NOT_EXIST = lib.NT_STATUS_DEVICE_DOES_NOT_EXIST
    CANCELLED = lib.NT_STATUS_CANCELLED
    INVALID_DEVICE_STATE = lib.NT_STATUS_INVALID_DEVICE_STATE
    IO_DEVICE_ERROR = lib.NT_STATUS_IO_DEVICE_ERROR


class SrbStatus(enum.IntEnum):
    """Low 6 bits of ``srb_status`` (§2.6)."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ABORT_FAILED = 0x03
    ERROR = 0x04
    BUSY = 0x05
    INVALID_REQUEST = 0x06
    INVALID_PATH_ID = 0x07
    NO_DEVICE = 0x08
    TIMEOUT = 0x09
    SELECTION_TIMEOUT = 0x0A
    COMMAND_TIMEOUT = 0x0B
    MESSAGE_REJECTED = 0x0D
    BUS_RESET = 0x0E
    PARITY_ERROR = 0x0F
    REQUEST_SENSE_FAILED = 0x10
    NO_HBA = 0x11
    DATA_OVERRUN = 0x12
    UNEXPECTED_BUS_FREE = 0x13
    PHASE_SEQUENCE_FAILURE = 0x14
    BAD_SRB_BLOCK_LENGTH = 0x15
    REQUEST_FLUSHED = 0x16
    INVALID_LUN = 0x20
    INVALID_TARGET_ID = 0x21
    BAD_FUNCTION = 0x22
    ERROR_RECOVERY = 0x23
    NOT_POWERED = 0x24
    LINK_DOWN = 0x25
    INTERNAL_ERROR = 0x30


SRB_QUEUE_FROZEN: int = lib.SRB_STATUS_QUEUE_FROZEN
SRB_AUTOSENSE_VALID: int = lib.SRB_STATUS_AUTOSENSE_VALID
SRB_STATUS_MASK: int = lib.SRB_STATUS_MASK


class SrbFlags(enum.IntFlag):
    QUEUE_ACTION_ENABLE = lib.SRB_FLAGS_QUEUE_ACTION_ENABLE
    DISABLE_DISCONNECT = lib.SRB_FLAGS_DISABLE_DISCONNECT
    DISABLE_SYNCH_TRANSFER = lib.SRB_FLAGS_DISABLE_SYNCH_TRANSFER
    BYPASS_FROZEN_QUEUE = lib.SRB_FLAGS_BYPASS_FROZEN_QUEUE
    DISABLE_AUTOSENSE = lib.SRB_FLAGS_DISABLE_AUTOSENSE
    DATA_IN = lib.SRB_FLAGS_DATA_IN
    DATA_OUT = lib.SRB_FLAGS_DATA_OUT
    NO_QUEUE_FREEZE = lib.SRB_FLAGS_NO_QUEUE_FREEZE
    ADAPTER_CACHE_ENABLE = lib.SRB_FLAGS_ADAPTER_CACHE_ENABLE


class ScsiStatus(enum.IntEnum):
    GOOD = lib.SCSI_STATUS_GOOD
    CHECK_CONDITION = lib.SCSI_STATUS_CHECK_CONDITION
    BUSY = lib.SCSI_STATUS_BUSY
    RESERVATION_CONFLICT = lib.SCSI_STATUS_RESERVATION_CONFLICT
    TASK_ABORTED = lib.SCSI_STATUS_TASK_ABORTED


class DataIn(enum.IntEnum):
    """``vmscsi_request.data_in``: the direction seen from the guest."""

    WRITE = lib.VSTOR_DATA_OUT     # guest -> device
    READ = lib.VSTOR_DATA_IN       # device -> guest
    NONE = lib.VSTOR_DATA_NONE


def _name(enum_cls: type[enum.IntEnum], value: int) -> str:
    try:
        return enum_cls(value).name
    except ValueError:
        return f"{value:#x}"


def op_name(op: int) -> str:
    return _name(Op, op)


def ntstatus_name(status: int) -> str:
    return _name(NtStatus, status)


def srb_status_name(srb_status: int) -> str:
    """Name of an SRB status, flags (QUEUE_FROZEN / AUTOSENSE_VALID) included."""
    name = _name(SrbStatus, srb_status & SRB_STATUS_MASK)
    if srb_status & SRB_AUTOSENSE_VALID:
        name += "|AUTOSENSE_VALID"
    if srb_status & SRB_QUEUE_FROZEN:
        name += "|QUEUE_FROZEN"
    return name


def version_name(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF}"


def reply_size(request_payload_len: int) -> int:
    """Payload size of the host's reply to a request payload of this size (§5.1):
    ``12 + min(len - 12, 52)``."""
    return HEADER_SIZE + min(request_payload_len - HEADER_SIZE, SRB_LEN_V2)


_SRB_TO_NT = {
    SrbStatus.SUCCESS: NtStatus.SUCCESS,
    SrbStatus.BUSY: NtStatus.DEVICE_BUSY,
    SrbStatus.INVALID_LUN: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.INVALID_TARGET_ID: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.NO_DEVICE: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.NO_HBA: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.COMMAND_TIMEOUT: NtStatus.IO_TIMEOUT,
    SrbStatus.TIMEOUT: NtStatus.IO_TIMEOUT,
    SrbStatus.SELECTION_TIMEOUT: NtStatus.DEVICE_NOT_CONNECTED,
    SrbStatus.BAD_FUNCTION: NtStatus.INVALID_DEVICE_REQUEST,
    SrbStatus.BAD_SRB_BLOCK_LENGTH: NtStatus.INVALID_DEVICE_REQUEST,
    SrbStatus.DATA_OVERRUN: NtStatus.BUFFER_OVERFLOW,
    SrbStatus.REQUEST_FLUSHED: NtStatus.UNSUCCESSFUL,
    SrbStatus.ABORTED: NtStatus.CANCELLED,
}


def ntstatus_for_srb(srb_status: int) -> int:
    """The header NTSTATUS a host puts on an I/O completion (§5.2 table)."""
    return int(_SRB_TO_NT.get(srb_status & SRB_STATUS_MASK, NtStatus.IO_DEVICE_ERROR))  # type: ignore[call-overload]


@dataclass(frozen=True)
class ChannelProperties:
    """QUERY_PROPERTIES answer (§2.4)."""

    max_channel_count: int
    flags: int
    max_transfer_bytes: int

    @property
    def multi_channel(self) -> bool:
        return bool(self.flags & PROP_MULTI_CHANNEL)

    def to_bytes(self) -> bytes:
        p = ffi.new("struct vstor_channel_properties *")
        p.max_channel_cnt = self.max_channel_count
        p.flags = self.flags
        p.max_transfer_bytes = self.max_transfer_bytes
        return bytes(ffi.buffer(p))

    @classmethod
    def from_bytes(cls, body: bytes | memoryview) -> ChannelProperties:
        size = ffi.sizeof("struct vstor_channel_properties")
        if len(body) < size:
            raise ProtocolError(f"channel properties: {len(body)} bytes, need {size}")
        p = ffi.new("struct vstor_channel_properties *")
        ffi.memmove(p, bytes(body[:size]), size)
        return cls(int(p.max_channel_cnt), int(p.flags), int(p.max_transfer_bytes))


@dataclass(frozen=True)
class VstorPacket:
    """A parsed VSTOR packet: header fields and the raw union bytes (``body``)."""

    operation: int
    flags: int
    status: int
    body: bytes

    @property
    def op_name(self) -> str:
        return op_name(self.operation)

    @property
    def ok(self) -> bool:
        return self.operation == Op.COMPLETE_IO and self.status == NtStatus.SUCCESS

    def version(self) -> int:
        """``major_minor`` of a protocol-version body."""
        return int.from_bytes(self.body[0:2], "little")

    def properties(self) -> ChannelProperties:
        return ChannelProperties.from_bytes(self.body)


def build_packet(operation: int, *, status: int = 0, flags: int = lib.VSTOR_FLAG_REQUEST_COMPLETION,
                 body: bytes | bytearray | memoryview = b"", size: int = PACKET_SIZE) -> bytes:
    """A VSTOR packet of ``size`` bytes (default the full 64): header + ``body``, zero padded."""
    if len(body) > size - HEADER_SIZE:
        raise ProtocolError(f"VSTOR body of {len(body)} bytes exceeds {size - HEADER_SIZE}")
    p = ffi.new("struct vstor_packet *")
    p.operation = operation
    p.flags = flags
    p.status = status
    raw = bytearray(ffi.buffer(p))
    raw[HEADER_SIZE:HEADER_SIZE + len(body)] = body
    if size <= PACKET_SIZE:
        return bytes(raw[:size])
    return bytes(raw) + bytes(size - PACKET_SIZE)


def parse_packet(payload: bytes | bytearray | memoryview) -> VstorPacket:
    """Parse a VSTOR packet (header + whatever union bytes there are)."""
    if len(payload) < HEADER_SIZE:
        raise ProtocolError(f"VSTOR packet of {len(payload)} bytes is shorter than its "
                            f"{HEADER_SIZE}-byte header")
    b = bytes(payload)
    return VstorPacket(int.from_bytes(b[0:4], "little"), int.from_bytes(b[4:8], "little"),
                       int.from_bytes(b[8:12], "little"), b[HEADER_SIZE:])


def version_body(major_minor: int, revision: int = 0) -> bytes:
    return major_minor.to_bytes(2, "little") + revision.to_bytes(2, "little")


def sub_channel_body(count: int) -> bytes:
    return count.to_bytes(2, "little")


@dataclass
class Srb:
    """A ``vmscsi_request`` as Python values (tests, the model, diagnostics)."""

    cdb: bytes = b""
    data_in: int = DataIn.NONE
    data_transfer_length: int = 0
    path_id: int = 0
    target_id: int = 0
    lun: int = 0
    length: int = SRB_LEN_V2
    srb_status: int = 0
    scsi_status: int = 0
    port_number: int = 0
    cdb_length: int | None = None
    sense_info_length: int = SENSE_SIZE
    srb_flags: int = 0
    time_out_value: int = 60
    queue_tag: int = 0
    queue_action: int = 0
    payload: bytes = b""      # raw 20-byte CDB/sense area as received

    def sense(self) -> bytes:
        """Sense bytes of a reply (only meaningful with AUTOSENSE_VALID)."""
        n = self.sense_info_length or SENSE_SIZE
        return self.payload[:min(n, SENSE_SIZE)]


def _srb_struct(s: Srb) -> Any:
    p = ffi.new("struct vstor_srb *")
    p.length = s.length
    p.srb_status = s.srb_status
    p.scsi_status = s.scsi_status
    p.port_number = s.port_number
    p.path_id = s.path_id
    p.target_id = s.target_id
    p.lun = s.lun
    p.cdb_length = len(s.cdb) if s.cdb_length is None else s.cdb_length
    p.sense_info_length = s.sense_info_length
    p.data_in = s.data_in
    p.data_transfer_length = s.data_transfer_length
    area = s.cdb if s.cdb else s.payload
    if len(area) > 20:
        raise ProtocolError(f"CDB/sense area of {len(area)} bytes exceeds 20")
    ffi.memmove(p.payload, area, len(area))
    p.queue_tag = s.queue_tag
    p.queue_action = s.queue_action
    p.srb_flags = s.srb_flags
    p.time_out_value = s.time_out_value
    return p


def build_srb_packet(srb: Srb, *, operation: int = Op.EXECUTE_SRB, status: int = 0,
                     flags: int = lib.VSTOR_FLAG_REQUEST_COMPLETION, size: int = PACKET_SIZE) -> bytes:
    """An EXECUTE_SRB (or completion) packet carrying ``srb``, ``size`` bytes long."""
    body = bytes(ffi.buffer(_srb_struct(srb)))
    return build_packet(operation, status=status, flags=flags, body=body[:max(0, size - HEADER_SIZE)],
                        size=size)


def parse_srb(body: bytes | memoryview) -> Srb:
    """Parse the union of a packet as a ``vmscsi_request``; missing bytes read as zero
    (a pre-Win8 36-byte request has no Win8 extension)."""
    b = bytes(body[:SRB_LEN_V2]).ljust(SRB_LEN_V2, b"\0")
    p = ffi.new("struct vstor_srb *")
    ffi.memmove(p, b, SRB_LEN_V2)
    return Srb(
        cdb=b"", data_in=int(p.data_in), data_transfer_length=int(p.data_transfer_length),
        path_id=int(p.path_id), target_id=int(p.target_id), lun=int(p.lun), length=int(p.length),
        srb_status=int(p.srb_status), scsi_status=int(p.scsi_status), port_number=int(p.port_number),
        cdb_length=int(p.cdb_length), sense_info_length=int(p.sense_info_length),
        srb_flags=int(p.srb_flags), time_out_value=int(p.time_out_value),
        queue_tag=int(p.queue_tag), queue_action=int(p.queue_action),
        payload=bytes(ffi.buffer(p.payload)),
    )

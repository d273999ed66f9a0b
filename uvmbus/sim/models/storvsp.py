"""StorVSP: the simulated host side of the synthetic SCSI controller (storvsc_ic.md §5).

Written from the reference's description of OpenVMM's StorVSP + SimpleScsiDisk, not from
the guest driver: it decodes CDBs and builds its answers itself (it shares only the wire
structs of ``native/storvsc_wire.h``), so a misunderstanding in the driver is not mirrored.

Behaviour:

* **Packet parsing, fatal errors (§5.1).**  A VMBus completion from the guest, a packet
  without the completion-requested flag, a payload shorter than 12 bytes, an operation the
  host does not parse (COMPLETE_IO, REMOVE_DEVICE, ENUMERATE_BUS, FCHBA_DATA,
  EVENT_NOTIFICATION, 0, >= 15), an EXECUTE_SRB with more than one GPA range, with
  ``data_transfer_length > 0`` and no range or a shorter one: the channel's worker stops
  (no completion for anything on it, ever), the model counts it (``fatal_errors``) and the
  simulator logs it.  Replies are ``12 + min(payload - 12, 52)`` bytes.
* **Negotiation (§2.8)** on the primary channel: Begin -> QueryVersion -> QueryProperties ->
  EndInitialization -> Ready, INVALID_DEVICE_STATE for out-of-order operations,
  REVISION_MISMATCH for versions not in ``versions`` (default: OpenVMM's 2.0/4.2/5.1/6.0;
  ``versions=hyperv`` adds 6.2), CREATE_SUB_CHANNELS once (version >= 5.1, n <= max, else
  INVALID_PARAMETER).  Sub-channels serve nothing until the primary is Ready.  The last close
  resets everything.
* **SCSI (§5.3-§5.5)**: REPORT LUNS for any path/target; INQUIRY to a missing LUN answers
  "LU not present" (0x7F), anything else there INVALID_LUN; the disk command table of
  SimpleScsiDisk; the error mapping of ``process_result``; completions in the §5.2 format.
* **Inquiry / status / reservations**: VPD 0x8F (``odx``), 0xB0-0xB2, 0xCE, 0xCF with
  OpenVMM's values; GET LBA STATUS from the image's holes; REPORT SUPPORTED OPERATION CODES
  only with ``rsoc``; PERSISTENT RESERVE IN/OUT with ``pr`` (state per image file, an
  initiator per controller: storvsp_pr.py); RESERVATION CONFLICT as OpenVMM's
  ``process_result`` (status 0x18, SRB ERROR, no sense).
* **Hot add/remove (§5.6)** through the control socket: ENUMERATE_BUS on the primary in Ready
  (version >= 4.2); I/O to a removed LUN gets INVALID_LUN at once.
* **Faults**: media-error LBA ranges (MEDIUM ERROR sense), a capacity change (UNIT ATTENTION
  2A/09 on the next command), plus the simulator's own faults (``slow_us`` delays,
  ``drop_completions``, ...), which send every packet through Python.

Fast path: ``uvb_vsp_pump`` (native/storvsp.c) completes error-free READ/WRITE(10/16),
TEST UNIT READY and SYNCHRONIZE CACHE in C with the GIL released; it leaves everything
else in the ring for :meth:`StorvspModel.packet`.

Options (``--disk SPEC`` repeatable, one controller; or ``--device storvsc:KEY=VAL,...``):
``disks`` (list, or specs joined with ``+``), ``versions`` (``openvmm``, ``hyperv`` or
hex versions joined with ``/``), ``max_subchannels`` (default 4), ``max_transfer``
(default 0x40000).  Control operations (``uvmbus sim ctl model storvsc OP ...``):
``attach`` (spec, lun), ``detach`` (lun), ``media_error`` (lun, start, count, kinds),
``clear_media_errors`` (lun), ``resize`` (lun, size), ``luns``, ``malformed`` (kinds: the
next SRB completions are broken on purpose: ``short`` payload, wrong ``op``, in-band ``type``
instead of a completion, wrong ``tid``).
"""

from __future__ import annotations

import enum
import itertools
import struct
import threading
import uuid
import weakref
from collections import deque
from typing import Any

from uvmbus.errors import ConfigError, RingCorrupt
from uvmbus.native import ffi, lib
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_GPA_DIRECT, PKT_INBAND, Packet
from uvmbus.sim.channel import HostChannel
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel, gpa_ranges
from uvmbus.sim.models.storvsp_image import (
    DiskTable,
    ImageDisk,
    MediaError,
    parse_disk_spec,
)
from uvmbus.sim.models.storvsp_pr import READ_CLASS, WRITE_CLASS, PrError, unwatch, watch
from uvmbus.sim.models.storvsp_pr import TYPES as PR_TYPES
from uvmbus.units import parse_size

__all__ = ["STORVSC_CLASS_ID", "StorvspModel", "VERSIONS_OPENVMM", "VERSIONS_HYPERV"]

STORVSC_CLASS_ID = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"

# ---- protocol constants (storvsc_ic.md §2) ------------------------------------------------
OP_COMPLETE_IO = 1
OP_EXECUTE_SRB = 3
OP_RESET_LUN, OP_RESET_ADAPTER, OP_RESET_BUS = 4, 5, 6
OP_BEGIN_INIT, OP_END_INIT, OP_QUERY_VERSION, OP_QUERY_PROPERTIES = 7, 8, 9, 10
OP_ENUMERATE_BUS = 11
OP_CREATE_SUB_CHANNELS = 13
#: operations parse_packet accepts; any other is UnrecognizedOperation (fatal)
PARSED_OPS = {OP_EXECUTE_SRB, OP_RESET_LUN, OP_RESET_ADAPTER, OP_RESET_BUS, OP_BEGIN_INIT,
              OP_END_INIT, OP_QUERY_VERSION, OP_QUERY_PROPERTIES, OP_CREATE_SUB_CHANNELS}

WIN6, WIN7, WIN8, WIN8_1, WIN10 = 0x0200, 0x0402, 0x0501, 0x0600, 0x0602
VERSIONS_OPENVMM = (WIN6, WIN7, WIN8, WIN8_1)
VERSIONS_HYPERV = (*VERSIONS_OPENVMM, WIN10)

ST_SUCCESS = 0x00000000
ST_BUFFER_OVERFLOW = 0x80000005
ST_DEVICE_BUSY = 0x80000011
ST_UNSUCCESSFUL = 0xC0000001
ST_INVALID_PARAMETER = 0xC000000D
ST_INVALID_DEVICE_REQUEST = 0xC0000010
ST_REVISION_MISMATCH = 0xC0000059
ST_DEVICE_NOT_CONNECTED = 0xC000009D
ST_IO_TIMEOUT = 0xC00000B5
ST_DEVICE_DOES_NOT_EXIST = 0xC00000C0
ST_CANCELLED = 0xC0000120
ST_INVALID_DEVICE_STATE = 0xC0000184
ST_IO_DEVICE_ERROR = 0xC0000185

SRB_SUCCESS, SRB_ABORTED, SRB_ERROR, SRB_BUSY, SRB_INVALID_REQUEST = 0x01, 0x02, 0x04, 0x05, 0x06
SRB_NO_DEVICE, SRB_TIMEOUT, SRB_SELECTION_TIMEOUT, SRB_COMMAND_TIMEOUT = 0x08, 0x09, 0x0A, 0x0B
SRB_NO_HBA, SRB_DATA_OVERRUN, SRB_BAD_SRB_BLOCK_LENGTH, SRB_REQUEST_FLUSHED = 0x11, 0x12, 0x15, 0x16
SRB_INVALID_LUN, SRB_INVALID_TARGET_ID, SRB_BAD_FUNCTION = 0x20, 0x21, 0x22
SRB_AUTOSENSE_VALID = 0x80

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
DATA_OUT = 0            # data_in == 0: the host reads guest memory

# §5.2 convert_srb_status_to_nt_status
_NT_FOR_SRB = {
    SRB_SUCCESS: ST_SUCCESS, SRB_BUSY: ST_DEVICE_BUSY,
    SRB_INVALID_LUN: ST_DEVICE_DOES_NOT_EXIST, SRB_INVALID_TARGET_ID: ST_DEVICE_DOES_NOT_EXIST,
    SRB_NO_DEVICE: ST_DEVICE_DOES_NOT_EXIST, SRB_NO_HBA: ST_DEVICE_DOES_NOT_EXIST,
    SRB_COMMAND_TIMEOUT: ST_IO_TIMEOUT, SRB_TIMEOUT: ST_IO_TIMEOUT,
    SRB_SELECTION_TIMEOUT: ST_DEVICE_NOT_CONNECTED,
    SRB_BAD_FUNCTION: ST_INVALID_DEVICE_REQUEST, SRB_BAD_SRB_BLOCK_LENGTH: ST_INVALID_DEVICE_REQUEST,
    SRB_DATA_OVERRUN: ST_BUFFER_OVERFLOW, SRB_REQUEST_FLUSHED: ST_UNSUCCESSFUL,
    SRB_ABORTED: ST_CANCELLED,
}

# sense keys / additional sense codes used by the disk (§5.4/§5.5)
KEY_NO_SENSE, KEY_MEDIUM_ERROR, KEY_ILLEGAL_REQUEST = 0x0, 0x3, 0x5
KEY_UNIT_ATTENTION, KEY_DATA_PROTECT = 0x6, 0x7
ASC_INVALID_COMMAND, ASC_ILLEGAL_BLOCK, ASC_INVALID_CDB = 0x20, 0x21, 0x24
ASC_INVALID_PARAM_LIST, ASC_WRITE_PROTECT, ASC_CAPACITY_CHANGED = 0x26, 0x27, 0x2A
ASC_UNRECOVERED_READ, ASC_WRITE_FAULT = 0x11, 0x03
ASC_PARAM_LIST_LENGTH = 0x1A

MAX_TRANSFER_DISK = 8 * 1024 * 1024        # SimpleScsiDisk max transfer length
MAX_UNMAP_DESCRIPTORS = 4096


def _disk_max_transfer(disk: ImageDisk) -> int:
    """SimpleScsiDisk's ``maximum_transfer_length`` (8 MiB; it caps WRITE SAME), or lower
    with the disk spec's ``maxxfer=`` (then also reported in VPD 0xB0 and enforced on
    READ/WRITE)."""
    mx = disk.spec.max_transfer
    return MAX_TRANSFER_DISK if mx is None else min(mx, MAX_TRANSFER_DISK)

VENDOR, PRODUCT, REVISION = b"Msft    ", b"Virtual Disk    ", b"1.0 "
#: VPD 0xCF signature (OpenVMM inquiry.rs handle_vpd_msft_virtual_device_properties)
MSFT_VDP_SIGNATURE = uuid.UUID("89a98f15-c928-4d8b-94cd-ef51faa99d33")
#: ODX: bytes per offload (OpenVMM inquiry.rs VHDMP_MAX_BYTES_PER_OFFLOAD)
ODX_MAX_BYTES = 64 * 1024 * 1024
MSFT_OUI = 0x002248
SRB_LEN = 52
HDR = 12

_disk_names = itertools.count()
MALFORMED_KINDS = ("short", "op", "type", "tid")


class State(enum.Enum):
    BEGIN = "begin"
    QUERY_VERSION = "query_version"
    QUERY_PROPERTIES = "query_properties"
    END_INIT = "end_initialization"
    READY = "ready"


class _Check(Exception):
    """A command failed: the completion's SRB status, SCSI status and sense."""

    def __init__(self, srb: int, scsi: int = CHECK_CONDITION, key: int | None = None,
                 asc: int = 0, ascq: int = 0, tx: int = 0):
        super().__init__(f"srb {srb:#x} scsi {scsi:#x} sense {key}/{asc:#x}/{ascq:#x}")
        self.srb, self.scsi, self.key, self.asc, self.ascq, self.tx = srb, scsi, key, asc, ascq, tx


def _illegal(asc: int) -> _Check:
    return _Check(SRB_INVALID_REQUEST, CHECK_CONDITION, KEY_ILLEGAL_REQUEST, asc)


def _fixed_sense(key: int, asc: int = 0, ascq: int = 0) -> bytes:
    s = bytearray(18)
    s[0], s[2], s[7], s[12], s[13] = 0x70, key, 10, asc, ascq
    return bytes(s)


def _versions(value: Any) -> tuple[int, ...]:
    if value is None or value == "openvmm":
        return VERSIONS_OPENVMM
    if value == "hyperv":
        return VERSIONS_HYPERV
    items = value if isinstance(value, (list, tuple)) else str(value).replace("/", " ").split()
    try:
        out = tuple(int(v, 0) if isinstance(v, str) else int(v) for v in items)
    except ValueError:
        raise ConfigError(f"storvsc versions={value!r}: use openvmm, hyperv or hex versions "
                          "joined with '/' (e.g. 0x0600/0x0501)") from None
    if not out:
        raise ConfigError("storvsc versions: at least one version is needed")
    return out


class _Request:
    """One parsed guest packet (copied out of the ring)."""

    __slots__ = ("type", "flags", "trans_id", "payload", "ranges", "op")

    def __init__(self, ptype: int, flags: int, trans_id: int, payload: bytes,
                 ranges: list[tuple[int, int, list[int]]]):
        self.type, self.flags, self.trans_id = ptype, flags, trans_id
        self.payload, self.ranges = payload, ranges
        self.op = int.from_bytes(payload[0:4], "little") if len(payload) >= 4 else -1

    @property
    def reply_len(self) -> int:
        return HDR + min(len(self.payload) - HDR, SRB_LEN)


@register_model
class StorvspModel(DeviceModel):
    name = "storvsc"
    class_id = STORVSC_CLASS_ID
    description = "synthetic SCSI controller (StorVSP) with raw-image LUNs"
    kernel_driver = "hv_storvsc"
    cli_option = "disk"

    @classmethod
    def from_cli(cls, value: Any) -> list[dict[str, Any]]:
        """Every ``--disk`` is one LUN of a single controller."""
        if isinstance(value, int):
            return [{} for _ in range(value)]
        return [{"disks": list(value)}]

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        disks = options.get("disks", options.get("disk", []))
        if isinstance(disks, str):
            disks = [d for d in disks.split("+") if d]
        self.versions = _versions(options.get("versions"))
        self.max_subchannels = int(options.get("max_subchannels", 4))
        self.max_transfer = int(str(options.get("max_transfer", 0x40000)), 0)
        #: the C path publishes completions every N requests (0: once per batch)
        self.commit_every = int(options.get("commit_every", 8))
        #: keep polling this long while the guest has completions to read (poll mode)
        self.poll_ns = int(float(options.get("poll_us", 200)) * 1000)
        if not 0 <= self.max_subchannels <= 1023 or self.max_transfer <= 0:
            raise ConfigError("storvsc: max_subchannels must be 0..1023 and max_transfer > 0")
        self._lock = threading.RLock()
        self.table = DiskTable()
        self._retired: list[ImageDisk] = []          # detached, fd kept until reset
        self._names: dict[int, str] = {}
        # native controller state shared with every channel's pump
        self._vsp: Any = ffi.new("struct uvb_vsp *")
        self._disk_arr: Any = ffi.new("struct uvb_vsp_disk[]", lib.UVB_VSP_MAX_LUNS)
        self._vsp.disks = self._disk_arr
        self._vsp.max_luns = lib.UVB_VSP_MAX_LUNS
        self._ram_set = False
        self._chans: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self._waiting: dict[int, deque[_Request]] = {}
        self.state = State.BEGIN
        self.version: int | None = None
        self.subchannels_created = 0
        self._create_done = False
        self._rescan_pending = False
        self._malformed: deque[str] = deque()
        self._pr_tokens: dict[int, int] = {}
        self.counters: dict[str, int] = {
            "fatal_errors": 0, "srbs_python": 0, "init_ops": 0, "invalid_state": 0,
            "enumerate_bus_sent": 0, "hot_adds": 0, "hot_removes": 0, "media_errors_reported": 0,
            "unit_attentions": 0, "resets": 0, "malformed_sent": 0, "over_max_transfer": 0,
            "reservation_conflicts": 0,
        }
        self.fatal_messages: list[str] = []
        for spec in disks:
            self.attach(str(spec), notify=False)

    # ==== LUN table ==========================================================================
    def _sync_native(self, lun: int) -> None:
        disk = self.table.disks.get(lun)
        if disk is None:
            lib.uvb_vsp_disk_detach(self._vsp, lun)
            return
        ptr, length = disk.map
        rc = lib.uvb_vsp_disk_attach(self._vsp, lun, disk.fd, disk.block_shift, disk.nblocks,
                                     1 if disk.readonly else 0, 1 if disk.slow else 0, ptr, length)
        if rc:
            raise ConfigError(f"storvsc: cannot attach LUN {lun} natively ({rc})")

    def attach(self, spec_text: str, lun: int | None = None, *, notify: bool = True) -> int:
        """Attach a disk (hot add when the guest is connected).  Returns its LUN."""
        spec = parse_disk_spec(spec_text)
        if lun is not None:
            spec.lun = lun
        with self._lock:
            n = spec.lun if spec.lun is not None else self.table.free_lun()
            if n in self.table.disks:
                raise ConfigError(f"storvsc: LUN {n} is already attached "
                                  f"({self.table.disks[n].path})")
            disk = ImageDisk(spec)
            self.table.disks[n] = disk
            self._names[n] = f"simsd{_disk_name(next(_disk_names))}"
            if disk.pr is not None:
                self._pr_tokens[id(disk)] = watch(disk.pr, self, _PrWatcher(self, disk))
            self._sync_native(n)
            if notify:
                self.counters["hot_adds"] += 1
                self._notify_rescan()
        return n

    def detach(self, lun: int) -> ImageDisk:
        """Remove a disk (hot remove): I/O to it fails with INVALID_LUN at once.  Returns it."""
        with self._lock:
            disk = self.table.disks.pop(lun, None)
            if disk is None:
                raise ConfigError(f"storvsc: no disk at LUN {lun}")
            self._sync_native(lun)
            if disk.pr is not None:
                unwatch(disk.pr, self._pr_tokens.pop(id(disk), 0))
            self._retired.append(disk)       # a pump may still be using its fd
            self.counters["hot_removes"] += 1
            self._notify_rescan()
            return disk

    def _pr_changed(self, disk: ImageDisk) -> None:
        """A reservation appeared or went (maybe through another controller): commands to the
        LUN take the Python path, which checks it, while one exists."""
        for lun, d in list(self.table.disks.items()):
            if d is disk:
                lib.uvb_vsp_set_slow(self._vsp, lun, 1 if d.slow else 0)

    @property
    def initiator(self) -> str:
        """This controller's initiator identity for persistent reservations (storvsp_pr.py)."""
        return f"vmbus-scsi:{self.device.device_id}"

    def _notify_rescan(self) -> None:
        """§5.6: one notification to the primary worker (repeats coalesce)."""
        self._rescan_pending = True
        primary = self.device.primary
        if primary is not None:
            primary.poke()

    def disks(self) -> list[tuple[int, str, int]]:
        """(lun, name, size) for the simulated in-kernel driver's block devices."""
        with self._lock:
            return [(lun, self._names[lun], d.size) for lun, d in sorted(self.table.disks.items())]

    # ==== control (uvmbus sim ctl model ...) ===============================================
    def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Model-specific control operations (run on the simulator's event loop)."""
        if op == "attach":
            lun = self.attach(str(args["spec"]), None if args.get("lun") is None else int(args["lun"]))
            return {"lun": lun}
        if op == "detach":
            lun = int(args["lun"])
            return {"detached_lun": lun, "disk": self.detach(lun).describe(),
                    "luns_left": sorted(self.table.disks)}
        if op in ("media_error", "clear_media_errors", "resize"):
            lun = int(args.get("lun", 0))
            with self._lock:
                disk = self.table.disks.get(lun)
                if disk is None:
                    raise ConfigError(f"storvsc: no disk at LUN {lun}")
                with disk.lock:
                    if op == "media_error":
                        kinds = args.get("kinds", ["read", "write"])
                        if isinstance(kinds, str):
                            kinds = kinds.split(",")
                        bad = set(kinds) - {"read", "write"}
                        if bad:
                            raise ConfigError(f"media_error kinds must be read/write, not {sorted(bad)}")
                        disk.media_errors.append(MediaError(int(args["start"]), int(args.get("count", 1)),
                                                            frozenset(kinds)))
                    elif op == "clear_media_errors":
                        disk.media_errors.clear()
                    else:
                        size = args["size"]
                        disk.resize(parse_size(size, what="disk size", allow_zero=False) if isinstance(size, str) else int(size))
                self._sync_native(lun)
            return {"disk": disk.describe()}
        if op == "malformed":
            kinds = args.get("kinds", ["short"])
            if isinstance(kinds, str):
                kinds = [kinds]
            bad = set(kinds) - set(MALFORMED_KINDS)
            if bad:
                raise ConfigError(f"malformed kinds must be among {MALFORMED_KINDS}, not {sorted(bad)}")
            with self._lock:
                self._malformed.extend(kinds)
            self.device.poke_channels()
            return {"queued": len(self._malformed)}
        if op == "luns":
            with self._lock:
                return {"luns": {str(k): d.describe() for k, d in sorted(self.table.disks.items())}}
        raise ConfigError(f"storvsc: unknown control operation {op!r}; known: attach, detach, "
                          "media_error, clear_media_errors, resize, luns")

    # ==== channel hooks =====================================================================
    def _ensure_ram(self) -> None:
        if self._ram_set:
            return
        ram = self.device.guest_ram
        if ram is not None:
            self._vsp.ram = ram.ptr
            self._vsp.ram_size = ram.size
            self._vsp.base_pfn = ram.base_pfn
        self._ram_set = True

    def open(self, channel: HostChannel) -> None:
        self._ensure_ram()
        c = ffi.new("struct uvb_vsp_chan *")
        scratch = ffi.new("uint8_t[]", 1 << 20)
        pkts = ffi.new("struct uvb_pkt[]", 256)
        c.vsp = self._vsp
        c.tx = channel.tx.raw
        c.rx = channel.rx.raw
        c.irq = channel.irq
        c.kick = channel.kick
        c.scratch = scratch
        c.scratch_len = len(scratch)
        c.pkts = pkts
        c.max_pkts = len(pkts)
        c.commit_every = self.commit_every
        with self._lock:
            self._chans[channel.relid] = (c, (scratch, pkts))
            self._waiting.setdefault(channel.relid, deque())

    def close(self, channel: HostChannel) -> None:
        with self._lock:
            self._chans.pop(channel.relid, None)
            self._waiting.pop(channel.relid, None)

    def reset(self) -> None:
        """Channel 0 closed: back to Begin (§2.8)."""
        with self._lock:
            self.state = State.BEGIN
            self.version = None
            self.subchannels_created = 0
            self._create_done = False
            self._rescan_pending = False
            lib.uvb_vsp_set_ready(self._vsp, 0)
            self._waiting.clear()
            for d in self._retired:
                d.close()
            self._retired.clear()

    def pump(self, channel: HostChannel, spin_ns: int) -> int | None:
        self._housekeeping(channel)
        entry = self._chans.get(channel.relid)
        if entry is None:
            return None
        c = entry[0]
        c.spin_ns = spin_ns
        c.poll_ns = self.poll_ns
        c.slow_all = 1 if self._malformed else 0
        return int(lib.uvb_vsp_pump(c))

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        self._housekeeping(channel)
        ranges = gpa_ranges(pkt) if pkt.type == PKT_GPA_DIRECT else []
        req = _Request(pkt.type, pkt.flags, pkt.trans_id, bytes(pkt.payload), ranges)
        if not channel.is_primary and self.state != State.READY:
            # sub-channels process nothing until the primary is Ready (§2.8)
            self._waiting.setdefault(channel.relid, deque()).append(req)
            return
        self._handle(channel, req)

    def _housekeeping(self, channel: HostChannel) -> None:
        """On the channel's own worker: queued sub-channel packets, pending ENUMERATE_BUS."""
        if self.state != State.READY:
            return
        waiting = self._waiting.get(channel.relid)
        if waiting:
            while waiting:
                self._handle(channel, waiting.popleft())
            channel.flush()
        if channel.is_primary and self._rescan_pending:
            self._rescan_pending = False
            if self.version is not None and self.version >= WIN7:
                size = HDR + (SRB_LEN if self.version >= WIN8 else 36)
                payload = struct.pack("<III", OP_ENUMERATE_BUS, 0, 0).ljust(size, b"\0")
                channel.send(payload, trans_id=0, flags=0, type=PKT_INBAND)
                channel.flush()
                self.counters["enumerate_bus_sent"] += 1

    def describe(self) -> dict[str, Any]:
        with self._lock:
            luns = {str(k): d.describe() for k, d in sorted(self.table.disks.items())}
            chans = {str(r): {"fast_completions": int(c.fast), "polls": int(c.polls)}
                     for r, (c, _) in self._chans.items()}
        native = {}
        for k in luns:
            d = self._disk_arr[int(k)]
            native[k] = {"reads": int(d.reads), "writes": int(d.writes), "read_bytes": int(d.read_bytes),
                         "write_bytes": int(d.write_bytes), "flushes": int(d.flushes)}
        return {"storvsp": {
            "state": self.state.value, "version": None if self.version is None else f"{self.version:#06x}",
            "accepted_versions": [f"{v:#06x}" for v in self.versions],
            "max_subchannels": self.max_subchannels, "max_transfer": self.max_transfer,
            "subchannels_created": self.subchannels_created, "luns": luns, "fast_path": native,
            "channels": chans, **self.counters, "fatal": self.fatal_messages[-5:],
        }}

    # ==== packets ===========================================================================
    def _fatal(self, channel: HostChannel, why: str) -> None:
        msg = (f"relid {channel.relid}: StorVSP fatal packet error ({why}); this channel's worker "
               "stops, as OpenVMM's does (storvsc_ic.md §5.1)")
        self.counters["fatal_errors"] += 1
        self.fatal_messages.append(msg)
        self.device.log(msg)
        raise RingCorrupt(msg, channel=f"relid {channel.relid}")

    def _reply(self, channel: HostChannel, req: _Request, status: int, body: bytes = b"") -> None:
        """A completion: ``{COMPLETE_IO, 0, status}`` + body, sized to the request (§5.1)."""
        data = (struct.pack("<III", OP_COMPLETE_IO, 0, status) + body)[:req.reply_len]
        channel.complete(req.trans_id, data.ljust(req.reply_len, b"\0"))

    def _handle(self, channel: HostChannel, req: _Request) -> None:
        # -- §5.1 parse_packet: fatal errors -------------------------------------------------
        if req.type == PKT_COMP:
            self._fatal(channel, "InvalidPacketType: a VMBus completion packet from the guest")
        if req.type not in (PKT_INBAND, PKT_GPA_DIRECT):
            self._fatal(channel, f"InvalidPacketType: packet type {req.type}")
        if not req.flags & FLAG_COMPLETION_REQUESTED:
            self._fatal(channel, "NotTransactional: no completion requested")
        if len(req.payload) < HDR:
            self._fatal(channel, f"Access: payload of {len(req.payload)} bytes < 12-byte header")
        if req.op not in PARSED_OPS:
            self._fatal(channel, f"UnrecognizedOperation: operation {req.op}")
        srb = None
        if req.op == OP_EXECUTE_SRB:
            srb = ffi.new("struct vstor_srb *")
            body = req.payload[HDR:HDR + SRB_LEN]
            ffi.memmove(srb, body, len(body))          # shorter SRBs: zero Win8 extension
            dtl = int(srb.data_transfer_length)
            if len(req.ranges) > 1:
                self._fatal(channel, f"InvalidDataTransferLength: {len(req.ranges)} GPA ranges")
            if dtl and not req.ranges:
                self._fatal(channel, f"InvalidDataTransferLength: {dtl} bytes without a GPA range")
            if dtl and req.ranges[0][0] < dtl:
                self._fatal(channel, f"InvalidDataTransferLength: range of {req.ranges[0][0]} "
                            f"bytes < data_transfer_length {dtl}")
        # -- state machine -----------------------------------------------------------------
        if self.state == State.READY:
            if req.op == OP_EXECUTE_SRB:
                assert srb is not None
                self._execute(channel, req, srb)
                return
            if req.op in (OP_RESET_LUN, OP_RESET_ADAPTER, OP_RESET_BUS):
                self.counters["resets"] += 1
                self._reply(channel, req, ST_SUCCESS)        # "have always been no-ops"
                return
            if req.op == OP_CREATE_SUB_CHANNELS and channel.is_primary:
                self._create_subchannels(channel, req)
                return
            self.counters["invalid_state"] += 1
            self._reply(channel, req, ST_INVALID_DEVICE_STATE)
            return
        if not channel.is_primary:       # not reached: queued until Ready
            self._reply(channel, req, ST_INVALID_DEVICE_STATE)
            return
        self.counters["init_ops"] += 1
        self._init_op(channel, req)

    def _init_op(self, channel: HostChannel, req: _Request) -> None:
        op, st = req.op, self.state
        if st == State.BEGIN and op == OP_BEGIN_INIT:
            self.state = State.QUERY_VERSION
            self._reply(channel, req, ST_SUCCESS)
        elif st == State.QUERY_VERSION and op == OP_QUERY_VERSION:
            ver = int.from_bytes(req.payload[HDR:HDR + 2].ljust(2, b"\0"), "little")
            if ver in self.versions:
                self.version = ver
                self.state = State.QUERY_PROPERTIES
                self._reply(channel, req, ST_SUCCESS, struct.pack("<HH", ver, 0))
            else:
                self._reply(channel, req, ST_REVISION_MISMATCH, struct.pack("<HH", ver, 0))
        elif st == State.QUERY_PROPERTIES and op == OP_QUERY_PROPERTIES:
            assert self.version is not None
            multi = self.version >= WIN8
            props = struct.pack("<IHHIIQ", 0, self.max_subchannels if multi else 0, 0,
                                1 if multi else 0, self.max_transfer, 0)
            self.state = State.END_INIT
            self._reply(channel, req, ST_SUCCESS, props)
        elif st == State.END_INIT and op == OP_CREATE_SUB_CHANNELS:
            self._create_subchannels(channel, req)
        elif st == State.END_INIT and op == OP_END_INIT:
            with self._lock:
                self.state = State.READY
                self._rescan_pending = False      # changes before Ready are not reported
                lib.uvb_vsp_set_ready(self._vsp, 1)
            self._reply(channel, req, ST_SUCCESS)
            self._wake_subchannels()
        else:
            self.counters["invalid_state"] += 1
            self._reply(channel, req, ST_INVALID_DEVICE_STATE)

    def _create_subchannels(self, channel: HostChannel, req: _Request) -> None:
        count = int.from_bytes(req.payload[HDR:HDR + 2].ljust(2, b"\0"), "little")
        if self.version is None or self.version < WIN8 or self._create_done:
            self.counters["invalid_state"] += 1
            self._reply(channel, req, ST_INVALID_DEVICE_STATE)
            return
        if count > self.max_subchannels:
            self._reply(channel, req, ST_INVALID_PARAMETER)
            return
        self._create_done = True                      # allowed once (§2.8)
        self.subchannels_created = count
        self._reply(channel, req, ST_SUCCESS)
        if count:
            self.device.offer_subchannels(count)

    def _wake_subchannels(self) -> None:
        """Sub-channel workers may hold packets queued before Ready: let them run."""
        for relid, ch in list(self.device.channels.items()):
            if relid != self.device.relid:
                ch.poke()

    # ==== SCSI =============================================================================
    def _execute(self, channel: HostChannel, req: _Request, srb: Any) -> None:
        self.counters["srbs_python"] += 1
        dtl = int(srb.data_transfer_length)
        rng = None
        if dtl:
            count, offset, pfns = req.ranges[0]
            rng = (dtl, offset, pfns)              # truncated to data_transfer_length (§3.2)
        path, target, lun = int(srb.path_id), int(srb.target_id), int(srb.lun)
        cdb = bytes(ffi.buffer(srb.payload))[:16]
        disk: ImageDisk | None = None
        try:
            with self._lock:
                disk = self.table.disks.get(lun) if path == 0 and target == 0 else None
            if cdb[0] == 0xA0:
                tx = self._report_luns(srb, rng, path, target)
            elif disk is None:
                tx = self._no_disk(srb, rng, cdb, lun)
            else:
                tx = self._disk_command(disk, lun, srb, rng, cdb)
            self._complete_srb(channel, req, SRB_SUCCESS, GOOD, None, tx)
        except _Check as chk:
            sense = None if chk.key is None else _fixed_sense(chk.key, chk.asc, chk.ascq)
            if chk.key is not None and disk is not None:
                disk.saved_sense = sense
            if chk.key == KEY_MEDIUM_ERROR:
                self.counters["media_errors_reported"] += 1
            self._complete_srb(channel, req, chk.srb, chk.scsi, sense, chk.tx)

    def _complete_srb(self, channel: HostChannel, req: _Request, srb_status: int, scsi_status: int,
                      sense: bytes | None, tx: int) -> None:
        """§5.2: header {1, 0, NTSTATUS(srb)}, ScsiRequest with length 0x34, cdb_length 16,
        sense_info_ex_length 20, data_transfer_length = bytes moved, sense + 2 zero bytes;
        path/target/lun, data_in and the Win8 fields zero."""
        r = ffi.new("struct vstor_srb *")
        r.length = SRB_LEN
        r.srb_status = srb_status | (SRB_AUTOSENSE_VALID if sense else 0)
        r.scsi_status = scsi_status
        r.cdb_length = 16
        r.sense_info_length = 20
        r.data_transfer_length = tx
        if sense:
            ffi.memmove(r.payload, sense, len(sense))
        status = _NT_FOR_SRB.get(srb_status, ST_IO_DEVICE_ERROR)
        if self._malformed:
            with self._lock:
                kind = self._malformed.popleft() if self._malformed else ""
            if kind:
                self.counters["malformed_sent"] += 1
                body = struct.pack("<III", OP_COMPLETE_IO, 0, status) + bytes(ffi.buffer(r))
                if kind == "short":
                    channel.complete(req.trans_id, body[:40])
                elif kind == "op":
                    channel.complete(req.trans_id, struct.pack("<I", OP_EXECUTE_SRB) + body[4:])
                elif kind == "type":
                    channel.send(body, trans_id=req.trans_id, type=PKT_INBAND)
                else:
                    channel.complete(req.trans_id ^ 0x5A5A0000, body)
                return
        self._reply(channel, req, status, bytes(ffi.buffer(r)))

    # -- guest memory ------------------------------------------------------------------------
    def _to_guest(self, srb: Any, rng: tuple[int, int, list[int]] | None, data: bytes) -> int:
        """Copy answer data into the buffer (truncated to it); bytes moved."""
        if rng is None or not data:
            return 0
        if srb.data_in == DATA_OUT:
            raise _illegal(ASC_INVALID_CDB)           # memory access fault (§5.5)
        n = min(len(data), rng[0])
        ram = self.device.guest_ram
        if ram is None:
            raise _illegal(ASC_INVALID_CDB)
        try:
            ram.write(rng[2], rng[1], data[:n])
        except ConfigError:
            raise _illegal(ASC_INVALID_CDB) from None
        return n

    def _from_guest(self, srb: Any, rng: tuple[int, int, list[int]] | None, n: int) -> bytes:
        if n == 0:
            return b""
        if rng is None or n > rng[0] or srb.data_in != DATA_OUT:
            raise _illegal(ASC_INVALID_CDB)
        ram = self.device.guest_ram
        if ram is None:
            raise _illegal(ASC_INVALID_CDB)
        try:
            return ram.read(rng[2], rng[1], n)
        except ConfigError:
            raise _illegal(ASC_INVALID_CDB) from None

    # -- controller level (§5.3) ---------------------------------------------------------------
    def _report_luns(self, srb: Any, rng: Any, path: int, target: int) -> int:
        with self._lock:
            luns = sorted(self.table.disks) if path == 0 and target == 0 else []
        data = struct.pack(">I4x", 8 * len(luns)) + b"".join(
            struct.pack(">H6x", lun) for lun in luns)
        buflen = 0 if rng is None else rng[0]
        if buflen < 8:
            return 0
        return self._to_guest(srb, rng, data[:buflen])

    def _no_disk(self, srb: Any, rng: Any, cdb: bytes, lun: int) -> int:
        if cdb[0] == 0x12:
            alloc = struct.unpack_from(">H", cdb, 3)[0]
            buflen = 0 if rng is None else rng[0]
            evpd, page = cdb[1] & 1, cdb[2]
            if evpd or page or srb.data_in != 1 or not (5 <= alloc <= buflen):
                raise _illegal(ASC_INVALID_CDB)
            data = bytearray(104)
            data[0] = 0x7F                       # qualifier 3, type 0x1F: LU not present
            data[2], data[3], data[4], data[7] = 0x05, 0x02, 99, 0x02
            if lun == 0:
                data[8:36] = VENDOR + PRODUCT + REVISION
            return self._to_guest(srb, rng, bytes(data[:min(alloc, 104)]))
        raise _Check(SRB_INVALID_LUN, CHECK_CONDITION)     # no sense; Linux removes the LUN

    # -- disk level (§5.4) --------------------------------------------------------------------
    def _disk_command(self, disk: ImageDisk, lun: int, srb: Any, rng: Any, cdb: bytes) -> int:
        op = cdb[0]
        with disk.lock:
            if disk.unit_attention and op not in (0x12, 0x03):
                disk.unit_attention = False
                self.counters["unit_attentions"] += 1
                self._sync_native_locked(lun)
                raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_UNIT_ATTENTION, ASC_CAPACITY_CHANGED, 0x09)
        buflen = 0 if rng is None else rng[0]
        if disk.pr is not None:
            key = 0x9E12 if op == 0x9E and cdb[1] & 0x1F == 0x12 else op
            cls = "write" if key in WRITE_CLASS else "read" if key in READ_CLASS else ""
            if cls:
                try:
                    disk.pr.check_access(self.initiator, cls)
                except PrError:
                    self.counters["reservation_conflicts"] += 1
                    raise _Check(SRB_ERROR, RESERVATION_CONFLICT) from None
        if op in (0x5E, 0x5F):
            return self._persistent_reserve(disk, srb, rng, cdb, buflen)
        if op == 0xA3 and cdb[1] & 0x1F == 0x0C and disk.spec.rsoc:
            return self._report_opcodes(disk, srb, rng, cdb, buflen)
        if op in (0x00, 0x04, 0x16, 0x17, 0x1E):      # TUR, FORMAT, RESERVE, RELEASE, PREVENT
            return 0
        if op == 0x03:
            return self._request_sense(disk, lun, srb, rng, cdb, buflen)
        if op == 0x12:
            return self._inquiry(disk, srb, rng, cdb, buflen)
        if op in (0x1A, 0x5A):
            return self._mode_sense(disk, srb, rng, cdb, buflen)
        if op in (0x15, 0x55):
            return self._mode_select(disk, srb, rng, cdb, buflen)
        if op == 0x25:
            if buflen < 8:
                raise _Check(SRB_DATA_OVERRUN, CHECK_CONDITION, KEY_ILLEGAL_REQUEST, ASC_INVALID_CDB)
            last = min(disk.nblocks - 1, 0xFFFFFFFF)
            return self._to_guest(srb, rng, struct.pack(">II", last, disk.block_size))
        if op == 0x9E:
            sa = cdb[1] & 0x1F
            if sa == 0x10:
                if buflen < 12:
                    raise _Check(SRB_DATA_OVERRUN, CHECK_CONDITION, KEY_ILLEGAL_REQUEST, ASC_INVALID_CDB)
                data = struct.pack(">QIBBB", disk.nblocks - 1, disk.block_size, 0, 0,
                                   0x80 if disk.unmap_supported else 0).ljust(32, b"\0")
                return self._to_guest(srb, rng, data[:min(buflen, 32)])
            if sa == 0x12:
                if not disk.spec.lba_status:
                    raise _illegal(ASC_INVALID_COMMAND)
                return self._get_lba_status(disk, srb, rng, cdb, buflen)
            raise _illegal(ASC_INVALID_CDB)
        if op in (0x08, 0x0A, 0x28, 0x2A, 0xA8, 0xAA, 0x88, 0x8A):
            return self._read_write(disk, srb, rng, cdb, buflen)
        if op in (0x2F, 0x2E, 0xAF, 0xAE, 0x8F, 0x8E):        # VERIFY / WRITE AND VERIFY
            lba, blocks = _lba_len(cdb)
            self._range(disk, lba, blocks)
            return 0
        if op in (0x35, 0x91):
            disk.flush()
            return 0
        if op in (0x41, 0x93):
            return self._write_same(disk, srb, rng, cdb, buflen)
        if op == 0x42 and disk.unmap_supported:
            return self._unmap(disk, srb, rng, cdb, buflen)
        if op == 0x1B:
            if cdb[1] & 1:
                raise _illegal(ASC_INVALID_CDB)
            if not cdb[4] & 1:
                disk.flush()
            return 0
        if op == 0x1D:
            if cdb[1] & 0xF0 or struct.unpack_from(">H", cdb, 3)[0]:
                raise _illegal(ASC_INVALID_CDB)
            return 0
        raise _illegal(ASC_INVALID_COMMAND)

    def _sync_native_locked(self, lun: int) -> None:
        d = self.table.disks.get(lun)
        if d is not None:
            lib.uvb_vsp_set_slow(self._vsp, lun, 1 if d.slow else 0)

    def _request_sense(self, disk: ImageDisk, lun: int, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        alloc = cdb[4]
        if not 8 <= alloc <= buflen:
            raise _illegal(ASC_INVALID_CDB)
        with disk.lock:
            if disk.unit_attention:
                disk.unit_attention = False
                self._sync_native_locked(lun)
                data = _fixed_sense(KEY_UNIT_ATTENTION, ASC_CAPACITY_CHANGED, 0x09)
            else:
                data = disk.saved_sense or _fixed_sense(KEY_NO_SENSE)
            disk.saved_sense = None
        return self._to_guest(srb, rng, data[:min(alloc, 18)])

    def _inquiry(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        evpd, cmddt, page = cdb[1] & 1, cdb[1] & 2, cdb[2]
        if alloc > buflen or cmddt or (page and not evpd):
            raise _illegal(ASC_INVALID_CDB)
        if not evpd:
            std = bytearray(104)
            std[2], std[3], std[4], std[7] = 0x05, 0x02, 99, 0x02
            std[8:36] = VENDOR + PRODUCT + REVISION
            return self._to_guest(srb, rng, bytes(std[:min(alloc, 104)]))
        if alloc < 4:
            raise _illegal(ASC_INVALID_CDB)
        pages = [0x00, 0x83, 0xCE, 0xCF] + ([0x80] if disk.serial else []) + \
            ([0x8F] if disk.spec.odx else []) + ([0xB0, 0xB1, 0xB2] if disk.unmap_supported else [])
        if page not in pages:
            raise _illegal(ASC_INVALID_CDB)
        if page == 0x00:
            body = bytes(sorted(pages))
        elif page == 0x80:
            body = (disk.serial or "").encode()
        elif page == 0x83:
            t10 = VENDOR + disk.disk_id.hex.encode()
            ident = disk.disk_id.int
            naa = (6 << 124) | (MSFT_OUI << 100) | (ident & ((1 << 100) - 1))
            body = bytes([0x02, 0x01, 0, len(t10)]) + t10 + bytes([0x01, 0x03, 0, 16]) + \
                naa.to_bytes(16, "big")
        elif page == 0x8F:
            # one Block Device ROD Token Limits descriptor (type 0, 32 bytes) with Microsoft's
            # signature bytes, 8 range descriptors, 64 MiB per token (OpenVMM inquiry.rs)
            n = ODX_MAX_BYTES >> disk.block_shift
            body = struct.pack(">HHBBBB2xHIIQQ", 0, 32, 0x4D, 0x1F, 0x83, 0x84, 8, 0, 0, n, n)
        elif page == 0xB0:
            bs = disk.block_size
            # MAXIMUM TRANSFER LENGTH: OpenVMM leaves it 0 (no limit); ``maxxfer=`` reports one
            mx = 0 if disk.spec.max_transfer is None else _disk_max_transfer(disk) // bs
            ws = _disk_max_transfer(disk) // bs      # MAXIMUM WRITE SAME LENGTH: 8 MiB cap
            # OPTIMAL UNMAP GRANULARITY 1 (OpenVMM's optimal_unmap_sectors default, "non-zero
            # or the guest will think unmap is not supported"), UGAVALID with alignment 0, as
            # OpenVMM's handle_vpd_block_limits
            body = struct.pack(">BBHIIIIIIIQ", 0, 0, 0, mx, 0, 0,
                               0xFFFFFFFF, MAX_UNMAP_DESCRIPTORS, 1, 0x80000000,
                               ws).ljust(0x3C, b"\0")
        elif page == 0xB1:
            body = struct.pack(">H", disk.spec.rotation).ljust(0x3C, b"\0")
        elif page == 0xB2:
            # threshold exponent: smallest e >= 1 with blocks >> e < 2**32; LBPU; thin
            thr = max(1, ((disk.nblocks >> 32) - 1).bit_length() if disk.nblocks >> 32 else 0)
            body = bytes([thr, 0x80, 0x02, 0])
        elif page == 0xCE:        # Microsoft paging-extent properties: version 1, mode select ext
            body = bytes([1, 1, 0, 0])
        else:                     # 0xCF Microsoft virtual-device properties: version 1, flags 0
            body = bytes([1, 0, 0, 0]) + MSFT_VDP_SIGNATURE.bytes_le
        data = bytes([0, page]) + struct.pack(">H", len(body)) + body
        return self._to_guest(srb, rng, data[:alloc])

    def _mode_sense(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        six = cdb[0] == 0x1A
        alloc = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
        hdr = 4 if six else 8
        if alloc == 0 or buflen == 0:
            return 0
        if alloc > buflen or alloc < hdr:
            raise _illegal(ASC_INVALID_CDB)
        pc, page = cdb[2] >> 6, cdb[2] & 0x3F
        if pc == 3 or page not in (0x08, 0x3F):
            raise _illegal(ASC_INVALID_CDB)
        # WCE only in current / default values (pc 0 / 2), as OpenVMM's handle_mode_sense
        wce = 0x04 if disk.write_cache and pc in (0, 2) else 0
        caching = bytes([0x08, 0x0A, wce]) + bytes(9)
        dsp = (0x80 if disk.readonly else 0) | 0x10
        total = hdr + len(caching)
        header = bytes([total - 1, 0, dsp, 0]) if six else struct.pack(">HBBHH", total - 2, 0, dsp, 0, 0)
        return self._to_guest(srb, rng, (header + caching)[:alloc])

    def _mode_select(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        six = cdb[0] == 0x15
        plen = cdb[4] if six else struct.unpack_from(">H", cdb, 7)[0]
        hdr = 4 if six else 8
        if plen == 0:
            return 0
        if cdb[1] & 1 or plen != buflen or plen < hdr + 12:
            raise _illegal(ASC_INVALID_CDB)
        data = self._from_guest(srb, rng, plen)
        bdl = data[3] if six else struct.unpack_from(">H", data, 6)[0]
        page = data[hdr + bdl:]
        if len(page) < 12 or page[0] & 0x3F != 0x08 or bool(page[2] & 0x04) != disk.write_cache:
            raise _illegal(ASC_INVALID_PARAM_LIST)
        return 0

    def _get_lba_status(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        """GET LBA STATUS with OpenVMM's checks (getlbastatus.rs): start beyond the end ->
        ILLEGAL BLOCK; allocation length != buffer -> INVALID CDB; 0 -> nothing; < 24 ->
        INVALID CDB.  Descriptors from the image's holes, to the end of the disk or as
        many as fit."""
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        if lba >= disk.nblocks:
            raise _illegal(ASC_ILLEGAL_BLOCK)
        if alloc != buflen:
            raise _illegal(ASC_INVALID_CDB)
        if alloc == 0:
            return 0
        if alloc < 24:
            raise _illegal(ASC_INVALID_CDB)
        room = (alloc - 8) // 16
        desc = b""
        for start, count, mapped in disk.allocation(lba, disk.nblocks - lba):
            while count and room:
                n = min(count, 0xFFFFFFFF)
                desc += struct.pack(">QIB3x", start, n, 0 if mapped else 1)
                start, count, room = start + n, count - n, room - 1
            if not room:
                break
        return self._to_guest(srb, rng, struct.pack(">I4x", len(desc) + 4) + desc)

    def _opcode_table(self, disk: ImageDisk) -> list[tuple[int, int | None]]:
        """(opcode, service action) of every command this disk answers."""
        ops: list[tuple[int, int | None]] = [(op, None) for op in (
            0x00, 0x03, 0x04, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1D, 0x1E, 0x25,
            0x28, 0x2A, 0x2E, 0x2F, 0x35, 0x41, 0x55, 0x5A, 0x88, 0x8A, 0x8E, 0x8F, 0x91, 0x93,
            0xA0, 0xA8, 0xAA, 0xAE, 0xAF)]
        if disk.unmap_supported:
            ops.append((0x42, None))
        ops.append((0x9E, 0x10))
        if disk.spec.lba_status:
            ops.append((0x9E, 0x12))
        if disk.pr is not None:
            ops += [(0x5E, sa) for sa in (0, 1, 2, 3)] + [(0x5F, sa) for sa in (0, 1, 2, 3, 4, 5, 6)]
        ops.append((0xA3, 0x0C))
        return sorted(ops, key=lambda o: (o[0], -1 if o[1] is None else o[1]))

    def _report_opcodes(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), only with the ``rsoc`` disk option:
        Hyper-V and OpenVMM refuse it (see storvsp_image.py)."""
        opts, op = cdb[2] & 7, cdb[3]
        sa = struct.unpack_from(">H", cdb, 4)[0]
        alloc = struct.unpack_from(">I", cdb, 6)[0]
        if alloc > buflen or cdb[2] & 0x80:          # RCTD (timeouts) not supported
            raise _illegal(ASC_INVALID_CDB)
        table = self._opcode_table(disk)
        if opts == 0:
            body = b"".join(struct.pack(">BxHxBH", o, s or 0, 1 if s is not None else 0,
                                        _cdb_len(o)) for o, s in table)
            data = struct.pack(">I", len(body)) + body
        elif opts in (1, 2, 3):
            has_sa = any(o == op and s is not None for o, s in table)
            if (opts == 1 and has_sa) or (opts == 2 and not has_sa):
                raise _illegal(ASC_INVALID_CDB)
            want = sa if has_sa else None
            support = 3 if (op, want) in table else 1
            n = _cdb_len(op)
            usage = bytes([op]) + b"\xff" * (n - 1) if support == 3 else b""
            data = struct.pack(">BBH", 0, support, len(usage)) + usage
        else:
            raise _illegal(ASC_INVALID_CDB)
        return self._to_guest(srb, rng, data[:alloc])

    def _persistent_reserve(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        """PERSISTENT RESERVE IN/OUT (OpenVMM reservation.rs checks; state: storvsp_pr.py)."""
        pr = disk.pr
        sa = cdb[1] & 0x1F
        if cdb[0] == 0x5E:
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            if alloc > buflen:
                raise _illegal(ASC_INVALID_CDB)
            if pr is None:                         # no PR-capable backend
                raise _illegal(ASC_INVALID_COMMAND)
            if sa == 2:                            # REPORT CAPABILITIES
                if alloc < 8:
                    raise _illegal(ASC_INVALID_CDB)
                # ATP_C; TMV; every type (types mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC,
                # WR_EX / EX_AC_AR)
                data = struct.pack(">HBBBB2x", 8, 0x04, 0x80, 0xEA, 0x01)
            elif sa in (0, 1, 3):
                if alloc < 8:
                    raise _illegal(ASC_INVALID_CDB)
                data = {0: pr.read_keys, 1: pr.read_reservation, 3: pr.read_full_status}[sa]()
            else:
                raise _illegal(ASC_INVALID_CDB)
            return self._to_guest(srb, rng, data[:alloc])
        scope, ptype = cdb[2] >> 4, cdb[2] & 0x0F
        plen = struct.unpack_from(">I", cdb, 5)[0]
        if scope != 0 and sa not in (0, 3, 6, 7):
            raise _illegal(ASC_INVALID_CDB)
        if pr is None:
            raise _illegal(ASC_INVALID_COMMAND)
        if buflen < 24:
            raise _illegal(ASC_INVALID_CDB)
        params = self._from_guest(srb, rng, 24)
        key, sa_key = struct.unpack_from(">QQ", params, 0)
        if params[20] & 0x08:                      # SPEC_I_PT (APTPL: ignored, PTPL_C = 0)
            raise _illegal(ASC_INVALID_PARAM_LIST)
        if plen != 24 and sa != 7:
            raise _illegal(ASC_PARAM_LIST_LENGTH)
        if sa in (1, 2, 4, 5) and ptype not in PR_TYPES:
            raise _illegal(ASC_INVALID_CDB)        # checked before the state, as OpenVMM
        try:
            pr.out(self.initiator, sa, ptype, key, sa_key)
        except PrError as e:
            if e.conflict:
                self.counters["reservation_conflicts"] += 1
                raise _Check(SRB_ERROR, RESERVATION_CONFLICT) from None
            raise _Check(SRB_INVALID_REQUEST, CHECK_CONDITION, KEY_ILLEGAL_REQUEST, e.asc, e.ascq) from None
        return 24                                  # OpenVMM reports the parameter list moved

    @staticmethod
    def _range(disk: ImageDisk, lba: int, blocks: int) -> None:
        if lba + blocks > disk.nblocks:
            raise _illegal(ASC_ILLEGAL_BLOCK)

    def _read_write(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        op = cdb[0]
        write = op in (0x0A, 0x2A, 0xAA, 0x8A)
        if op in (0x28, 0x2A) and cdb[1] & 1:            # RelAdr
            raise _illegal(ASC_INVALID_CDB)
        lba, blocks = _lba_len(cdb)
        fua = op not in (0x08, 0x0A) and bool(cdb[1] & 0x08)
        if blocks == 0 or blocks > buflen >> disk.block_shift:
            raise _illegal(ASC_ILLEGAL_BLOCK)
        mx = disk.spec.max_transfer                       # only a reported limit is enforced
        if mx is not None and blocks << disk.block_shift > min(mx, MAX_TRANSFER_DISK):
            self.counters["over_max_transfer"] += 1
            raise _illegal(ASC_INVALID_CDB)               # SBC-3 6.6.4: beyond MAXIMUM TRANSFER LENGTH
        self._range(disk, lba, blocks)
        if write and disk.readonly:
            raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_DATA_PROTECT, ASC_WRITE_PROTECT)
        if disk.media_error(lba, blocks, "write" if write else "read"):
            raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_MEDIUM_ERROR,
                         ASC_WRITE_FAULT if write else ASC_UNRECOVERED_READ)
        if (srb.data_in == DATA_OUT) != write:
            raise _illegal(ASC_INVALID_CDB)                # memory access in the wrong direction
        nbytes = blocks << disk.block_shift
        rc = disk.transfer(self._vsp, write, lba, nbytes, rng, fua=fua)
        if rc in (lib.UVB_VSP_EFAULT, lib.UVB_VSP_ERANGE):
            raise _illegal(ASC_INVALID_CDB)                # memory access fault (§5.5)
        if rc:
            raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_MEDIUM_ERROR, 0, 0)   # backend I/O error
        return nbytes

    def _write_same(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        lba, blocks = _lba_len(cdb)
        self._range(disk, lba, blocks)
        nbytes = blocks << disk.block_shift
        if nbytes > _disk_max_transfer(disk) or nbytes > self.max_transfer or blocks == 0:
            raise _illegal(ASC_INVALID_CDB)
        if buflen < disk.block_size:
            raise _illegal(ASC_INVALID_CDB)
        if disk.readonly:
            raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_DATA_PROTECT, ASC_WRITE_PROTECT)
        sector = self._from_guest(srb, rng, disk.block_size)
        disk.write_blocks(lba, sector * blocks)
        return 0

    def _unmap(self, disk: ImageDisk, srb: Any, rng: Any, cdb: bytes, buflen: int) -> int:
        plen = struct.unpack_from(">H", cdb, 7)[0]
        if plen == 0:
            return 0
        if plen > buflen or plen < 8:
            raise _illegal(ASC_INVALID_CDB)
        if disk.readonly:
            raise _Check(SRB_ERROR, CHECK_CONDITION, KEY_DATA_PROTECT, ASC_WRITE_PROTECT)
        data = self._from_guest(srb, rng, plen)
        data_len, desc_len = struct.unpack_from(">HH", data, 0)
        if data_len != plen - 2 or desc_len != plen - 8 or desc_len % 16:
            raise _illegal(ASC_INVALID_PARAM_LIST)
        n = desc_len // 16
        if n > MAX_UNMAP_DESCRIPTORS:
            raise _illegal(ASC_INVALID_PARAM_LIST)
        ranges = [struct.unpack_from(">QI", data, 8 + 16 * i) for i in range(n)]
        for lba, blocks in ranges:
            self._range(disk, lba, blocks)
        for lba, blocks in ranges:
            if blocks:
                disk.discard(lba, blocks)
        return 0


def _lba_len(cdb: bytes) -> tuple[int, int]:
    """LBA and block count of a READ/WRITE/VERIFY/WRITE SAME CDB (6/10/12/16)."""
    op = cdb[0]
    group = op >> 5
    if group == 0:          # 6-byte: 21-bit LBA, 8-bit length (0 is NOT 256 here, §5.4)
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4]
    if group in (1, 2):     # 10-byte
        return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    if group == 5:          # 12-byte
        return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">I", cdb, 6)[0]
    return struct.unpack_from(">Q", cdb, 2)[0], struct.unpack_from(">I", cdb, 10)[0]


def _disk_name(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa (as sd names)."""
    s = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        s = chr(ord("a") + r) + s
    return s



def _cdb_len(op: int) -> int:
    """CDB length from the opcode's group code (SPC-4 4.2.5.1)."""
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(op >> 5, 16)


class _PrWatcher:
    """Calls ``model._pr_changed(disk)`` while the model lives (holds it weakly: the shared
    reservation state outlives a model)."""

    def __init__(self, model: StorvspModel, disk: ImageDisk) -> None:
        self.model, self.disk = weakref.ref(model), disk

    def __call__(self) -> None:
        m = self.model()
        if m is not None:
            m._pr_changed(self.disk)

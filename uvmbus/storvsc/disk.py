"""A LUN of the synthetic SCSI controller as a block device.

Byte offsets and lengths must be multiples of :attr:`Disk.block_size` and stay inside the
disk (checked here, with a clear :class:`ConfigError`).  Requests larger than the host's
maximum transfer are split and run concurrently; data goes through DMA bounce buffers,
except with :meth:`Disk.readinto` / :meth:`Disk.write` on a :class:`~uvmbus.dma.DmaBuffer`
(zero copy).  The batch interface (:meth:`Disk.read_command` / :meth:`Disk.write_command`
+ :meth:`Controller.submit` / :meth:`Controller.reap`) keeps many requests in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from uvmbus.block.interface import ByteIO, check_range, piece_buffer
from uvmbus.dma import DmaBuffer
from uvmbus.errors import (
    ConfigError,
    IllegalRequest,
    LunGone,
    ProtocolError,
    ScsiError,
    StorageError,
)
from uvmbus.native import lib
from uvmbus.storvsc import protocol as P
from uvmbus.storvsc import scsi
from uvmbus.storvsc.command import Command, LunController
from uvmbus.storvsc.reservations import PersistentReservations

if TYPE_CHECKING:
    from uvmbus.storvsc.batch import IoBatch

__all__ = ["Disk"]

_VPD_ALLOC = 1024
log = logging.getLogger(__name__)
T = TypeVar("T")


class Disk(ByteIO, PersistentReservations):
    """One LUN (see the module docstring)."""

    def __init__(self, controller: LunController, lun: int, inquiry: scsi.InquiryData) -> None:
        self.controller = controller
        self.lun = lun
        self.inquiry = inquiry
        self.capacity = scsi.Capacity(0, 512)
        self.vpd_pages: list[int] = []
        self.serial: str | None = None
        self.device_ids: list[scsi.Designator] = []
        self.block_limits = scsi.BlockLimits()
        self.rotation_rate = 0
        self.provisioning: scsi.LogicalBlockProvisioning | None = None
        self.characteristics: scsi.BlockCharacteristics | None = None
        #: VPD pages the host listed but refused or answered malformed: page -> reason
        self.vpd_errors: dict[int, str] = {}
        self.third_party_copy: scsi.ThirdPartyCopy | None = None
        #: MODE SENSE caching page: WCE (None: the LUN did not report the page)
        self.volatile_write_cache: bool | None = None
        #: MODE SENSE caching page: not RCD
        self.read_cache: bool | None = None
        #: MODE SENSE control page (None: not reported; Hyper-V/OpenVMM refuse page 0x0A)
        self.control: scsi.ControlPage | None = None
        #: write protected (MODE SENSE device-specific parameter WP): writes fail with DATA PROTECT
        self.read_only = False
        self.gone = False

    # ==== identity =========================================================================
    @property
    def size(self) -> int:
        """Bytes."""
        return self.capacity.size

    @property
    def block_size(self) -> int:
        return self.capacity.block_size

    @property
    def blocks(self) -> int:
        return self.capacity.blocks

    @property
    def max_transfer(self) -> int:
        """Largest data length of one READ/WRITE to this LUN, in bytes: the host's
        max_transfer_bytes (QUERY_PROPERTIES, page aligned) capped by the LUN's MAXIMUM
        TRANSFER LENGTH from VPD 0xB0 when it reports one (0 means no limit), as Linux's sd
        does (sd_revalidate_disk); a whole number of blocks, at least one."""
        bs = self.block_size
        limit = self.controller.max_transfer
        mx = self.block_limits.max_transfer_blocks
        if mx:
            limit = min(limit, mx * bs)
        return max(bs, limit - limit % bs)

    @property
    def vendor(self) -> str:
        return self.inquiry.vendor

    @property
    def product(self) -> str:
        return self.inquiry.product

    @property
    def revision(self) -> str:
        return self.inquiry.revision

    @property
    def unmap_supported(self) -> bool:
        return bool(self.provisioning and self.provisioning.lbpu)

    def refresh(self) -> None:
        """READ CAPACITY(16)."""
        res = self.controller.execute(self.lun, scsi.read_capacity16(32), data_in=32,
                                      what="READ CAPACITY(16)")
        cap = scsi.parse_read_capacity16(res.data)
        if cap.block_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
            raise StorageError(f"LUN {self.lun}: READ CAPACITY reports block size {cap.block_size}")
        self.capacity = cap

    def read_vpd(self) -> None:
        """INQUIRY VPD 0x00 and the pages it lists among 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2.

        The limits and status pages (0x8F, 0xB0-0xB2) are optional to use: one the host lists
        but then refuses or answers malformed is left "not reported" (as Linux's sd does), with
        the reason in :attr:`vpd_errors` and the log, instead of making the LUN unusable."""
        self.vpd_pages = scsi.parse_vpd_supported(self._vpd(0x00))
        self.vpd_errors = {}
        if 0x80 in self.vpd_pages:
            self.serial = scsi.parse_vpd_serial(self._vpd(0x80))
        if 0x83 in self.vpd_pages:
            self.device_ids = scsi.parse_vpd_device_ids(self._vpd(0x83))
        bl = self._optional_vpd(0xB0, scsi.parse_vpd_block_limits)
        if bl is not None:
            self.block_limits = bl
        self.characteristics = self._optional_vpd(0xB1, scsi.parse_vpd_block_characteristics)
        if self.characteristics is not None:
            self.rotation_rate = self.characteristics.rotation_rate
        self.provisioning = self._optional_vpd(0xB2, scsi.parse_vpd_lbp)
        self.third_party_copy = self._optional_vpd(0x8F, scsi.parse_vpd_third_party_copy)

    def _optional_vpd(self, page: int, parse: Callable[[bytes], T]) -> T | None:
        if page not in self.vpd_pages:
            return None
        try:
            return parse(self._vpd(page))
        except (IllegalRequest, ProtocolError) as e:
            self.vpd_errors[page] = str(e)
            log.warning("storvsc LUN %d: VPD page %#04x listed but unusable, ignored: %s",
                        self.lun, page, e)
            return None

    def read_write_protect(self) -> None:
        """MODE SENSE(6), all pages: the WP bit of the device-specific parameter (as Linux's
        sd does; a LUN that refuses the command counts as writable, as there), and the
        caching page (0x08: WCE, RCD) and control page (0x0A) if among the pages returned
        (sd_read_cache_type asks for page 8; Hyper-V returns it for 0x3F too)."""
        try:
            res = self.controller.execute(self.lun, scsi.mode_sense6(0x3F, 192), data_in=192,
                                          what="MODE SENSE(6)")
        except ScsiError:
            self.read_only = False
            return
        self.read_only = len(res.data) >= 3 and bool(res.data[2] & 0x80)
        try:
            _dsp, pages = scsi.parse_mode_pages(res.data)
        except ProtocolError:
            return
        cache = scsi.parse_caching_page(pages.get(0x08, b""))
        if cache is not None:
            self.volatile_write_cache, self.read_cache = cache.wce, not cache.rcd
        self.control = scsi.parse_control_page(pages.get(0x0A, b""))

    def mode_page(self, page: int, *, pc: int = 0) -> bytes | None:
        """One mode page (MODE SENSE(10), ``pc`` 0 current, 1 changeable, 2 default): its
        bytes from the page code on, or None if the LUN refuses the page."""
        self._api("MODE SENSE")
        if not 0 <= page < 0x3F or not 0 <= pc <= 2:
            raise ConfigError(f"mode page {page:#x} / page control {pc}: page 0..0x3E, pc 0..2")
        try:
            res = self.controller.execute(self.lun, scsi.mode_sense10(page, 1024, pc=pc),
                                          data_in=1024, what=f"MODE SENSE(10) page {page:#04x}")
        except IllegalRequest:
            return None
        _dsp, pages = scsi.parse_mode_pages(res.data, ten=True)
        return pages.get(page)

    # ==== VPD, LBA status, supported commands ==============================================
    def _api(self, what: str) -> None:
        self.controller._api_entry()
        if self.gone:
            raise LunGone(f"{what}: LUN {self.lun} was removed from the controller")

    def _pr_check(self) -> None:
        self._api("PERSISTENT RESERVE")

    def vpd(self, page: int) -> bytes:
        """The raw VPD ``page`` (header included), copied from the host and checked to be the
        page asked for; :class:`IllegalRequest` names the pages the LUN does list."""
        self._api("INQUIRY VPD")
        if not 0 <= page <= 0xFF:
            raise ConfigError(f"VPD page {page} is not a byte (0..0xff)")
        try:
            data = self._vpd(page)
        except IllegalRequest as e:
            raise IllegalRequest(f"LUN {self.lun} does not report VPD page {page:#04x} (it lists "
                                 f"{', '.join(f'{p:#04x}' for p in self.vpd_pages)}): {e}",
                                 srb_status=e.srb_status, scsi_status=e.scsi_status,
                                 sense_key=e.sense_key, asc=e.asc, ascq=e.ascq) from None
        if len(data) < 4 or data[1] != page:
            raise ProtocolError(f"LUN {self.lun}: asked for VPD page {page:#04x}, the host returned "
                                f"{len(data)} bytes" + (f" of page {data[1]:#04x}" if len(data) > 1 else ""))
        n = int.from_bytes(data[2:4], "big")
        return bytes(data[:4 + n])

    @property
    def optimal_transfer(self) -> int:
        """OPTIMAL TRANSFER LENGTH (VPD 0xB0) in bytes, 0 when not reported."""
        return self.block_limits.optimal_transfer_blocks * self.block_size

    def lba_status(self, lba: int = 0, blocks: int | None = None) -> list[scsi.LbaStatus]:
        """GET LBA STATUS: runs of (lba, count, mapped/deallocated/anchored) from ``lba`` up to
        ``lba + blocks`` (default: the end of the disk); asks again where the host's answer
        stops short.  :class:`IllegalRequest` if the LUN does not support the command."""
        self._api("GET LBA STATUS")
        if blocks is None:
            blocks = self.blocks - lba
        if lba < 0 or blocks < 0 or lba + blocks > self.blocks:
            raise ConfigError(f"GET LBA STATUS: [{lba}, {lba + blocks}) is not inside LUN "
                              f"{self.lun} ({self.blocks} blocks)")
        end = lba + blocks
        out: list[scsi.LbaStatus] = []
        pos = lba
        alloc = 8 + 16 * 256
        while pos < end:
            try:
                res = self.controller.execute(self.lun, scsi.get_lba_status(pos, alloc),
                                              data_in=alloc, what="GET LBA STATUS")
            except IllegalRequest as e:
                if e.asc == 0x20:
                    raise IllegalRequest(f"GET LBA STATUS on LUN {self.lun}: the LUN does not "
                                         "support the command (OpenVMM disks need get_lba_status; "
                                         "in the simulator drop :nolbastatus)", srb_status=e.srb_status,
                                         scsi_status=e.scsi_status, sense_key=e.sense_key,
                                         asc=e.asc, ascq=e.ascq) from None
                raise
            runs = scsi.parse_lba_status(res.data, blocks=self.blocks)
            if not runs or not runs[0].lba <= pos < runs[0].lba + runs[0].count:
                raise ProtocolError(f"GET LBA STATUS at LBA {pos} on LUN {self.lun}: the host's "
                                    "first descriptor does not cover the LBA asked for")
            for r in runs:
                a, b = max(r.lba, pos), min(r.lba + r.count, end)
                if a >= b:
                    continue
                if out and out[-1].status == r.status and out[-1].lba + out[-1].count == a:
                    out[-1] = scsi.LbaStatus(out[-1].lba, out[-1].count + b - a, r.status)
                else:
                    out.append(scsi.LbaStatus(a, b - a, r.status))
            pos = max(pos + 1, min(end, runs[-1].lba + runs[-1].count))
        return out

    def supported_opcodes(self) -> list[scsi.SupportedOpcode] | None:
        """REPORT SUPPORTED OPERATION CODES (all commands), or None if the LUN does not answer
        it (Hyper-V and OpenVMM do not: Linux sets no_report_opcodes for storvsc)."""
        self._api("REPORT SUPPORTED OPERATION CODES")
        alloc = 4 + 20 * 256
        try:
            res = self.controller.execute(self.lun, scsi.report_supported_opcodes(alloc),
                                          data_in=alloc, what="REPORT SUPPORTED OPERATION CODES")
        except IllegalRequest as e:
            if e.asc in (0x20, 0x24):
                return None
            raise
        return scsi.parse_supported_opcodes(res.data)

    def opcode_supported(self, opcode: int, service_action: int | None = None) -> bool | None:
        """Whether the LUN supports one command (REPORT SUPPORTED OPERATION CODES, one-command
        form, as Linux's scsi_report_opcode); None if it cannot say."""
        self._api("REPORT SUPPORTED OPERATION CODES")
        try:
            res = self.controller.execute(
                self.lun, scsi.report_supported_opcodes(64, opcode=opcode,
                                                        service_action=service_action),
                data_in=64, what=f"REPORT SUPPORTED OPERATION CODES ({opcode:#04x})")
        except IllegalRequest:
            return None
        return scsi.parse_one_opcode(res.data)

    def _vpd(self, page: int) -> bytes:
        res = self.controller.execute(self.lun, scsi.inquiry(_VPD_ALLOC, evpd=True, page=page),
                                      data_in=_VPD_ALLOC, what=f"INQUIRY VPD {page:#04x}")
        return res.data

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "lun": self.lun, "size": self.size, "block_size": self.block_size, "blocks": self.blocks,
            "vendor": self.vendor, "product": self.product, "revision": self.revision,
            "serial": self.serial, "vpd_pages": [f"{p:#04x}" for p in self.vpd_pages],
            "rotation_rate": self.rotation_rate, "unmap": self.unmap_supported,
            "thin": bool(self.capacity.lbpme), "read_only": self.read_only,
            "max_transfer": self.max_transfer,
            "device_ids": [{"type": x.type, "value": x.text} for x in self.device_ids],
        }
        bl = self.block_limits
        if 0xB0 in self.vpd_pages:
            d["block_limits"] = {"max_transfer_blocks": bl.max_transfer_blocks,
                                 "optimal_transfer_blocks": bl.optimal_transfer_blocks,
                                 "max_unmap_blocks": bl.max_unmap_blocks,
                                 "max_unmap_descriptors": bl.max_unmap_descriptors,
                                 "unmap_granularity": bl.unmap_granularity,
                                 "unmap_granularity_alignment": bl.unmap_granularity_alignment,
                                 "max_write_same_blocks": bl.max_write_same_blocks}
        d["optimal_transfer"] = self.optimal_transfer
        p = self.provisioning
        d["provisioning"] = None if p is None else {
            "type": p.provisioning, "lbpu": p.lbpu, "lbpws": p.lbpws, "lbpws10": p.lbpws10,
            "lbprz": p.lbprz, "threshold_exponent": p.threshold_exponent}
        d["volatile_write_cache"] = self.volatile_write_cache
        if self.vpd_errors:
            d["vpd_errors"] = {f"{k:#04x}": v for k, v in self.vpd_errors.items()}
        d["read_cache"] = self.read_cache
        d["control_page"] = None if self.control is None else {
            "tst": self.control.tst, "qerr": self.control.qerr, "d_sense": self.control.d_sense,
            "swp": self.control.swp}
        t = self.third_party_copy
        d["third_party_copy"] = None if t is None else {
            "descriptor_types": list(t.descriptor_types),
            "max_range_descriptors": t.max_range_descriptors,
            "max_token_transfer_blocks": t.max_token_transfer_blocks,
            "optimal_transfer_count": t.optimal_transfer_count}
        return d

    def __repr__(self) -> str:
        return (f"<Disk LUN {self.lun} {self.size} bytes ({self.blocks} x {self.block_size}) "
                f"{self.vendor} {self.product}{' GONE' if self.gone else ''}>")

    # ==== checks ===========================================================================
    def _check(self, offset: int, length: int, what: str) -> None:
        if self.gone:
            raise LunGone(f"LUN {self.lun} was removed from the controller")
        check_range(what, offset, length, self.block_size, self.size, f"LUN {self.lun}")

    # ==== batch interface ==================================================================
    def _command(self, write: bool, offset: int, buffer: DmaBuffer, length: int | None,
                 buf_offset: int, fua: bool, user: Any) -> Command:

        n = buffer.size - buf_offset if length is None else length
        what = "WRITE(16)" if write else "READ(16)"
        self._check(offset, n, what)
        if n == 0:
            raise ConfigError(f"{what}: zero-length transfer")
        if n > self.max_transfer:
            raise ConfigError(f"{what}: {n} bytes exceed the maximum transfer of {self.max_transfer} "
                              f"bytes of LUN {self.lun} (host and VPD 0xB0 limits); split it, "
                              "or use read()/write(), which split")
        return Command(kind=lib.UVB_STOR_WRITE16 if write else lib.UVB_STOR_READ16, lun=self.lun,
                       buffer=buffer, buf_offset=buf_offset, length=n,
                       lba=offset // self.block_size, blocks=n // self.block_size, fua=fua,
                       data_in=P.DataIn.WRITE if write else P.DataIn.READ, what=what, user=user)

    def read_command(self, offset: int, buffer: DmaBuffer, *, length: int | None = None,
                     buf_offset: int = 0, user: Any = None) -> Command:
        """A READ(16) of ``length`` bytes (default: the buffer) at ``offset`` into ``buffer``,
        for :meth:`Controller.submit` (at most :attr:`max_transfer` bytes)."""
        return self._command(False, offset, buffer, length, buf_offset, False, user)

    def write_command(self, offset: int, buffer: DmaBuffer, *, length: int | None = None,
                      buf_offset: int = 0, fua: bool = False, user: Any = None) -> Command:
        """A WRITE(16) (with FUA if asked) from ``buffer``, for :meth:`Controller.submit`."""
        return self._command(True, offset, buffer, length, buf_offset, fua, user)

    def batch(self, slots: int, size: int, *, write: bool = False, fua: bool = False,
              channels: int = 1) -> IoBatch:
        """An :class:`~uvmbus.storvsc.batch.IoBatch` of ``slots`` buffers of ``size`` bytes
        on this LUN (claims ``channels`` of the controller's queues until closed; slot ``i``
        runs on the ``i % channels``-th)."""
        from uvmbus.storvsc.batch import IoBatch

        self.controller._api_entry()
        self._check(0, size, "batch")
        return IoBatch(self, slots, size, write=write, fua=fua, channels=channels)

    # ==== synchronous I/O ==================================================================
    def _io(self, write: bool, offset: int, view: memoryview | None, dma: DmaBuffer | None,
            length: int, fua: bool) -> int:
        """Run a transfer of ``length`` bytes split at the host's maximum transfer."""
        ctl = self.controller
        ctl._api_entry()
        what = "write" if write else "read"
        self._check(offset, length, what)
        if length == 0:
            return 0
        chunk = self.max_transfer
        pieces = [(off, min(chunk, length - off)) for off in range(0, length, chunk)]
        window = 64
        done = 0
        for w in range(0, len(pieces), window):
            part = pieces[w:w + window]
            cmds: list[Command] = []
            bounce: list[DmaBuffer] = []
            try:
                for off, n in part:
                    buf, boff = piece_buffer(ctl.alloc_buffer, dma, view, off, n, write, bounce)
                    cmds.append(self._command(write, offset + off, buf, n, boff, fua, None))
                ctl.run(cmds)
                for (off, n), cmd in zip(part, cmds, strict=True):
                    if cmd.error is not None:
                        raise cmd.error
                    if cmd.transferred != n:
                        raise StorageError(f"{what} of {n} bytes at {offset + off} on LUN {self.lun}: "
                                           f"the host moved {cmd.transferred}")
                    if not write and dma is None:
                        assert view is not None
                        view[off:off + n] = cmd.buffer.view[:n]       # type: ignore[union-attr]
                    done += n
            finally:
                kept = {id(c.buffer) for c in cmds if c.tag in ctl._quarantine}
                for b in bounce:
                    if id(b) not in kept:      # the host may still write an abandoned one
                        b.free()
        return done

    def flush(self) -> None:
        """SYNCHRONIZE CACHE(16): everything written is on stable storage."""
        self.controller._api_entry()
        self._check(0, 0, "flush")
        self.controller.execute(self.lun, scsi.synchronize_cache16(), what="SYNCHRONIZE CACHE(16)")

    def discard(self, offset: int, length: int) -> None:
        """UNMAP ``[offset, offset + length)``: the blocks are deallocated (thin disks then
        read zeros)."""
        self.controller._api_entry()
        self._check(offset, length, "discard")
        if not self.unmap_supported:
            raise IllegalRequest(f"LUN {self.lun} does not support UNMAP (no LBPU in VPD 0xB2)")
        if length == 0:
            return
        bs = self.block_size
        lba, blocks = offset // bs, length // bs
        per = self.block_limits.max_unmap_blocks or 0xFFFFFFFF
        ndesc = self.block_limits.max_unmap_descriptors or 1
        ranges = []
        while blocks:
            n = min(blocks, per, 0xFFFFFFFF)
            ranges.append((lba, n))
            lba += n
            blocks -= n
        for i in range(0, len(ranges), ndesc):
            params = scsi.unmap_parameters(ranges[i:i + ndesc])
            self.controller.execute(self.lun, scsi.unmap(len(params)), data_out=params, what="UNMAP")

    def test_unit_ready(self) -> bool:
        """True if the LUN answers TEST UNIT READY with GOOD status."""
        try:
            self.controller.execute(self.lun, scsi.test_unit_ready(), what="TEST UNIT READY")
        except (ScsiError, LunGone):
            return False
        return True

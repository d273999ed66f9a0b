"""A userspace NVMe controller driver over VFIO.

::

    import uvmbus.nvme as nvme

    with nvme.open("0000:00:04.0") as ctl:          # enabled, identified, I/O queues created
        ns = ctl.disk(0)                             # first active namespace, a block device
        ns.write(0, b"x" * 4096)
        data = ns.read(0, 4096)

Bring-up (NVMe base spec 2.0 §3.5.1): disable (CC.EN=0, wait CSTS.RDY=0), admin queues
(AQA/ASQ/ACQ), enable (CC.EN=1 with 4 KiB pages, 64-byte SQEs, 16-byte CQEs; wait RDY=1),
Identify Controller, Set Features "Number of Queues", Create I/O CQ/SQ pairs (one per
thread: as many as asked for and granted), Identify active namespace list + each namespace.
Close: delete the I/O queues, normal shutdown notification (CC.SHN), disable.

A fatal controller status (CSTS.CFS), an invalid completion or an all-ones register read
(the function is gone) marks the controller dead: every call raises ControllerFatal or
DeviceRemoved with what to do; nothing waits forever.  The VFIO request IRQ (the host wants
the device back: Hyper-V eject, hot unplug) is watched in every wait and ends the session
with DeviceRemoved so that the kernel can complete the removal.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from uvmbus.dma import DmaBuffer, DmaPool
from uvmbus.errors import ConfigError, ControllerFatal, DeviceRemoved, NvmeError, ResourceError
from uvmbus.native import ffi, lib
from uvmbus.nvme.queue import QueuePair
from uvmbus.vfio.device import MSIX, REQ, SysOps, VfioHandle, open_device
from uvmbus.vfio.dma import dma_memory_for
from uvmbus.vfio.pci import PciBus, PciFunction

__all__ = ["Controller", "ControllerInfo", "open"]

ADMIN_DEPTH = 32
MAX_IO_DEPTH = 256
MAX_TRANSFER_CAP = 1024 * 1024


@dataclass
class ControllerInfo:
    address: str
    vendor: str
    model: str
    serial: str
    firmware: str
    version: str
    mdts_bytes: int
    max_transfer_bytes: int
    io_queues: int
    queue_depth: int
    namespaces: list[int]
    oncs: int
    vwc: bool
    sgls: bool
    iommu: str
    interrupts: str
    vmbus_parent: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(arr: Any) -> str:
    return bytes(ffi.buffer(arr)).decode("ascii", "replace").rstrip(" \0")


class Controller:
    """See the module docstring.  ``io_queues`` (default 1) I/O queue pairs of ``queue_depth``
    entries (default 128, capped by CAP.MQES and 256)."""

    def __init__(self, fn: PciFunction, *, io_queues: int = 1, queue_depth: int = 128,
                 timeout: float = 30.0, interrupts: bool = True, spin_us: int = 0,
                 ops: SysOps | None = None) -> None:
        if io_queues < 1:
            raise ConfigError("io_queues must be at least 1")
        self.fn = fn
        self.timeout = timeout
        self.spin_us = spin_us
        self.dead: Exception | None = None
        self.io_queues: list[QueuePair] = []
        self._free_queues: list[QueuePair] = []
        self._qlock = threading.Lock()
        self._efds: list[int] = []
        self._req_efd: int | None = None
        self.admin: QueuePair | None = None
        self.namespaces: list[Any] = []
        self._enabled = False
        self.handle: VfioHandle = open_device(fn, ops=ops)
        try:
            self._bring_up(io_queues, queue_depth, interrupts)
        except BaseException:
            self.close()
            raise

    # ==== registers ================================================================================
    def _r32(self, off: int) -> int:
        return int(lib.uvb_mmio_read32(self.bar_ptr, off))

    def _w32(self, off: int, v: int) -> None:
        lib.uvb_mmio_write32(self.bar_ptr, off, v)

    def _r64(self, off: int) -> int:
        return int(lib.uvb_mmio_read64(self.bar_ptr, off))

    def _w64(self, off: int, v: int) -> None:
        lib.uvb_mmio_write64(self.bar_ptr, off, v)

    @property
    def csts(self) -> int:
        return self._r32(lib.UVB_NVME_REG_CSTS)

    def _wait_csts(self, mask: int, value: int, what: str, *, fatal_ok: bool = False) -> None:
        deadline = time.monotonic() + self.cap_timeout
        while True:
            st = self.csts
            if st == 0xFFFFFFFF:
                raise DeviceRemoved(f"{self.fn.name}: registers read all-ones while waiting for "
                                    f"{what}: the device is gone")
            if st & lib.UVB_NVME_CSTS_CFS and not fatal_ok:
                raise ControllerFatal(f"{self.fn.name}: controller fatal status while waiting for {what}")
            if st & mask == value:
                return
            if time.monotonic() > deadline:
                raise ControllerFatal(f"{self.fn.name}: timed out after {self.cap_timeout:g} s "
                                      f"(CAP.TO) waiting for {what} (CSTS={st:#x})")
            time.sleep(0.001)

    # ==== bring-up =================================================================================
    def _bring_up(self, io_queues: int, depth: int, interrupts: bool) -> None:
        dev = self.handle.device
        dev.enable_bus_master()
        self._bar = dev.map_bar(0)
        self.bar_ptr = ffi.from_buffer("uint8_t[]", self._bar)
        cap = self._r64(lib.UVB_NVME_REG_CAP)
        if cap == 0xFFFFFFFFFFFFFFFF:
            raise DeviceRemoved(f"{self.fn.name}: BAR0 reads all-ones; the device is not responding")
        self.mqes = (cap & 0xFFFF) + 1
        self.dstrd = (cap >> 32) & 0xF
        self.cap_timeout = max(((cap >> 24) & 0xFF) * 0.5, 1.0)
        mpsmin = (cap >> 48) & 0xF
        if not (cap >> 37) & 1:
            raise NvmeError(f"{self.fn.name}: controller does not support the NVM command set")
        if mpsmin > 0:
            raise NvmeError(f"{self.fn.name}: minimum memory page size {4096 << mpsmin} > 4 KiB "
                            "is not supported")
        self.version = self._r32(lib.UVB_NVME_REG_VS)
        self.memory = dma_memory_for(self.handle)
        self.pool = DmaPool(self.memory, region_size=2 * 1024 * 1024, max_regions=256,
                            name=f"nvme-{self.fn.name}")
        # request IRQ: the kernel asks for the device back (surprise removal / eject)
        if dev.irq_info(REQ).count:
            efd = dev.ops.eventfd()
            try:
                dev.set_irq_eventfds(REQ, [efd])
                self._req_efd = efd
            except Exception:
                os.close(efd)
        # disable, admin queue, enable
        cc = self._r32(lib.UVB_NVME_REG_CC)
        if cc & lib.UVB_NVME_CC_EN:
            self._w32(lib.UVB_NVME_REG_CC, cc & ~lib.UVB_NVME_CC_EN)
        self._wait_csts(lib.UVB_NVME_CSTS_RDY, 0, "CSTS.RDY=0 (disable)", fatal_ok=True)
        nvec = 0
        msix = dev.irq_info(MSIX).count if interrupts else 0
        if msix:
            nvec = min(msix, io_queues + 1)
            self._efds = [dev.ops.eventfd() for _ in range(nvec)]
            try:
                dev.set_irq_eventfds(MSIX, self._efds)
            except Exception:
                for fd in self._efds:
                    os.close(fd)
                self._efds, nvec = [], 0
        self.interrupt_mode = f"MSI-X ({nvec} vectors)" if nvec else "polled"
        adepth = min(ADMIN_DEPTH, self.mqes)
        self.admin = QueuePair(self, 0, adepth, self.pool, max_pages=2, vector=0 if nvec else None,
                               efd=self._efds[0] if nvec else None)
        self._w32(lib.UVB_NVME_REG_AQA, ((adepth - 1) << 16) | (adepth - 1))
        self._w64(lib.UVB_NVME_REG_ASQ, QueuePair.dma_addr(self.admin.sq_buf))
        self._w64(lib.UVB_NVME_REG_ACQ, QueuePair.dma_addr(self.admin.cq_buf))
        cc = lib.UVB_NVME_CC_EN | (6 << 16) | (4 << 20)        # IOSQES 64 B, IOCQES 16 B
        self._w32(lib.UVB_NVME_REG_CC, cc)
        self._wait_csts(lib.UVB_NVME_CSTS_RDY, lib.UVB_NVME_CSTS_RDY, "CSTS.RDY=1 (enable)")
        self._enabled = True
        self._identify()
        self._create_queues(io_queues, depth, nvec)
        self._scan_namespaces()

    def _identify(self) -> None:
        buf = self.pool.alloc(4096)
        try:
            self.admin_command(lib.UVB_NVME_ADM_IDENTIFY, cdw10=lib.UVB_NVME_CNS_CTRL, data=buf,
                               what="Identify Controller")
            idc = ffi.cast("struct uvb_nvme_id_ctrl *", buf.ptr)
            self.id_vid = int(idc.vid)
            self.model = _text(idc.mn)
            self.serial = _text(idc.sn)
            self.firmware = _text(idc.fr)
            self.mdts = int(idc.mdts)
            self.nn = int(idc.nn)
            self.oncs = int(idc.oncs)
            self.vwc = bool(idc.vwc & 1)
            self.sgls = int(idc.sgls)
        finally:
            buf.free()
        mdts_bytes = (4096 << self.mdts) if self.mdts else 0
        self.mdts_bytes = mdts_bytes
        self.max_transfer = min(mdts_bytes or MAX_TRANSFER_CAP, MAX_TRANSFER_CAP)

    def _create_queues(self, want: int, depth: int, nvec: int) -> None:
        dw0 = self.admin_command(lib.UVB_NVME_ADM_SET_FEATURES, cdw10=lib.UVB_NVME_FEAT_NUM_QUEUES,
                                 cdw11=((want - 1) << 16) | (want - 1), what="Set Features (queues)")
        granted = min((dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1, want)
        depth = max(2, min(depth, self.mqes, MAX_IO_DEPTH))
        pages = self.max_transfer // 4096 + 1
        for qid in range(1, granted + 1):
            vec = qid if qid < nvec else None
            efd = self._efds[qid] if vec is not None else None
            qp = QueuePair(self, qid, depth, self.pool, max_pages=pages, vector=vec, efd=efd)
            ien = (1 << 1) if vec is not None else 0
            self.admin_command(lib.UVB_NVME_ADM_CREATE_CQ, prp1=QueuePair.dma_addr(qp.cq_buf),
                               cdw10=((depth - 1) << 16) | qid,
                               cdw11=1 | ien | ((vec or 0) << 16), what=f"Create I/O CQ {qid}")
            self.admin_command(lib.UVB_NVME_ADM_CREATE_SQ, prp1=QueuePair.dma_addr(qp.sq_buf),
                               cdw10=((depth - 1) << 16) | qid, cdw11=1 | (qid << 16),
                               what=f"Create I/O SQ {qid}")
            self.io_queues.append(qp)
        self._free_queues = list(reversed(self.io_queues))
        self.queue_depth = depth

    def _scan_namespaces(self) -> None:
        from uvmbus.nvme.namespace import Namespace

        buf = self.pool.alloc(4096)
        try:
            self.admin_command(lib.UVB_NVME_ADM_IDENTIFY, cdw10=lib.UVB_NVME_CNS_NS_ACTIVE, data=buf,
                               what="Identify active namespaces")
            ids = ffi.cast("uint32_t *", buf.ptr)
            nsids = []
            for i in range(1024):
                if not ids[i]:
                    break
                nsids.append(int(ids[i]))
            self.namespaces = []
            for nsid in nsids:
                buf.view[:] = bytes(4096)
                self.admin_command(lib.UVB_NVME_ADM_IDENTIFY, nsid=nsid, cdw10=lib.UVB_NVME_CNS_NS,
                                   data=buf, what=f"Identify namespace {nsid}")
                ns = Namespace.from_identify(self, nsid, bytes(buf.view))
                if ns.blocks:
                    self.namespaces.append(ns)
        finally:
            buf.free()

    # ==== admin commands ===========================================================================
    def admin_command(self, opc: int, *, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                      cdw12: int = 0, prp1: int | None = None, data: DmaBuffer | None = None,
                      what: str = "admin command") -> int:
        """Run one admin command synchronously; returns completion dword 0."""
        assert self.admin is not None
        self.check_alive()
        s = ffi.new("struct uvb_nvme_sqe *")
        s.opc, s.nsid, s.cdw10, s.cdw11, s.cdw12 = opc, nsid, cdw10, cdw11, cdw12
        if data is not None:
            s.prp1 = QueuePair.dma_addr(data)
            if data.size > 4096 - (data.offset & 4095):
                s.prp2 = QueuePair.dma_addr(data, 4096 - (data.offset & 4095))
        elif prp1 is not None:
            s.prp1 = prp1
        rc = lib.uvb_nvme_submit_raw(self.admin.q, s, 1)
        if rc < 0:
            self._queue_failed(self.admin, rc)
        deadline = time.monotonic() + self.timeout
        while True:
            n = self.admin.wait(max(0.001, deadline - time.monotonic()))
            if n:
                st = int(self.admin.status[0])
                if st:
                    raise self.admin.command_error(st, f"{self.fn.name}: {what}")
                return int(self.admin.dw0[0])
            if time.monotonic() >= deadline:
                self._mark_dead(ControllerFatal(
                    f"{self.fn.name}: {what} got no completion in {self.timeout:g} s; the "
                    "controller is not answering (unbind and rebind the function to reset it)"))
                raise self.dead  # type: ignore[misc]

    # ==== health ===================================================================================
    def _mark_dead(self, exc: Exception) -> None:
        if self.dead is None:
            self.dead = exc
            for q in [*self.io_queues, *([self.admin] if self.admin else [])]:
                q.q.dead = 1

    def _queue_failed(self, q: QueuePair, rc: int) -> None:
        if rc == lib.UVB_NVME_ECQE:
            self._mark_dead(ControllerFatal(f"{self.fn.name}: invalid completion from the "
                                            f"controller ({q.errmsg()}); the queue is dead, "
                                            "reopen the controller"))
        elif rc == lib.UVB_NVME_EREQ:
            raise ConfigError(f"NVMe queue {q.qid}: bad request: {q.errmsg()}")
        elif rc == lib.UVB_NVME_EFULL:
            raise ResourceError(f"NVMe queue {q.qid} is full ({q.depth - 1} commands in flight)")
        self.check_alive()
        if self.dead is not None:
            raise self.dead
        raise ControllerFatal(f"NVMe queue {q.qid}: error {rc}")

    def check_alive(self) -> None:
        """Raise if the controller is dead, fatal (CSTS.CFS), gone, or asked back (REQ IRQ)."""
        if self.dead is not None:
            raise self.dead
        if self._req_efd is not None:
            try:
                os.read(self._req_efd, 8)
            except BlockingIOError:
                pass
            else:
                self._mark_dead(DeviceRemoved(
                    f"{self.fn.name}: the kernel asked for the device back (VFIO request "
                    "interrupt: hot unplug or Hyper-V eject); I/O stopped and the device is "
                    "being released"))
                raise self.dead  # type: ignore[misc]
        if self._enabled:
            st = self.csts
            if st == 0xFFFFFFFF:
                self._mark_dead(DeviceRemoved(f"{self.fn.name}: registers read all-ones: the "
                                              "device was removed"))
                raise self.dead  # type: ignore[misc]
            if st & lib.UVB_NVME_CSTS_CFS:
                self._mark_dead(ControllerFatal(
                    f"{self.fn.name}: controller fatal status (CSTS.CFS); in-flight I/O is "
                    "lost. Reopen the controller (it is reset on open)"))
                raise self.dead  # type: ignore[misc]

    # ==== queues and buffers =======================================================================
    def claim_queue(self, queue: QueuePair | None = None) -> QueuePair:
        """An I/O queue for exclusive use (one per thread / batch) until release_queue."""
        with self._qlock:
            if queue is not None:
                if queue not in self._free_queues:
                    raise ResourceError(f"NVMe queue {queue.qid} is in use")
                self._free_queues.remove(queue)
                return queue
            if not self._free_queues:
                raise ResourceError(f"all {len(self.io_queues)} NVMe I/O queues are in use; open "
                                    "the controller with more io_queues (one per thread)")
            return self._free_queues.pop()

    def release_queue(self, q: QueuePair) -> None:
        with self._qlock:
            if q not in self._free_queues:
                self._free_queues.append(q)

    def alloc_buffer(self, size: int) -> DmaBuffer:
        return self.pool.alloc(size)

    # ==== block-interface helpers (same names as storvsc.Controller) ================================
    @property
    def channels(self) -> int:
        return len(self.io_queues)

    @property
    def luns(self) -> list[Any]:
        return self.namespaces

    def disk(self, index: int = 0) -> Any:
        """The ``index``-th active namespace (0: the first, usually NSID 1)."""
        if not 0 <= index < len(self.namespaces):
            raise ConfigError(f"{self.fn.name} has {len(self.namespaces)} active namespace(s) "
                              f"(NSIDs {[n.nsid for n in self.namespaces]}); index {index} is "
                              "out of range")
        return self.namespaces[index]

    def info(self) -> ControllerInfo:
        v = self.version
        return ControllerInfo(
            address=self.fn.name, vendor=f"{self.id_vid:04x}", model=self.model,
            serial=self.serial, firmware=self.firmware,
            version=f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}", mdts_bytes=self.mdts_bytes,
            max_transfer_bytes=self.max_transfer, io_queues=len(self.io_queues),
            queue_depth=self.queue_depth, namespaces=[n.nsid for n in self.namespaces],
            oncs=self.oncs, vwc=self.vwc, sgls=bool(self.sgls & 3),
            iommu="no-IOMMU (physical addresses)" if self.handle.noiommu else "type1 (IOVA)",
            interrupts=self.interrupt_mode, vmbus_parent=self.fn.vmbus_parent)

    def stats(self) -> dict[str, Any]:
        qs = [*([self.admin] if self.admin else []), *self.io_queues]
        return {
            "signals": sum(int(q.q.sq_doorbells) + int(q.q.cq_doorbells) for q in qs),
            "queues": [{"qid": q.qid, "submitted": int(q.q.submitted),
                        "completed": int(q.q.completed), "sq_doorbells": int(q.q.sq_doorbells),
                        "cq_doorbells": int(q.q.cq_doorbells), "interrupts": q.interrupts}
                       for q in qs],
        }

    # ==== shutdown =================================================================================
    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if self._enabled and self.dead is None:
                try:
                    for q in reversed(self.io_queues):
                        self.admin_command(lib.UVB_NVME_ADM_DELETE_SQ, cdw10=q.qid,
                                           what=f"Delete I/O SQ {q.qid}")
                        self.admin_command(lib.UVB_NVME_ADM_DELETE_CQ, cdw10=q.qid,
                                           what=f"Delete I/O CQ {q.qid}")
                    cc = self._r32(lib.UVB_NVME_REG_CC)
                    self._w32(lib.UVB_NVME_REG_CC, (cc & ~0xC000) | lib.UVB_NVME_CC_SHN_NORMAL)
                    self._wait_csts(lib.UVB_NVME_CSTS_SHST_MASK, lib.UVB_NVME_CSTS_SHST_DONE,
                                    "shutdown complete")
                except Exception:
                    pass
            if self._enabled:
                try:
                    cc = self._r32(lib.UVB_NVME_REG_CC)
                    self._w32(lib.UVB_NVME_REG_CC, cc & ~lib.UVB_NVME_CC_EN)
                except Exception:
                    pass
                self._enabled = False
            try:
                self.handle.device.disable_bus_master()
            except Exception:
                pass
        finally:
            if hasattr(self, "bar_ptr"):
                ffi.release(self.bar_ptr)
            if hasattr(self, "pool"):
                self.pool.close()
                self.memory.close()
            self.handle.close()
            for fd in [*self._efds, *([self._req_efd] if self._req_efd is not None else [])]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._efds = []

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(ref: str, root: str = "/", **kwargs: Any) -> Controller:
    """Open the NVMe controller ``ref`` (PCI address, vPCI GUID, or ``nvme`` when there is
    one) under ``root``; it must be bound to vfio-pci (``uvmbus bind ADDRESS``)."""
    fn = PciBus(root).function(ref, cls=None)
    if fn.class_name != "nvme":
        raise ConfigError(f"{fn.name} is a {fn.class_name} function (class {fn.class_code:06x}), "
                          "not an NVMe controller")
    return Controller(fn, **kwargs)

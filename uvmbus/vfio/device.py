"""The VFIO userspace API: container, group, device (legacy group API, type1 and no-IOMMU).

Flow (Documentation/driver-api/vfio.rst)::

    container = Container(root)                    # /dev/vfio/vfio, API version 0
    group = Group(container, fn)                    # /dev/vfio/N or noiommu-N, must be viable
    group.attach()                                  # GROUP_SET_CONTAINER, then SET_IOMMU
    dev = group.device(fn.name)                     # GROUP_GET_DEVICE_FD
    dev.region(0).mmap()                            # BAR0; config space via pread/pwrite
    dev.set_irq_eventfds(MSIX, [efd0, efd1])        # SET_IRQS DATA_EVENTFD | ACTION_TRIGGER
    container.map_dma(vaddr, iova, size)            # type1 only

No-IOMMU (``vfio.enable_unsafe_noiommu_mode=1``, ``/dev/vfio/noiommu-N``): the container
takes ``VFIO_NOIOMMU_IOMMU``, opening the group needs CAP_SYS_RAWIO, and there is no
MAP_DMA: the device is programmed with guest-physical addresses (pinned hugepages and
pagemap, :class:`uvmbus.dma.HugepageMemory`).

Every system call goes through a :class:`SysOps` object so the ioctl sequence can be
checked against a recorded one without a kernel (tests/test_vfio_ioctl.py).  Struct layouts
come from native/vfio_wire.h only.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from uvmbus.errors import NotFound, PrivilegeError, VfioError
from uvmbus.native import ffi, lib
from uvmbus.vfio.pci import VFIO_DRIVER, PciFunction

__all__ = ["SysOps", "Container", "Group", "Device", "Region", "IrqInfo", "Iommufd", "VfioHandle",
           "open_device", "open_cdev",
           "INTX", "MSI", "MSIX", "ERR", "REQ", "CONFIG", "IRQ_NAMES"]

INTX, MSI, MSIX, ERR, REQ = 0, 1, 2, 3, 4
IRQ_NAMES = {INTX: "INTx", MSI: "MSI", MSIX: "MSI-X", ERR: "error", REQ: "request"}
CONFIG = lib.UVB_VFIO_PCI_CONFIG_REGION_INDEX
_PCI_COMMAND = 0x04
_PCI_COMMAND_MEMORY = 0x2
_PCI_COMMAND_MASTER = 0x4
_PCI_COMMAND_INTX_DISABLE = 0x400


class SysOps:
    """The system calls the VFIO layer makes (replaced by a recording fake in tests)."""

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        """``arg``: a cdata pointer (struct argument) or an int.  Raises OSError."""
        if isinstance(arg, int):
            rc = lib.uvb_ioctl_int(fd, request, arg)
        else:
            rc = lib.uvb_ioctl_ptr(fd, request, arg)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return int(rc)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def mmap(self, fd: int, size: int, offset: int) -> mmap.mmap:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)

    def eventfd(self) -> int:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _new(ctype: str) -> Any:
    p = ffi.new(ctype + " *")
    p.argsz = ffi.sizeof(ctype)
    return p


class Container:
    """A VFIO container (``/dev/vfio/vfio``): the IOMMU context of one or more groups."""

    def __init__(self, root: str | os.PathLike[str] = "/", *, ops: SysOps | None = None) -> None:
        self.ops = ops or SysOps()
        self.root = str(root)
        self.path = os.path.join(self.root, "dev/vfio/vfio")
        self.iommu_type: int | None = None
        self.fd = -1
        try:
            self.fd = self.ops.open(self.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotFound(f"{self.path} does not exist: VFIO is not loaded. Run `modprobe "
                               "vfio-pci` (no IOMMU, e.g. Azure: `modprobe vfio "
                               "enable_unsafe_noiommu_mode=1` first)") from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PrivilegeError(f"cannot open {self.path}: {exc.strerror}. Run as root or "
                                     "give the user access to /dev/vfio") from exc
            raise VfioError(f"cannot open {self.path}: {exc}") from exc
        try:
            version = self.ops.ioctl(self.fd, lib.UVB_VFIO_GET_API_VERSION, 0)
        except OSError as exc:
            self.close()
            raise VfioError(f"{self.path}: VFIO_GET_API_VERSION failed: {exc}") from exc
        if version != lib.UVB_VFIO_API_VERSION:
            self.close()
            raise VfioError(f"{self.path}: VFIO API version {version}, expected "
                            f"{lib.UVB_VFIO_API_VERSION}")

    def check_extension(self, ext: int) -> bool:
        try:
            return self.ops.ioctl(self.fd, lib.UVB_VFIO_CHECK_EXTENSION, ext) > 0
        except OSError:
            return False

    @property
    def noiommu(self) -> bool:
        return self.iommu_type == lib.UVB_VFIO_NOIOMMU_IOMMU

    def set_iommu(self, *, noiommu: bool) -> int:
        """Pick the IOMMU model after the first group is attached: no-IOMMU for noiommu groups,
        else type1v2 (or type1).  Returns the type."""
        if noiommu:
            if not self.check_extension(lib.UVB_VFIO_NOIOMMU_IOMMU):
                raise VfioError(
                    "the VFIO container does not offer VFIO_NOIOMMU_IOMMU: load VFIO with "
                    "`modprobe vfio enable_unsafe_noiommu_mode=1` (or write Y to "
                    "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode); the kernel needs "
                    "CONFIG_VFIO_NOIOMMU (Debian's kernels do not build it, Azure Linux does)")
            kinds = [lib.UVB_VFIO_NOIOMMU_IOMMU]
        else:
            kinds = [t for t in (lib.UVB_VFIO_TYPE1v2_IOMMU, lib.UVB_VFIO_TYPE1_IOMMU)
                     if self.check_extension(t)]
            if not kinds:
                raise VfioError("the VFIO container offers no type1 IOMMU: `modprobe "
                                "vfio_iommu_type1` and check that the IOMMU is enabled "
                                "(intel_iommu=on / amd_iommu=on)")
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_SET_IOMMU, kinds[0])
        except OSError as exc:
            if exc.errno == errno.EPERM and noiommu:
                raise PrivilegeError("VFIO_SET_IOMMU(NOIOMMU) was refused: no-IOMMU mode needs "
                                     "CAP_SYS_RAWIO (run as root, or systemd "
                                     "AmbientCapabilities=CAP_SYS_RAWIO)") from exc
            raise VfioError(f"VFIO_SET_IOMMU({kinds[0]}) failed: {exc}") from exc
        self.iommu_type = kinds[0]
        return kinds[0]

    def iova_pgsizes(self) -> int:
        """Bitmap of IOMMU page sizes (type1), 0 when unknown."""
        info = _new("struct vfio_iommu_type1_info")
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_IOMMU_GET_INFO, info)
        except OSError:
            return 0
        return int(info.iova_pgsizes) if info.flags & lib.UVB_VFIO_IOMMU_INFO_PGSIZES else 0

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """Map ``[vaddr, vaddr+size)`` of this process at ``iova`` for device reads and writes
        (the kernel pins the pages)."""
        if self.noiommu:
            raise VfioError("no-IOMMU containers have no DMA mapping: use guest-physical "
                            "addresses of pinned memory (uvmbus.dma.HugepageMemory)")
        m = _new("struct vfio_iommu_type1_dma_map")
        m.flags = lib.UVB_VFIO_DMA_MAP_FLAG_READ | lib.UVB_VFIO_DMA_MAP_FLAG_WRITE
        m.vaddr, m.iova, m.size = vaddr, iova, size
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_IOMMU_MAP_DMA, m)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.ENOMEM:
                hint = (": the locked-memory limit is too low for pinning (raise `ulimit -l`, "
                        "systemd LimitMEMLOCK=infinity) or CAP_IPC_LOCK is missing")
            elif exc.errno == errno.ENOSPC:
                hint = ": the IOMMU's DMA mapping limit (vfio_iommu_type1 dma_entry_limit) is reached"
            raise VfioError(f"VFIO_IOMMU_MAP_DMA of {size} bytes at IOVA {iova:#x} failed: "
                            f"{exc.strerror}{hint}") from exc

    def unmap_dma(self, iova: int, size: int) -> None:
        u = _new("struct vfio_iommu_type1_dma_unmap")
        u.iova, u.size = iova, size
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_IOMMU_UNMAP_DMA, u)
        except OSError as exc:
            raise VfioError(f"VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x} failed: {exc}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            self.ops.close(self.fd)
            self.fd = -1


class Group:
    """A VFIO group (``/dev/vfio/N`` or ``/dev/vfio/noiommu-N``)."""

    def __init__(self, container: Container, fn: PciFunction) -> None:
        self.container = container
        self.ops = container.ops
        self.fn = fn
        gpath = fn.vfio_group_path
        if fn.driver != VFIO_DRIVER or gpath is None:
            raise VfioError(f"{fn.name} is not bound to vfio-pci (driver: {fn.driver or 'none'}, "
                            f"iommu_group: {fn.iommu_group}): run `uvmbus bind {fn.name}` first")
        self.path = str(gpath)
        self.noiommu = os.path.basename(self.path).startswith("noiommu-")
        self.attached = False
        try:
            self.fd = self.ops.open(self.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                need = ("CAP_SYS_RAWIO (no-IOMMU groups)" if self.noiommu
                        else "write access to it (root, or chown the node to your user)")
                raise PrivilegeError(f"cannot open {self.path}: {exc.strerror}; it needs "
                                     f"{need}") from exc
            if exc.errno == errno.EBUSY:
                raise VfioError(f"{self.path} is busy: another process (a VM, another uvmbus "
                                "command) has the group open") from exc
            raise VfioError(f"cannot open {self.path}: {exc}") from exc

    def status(self) -> int:
        st = _new("struct vfio_group_status")
        self.ops.ioctl(self.fd, lib.UVB_VFIO_GROUP_GET_STATUS, st)
        return int(st.flags)

    def check_viable(self) -> None:
        if self.status() & lib.UVB_VFIO_GROUP_FLAGS_VIABLE:
            return
        others = []
        for name in self.fn.group_members():
            if name == self.fn.name:
                continue
            other = PciFunction(self.fn.bus, name)
            if other.driver not in (None, VFIO_DRIVER):
                others.append(f"{name} ({other.class_name}, driver {other.driver})")
        listing = "; ".join(others) or "(none found in sysfs)"
        raise VfioError(
            f"IOMMU group {self.fn.iommu_group} of {self.fn.name} is not viable: every device "
            f"in the group must be bound to vfio-pci (or no driver). Still on a kernel driver: "
            f"{listing}. Bind them too (`uvmbus bind ADDRESS`), or move the device to a slot "
            "with its own group")

    def attach(self) -> None:
        """GROUP_SET_CONTAINER, then VFIO_SET_IOMMU on the container if not yet set."""
        self.check_viable()
        fdp = ffi.new("int32_t *", self.container.fd)
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_GROUP_SET_CONTAINER, fdp)
        except OSError as exc:
            raise VfioError(f"VFIO_GROUP_SET_CONTAINER for {self.path} failed: {exc}") from exc
        self.attached = True
        if self.container.iommu_type is None:
            self.container.set_iommu(noiommu=self.noiommu)

    def device(self, name: str) -> Device:
        buf = ffi.new("char[]", name.encode())
        try:
            fd = self.ops.ioctl(self.fd, lib.UVB_VFIO_GROUP_GET_DEVICE_FD, buf)
        except OSError as exc:
            if exc.errno == errno.EPERM and self.noiommu:
                raise PrivilegeError(f"VFIO_GROUP_GET_DEVICE_FD({name}) refused: no-IOMMU "
                                     "devices need CAP_SYS_RAWIO") from exc
            raise VfioError(f"VFIO_GROUP_GET_DEVICE_FD({name}) failed: {exc}") from exc
        return Device(self, name, fd)

    def close(self) -> None:
        if self.fd >= 0:
            if self.attached:
                try:
                    self.ops.ioctl(self.fd, lib.UVB_VFIO_GROUP_UNSET_CONTAINER, 0)
                except OSError:
                    pass
                self.attached = False
            self.ops.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int
    #: (offset, size) areas that may be mmap'd; [(0, size)] without a sparse-mmap capability
    mmap_areas: tuple[tuple[int, int], ...]

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & lib.UVB_VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int


class Device:
    """A VFIO device fd (from a group, or a cdev): regions, config space, interrupts, reset."""

    def __init__(self, group: Group | None, name: str, fd: int, *, ops: SysOps | None = None) -> None:
        self.group = group
        self.ops = group.ops if group is not None else (ops or SysOps())
        self.name = name
        self.fd = fd
        info = _new("struct vfio_device_info")
        self.ops.ioctl(fd, lib.UVB_VFIO_DEVICE_GET_INFO, info)
        self.flags = int(info.flags)
        self.num_regions = int(info.num_regions)
        self.num_irqs = int(info.num_irqs)
        self._maps: list[mmap.mmap] = []
        self._irq_fds: dict[int, list[int]] = {}
        self._config_off: int | None = None

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & lib.UVB_VFIO_DEVICE_FLAGS_RESET)

    def region(self, index: int) -> Region:
        info = _new("struct vfio_region_info")
        info.index = index
        self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_GET_REGION_INFO, info)
        areas: tuple[tuple[int, int], ...] = ((0, int(info.size)),)
        if info.flags & lib.UVB_VFIO_REGION_INFO_FLAG_CAPS and info.argsz > ffi.sizeof(info[0]):
            areas = self._sparse_areas(index, int(info.argsz)) or areas
        return Region(index, int(info.flags), int(info.size), int(info.offset), areas)

    def _sparse_areas(self, index: int, argsz: int) -> tuple[tuple[int, int], ...]:
        raw = ffi.new("uint8_t[]", argsz)
        info = ffi.cast("struct vfio_region_info *", raw)
        info.argsz, info.index = argsz, index
        self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_GET_REGION_INFO, info)
        off = int(info.cap_offset)
        seen = 0
        while off and off + ffi.sizeof("struct vfio_info_cap_header") <= argsz and seen < 16:
            hdr = ffi.cast("struct vfio_info_cap_header *", raw + off)
            if hdr.id == lib.UVB_VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                return ()          # the whole region may be mapped
            if hdr.id == lib.UVB_VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                sp = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", raw + off)
                n = int(sp.nr_areas)
                first = off + ffi.sizeof("struct vfio_region_info_cap_sparse_mmap")
                if first + n * 16 > argsz:
                    break
                arr = ffi.cast("struct vfio_region_sparse_mmap_area *", raw + first)
                return tuple((int(arr[i].offset), int(arr[i].size)) for i in range(n))
            off = int(hdr.next)
            seen += 1
        return ()

    # -- config space --------------------------------------------------------------------------
    def _config_offset(self) -> int:
        if self._config_off is None:
            self._config_off = self.region(CONFIG).offset
        return self._config_off

    def config_read(self, offset: int, n: int) -> bytes:
        return self.ops.pread(self.fd, n, self._config_offset() + offset)

    def config_write(self, offset: int, data: bytes) -> None:
        self.ops.pwrite(self.fd, data, self._config_offset() + offset)

    def enable_bus_master(self) -> None:
        """Memory space + bus mastering on, INTx off (MSI/MSI-X or polling)."""
        cmd = int.from_bytes(self.config_read(_PCI_COMMAND, 2), "little")
        cmd |= _PCI_COMMAND_MEMORY | _PCI_COMMAND_MASTER
        self.config_write(_PCI_COMMAND, cmd.to_bytes(2, "little"))

    def disable_bus_master(self) -> None:
        cmd = int.from_bytes(self.config_read(_PCI_COMMAND, 2), "little")
        self.config_write(_PCI_COMMAND, (cmd & ~_PCI_COMMAND_MASTER).to_bytes(2, "little"))

    # -- BARs ----------------------------------------------------------------------------------
    def map_bar(self, index: int) -> mmap.mmap:
        """mmap a whole BAR (it must be mmap-able in full)."""
        reg = self.region(index)
        if not reg.size:
            raise VfioError(f"{self.name}: BAR{index} is not implemented")
        if not reg.mmappable or reg.mmap_areas and reg.mmap_areas != ((0, reg.size),):
            raise VfioError(f"{self.name}: BAR{index} cannot be mmap'd whole (flags "
                            f"{reg.flags:#x}, mmap areas {reg.mmap_areas}); this kernel keeps the "
                            "MSI-X table out of the mapping")
        try:
            m = self.ops.mmap(self.fd, reg.size, reg.offset)
        except OSError as exc:
            raise VfioError(f"{self.name}: mmap of BAR{index} ({reg.size} bytes) failed: {exc}") from exc
        self._maps.append(m)
        return m

    # -- interrupts ----------------------------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        info = _new("struct vfio_irq_info")
        info.index = index
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_GET_IRQ_INFO, info)
        except OSError:
            return IrqInfo(index, 0, 0)
        return IrqInfo(index, int(info.flags), int(info.count))

    def set_irq_eventfds(self, index: int, fds: list[int], start: int = 0) -> None:
        """Trigger eventfd ``fds[i]`` on vector ``start + i`` of IRQ ``index`` (-1: none)."""
        info = self.irq_info(index)
        if start + len(fds) > info.count:
            raise VfioError(f"{self.name}: {IRQ_NAMES.get(index, index)} has {info.count} "
                            f"vectors, cannot set {start}..{start + len(fds) - 1}")
        hdr = ffi.sizeof("struct vfio_irq_set")
        raw = ffi.new("uint8_t[]", hdr + 4 * len(fds))
        s = ffi.cast("struct vfio_irq_set *", raw)
        s.argsz = hdr + 4 * len(fds)
        s.flags = lib.UVB_VFIO_IRQ_SET_DATA_EVENTFD | lib.UVB_VFIO_IRQ_SET_ACTION_TRIGGER
        s.index, s.start, s.count = index, start, len(fds)
        data = ffi.cast("int32_t *", raw + hdr)
        for i, fd in enumerate(fds):
            data[i] = fd
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_SET_IRQS, s)
        except OSError as exc:
            raise VfioError(f"{self.name}: VFIO_DEVICE_SET_IRQS({IRQ_NAMES.get(index, index)}, "
                            f"{len(fds)} eventfds) failed: {exc}") from exc
        self._irq_fds[index] = list(fds)

    def disable_irqs(self, index: int) -> None:
        s = _new("struct vfio_irq_set")
        s.flags = lib.UVB_VFIO_IRQ_SET_DATA_NONE | lib.UVB_VFIO_IRQ_SET_ACTION_TRIGGER
        s.index, s.start, s.count = index, 0, 0
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_SET_IRQS, s)
        except OSError:
            pass
        self._irq_fds.pop(index, None)

    def reset(self) -> None:
        if not self.can_reset:
            raise VfioError(f"{self.name}: the device offers no reset (no FLR / PM reset)")
        try:
            self.ops.ioctl(self.fd, lib.UVB_VFIO_DEVICE_RESET, 0)
        except OSError as exc:
            raise VfioError(f"{self.name}: VFIO_DEVICE_RESET failed: {exc}") from exc

    def close(self) -> None:
        for index in list(self._irq_fds):
            self.disable_irqs(index)
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass        # a view is still exported; the mapping goes with the process
        self._maps.clear()
        if self.fd >= 0:
            self.ops.close(self.fd)
            self.fd = -1


class Iommufd:
    """An iommufd context (``/dev/iommu``) with one IO address space: the cdev API's
    counterpart of a type1 :class:`Container` (same ``map_dma``/``unmap_dma``)."""

    noiommu = False
    iommu_type = "iommufd"

    def __init__(self, root: str | os.PathLike[str] = "/", *, ops: SysOps | None = None) -> None:
        self.ops = ops or SysOps()
        self.path = os.path.join(str(root), "dev/iommu")
        self.ioas_id = 0
        try:
            self.fd = self.ops.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise VfioError(f"cannot open {self.path} ({exc.strerror}): the iommufd API needs "
                            "CONFIG_IOMMUFD (`modprobe iommufd`); or use the group API") from exc
        a = ffi.new("struct iommu_ioas_alloc *")
        a.size = ffi.sizeof("struct iommu_ioas_alloc")
        try:
            self.ops.ioctl(self.fd, lib.UVB_IOMMU_IOAS_ALLOC, a)
        except OSError as exc:
            self.close()
            raise VfioError(f"IOMMU_IOAS_ALLOC failed: {exc}") from exc
        self.ioas_id = int(a.out_ioas_id)

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        m = ffi.new("struct iommu_ioas_map *")
        m.size = ffi.sizeof("struct iommu_ioas_map")
        m.flags = (lib.UVB_IOMMU_IOAS_MAP_FIXED_IOVA | lib.UVB_IOMMU_IOAS_MAP_WRITEABLE
                   | lib.UVB_IOMMU_IOAS_MAP_READABLE)
        m.ioas_id, m.user_va, m.length, m.iova = self.ioas_id, vaddr, size, iova
        try:
            self.ops.ioctl(self.fd, lib.UVB_IOMMU_IOAS_MAP, m)
        except OSError as exc:
            raise VfioError(f"IOMMU_IOAS_MAP of {size} bytes at IOVA {iova:#x} failed: "
                            f"{exc.strerror} (ENOMEM: raise the locked-memory limit)") from exc

    def unmap_dma(self, iova: int, size: int) -> None:
        u = ffi.new("struct iommu_ioas_unmap *")
        u.size = ffi.sizeof("struct iommu_ioas_unmap")
        u.ioas_id, u.iova, u.length = self.ioas_id, iova, size
        try:
            self.ops.ioctl(self.fd, lib.UVB_IOMMU_IOAS_UNMAP, u)
        except OSError as exc:
            raise VfioError(f"IOMMU_IOAS_UNMAP at IOVA {iova:#x} failed: {exc}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            self.ops.close(self.fd)
            self.fd = -1


def open_cdev(fn: PciFunction, *, ops: SysOps | None = None) -> VfioHandle:
    """Open ``fn`` through the cdev API (``/dev/vfio/devices/vfioX`` + iommufd, Linux >= 6.6
    with CONFIG_VFIO_DEVICE_CDEV): BIND_IOMMUFD, IOAS_ALLOC, ATTACH_IOMMUFD_PT."""
    ops = ops or SysOps()
    node = fn.vfio_cdev
    if node is None:
        raise VfioError(f"{fn.name} has no VFIO cdev (/dev/vfio/devices/vfioX): the kernel lacks "
                        "CONFIG_VFIO_DEVICE_CDEV or the function is not on vfio-pci; use the "
                        "group API")
    ctx = Iommufd(fn.bus.root, ops=ops)
    fd = -1
    try:
        try:
            fd = ops.open(str(node), os.O_RDWR)
        except OSError as exc:
            raise VfioError(f"cannot open {node}: {exc}") from exc
        b = _new("struct vfio_device_bind_iommufd")
        b.iommufd = ctx.fd
        try:
            ops.ioctl(fd, lib.UVB_VFIO_DEVICE_BIND_IOMMUFD, b)
        except OSError as exc:
            raise VfioError(f"VFIO_DEVICE_BIND_IOMMUFD for {node} failed: {exc}") from exc
        at = _new("struct vfio_device_attach_iommufd_pt")
        at.pt_id = ctx.ioas_id
        try:
            ops.ioctl(fd, lib.UVB_VFIO_DEVICE_ATTACH_IOMMUFD_PT, at)
        except OSError as exc:
            raise VfioError(f"VFIO_DEVICE_ATTACH_IOMMUFD_PT for {node} failed: {exc}") from exc
        dev = Device(None, fn.name, fd, ops=ops)
    except BaseException:
        if fd >= 0:
            ops.close(fd)
        ctx.close()
        raise
    return VfioHandle(fn, ctx, None, dev)


class VfioHandle:
    """Container (or iommufd) + group (None with the cdev API) + device of one PCI function,
    opened together (see open_device)."""

    def __init__(self, fn: PciFunction, container: Container | Iommufd, group: Group | None,
                 device: Device) -> None:
        self.fn = fn
        self.container = container
        self.group = group
        self.device = device

    @property
    def noiommu(self) -> bool:
        return self.group is not None and self.group.noiommu

    @property
    def api(self) -> str:
        return "cdev+iommufd" if self.group is None else "group"

    def close(self) -> None:
        self.device.close()
        if self.group is not None:
            self.group.close()
        self.container.close()

    def __enter__(self) -> VfioHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(fn: PciFunction, *, ops: SysOps | None = None, api: str | None = None) -> VfioHandle:
    """Open ``fn`` (bound to vfio-pci).  ``api``: ``group`` (the legacy container/group API,
    every kernel, the only one with no-IOMMU), ``cdev`` (cdev + iommufd), or ``auto``
    (default, or $UVMBUS_VFIO_API): the group API when the group node exists, else the cdev."""
    api = api or os.environ.get("UVMBUS_VFIO_API", "auto")
    if api not in ("auto", "group", "cdev"):
        raise VfioError(f"VFIO API {api!r}: use auto, group or cdev")
    if api == "cdev" or (api == "auto" and fn.vfio_group_path is None and fn.vfio_cdev is not None):
        return open_cdev(fn, ops=ops)
    container = Container(fn.bus.root, ops=ops)
    group: Group | None = None
    try:
        group = Group(container, fn)
        group.attach()
        dev = group.device(fn.name)
    except BaseException:
        if group is not None:
            group.close()
        container.close()
        raise
    return VfioHandle(fn, container, group, dev)


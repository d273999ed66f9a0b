"""The VFIO ioctl layer against a recorded ioctl sequence (no kernel needed).

A fake :class:`SysOps` plays the kernel's side of /dev/vfio: it fills the output structs the
way vfio.c / vfio_iommu_type1.c / vfio_pci_core.c do and records every call with the struct
bytes passed.  Debian's kernels do not build CONFIG_VFIO_NOIOMMU, so this is where the
no-IOMMU path (VFIO_NOIOMMU_IOMMU, no MAP_DMA, CAP_SYS_RAWIO errors) is tested; the type1
path is also run for real in tests/test_qemu_nvme.py.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import pytest
from pci_fixtures import PciTree

from uvmbus.dma import HugepageMemory
from uvmbus.errors import NotFound, PrivilegeError, VfioError
from uvmbus.native import ffi, lib
from uvmbus.vfio import PciBus, SysOps, open_device
from uvmbus.vfio.device import MSIX, REQ, Container
from uvmbus.vfio.dma import IOVA_BASE, IommuDmaMemory, dma_memory_for

NAMES = {getattr(lib, n): n[len("UVB_VFIO_"):] for n in dir(lib)
         if n.startswith("UVB_VFIO_") and n.split("UVB_VFIO_")[1].split("_")[0] in
         ("GET", "CHECK", "SET", "GROUP", "DEVICE", "IOMMU") and getattr(lib, n) > 0x3B00}
BDF = "0000:00:04.0"


class FakeVfio(SysOps):
    """The kernel side of the VFIO legacy API for one group with one PCI function."""

    def __init__(self, root: Path, *, noiommu: bool = False, extensions: set[int] | None = None,
                 viable: bool = True, set_iommu_errno: int = 0, open_errno: int = 0) -> None:
        self.root = str(root)
        self.noiommu = noiommu
        self.ext = extensions if extensions is not None else (
            {lib.UVB_VFIO_NOIOMMU_IOMMU} if noiommu else
            {lib.UVB_VFIO_TYPE1_IOMMU, lib.UVB_VFIO_TYPE1v2_IOMMU})
        self.viable = viable
        self.set_iommu_errno = set_iommu_errno
        self.open_errno = open_errno
        self.calls: list[tuple[Any, ...]] = []
        self.fds: dict[int, str] = {}
        self.next_fd = 100
        self.iommu_set = 0
        self.config = bytearray(256)
        self.mapped: list[tuple[int, int, int]] = []

    def _fd(self, what: str) -> int:
        fd = self.next_fd
        self.next_fd += 1
        self.fds[fd] = what
        return fd

    def open(self, path: str, flags: int) -> int:
        rel = path[len(self.root):].lstrip("/")
        self.calls.append(("open", rel))
        if self.open_errno and "vfio/vfio" not in rel:
            raise OSError(self.open_errno, "fake")
        return self._fd("container" if rel == "dev/vfio/vfio" else "group")

    def close(self, fd: int) -> None:
        self.calls.append(("close", self.fds.pop(fd)))

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        off = offset - (7 << 40)
        return bytes(self.config[off:off + n])

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        off = offset - (7 << 40)
        self.config[off:off + len(data)] = data
        self.calls.append(("config-write", off, data.hex()))
        return len(data)

    def eventfd(self) -> int:
        return self._fd("eventfd")

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        what = self.fds[fd]
        name = NAMES[request]
        rec: tuple[Any, ...] = (what, name)
        if name == "GET_API_VERSION":
            rec += ()
            ret = 0
        elif name == "CHECK_EXTENSION":
            rec += (arg,)
            ret = int(arg in self.ext)
        elif name == "SET_IOMMU":
            rec += (arg,)
            self.calls.append(rec)
            if self.set_iommu_errno:
                raise OSError(self.set_iommu_errno, "fake")
            if arg not in self.ext:
                raise OSError(errno.EINVAL, "fake")
            self.iommu_set = arg
            return 0
        elif name == "GROUP_GET_STATUS":
            st = ffi.cast("struct vfio_group_status *", arg)
            assert st.argsz == 8
            st.flags = (1 if self.viable else 0) | (2 if self.iommu_set else 0)
            ret = 0
        elif name == "GROUP_SET_CONTAINER":
            cfd = ffi.cast("int32_t *", arg)[0]
            rec += (self.fds[cfd],)
            ret = 0
        elif name == "GROUP_UNSET_CONTAINER":
            ret = 0
        elif name == "GROUP_GET_DEVICE_FD":
            rec += (ffi.string(ffi.cast("char *", arg)).decode(),)
            self.calls.append(rec)
            if not self.iommu_set:
                raise OSError(errno.EINVAL, "fake: no IOMMU set")
            return self._fd("device")
        elif name == "DEVICE_GET_INFO":
            i = ffi.cast("struct vfio_device_info *", arg)
            i.flags = lib.UVB_VFIO_DEVICE_FLAGS_PCI | lib.UVB_VFIO_DEVICE_FLAGS_RESET
            i.num_regions, i.num_irqs = 9, 5
            ret = 0
        elif name == "DEVICE_GET_REGION_INFO":
            r = ffi.cast("struct vfio_region_info *", arg)
            rec += (int(r.index), int(r.argsz))
            r.offset = int(r.index) << 40
            r.size = {0: 0x4000, 7: 256}.get(int(r.index), 0)
            r.flags = 3 | (4 if r.index == 0 else 0)
            ret = 0
        elif name == "DEVICE_GET_IRQ_INFO":
            i = ffi.cast("struct vfio_irq_info *", arg)
            rec += (int(i.index),)
            i.count = {MSIX: 65, REQ: 1}.get(int(i.index), 0)
            i.flags = lib.UVB_VFIO_IRQ_INFO_EVENTFD
            ret = 0
        elif name == "DEVICE_SET_IRQS":
            s = ffi.cast("struct vfio_irq_set *", arg)
            raw = bytes(ffi.buffer(ffi.cast("uint8_t *", arg), int(s.argsz)))
            rec += (raw.hex(),)
            ret = 0
        elif name == "IOMMU_MAP_DMA":
            m = ffi.cast("struct vfio_iommu_type1_dma_map *", arg)
            rec += (bytes(ffi.buffer(m)).hex(),)
            self.calls.append(rec)
            if self.iommu_set == lib.UVB_VFIO_NOIOMMU_IOMMU:
                raise OSError(errno.ENOTTY, "fake")
            self.mapped.append((int(m.vaddr), int(m.iova), int(m.size)))
            return 0
        elif name == "IOMMU_UNMAP_DMA":
            u = ffi.cast("struct vfio_iommu_type1_dma_unmap *", arg)
            rec += (int(u.iova), int(u.size))
            ret = 0
        elif name == "DEVICE_RESET":
            ret = 0
        else:
            raise AssertionError(f"unexpected ioctl {name}")
        self.calls.append(rec)
        return ret


@pytest.fixture
def tree(tmp_path: Path) -> PciTree:
    t = PciTree(tmp_path)
    t.add_function(BDF, group=3, driver="vfio-pci")
    (tmp_path / "dev/vfio/vfio").write_text("")
    return t


def noiommu_tree(tmp_path: Path) -> PciTree:
    t = PciTree(tmp_path, noiommu=True)
    t.add_function(BDF, group=0, driver="vfio-pci")
    (tmp_path / "dev/vfio/vfio").write_text("")
    return t


def test_type1_sequence(tree: PciTree) -> None:
    ops = FakeVfio(tree.root)
    fn = PciBus(tree.root).function(BDF)
    with open_device(fn, ops=ops) as h:
        assert not h.noiommu
        dev = h.device
        assert dev.can_reset and dev.num_regions == 9
        dev.enable_bus_master()
        assert int.from_bytes(ops.config[4:6], "little") & 0x6 == 0x6
        dev.set_irq_eventfds(MSIX, [7, 8])
        dev.reset()
        h.container.map_dma(0x7F0000000000, IOVA_BASE, 2 << 20)
    assert ops.calls == [
        ("open", "dev/vfio/vfio"),
        ("container", "GET_API_VERSION"),
        ("open", "dev/vfio/3"),
        ("group", "GROUP_GET_STATUS"),
        ("group", "GROUP_SET_CONTAINER", "container"),
        ("container", "CHECK_EXTENSION", lib.UVB_VFIO_TYPE1v2_IOMMU),
        ("container", "CHECK_EXTENSION", lib.UVB_VFIO_TYPE1_IOMMU),
        ("container", "SET_IOMMU", lib.UVB_VFIO_TYPE1v2_IOMMU),
        ("group", "GROUP_GET_DEVICE_FD", BDF),
        ("device", "DEVICE_GET_INFO"),
        ("device", "DEVICE_GET_REGION_INFO", 7, 32),
        ("config-write", 4, "0600"),
        ("device", "DEVICE_GET_IRQ_INFO", MSIX),
        # argsz 28, DATA_EVENTFD|ACTION_TRIGGER, index 2, start 0, count 2, fds 7 and 8
        ("device", "DEVICE_SET_IRQS", struct.pack("<7I", 28, 0x24, 2, 0, 2, 7, 8).hex()),
        ("device", "DEVICE_RESET"),
        ("container", "IOMMU_MAP_DMA",
         struct.pack("<IIQQQ", 32, 3, 0x7F0000000000, IOVA_BASE, 2 << 20).hex()),
        # close: IRQs off (DATA_NONE|ACTION_TRIGGER, count 0), device, group, container
        ("device", "DEVICE_SET_IRQS", struct.pack("<5I", 20, 0x21, 2, 0, 0).hex()),
        ("close", "device"),
        ("group", "GROUP_UNSET_CONTAINER"),
        ("close", "group"),
        ("close", "container"),
    ]


def test_type1_dma_memory_maps_and_unmaps(tree: PciTree) -> None:
    ops = FakeVfio(tree.root)
    with open_device(PciBus(tree.root).function(BDF), ops=ops) as h:
        mem = dma_memory_for(h)
        assert isinstance(mem, IommuDmaMemory)
        region = mem.alloc_region(4096)
        assert region.size == 2 << 20
        assert int(region.pfn_table[0]) == IOVA_BASE >> 12
        assert int(region.pfn_table[511]) == (IOVA_BASE >> 12) + 511
        assert ops.mapped == [(region.address, IOVA_BASE, 2 << 20)]
        r2 = mem.alloc_region(4096)
        assert int(r2.pfn_table[0]) == (IOVA_BASE + (2 << 20)) >> 12
        mem.close()
    unmaps = [c for c in ops.calls if c[1] == "IOMMU_UNMAP_DMA"]
    assert unmaps == [("container", "IOMMU_UNMAP_DMA", IOVA_BASE, 2 << 20),
                      ("container", "IOMMU_UNMAP_DMA", IOVA_BASE + (2 << 20), 2 << 20)]


def test_noiommu_sequence(tmp_path: Path) -> None:
    t = noiommu_tree(tmp_path)
    ops = FakeVfio(t.root, noiommu=True)
    fn = PciBus(t.root).function(BDF)
    assert fn.noiommu
    with open_device(fn, ops=ops) as h:
        assert h.noiommu and h.container.noiommu
        with pytest.raises(VfioError, match="no DMA mapping"):
            h.container.map_dma(0x1000, 0, 4096)
        try:
            mem = dma_memory_for(h)
        except Exception as exc:             # no hugetlb on this kernel: still the right kind
            assert "hugetlb" in str(exc)
        else:
            assert isinstance(mem, HugepageMemory)
    assert ops.calls[:8] == [
        ("open", "dev/vfio/vfio"),
        ("container", "GET_API_VERSION"),
        ("open", "dev/vfio/noiommu-0"),
        ("group", "GROUP_GET_STATUS"),
        ("group", "GROUP_SET_CONTAINER", "container"),
        ("container", "CHECK_EXTENSION", lib.UVB_VFIO_NOIOMMU_IOMMU),
        ("container", "SET_IOMMU", lib.UVB_VFIO_NOIOMMU_IOMMU),
        ("group", "GROUP_GET_DEVICE_FD", BDF),
    ]
    assert not any(c[1] == "IOMMU_MAP_DMA" for c in ops.calls)


def test_noiommu_needs_the_module_parameter(tmp_path: Path) -> None:
    t = noiommu_tree(tmp_path)
    ops = FakeVfio(t.root, noiommu=True, extensions=set())
    with pytest.raises(VfioError, match="enable_unsafe_noiommu_mode=1"):
        open_device(PciBus(t.root).function(BDF), ops=ops)
    assert ops.calls[-2:] == [("close", "group"), ("close", "container")]


def test_noiommu_needs_cap_sys_rawio(tmp_path: Path) -> None:
    t = noiommu_tree(tmp_path)
    with pytest.raises(PrivilegeError, match="CAP_SYS_RAWIO"):
        open_device(PciBus(t.root).function(BDF),
                    ops=FakeVfio(t.root, noiommu=True, set_iommu_errno=errno.EPERM))
    with pytest.raises(PrivilegeError, match="CAP_SYS_RAWIO"):
        open_device(PciBus(t.root).function(BDF),
                    ops=FakeVfio(t.root, noiommu=True, open_errno=errno.EPERM))


def test_group_not_viable_lists_the_other_devices(tmp_path: Path) -> None:
    t = PciTree(tmp_path)
    t.add_function(BDF, group=4, driver="vfio-pci")
    t.add_function("0000:00:04.1", vendor=0x8086, device=0x1234, cls=0x020000, group=4,
                   driver="e1000e")
    (tmp_path / "dev/vfio/vfio").write_text("")
    with pytest.raises(VfioError, match=r"0000:00:04\.1 \(ethernet, driver e1000e\)"):
        open_device(PciBus(t.root).function(BDF), ops=FakeVfio(t.root, viable=False))


def test_not_bound_and_not_loaded(tmp_path: Path) -> None:
    t = PciTree(tmp_path)
    t.add_function(BDF, group=3, driver="nvme")
    with pytest.raises(NotFound, match="modprobe"):
        Container(t.root)
    (tmp_path / "dev/vfio/vfio").write_text("")
    with pytest.raises(VfioError, match=f"uvmbus bind {BDF}"):
        open_device(PciBus(t.root).function(BDF), ops=FakeVfio(t.root))


def test_sparse_mmap_capability(tree: PciTree) -> None:
    class Sparse(FakeVfio):
        def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
            if request != lib.UVB_VFIO_DEVICE_GET_REGION_INFO:
                return super().ioctl(fd, request, arg)
            r = ffi.cast("struct vfio_region_info *", arg)
            need = 32 + 16 + 2 * 16
            r.flags, r.size, r.offset = 0xF, 0x4000, 0
            if r.argsz < need:
                r.argsz = need
                return 0
            raw = ffi.cast("uint8_t *", arg)
            r.cap_offset = 32
            struct.pack_into("<HHIII", ffi.buffer(raw, need), 32, 1, 1, 0, 2, 0)
            struct.pack_into("<QQQQ", ffi.buffer(raw, need), 48, 0, 0x2000, 0x3000, 0x1000)
            return 0

    with open_device(PciBus(tree.root).function(BDF), ops=Sparse(tree.root)) as h:
        reg = h.device.region(0)
        assert reg.mmap_areas == ((0, 0x2000), (0x3000, 0x1000))
        with pytest.raises(VfioError, match="cannot be mmap'd whole"):
            h.device.map_bar(0)


class FakeCdev(FakeVfio):
    """The cdev + iommufd side: /dev/iommu, /dev/vfio/devices/vfio0."""

    def open(self, path: str, flags: int) -> int:
        rel = path[len(self.root):].lstrip("/")
        self.calls.append(("open", rel))
        return self._fd({"dev/iommu": "iommufd"}.get(rel, "device"))

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        what = self.fds[fd]
        if request == lib.UVB_IOMMU_IOAS_ALLOC:
            a = ffi.cast("struct iommu_ioas_alloc *", arg)
            assert a.size == 12
            a.out_ioas_id = 7
            self.calls.append((what, "IOAS_ALLOC"))
            return 0
        if request == lib.UVB_IOMMU_IOAS_MAP:
            m = ffi.cast("struct iommu_ioas_map *", arg)
            self.calls.append((what, "IOAS_MAP", bytes(ffi.buffer(m)).hex()))
            return 0
        if request == lib.UVB_IOMMU_IOAS_UNMAP:
            u = ffi.cast("struct iommu_ioas_unmap *", arg)
            self.calls.append((what, "IOAS_UNMAP", int(u.ioas_id), int(u.iova), int(u.length)))
            return 0
        if request == lib.UVB_VFIO_DEVICE_BIND_IOMMUFD:
            b = ffi.cast("struct vfio_device_bind_iommufd *", arg)
            self.calls.append((what, "BIND_IOMMUFD", self.fds[int(b.iommufd)], int(b.argsz)))
            b.out_devid = 1
            return 0
        if request == lib.UVB_VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            at = ffi.cast("struct vfio_device_attach_iommufd_pt *", arg)
            self.calls.append((what, "ATTACH_IOMMUFD_PT", int(at.pt_id), int(at.argsz)))
            return 0
        return super().ioctl(fd, request, arg)


def test_cdev_iommufd_sequence(tmp_path: Path) -> None:
    t = PciTree(tmp_path)
    t.add_function(BDF, group=3, driver="vfio-pci")
    (t.paths[BDF] / "vfio-dev" / "vfio0").mkdir(parents=True)
    (tmp_path / "dev/vfio/devices").mkdir(parents=True)
    (tmp_path / "dev/vfio/devices/vfio0").write_text("")
    (tmp_path / "dev/iommu").write_text("")
    (tmp_path / "dev/vfio/3").unlink()              # no group node: auto picks the cdev
    ops = FakeCdev(tmp_path)
    fn = PciBus(tmp_path).function(BDF)
    assert fn.vfio_cdev == tmp_path / "dev/vfio/devices/vfio0"
    with open_device(fn, ops=ops) as h:
        assert h.api == "cdev+iommufd" and not h.noiommu
        mem = dma_memory_for(h)
        assert isinstance(mem, IommuDmaMemory)
        region = mem.alloc_region(4096)
        assert int(region.pfn_table[0]) == IOVA_BASE >> 12
        vaddr = region.address
        mem.close()
    assert ops.calls == [
        ("open", "dev/iommu"),
        ("iommufd", "IOAS_ALLOC"),
        ("open", "dev/vfio/devices/vfio0"),
        ("device", "BIND_IOMMUFD", "iommufd", 16),
        ("device", "ATTACH_IOMMUFD_PT", 7, 12),
        ("device", "DEVICE_GET_INFO"),
        # FIXED_IOVA | WRITEABLE | READABLE, IOAS 7
        ("iommufd", "IOAS_MAP", struct.pack("<IIIIQQQ", 40, 7, 7, 0, vaddr, 2 << 20,
                                            IOVA_BASE).hex()),
        ("iommufd", "IOAS_UNMAP", 7, IOVA_BASE, 2 << 20),
        ("close", "device"),
        ("close", "iommufd"),
    ]

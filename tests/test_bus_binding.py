"""bind_uio / unbind_uio against a fake tree plus a fake driver core (tests/sysfs_fixtures.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from sysfs_fixtures import FCOPY_CLASS, NIC_CLASS, SCSI_CLASS, FakeKernel, SysfsTree

from uvmbus.bus import BlockUser, Bus, bind_uio, unbind_uio
from uvmbus.bus.sysfs import write_attr
from uvmbus.errors import BusError, PrivilegeError, UnsafeDeviceError

NIC_GUID = "aaaa1111-0000-4000-8000-000000000001"
NIC2_GUID = "aaaa2222-0000-4000-8000-000000000002"
SCSI_GUID = "bbbb1111-0000-4000-8000-000000000003"
FCOPY_GUID = "eb765408-105f-49b6-b4aa-c123b64d17d4"

KERNEL_IDS = {"hv_netvsc": {NIC_CLASS}, "hv_storvsc": {SCSI_CLASS}}


class QuietSystem:
    """Nothing mounted, no addresses: every device is safe to take."""

    def block_users(self) -> list[BlockUser]:
        return []

    def interface_addresses(self, ifname: str) -> list[str]:
        return []

    def default_route_interfaces(self) -> set[str]:
        return set()


class BusySystem(QuietSystem):
    def interface_addresses(self, ifname: str) -> list[str]:
        return ["192.0.2.5"]


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    t = SysfsTree(tmp_path)
    for d in ("hv_netvsc", "hv_storvsc", "hv_utils", "uio_hv_generic"):
        t.add_driver(d)
    return t


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Spy on the sysfs writes bind_uio/unbind_uio make: (last two path parts, value)."""
    import uvmbus.bus.binding as binding

    log: list[tuple[str, str]] = []

    def spy(path: Path, value: str, *, ok_errnos: tuple[int, ...] = ()) -> None:
        log.append(("/".join(path.parts[-2:]), value))
        write_attr(path, value, ok_errnos=ok_errnos)

    monkeypatch.setattr(binding, "write_attr", spy)
    return log


def test_bind_from_kernel_driver(tree: SysfsTree, writes: list[tuple[str, str]]) -> None:
    nic = tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    tree.add_net(nic, "simeth0")
    bus = Bus(tree.root)
    with FakeKernel(tree, id_tables=KERNEL_IDS):
        dev = bind_uio(bus, NIC_GUID, system=QuietSystem(), timeout=5)
    assert (dev.driver, dev.uio) == ("uio_hv_generic", "uio0")
    assert os.path.exists(str(dev.uio_dev_path))
    assert dev.driver_override == "uio_hv_generic"
    assert len(dev.maps()) == 5
    # The recipe of uio_vmbus.md §1.1, in order.  The final bind may be skipped when the
    # (asynchronous) fake already attached the device through new_id after the unbind.
    assert writes[:3] == [
        ("uio_hv_generic/new_id", NIC_CLASS),
        (f"{NIC_GUID}/driver_override", "uio_hv_generic"),
        ("hv_netvsc/unbind", NIC_GUID),
    ]
    assert writes[3:] in ([], [("uio_hv_generic/bind", NIC_GUID)])


def test_bind_writes_bind_when_needed(tree: SysfsTree, writes: list[tuple[str, str]]) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    with FakeKernel(tree, id_tables=KERNEL_IDS, new_id_attaches=False):
        dev = bind_uio(Bus(tree.root), NIC_GUID, system=QuietSystem(), timeout=5)
    assert dev.driver == "uio_hv_generic" and dev.uio == "uio0"
    assert writes == [
        ("uio_hv_generic/new_id", NIC_CLASS),
        (f"{NIC_GUID}/driver_override", "uio_hv_generic"),
        ("hv_netvsc/unbind", NIC_GUID),
        ("uio_hv_generic/bind", NIC_GUID),
    ]


def test_bind_unbound_device_attached_by_new_id(tree: SysfsTree) -> None:
    """new_id alone binds an unbound device of that class; the flow must accept that."""
    tree.add_device(FCOPY_CLASS, FCOPY_GUID, driver_override=None)
    bus = Bus(tree.root)
    with FakeKernel(tree, id_tables=KERNEL_IDS):
        dev = bind_uio(bus, "fcopy", system=QuietSystem(), timeout=5)
    assert dev.driver == "uio_hv_generic" and dev.uio is not None
    assert [m.name for m in dev.maps()] == ["txrx_rings", "int_page", "monitor_page"]


def test_bind_without_persist_override(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    with FakeKernel(tree, id_tables=KERNEL_IDS):
        dev = bind_uio(Bus(tree.root), NIC_GUID, persist_override=False, system=QuietSystem(),
                       timeout=5)
    assert dev.driver == "uio_hv_generic" and dev.driver_override is None


def test_bind_already_bound_is_noop(tree: SysfsTree) -> None:
    nic = tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="uio_hv_generic")
    tree.attach_uio(nic, nmaps=5)
    tree.add_net(nic, "stale0")  # would be unsafe, but an already-bound device is not re-checked
    with FakeKernel(tree) as k:
        dev = bind_uio(Bus(tree.root), NIC_GUID, system=BusySystem(), timeout=5)
    assert dev.uio == "uio0" and k.log == []


def test_bind_twice(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    bus = Bus(tree.root)
    with FakeKernel(tree, id_tables=KERNEL_IDS) as k:
        first = bind_uio(bus, NIC_GUID, system=QuietSystem(), timeout=5)
        n = len(k.log)
        second = bind_uio(bus, NIC_GUID, system=QuietSystem(), timeout=5)
        assert len(k.log) == n
    assert first == second and second.uio == "uio0"


def test_bind_timeout_message(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    with FakeKernel(tree, id_tables=KERNEL_IDS, refuse_uio=True), \
            pytest.raises(BusError) as ei:
        bind_uio(Bus(tree.root), NIC_GUID, system=QuietSystem(), timeout=0.2)
    msg = str(ei.value)
    assert "did not bind to uio_hv_generic" in msg and "modprobe uio_hv_generic" in msg
    assert "driver=none" in msg


def test_bind_timeout_hints_old_kernel_nonmonitored(tree: SysfsTree) -> None:
    tree.set_osrelease("5.15.0-1064-azure")
    tree.add_device(FCOPY_CLASS, FCOPY_GUID)
    with FakeKernel(tree, refuse_uio=True), pytest.raises(BusError, match="< 6.10 refuses"):
        bind_uio(Bus(tree.root), FCOPY_GUID, system=QuietSystem(), timeout=0.2)


def test_bind_waits_for_dev_node(tree: SysfsTree) -> None:
    """uio/uioN without <root>/dev/uioN is not 'bound' yet."""
    nic = tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="uio_hv_generic")
    tree.attach_uio(nic, nmaps=5, dev_node=False)
    with pytest.raises(BusError, match="is udev/devtmpfs creating"):
        bind_uio(Bus(tree.root), NIC_GUID, system=QuietSystem(), timeout=0.1)


def test_bind_without_uio_module(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.add_driver("hv_netvsc")
    tree.add_device(NIC_CLASS, NIC_GUID, driver="hv_netvsc")
    with pytest.raises(BusError, match="modprobe uio_hv_generic"):
        bind_uio(Bus(tmp_path), NIC_GUID, system=QuietSystem(), timeout=0.1)


def test_bind_refuses_unsafe_and_force_overrides(tree: SysfsTree) -> None:
    nic = tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    tree.add_net(nic, "eth0")
    bus = Bus(tree.root)
    with FakeKernel(tree, id_tables=KERNEL_IDS) as k:
        with pytest.raises(UnsafeDeviceError, match="--force"):
            bind_uio(bus, NIC_GUID, system=BusySystem(), timeout=5)
        assert k.log == [] and bus.device(NIC_GUID).driver == "hv_netvsc"
        dev = bind_uio(bus, NIC_GUID, force=True, system=BusySystem(), timeout=5)
    assert dev.driver == "uio_hv_generic"


def test_unbind_returns_to_kernel_driver(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="hv_netvsc")
    bus = Bus(tree.root)
    with FakeKernel(tree, id_tables=KERNEL_IDS) as k:
        bind_uio(bus, NIC_GUID, system=QuietSystem(), timeout=5)
        dev = unbind_uio(bus, NIC_GUID, timeout=5)
        assert (dev.driver, dev.uio, dev.driver_override) == ("hv_netvsc", None, None)
        assert not (tree.root / "dev/uio0").exists()
        assert ("hv_netvsc", "bind", NIC_GUID) in k.log
        n = len(k.log)
        unbind_uio(bus, NIC_GUID, timeout=5)  # idempotent: already with its kernel driver
        assert len(k.log) == n


def test_unbind_class_without_kernel_driver_stays_unbound(tree: SysfsTree) -> None:
    tree.add_device(FCOPY_CLASS, FCOPY_GUID)
    bus = Bus(tree.root)
    with FakeKernel(tree):
        bind_uio(bus, FCOPY_GUID, system=QuietSystem(), timeout=5)
        dev = unbind_uio(bus, FCOPY_GUID, timeout=5)
    assert dev.driver is None and dev.driver_override is None


def test_unbind_kernel_module_missing(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.add_driver("uio_hv_generic")
    dev = tree.add_device(SCSI_CLASS, SCSI_GUID, driver="uio_hv_generic")
    tree.attach_uio(dev)
    with FakeKernel(tree), pytest.raises(BusError, match="modprobe hv_storvsc"):
        unbind_uio(Bus(tmp_path), SCSI_GUID, timeout=5)


def test_write_errnos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "bind"
    f.write_text("")

    def fail(code: int) -> None:
        def write(fd: int, data: bytes) -> int:
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, "write", write)

    fail(errno.EBUSY)
    write_attr(f, "x", ok_errnos=(errno.EBUSY,))  # kernel's "already bound": success
    with pytest.raises(BusError) as ei:
        write_attr(f, "x", ok_errnos=(errno.EEXIST,))
    assert ei.value.errno == errno.EBUSY and ei.value.path == str(f)
    fail(errno.EACCES)
    with pytest.raises(PrivilegeError, match="Run as root"):
        write_attr(f, "x")
    monkeypatch.undo()
    with pytest.raises(BusError, match="does-not-exist"):
        write_attr(tmp_path / "does-not-exist", "x")  # never creates attribute files


def test_bind_permission_error(tree: SysfsTree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID, driver="hv_netvsc")
    real_open = os.open

    def deny(path: str | os.PathLike[str], flags: int, *a: int) -> int:
        if flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PrivilegeError, match="Run as root"):
        bind_uio(Bus(tree.root), NIC_GUID, system=QuietSystem(), timeout=0.1)

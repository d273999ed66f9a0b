"""check_safe_to_take: refuse mounted disks, swap, addressed or routed NICs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sysfs_fixtures import NIC_CLASS, SCSI_CLASS, SysfsTree

from uvmbus.bus import BlockUser, Bus, LiveSystem, check_safe_to_take
from uvmbus.bus.safety import _read_swaps
from uvmbus.errors import UnsafeDeviceError

NIC_GUID = "aaaa1111-0000-4000-8000-000000000001"
SCSI_GUID = "bbbb1111-0000-4000-8000-000000000003"


class FakeSystem:
    def __init__(self, users: list[BlockUser] | None = None,
                 addrs: dict[str, list[str]] | None = None,
                 default_ifs: set[str] | None = None, broken: bool = False):
        self.users = users or []
        self.addrs = addrs or {}
        self.default_ifs = default_ifs or set()
        self.broken = broken

    def block_users(self) -> list[BlockUser]:
        if self.broken:
            raise OSError("psutil exploded")
        return self.users

    def interface_addresses(self, ifname: str) -> list[str]:
        if self.broken:
            raise OSError("netlink unavailable")
        return self.addrs.get(ifname, [])

    def default_route_interfaces(self) -> set[str]:
        return self.default_ifs


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    t = SysfsTree(tmp_path)
    scsi = t.add_device(SCSI_CLASS, SCSI_GUID, driver="hv_storvsc")
    t.add_disk(scsi, "sdq", partitions=("sdq1", "sdq2"), holders={"dm-7": "vg-data"},
               devnum=(65, 0))
    t.add_disk(scsi, "sdr", lun=1, devnum=(65, 16))
    nic = t.add_device(NIC_CLASS, NIC_GUID, driver="hv_netvsc")
    t.add_net(nic, "simeth0")
    return t


def check(tree: SysfsTree, ref: str, system: FakeSystem) -> None:
    bus = Bus(tree.root)
    check_safe_to_take(bus, bus.device(ref), system=system)


def test_idle_devices_are_safe(tree: SysfsTree) -> None:
    sys_ = FakeSystem(users=[BlockUser("/dev/sdz1", "/srv"), BlockUser("tmpfs", "/tmp")],
                      addrs={"eth9": ["10.0.0.1"]}, default_ifs={"eth9"})
    check(tree, SCSI_GUID, sys_)
    check(tree, NIC_GUID, sys_)


@pytest.mark.parametrize("user,needle", [
    (BlockUser("/dev/sdq", "/data"), "/dev/sdq is mounted on /data"),
    (BlockUser("/dev/sdq2", "/"), "/dev/sdq2 is mounted on /"),
    (BlockUser("/dev/sdr", "/mnt/b"), "disk sdr"),
    (BlockUser("/dev/dm-7", "/var"), "dm-7"),
    (BlockUser("/dev/mapper/vg-data", "/home"), "vg-data is mounted on /home"),
    (BlockUser("/dev/root", "/", devnum=os.makedev(65, 1)), "/dev/root is mounted on /"),
    (BlockUser("/dev/sdq1", "swap"), "/dev/sdq1 is used as swap"),
])
def test_disk_in_use_refused(tree: SysfsTree, user: BlockUser, needle: str) -> None:
    with pytest.raises(UnsafeDeviceError) as ei:
        check(tree, SCSI_GUID, FakeSystem(users=[user]))
    msg = str(ei.value)
    assert needle in msg
    assert "--force" in msg and "OS disk" in msg and SCSI_GUID in msg


def test_similar_names_do_not_match(tree: SysfsTree) -> None:
    """sdq10 is not a partition of this controller's sdq; /dev/sdqa is another disk."""
    check(tree, SCSI_GUID, FakeSystem(users=[BlockUser("/dev/sdqa", "/x"),
                                             BlockUser("/dev/dm-70", "/y"),
                                             BlockUser("/dev/root", "/", os.makedev(8, 1))]))


@pytest.mark.parametrize("system,needle", [
    (FakeSystem(addrs={"simeth0": ["fe80::1"]}), "simeth0 has addresses fe80::1"),
    (FakeSystem(addrs={"simeth0": ["192.0.2.7", "2001:db8::7"]}), "192.0.2.7, 2001:db8::7"),
    (FakeSystem(default_ifs={"simeth0"}), "simeth0 carries a default route"),
])
def test_nic_in_use_refused(tree: SysfsTree, system: FakeSystem, needle: str) -> None:
    with pytest.raises(UnsafeDeviceError, match="management NIC") as ei:
        check(tree, NIC_GUID, system)
    assert needle in str(ei.value)


def test_checks_fail_closed(tree: SysfsTree) -> None:
    with pytest.raises(UnsafeDeviceError, match="could not list mounted filesystems"):
        check(tree, SCSI_GUID, FakeSystem(broken=True))
    with pytest.raises(UnsafeDeviceError, match="could not read the addresses of simeth0"):
        check(tree, NIC_GUID, FakeSystem(broken=True))


def test_device_without_children_needs_no_queries(tree: SysfsTree) -> None:
    tree.add_device("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")
    check_safe_to_take(Bus(tree.root), "kvp", system=FakeSystem(broken=True))  # by reference


def test_live_system_on_simulated_names(tree: SysfsTree) -> None:
    """Simulated names queried against the real kernel: no such interface → no addresses."""
    live = LiveSystem()
    assert live.interface_addresses("simeth0") == []
    assert isinstance(live.default_route_interfaces(), set)
    assert all(isinstance(u, BlockUser) for u in live.block_users())
    check_safe_to_take(Bus(tree.root), Bus(tree.root).device(NIC_GUID))


def test_live_system_sees_loopback() -> None:
    assert "127.0.0.1" in LiveSystem().interface_addresses("lo")


def test_read_swaps(tmp_path: Path) -> None:
    p = tmp_path / "swaps"
    p.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
                 "/dev/sdq2                               partition\t1048572\t\t0\t\t-2\n"
                 "/swap\\040file                          file\t\t1024\t\t0\t\t-3\n")
    users = _read_swaps(p)
    assert [(u.device, u.where) for u in users] == [("/dev/sdq2", "swap"), ("/swap file", "swap")]
    assert _read_swaps(tmp_path / "absent") == []

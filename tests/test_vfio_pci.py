"""PCI discovery, vfio-pci binding and the CLI on fake sysfs trees (tests/pci_fixtures.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pci_fixtures import FakePciKernel, PciTree

from uvmbus.bus import BlockUser
from uvmbus.errors import BusError, ConfigError, NotFound, UnsafeDeviceError
from uvmbus.vfio import PciBus, bind_vfio, guid_domain, normalize_bdf, unbind_vfio

GUID = "7d3c7870-1a2b-4c5d-8e9f-0123456789ab"
VPCI = "1a2b:00:00.0"


class NoUsers:
    def __init__(self, users: list[BlockUser] | None = None) -> None:
        self.users = users or []

    def block_users(self) -> list[BlockUser]:
        return self.users

    def interface_addresses(self, ifname: str) -> list[str]:
        return []

    def default_route_interfaces(self) -> set[str]:
        return set()


@pytest.fixture
def tree(tmp_path: Path) -> PciTree:
    t = PciTree(tmp_path)
    t.add_driver("nvme")
    t.add_driver("vfio-pci")
    t.add_function("0000:00:00.0", vendor=0x8086, device=0x29c0, cls=0x060000, group=0)
    t.add_function("0000:00:04.0", group=3, driver="nvme")
    t.add_function("0000:00:1f.0", vendor=0x8086, device=0x2918, cls=0x060100, group=4)
    t.add_function("0000:00:1f.2", vendor=0x8086, device=0x2922, cls=0x010601, group=4,
                   driver="ahci")
    t.add_function(VPCI, vendor=0x1414, device=0xb111, group=None, driver="nvme",
                   vmbus_parent=GUID)
    return t


def test_addresses_and_domains() -> None:
    assert normalize_bdf("00:04.0") == "0000:00:04.0"
    assert normalize_bdf("7870:00:00.0") == "7870:00:00.0"
    assert normalize_bdf("0000:00:04.8") is None
    assert normalize_bdf("storvsc") is None
    assert guid_domain("{7d3c7870-1A2B-4c5d-8e9f-0123456789ab}") == 0x1A2B


def test_discovery(tree: PciTree) -> None:
    bus = PciBus(tree.root)
    fns = bus.functions()
    assert [f.name for f in fns] == ["0000:00:00.0", "0000:00:04.0", "0000:00:1f.0",
                                     "0000:00:1f.2", VPCI]
    nvme = bus.function("00:04.0")
    assert (nvme.vendor_id, nvme.device_id_num, nvme.class_name) == (0x1B36, 0x0010, "nvme")
    assert nvme.iommu_group == 3 and nvme.driver == "nvme" and nvme.vmbus_parent is None
    sata = bus.function("0000:00:1f.2")
    assert sata.group_members() == ["0000:00:1f.0", "0000:00:1f.2"]
    v = bus.function(GUID.upper())
    assert v.name == VPCI and v.vmbus_parent == GUID and v.iommu_group is None
    assert guid_domain(GUID) == v.domain
    assert [f.name for f in bus.functions(cls="nvme")] == ["0000:00:04.0", VPCI]
    with pytest.raises(ConfigError, match="2 PCI functions of class 'nvme'"):
        bus.function("nvme")
    with pytest.raises(NotFound, match="no PCI function 0000:00:05.0"):
        bus.function("0000:00:05.0")
    d = v.to_dict()
    assert d["vmbus_parent"] == GUID and d["class"] == "010802"


def test_bind_and_unbind(tree: PciTree) -> None:
    bus = PciBus(tree.root)
    with FakePciKernel(tree, native={"0000:00:04.0": "nvme"}) as k:
        fn = bind_vfio(bus, "0000:00:04.0", system=NoUsers(), timeout=5)
        assert fn.driver == "vfio-pci" and fn.driver_override == "vfio-pci"
        assert fn.vfio_group_path == tree.root / "dev/vfio/3" and not fn.noiommu
        n = len(k.log)
        bind_vfio(bus, fn, system=NoUsers(), timeout=5)        # idempotent: no writes
        assert len(k.log) == n
        assert ("nvme", "unbind", "0000:00:04.0") in k.log
        unbind_vfio(bus, fn, timeout=5)
        assert fn.driver == "nvme" and fn.driver_override is None
        assert not (tree.root / "dev/vfio/3").exists()


def test_bind_refuses_a_mounted_disk(tree: PciTree) -> None:
    tree.add_disk(VPCI, "nvme0n1")
    bus = PciBus(tree.root)
    users = NoUsers([BlockUser("/dev/nvme0n1", "/")])
    with FakePciKernel(tree):
        with pytest.raises(UnsafeDeviceError, match="nvme0n1.*mounted on /"):
            bind_vfio(bus, GUID, system=users, timeout=5)
        assert bus.function(VPCI).driver == "nvme"


def test_bind_without_vfio_driver_says_what_to_load(tmp_path: Path) -> None:
    t = PciTree(tmp_path)
    t.add_function("0000:00:04.0", group=None)
    with pytest.raises(BusError, match="enable_unsafe_noiommu_mode=1"):
        bind_vfio(PciBus(tmp_path), "0000:00:04.0", system=NoUsers(), timeout=1)


def test_noiommu_group_node(tmp_path: Path) -> None:
    t = PciTree(tmp_path, noiommu=True)
    t.add_driver("vfio-pci")
    t.add_function("0000:00:04.0", group=0)
    with FakePciKernel(t):
        fn = bind_vfio(PciBus(tmp_path), "0000:00:04.0", system=NoUsers(), timeout=5)
    assert fn.noiommu and fn.vfio_group_path == tmp_path / "dev/vfio/noiommu-0"


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UVMBUS_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "uvmbus", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli_list_and_bind(tree: PciTree) -> None:
    p = _cli(tree.root, "list", "--pci", "--root", str(tree.root))
    assert p.returncode == 0, p.stderr
    assert "0000:00:04.0" in p.stdout and GUID in p.stdout and "nvme" in p.stdout
    p = _cli(tree.root, "list", "--json", "--root", str(tree.root))
    rows = json.loads(p.stdout)
    pci = [r for r in rows if r["bus"] == "pci"]
    assert {r["address"] for r in pci} >= {"0000:00:04.0", VPCI}
    with FakePciKernel(tree, native={"0000:00:04.0": "nvme"}):
        p = _cli(tree.root, "bind", "0000:00:04.0", "--root", str(tree.root))
        assert p.returncode == 0, p.stderr
        assert "bound to vfio-pci" in p.stdout
        p = _cli(tree.root, "bind", "0000:00:04.0", "--persist", "--root", str(tree.root))
        assert p.returncode != 0 and "driverctl" in p.stderr
        p = _cli(tree.root, "unbind", "0000:00:04.0", "--root", str(tree.root))
        assert p.returncode == 0, p.stderr
        assert "returned to nvme" in p.stdout

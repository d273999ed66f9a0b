"""Reading the device tree (uvmbus.bus.devices) from fake trees and from the real /sys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sysfs_fixtures import FCOPY_CLASS, NIC_CLASS, PAGE, SCSI_CLASS, MiB, SysfsTree

from uvmbus.bus import Bus, ChannelInfo, MapInfo, VmbusDevice
from uvmbus.errors import BusError, ConfigError, NotFound

NIC_GUID = "aaaa1111-0000-4000-8000-000000000001"
NIC2_GUID = "aaaa2222-0000-4000-8000-000000000002"
SCSI_GUID = "bbbb1111-0000-4000-8000-000000000003"
FCOPY_GUID = "eb765408-105f-49b6-b4aa-c123b64d17d4"


@pytest.fixture(params=[True, False], ids=["symlinked", "plain-dirs"])
def tree(tmp_path: Path, request: pytest.FixtureRequest) -> SysfsTree:
    t = SysfsTree(tmp_path, symlink_devices=request.param)
    for d in ("hv_netvsc", "hv_storvsc", "uio_hv_generic"):
        t.add_driver(d)
    return t


def test_no_vmbus_is_empty(tmp_path: Path) -> None:
    assert Bus(tmp_path).devices() == []
    with pytest.raises(NotFound, match="no VMBus devices under"):
        Bus(tmp_path).device("netvsc")


def test_real_sys_read_only() -> None:
    """Must not raise on this machine whatever /sys contains (usually no vmbus at all)."""
    devs = Bus("/").devices()
    for d in devs:
        assert isinstance(d, VmbusDevice)
        json.dumps(d.to_dict())


def test_identity_and_brace_stripping(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID.upper(), relid=14, monitor_id=3, driver="hv_netvsc")
    [d] = Bus(tree.root).devices()
    assert d.device_id == NIC_GUID
    assert d.class_id == NIC_CLASS
    assert d.class_name == "netvsc"
    assert (d.relid, d.monitor_id, d.driver, d.uio, d.uio_dev_path) == (14, 3, "hv_netvsc",
                                                                         None, None)
    assert d.driver_override is None  # "(null)"


def test_unmonitored_and_unbound(tree: SysfsTree) -> None:
    tree.add_device(FCOPY_CLASS, FCOPY_GUID, relid=20, driver_override=None)
    d = Bus(tree.root).device(FCOPY_GUID)
    assert (d.monitor_id, d.driver, d.driver_override, d.class_name) == (None, None, None,
                                                                         "fcopy")


def test_unknown_class(tree: SysfsTree) -> None:
    tree.add_device("12345678-1234-1234-1234-123456789abc", NIC_GUID)
    assert Bus(tree.root).device(NIC_GUID).class_name == "unknown"


def test_garbage_is_reported_with_file(tree: SysfsTree) -> None:
    dev = tree.add_device(NIC_CLASS, NIC_GUID)
    (dev.path / "id").write_text("twelve\n")
    (dev.path / "class_id").write_text("{not-a-guid}\n")
    d = Bus(tree.root).device(NIC_GUID)
    with pytest.raises(BusError, match=r"/id: expected a number, got 'twelve'"):
        _ = d.relid
    with pytest.raises(BusError, match=r"class_id: expected a GUID") as ei:
        _ = d.class_id
    assert ei.value.path is not None and ei.value.path.endswith("class_id")


class TestRefs:
    @pytest.fixture
    def bus(self, tree: SysfsTree) -> Bus:
        tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1)
        tree.add_device(NIC_CLASS, NIC2_GUID, monitor_id=2)
        tree.add_device(SCSI_CLASS, SCSI_GUID, monitor_id=3)
        return Bus(tree.root)

    def test_full_guid_any_form(self, bus: Bus) -> None:
        assert bus.device(NIC_GUID).device_id == NIC_GUID
        assert bus.device("{" + NIC_GUID.upper() + "}").device_id == NIC_GUID

    def test_unique_prefix(self, bus: Bus) -> None:
        assert bus.device("aaaa2").device_id == NIC2_GUID
        assert bus.device("BBBB").device_id == SCSI_GUID

    def test_short_name_single(self, bus: Bus) -> None:
        assert bus.device("storvsc").device_id == SCSI_GUID
        assert bus.device("scsi").device_id == SCSI_GUID  # alias
        assert bus.device(SCSI_CLASS).device_id == SCSI_GUID  # class GUID

    def test_ambiguous_lists_candidates(self, bus: Bus) -> None:
        with pytest.raises(ConfigError, match="ambiguous") as ei:
            bus.device("netvsc")
        assert NIC_GUID in str(ei.value) and NIC2_GUID in str(ei.value)
        with pytest.raises(ConfigError, match="ambiguous"):
            bus.device("aaaa")

    def test_not_found_lists_available(self, bus: Bus) -> None:
        with pytest.raises(NotFound) as ei:
            bus.device("kvp")
        assert SCSI_GUID in str(ei.value) and "storvsc" in str(ei.value)
        with pytest.raises(NotFound):
            bus.device("cccc")

    def test_empty_ref(self, bus: Bus) -> None:
        with pytest.raises(ConfigError):
            bus.device("  ")


def test_channels_and_ring_sizes(tree: SysfsTree) -> None:
    dev = tree.add_device(NIC_CLASS, NIC_GUID, relid=14, monitor_id=7)
    tree.attach_uio(dev, ring_size=2 * MiB + PAGE, nmaps=5)
    tree.add_channel(dev, 31, 2, ring_size=2 * MiB)
    tree.add_channel(dev, 30, 1, monitor_id=9, ring_size=2 * MiB)
    tree.add_channel(dev, 32, 3)  # offered, not opened: no ring file yet
    (dev.path / "channels" / "not-a-relid").mkdir()
    chans = Bus(tree.root).device(NIC_GUID).channels()
    assert [c.relid for c in chans] == [14, 30, 31, 32]
    ring0 = str(tree.vmbus / "devices" / NIC_GUID / "channels/14/ring")
    assert chans[0] == ChannelInfo(14, 0, 7, ring0, 2 * MiB + PAGE)
    assert (chans[1].subchannel_id, chans[1].monitor_id, chans[1].ring_size_per_direction) == (
        1, 9, 2 * MiB)
    assert chans[2].monitor_id is None
    assert (chans[3].ring_path, chans[3].ring_size_per_direction) == (None, None)


def test_channels_absent(tree: SysfsTree) -> None:
    dev = tree.add_device(SCSI_CLASS, SCSI_GUID)
    shutil.rmtree(dev.path / "channels")
    assert Bus(tree.root).device(SCSI_GUID).channels() == []


def test_nic_maps_with_gpadls(tree: SysfsTree) -> None:
    dev = tree.add_device(NIC_CLASS, NIC_GUID, monitor_id=1, driver="uio_hv_generic")
    name = tree.attach_uio(dev, nmaps=5, gpadls=(925200, 925203))
    d = Bus(tree.root).device(NIC_GUID)
    assert d.uio == name == "uio0"
    assert d.uio_dev_path == str(tree.root / "dev/uio0")
    maps = d.maps()
    assert [m.index for m in maps] == [0, 1, 2, 3, 4]
    assert [m.name for m in maps] == ["txrx_rings", "int_page", "monitor_page",
                                      "recv:925200", "send:925203"]
    assert [m.gpadl for m in maps] == [None, None, None, 925200, 925203]
    assert maps[3] == MapInfo(3, "recv:925200", 31 * MiB, 0, 0x130000000, 925200)
    assert d.primary_ring_size == 2 * MiB + PAGE


def test_non_nic_has_three_maps(tree: SysfsTree) -> None:
    dev = tree.add_device(FCOPY_CLASS, FCOPY_GUID, driver="uio_hv_generic")
    tree.attach_uio(dev, ring_size=20 * 1024, nmaps=3)
    d = Bus(tree.root).device("fcopy")
    assert [m.name for m in d.maps()] == ["txrx_rings", "int_page", "monitor_page"]
    assert all(m.gpadl is None for m in d.maps())
    assert d.primary_ring_size == 20 * 1024


def test_maps_fallback_to_device_uio_dir(tree: SysfsTree) -> None:
    dev = tree.add_device(FCOPY_CLASS, FCOPY_GUID, driver="uio_hv_generic")
    name = tree.attach_uio(dev, nmaps=3)
    (tree.root / "sys/class/uio" / name).unlink()
    assert len(Bus(tree.root).device(FCOPY_GUID).maps()) == 3


def test_bad_gpadl_name(tree: SysfsTree) -> None:
    dev = tree.add_device(NIC_CLASS, NIC_GUID, driver="uio_hv_generic")
    tree.attach_uio(dev, nmaps=5)
    (dev.path / "uio/uio0/maps/map3/name").write_text("recv:banana\n")
    with pytest.raises(BusError, match=r"map3/name: expected a number, got 'banana'"):
        Bus(tree.root).device(NIC_GUID).maps()


def test_unbound_has_no_maps(tree: SysfsTree) -> None:
    tree.add_device(NIC_CLASS, NIC_GUID)
    d = Bus(tree.root).device(NIC_GUID)
    assert d.maps() == [] and d.primary_ring_size is None


def test_net_and_block_children(tree: SysfsTree) -> None:
    nic = tree.add_device(NIC_CLASS, NIC_GUID, driver="hv_netvsc")
    tree.add_net(nic, "simeth1")
    scsi = tree.add_device(SCSI_CLASS, SCSI_GUID, driver="hv_storvsc")
    tree.add_disk(scsi, "sdb", partitions=("sdb1", "sdb2"), lun=0)
    tree.add_disk(scsi, "sdc", lun=1)
    bus = Bus(tree.root)
    assert bus.device(NIC_GUID).net_interfaces() == ["simeth1"]
    assert bus.device(NIC_GUID).block_devices() == []
    assert bus.device(SCSI_GUID).block_devices() == ["sdb", "sdc"]
    assert bus.device(SCSI_GUID).net_interfaces() == []


def test_nested_nvme_disk_found(tree: SysfsTree) -> None:
    """A disk not under a block/ folder (NVMe below a vPCI device) is still found."""
    dev = tree.add_device("44c4f61d-4444-4400-9d52-802e27ede19f", NIC_GUID)
    ns = dev.path / "pci1234:00/1234:00:00.0/nvme/nvme0/nvme0n1"
    (ns / "queue").mkdir(parents=True)
    (ns / "dev").write_text("259:0\n")
    assert Bus(tree.root).device("pci").block_devices() == ["nvme0n1"]


def test_to_dict(tree: SysfsTree) -> None:
    dev = tree.add_device(NIC_CLASS, NIC_GUID, relid=14, monitor_id=1, driver="uio_hv_generic")
    tree.attach_uio(dev, nmaps=5)
    tree.add_channel(dev, 30, 1, ring_size=2 * MiB)
    d = Bus(tree.root).device(NIC_GUID).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"device_id", "class_id", "class", "driver", "uio", "channels", "relid",
            "monitor_id"} <= d.keys()
    assert (d["device_id"], d["class"], d["driver"], d["uio"], d["relid"]) == (
        NIC_GUID, "netvsc", "uio_hv_generic", "uio0", 14)
    assert [c["relid"] for c in d["channels"]] == [14, 30]
    assert d["channels"][1]["ring_size_per_direction"] == 2 * MiB


def test_devices_sorted_and_equal(tree: SysfsTree) -> None:
    tree.add_device(SCSI_CLASS, SCSI_GUID)
    tree.add_device(NIC_CLASS, NIC_GUID)
    bus = Bus(tree.root)
    assert [d.device_id for d in bus.devices()] == [NIC_GUID, SCSI_GUID]
    assert bus.devices()[0] == bus.device(NIC_GUID)
    assert len({*bus.devices(), *bus.devices()}) == 2

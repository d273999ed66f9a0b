"""The simulated tree against the kernel's sources (issue 9.5): drivers/hv/vmbus_drv.c,
drivers/uio/uio.c, drivers/uio/uio_hv_generic.c.  Each test names the source it checks."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.bus import Bus
from uvmbus.channel import open_device
from uvmbus.ring import PKT_COMP

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    with run_sim(tmp_path_factory.mktemp("fidelity"), "--kernel", "6.16", "--no-ic", "--echo", "1",
                 "--nic", "1") as s:
        for d in s.devices:
            s.bind(d["device_id"])
        yield s


def test_map_addresses_are_64_bit_kernel_addresses(sim: SimProcess) -> None:
    """uio.c map_addr_show prints ``%pa``: 0x + 16 hex digits.  uio_hv_generic publishes the
    vzalloc() address of the NIC buffers (x86-64 vmalloc area) as maps 3/4's addr."""
    nic = Bus(sim.root).device(sim.device("netvsc")["device_id"])
    upath = nic.uio_sysfs_path
    assert upath is not None
    for k in range(5):
        text = (upath / "maps" / f"map{k}" / "addr").read_text()
        assert re.fullmatch(r"0x[0-9a-f]{16}\n", text), (k, text)
        if k >= 3:
            assert int(text, 16) >> 40 == 0xFFFFC9, text      # vmalloc area


def test_devices_are_symlinks_into_sys_devices(sim: SimProcess) -> None:
    """vmbus_device_register: the device lives under the ACPI VMBus device (Gen2:
    /sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/<guid>); the bus lists links."""
    r = sim.root
    for d in sim.devices:
        link = r / "sys/bus/vmbus/devices" / d["device_id"]
        assert link.is_symlink()
        real = Path(os.path.realpath(link))
        assert real == (r / "sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00"
                        / d["device_id"]).resolve()
        assert Path(os.path.realpath(real / "subsystem")) == (r / "sys/bus/vmbus").resolve()
        drv = real / "driver"
        assert Path(os.path.realpath(drv)) == (r / "sys/bus/vmbus/drivers/uio_hv_generic").resolve()
        back = r / "sys/bus/vmbus/drivers/uio_hv_generic" / d["device_id"]
        assert Path(os.path.realpath(back)) == real
    assert (r / "sys/bus/vmbus/drivers_autoprobe").read_text() == "1\n"
    mod = r / "sys/bus/vmbus/drivers/uio_hv_generic/module"
    assert mod.is_symlink() and Path(os.path.realpath(mod)) == (r / "sys/module/uio_hv_generic").resolve()
    # the guest's bus layer reads both shapes through the links
    bus = Bus(r)
    nic = bus.device(sim.device("netvsc")["device_id"])
    assert nic.driver == "uio_hv_generic" and nic.uio is not None and len(nic.maps()) == 5
    assert {d.name for d in bus.devices()} == {d["device_id"] for d in sim.devices}


def test_device_attributes_of_vmbus_drv(sim: SimProcess) -> None:
    """vmbus_dev_attrs / vmbus_chan_attrs (drivers/hv/vmbus_drv.c) with their formats."""
    e = sim.device("echo")
    d = sim.root / "sys/bus/vmbus/devices" / e["device_id"]
    relid = e["relid"]
    assert (d / "state").read_text() == "2\n"                 # CHANNEL_OPEN_STATE: not open
    assert (d / "channel_vp_mapping").read_text() == f"{relid}:0\n"
    modalias = (d / "modalias").read_text().strip()
    assert (d / "uevent").read_text() == f"DRIVER=uio_hv_generic\nMODALIAS={modalias}\n"
    for side in ("server", "client"):                         # monitored: visible
        for what in ("pending", "latency", "conn_id"):
            assert re.fullmatch(r"\d+\n", (d / f"{side}_monitor_{what}").read_text())
    for side in ("out", "in"):                                # no ring before open: no value
        for what in ("intr_mask", "read_index", "write_index", "read_bytes_avail", "write_bytes_avail"):
            assert (d / f"{side}_{what}").read_text() == ""
    c = d / "channels" / str(relid)
    for what in ("interrupts", "events", "intr_in_full", "intr_out_empty", "out_full_first",
                 "out_full_total", "pending", "latency"):
        assert re.fullmatch(r"\d+\n", (c / what).read_text()), what
    for what in ("out_mask", "in_mask", "read_avail", "write_avail"):
        assert (c / what).exists()


def test_primary_ring_exists_from_bind_and_live_values_follow(sim: SimProcess) -> None:
    """uio_hv_generic's probe makes the primary's ``ring`` visible (hv_create_ring_sysfs);
    before the open it is not the ring (the kernel's mmap fails with ENODEV); after the open it
    is, live attributes follow the ring, and the last close takes it back."""
    e = sim.device("echo")
    d = sim.root / "sys/bus/vmbus/devices" / e["device_id"]
    ring = d / "channels" / str(e["relid"]) / "ring"
    closed = sim.root / "sim/rings" / f"{e['relid']}.closed"
    assert ring.is_file() and os.stat(ring).st_mode & 0o777 == 0o600
    assert os.stat(ring).st_ino == os.stat(closed).st_ino and os.stat(ring).st_size > 0
    with open_device(e["device_id"], sim.root) as cd:
        backing = sim.root / "sim/rings" / f"{e['relid']}.ring"
        assert os.stat(ring).st_ino == os.stat(backing).st_ino          # now the ring itself
        assert cd.primary.request(b"ping", timeout=10).type == PKT_COMP
        deadline = time.monotonic() + 10
        while (d / "state").read_text() != "3\n" or int((d / "out_write_index").read_text() or 0) == 0:
            assert time.monotonic() < deadline, (d / "out_write_index").read_text()
            time.sleep(0.05)
        w = int((d / "out_write_index").read_text())
        assert int((d / "out_read_index").read_text()) == w          # the host consumed it
        assert int((d / "out_read_bytes_avail").read_text()) == 0
        assert int((d / "channels" / str(e["relid"]) / "events").read_text()) >= 0
    deadline = time.monotonic() + 10
    while (d / "state").read_text() != "2\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ring.is_file() and os.stat(ring).st_ino == os.stat(closed).st_ino
    assert (d / "out_write_index").read_text() == ""

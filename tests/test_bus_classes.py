"""Class GUID table (uvmbus.bus.classes)."""

from __future__ import annotations

import pytest

from uvmbus.bus import CLASSES, lookup_class, normalize_guid
from uvmbus.bus.classes import DRIVER_MODULES

NIC = "f8615163-df3e-46c5-913f-f2d2f965ed0e"


@pytest.mark.parametrize("text", [
    "{f8615163-df3e-46c5-913f-f2d2f965ed0e}\n",
    "F8615163-DF3E-46C5-913F-F2D2F965ED0E",
    "  {F8615163-df3e-46c5-913f-f2d2f965ed0e}  ",
])
def test_normalize_guid_strips_braces_and_case(text: str) -> None:
    assert normalize_guid(text) == NIC


@pytest.mark.parametrize("text", ["", "{}", "netvsc", "f8615163-df3e-46c5-913f-f2d2f965ed0",
                                  "f8615163df3e46c5913ff2d2f965ed0e", "{f8615163-df3e-46c5-913f"])
def test_normalize_guid_rejects_garbage(text: str) -> None:
    assert normalize_guid(text) is None


def test_table_is_consistent() -> None:
    names = [n for c in CLASSES for n in (c.name, *c.aliases)]
    assert len(names) == len(set(names)), "short names and aliases must be unique"
    guids = [c.guid for c in CLASSES]
    assert len(guids) == len(set(guids))
    for c in CLASSES:
        assert normalize_guid(c.guid) == c.guid
        for d in c.kernel_drivers:
            assert d in DRIVER_MODULES, f"no module hint for {d}"


@pytest.mark.parametrize("key,name", [
    (NIC, "netvsc"),
    ("{BA6163D9-04A1-4D29-B605-72E2FFB1DC7F}", "storvsc"),
    ("netvsc", "netvsc"),
    ("NetVSC", "netvsc"),
    ("blkvsc", "ide"),
    ("imc", "vmbfs"),
    ("rdma", "nd"),
    ("vpci", "pci"),
    ("34d14be3-dee4-41c8-9ae7-6b174977c192", "fcopy"),
    ("8b60ccf6-709f-4c11-90b5-229c959a9e6a", "uart"),
    ("427b03e7-4ceb-4286-b5fc-486f4a1dd439", "crashdump"),
])
def test_lookup(key: str, name: str) -> None:
    cls = lookup_class(key)
    assert cls is not None and cls.name == name


def test_lookup_unknown() -> None:
    assert lookup_class("00000000-0000-0000-0000-000000000000") is None
    assert lookup_class("nosuchclass") is None


@pytest.mark.parametrize("name,driver", [
    ("netvsc", "hv_netvsc"), ("storvsc", "hv_storvsc"), ("ide", "hv_storvsc"),
    ("fc", "hv_storvsc"), ("shutdown", "hv_utils"), ("timesync", "hv_utils"),
    ("heartbeat", "hv_utils"), ("kvp", "hv_utils"), ("vss", "hv_utils"),
    ("balloon", "hv_balloon"), ("pci", "hv_pci"), ("keyboard", "hyperv_keyboard"),
    ("mouse", "hid_hyperv"), ("framebuffer", "hyperv_drm"),
    ("fcopy", None), ("uart", None), ("avma1", None),
])
def test_kernel_drivers(name: str, driver: str | None) -> None:
    cls = lookup_class(name)
    assert cls is not None and cls.kernel_driver == driver


def test_framebuffer_has_both_drivers() -> None:
    cls = lookup_class("framebuffer")
    assert cls is not None and set(cls.kernel_drivers) == {"hyperv_drm", "hyperv_fb"}


def test_pref_ring_sizes() -> None:
    fcopy, nic, uart = lookup_class("fcopy"), lookup_class("netvsc"), lookup_class("uart")
    assert fcopy and nic and uart
    assert (fcopy.pref_ring_size, nic.pref_ring_size, uart.pref_ring_size) == (0x4000, 0, 0x11000)


def test_simulator_echo_device_has_a_class_name(tmp_path) -> None:
    """`uvmbus list` names the simulator's echo device "echo", not "unknown"; its predicted
    ring size stays that of a class the kernel does not know."""
    from simhelpers import run_sim

    from uvmbus.bus import Bus
    from uvmbus.bus.classes import UNKNOWN_PREF_RING_SIZE

    echo = lookup_class("echo")
    assert echo is not None and echo.pref_ring_size == UNKNOWN_PREF_RING_SIZE and not echo.kernel_drivers
    with run_sim(tmp_path, "--echo", "1", "--no-ic") as sim:
        [dev] = Bus(sim.root).devices()
        assert dev.class_name == "echo"
        assert Bus(sim.root).device("echo").device_id == dev.device_id

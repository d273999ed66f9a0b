"""Kernel release → uio_hv_generic behaviour (uvmbus.bus.kernel)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uvmbus.bus import Bus, KernelQuirks, parse_release
from uvmbus.errors import ConfigError, KernelUnsupported, NotFound

MiB = 1024 * 1024


@pytest.mark.parametrize("release,version", [
    ("6.16.0-rc3+", (6, 16, 0)),
    ("5.15.0-1064-azure", (5, 15, 0)),
    ("6.12.57-cloud-amd64", (6, 12, 57)),
    ("6.9", (6, 9, 0)),
    ("6.16.0-uvmbus-sim\n", (6, 16, 0)),
    ("  6.18.1", (6, 18, 1)),
])
def test_parse_release(release: str, version: tuple[int, int, int]) -> None:
    assert parse_release(release) == version


@pytest.mark.parametrize("release", ["", "linux", "6", "v6.1", "6.x"])
def test_parse_release_garbage(release: str) -> None:
    with pytest.raises(ConfigError, match="cannot parse kernel release"):
        parse_release(release)


# release: (nonmonitored, signals, all_channels, may_set_mask, ring_exact, nic_only, hv_page)
TABLE = {
    "5.15.0-1064-azure":   (False, False, False, True, False, False, False),
    "6.9.12":              (False, False, False, True, False, False, False),
    "6.10.0":              (True, True, False, True, False, False, False),
    "6.12.10-cloud-amd64": (True, True, False, True, False, False, False),
    "6.12.57-cloud-amd64": (True, True, False, True, True, False, False),
    "6.14.2":              (True, True, False, True, False, True, False),
    "6.15.0":              (True, True, False, True, True, True, False),
    "6.16.0-rc3+":         (True, True, True, True, True, True, True),
    "6.18.0":              (True, True, True, False, True, True, True),
    "7.0.0":               (True, True, True, False, True, True, True),
}


@pytest.mark.parametrize("release", sorted(TABLE))
def test_quirk_table(release: str) -> None:
    q = KernelQuirks.from_release(release)
    got = (q.nonmonitored_supported, q.irqcontrol_signals_nonmonitored,
           q.irqcontrol_all_channels, q.kernel_may_set_mask, q.ring_file_size_exact,
           q.nic_only_buffer_maps, q.int_map_is_hv_page)
    assert got == TABLE[release]


def test_require_nonmonitored() -> None:
    KernelQuirks.from_release("6.10.0").require_nonmonitored("fcopy")
    with pytest.raises(KernelUnsupported, match=r"6\.10.*5\.15\.0-1064-azure"):
        KernelQuirks.from_release("5.15.0-1064-azure").require_nonmonitored("fcopy")


@pytest.mark.parametrize("release,cls,sub,expected", [
    ("6.9.0", "netvsc", False, 2 * MiB),
    ("6.9.0", "fcopy", False, 2 * MiB),
    ("6.12.0", "netvsc", False, 2 * MiB),
    ("6.12.0", "fcopy", False, 16 * 1024),
    ("6.12.0", None, False, 68 * 1024),
    ("6.16.0", "netvsc", False, 2 * MiB + 4096),
    ("6.16.0", "netvsc", True, 2 * MiB),
    ("6.16.0", "fcopy", False, 20 * 1024),
    ("6.16.0", "00000000-0000-0000-0000-000000000001", False, 72 * 1024),
])
def test_ring_size(release: str, cls: str | None, sub: bool, expected: int) -> None:
    assert KernelQuirks.from_release(release).ring_size(cls, subchannel=sub) == expected


def test_ring_size_64k_pages() -> None:
    q = KernelQuirks.from_release("6.16.0")
    assert q.ring_size("netvsc", page_size=65536) == 2 * MiB + 65536
    assert KernelQuirks.from_release("6.6.0").ring_size("netvsc", page_size=65536) == 32 * MiB


def test_ring_file_and_int_map_sizes() -> None:
    assert KernelQuirks.from_release("6.12.0").ring_file_size(20 * 1024) == 4 * MiB
    assert KernelQuirks.from_release("6.16.0").ring_file_size(20 * 1024) == 40 * 1024
    assert KernelQuirks.from_release("6.15.0").int_map_size(65536) == 65536
    assert KernelQuirks.from_release("6.16.0").int_map_size(65536) == 4096


def test_for_root_reads_osrelease(tmp_path: Path) -> None:
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.9.0-sim\n")
    q = Bus(tmp_path).kernel
    assert q.release == "6.9.0-sim" and not q.nonmonitored_supported


def test_for_simulated_root_without_osrelease(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="osrelease"):
        KernelQuirks.for_root(tmp_path)


def test_for_real_root() -> None:
    assert KernelQuirks.for_root("/").version == parse_release(os.uname().release)

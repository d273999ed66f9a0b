"""Byte-count parsing shared by the CLI and the simulator."""

import pytest

from uvmbus.errors import ConfigError
from uvmbus.units import parse_size


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("256M", 256 << 20),
    ("1G", 1 << 30), ("2TB", 2 << 40), ("0x1000", 4096), (" 8m ", 8 << 20), ("0", 0),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1.5G", "12Q", "-1", "one"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="disk size"):
        parse_size(text, what="disk size")


def test_parse_size_zero_can_be_refused():
    with pytest.raises(ConfigError, match="positive"):
        parse_size("0", what="disk size", allow_zero=False)

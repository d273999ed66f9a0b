"""The Wireshark/tshark Lua dissector for uvmbus traces (``uvmbus trace dissector``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["dissector_path"]


def dissector_path() -> Path:
    """Absolute path of the shipped Lua plugin (``tshark -X lua_script:PATH``)."""
    return Path(__file__).resolve().parent / "uvmbus.lua"

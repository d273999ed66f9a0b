"""Byte counts as people write them: ``4096``, ``4K``, ``256M``, ``1G`` (powers of 1024)."""

from __future__ import annotations

from uvmbus.errors import ConfigError

__all__ = ["parse_size"]

_SUFFIXES = "KMGT"


def parse_size(text: str, *, what: str = "size", allow_zero: bool = True) -> int:
    """``"1G"`` -> 1073741824. Accepts K/M/G/T (optionally followed by B or iB) and plain
    numbers (decimal or 0x...). Raises ConfigError naming ``what`` on anything else."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if s and s[-1] in _SUFFIXES:
        mult = 1024 ** (_SUFFIXES.index(s[-1]) + 1)
        s = s[:-1]
    try:
        value = int(s, 0) * mult
    except ValueError:
        raise ConfigError(f"{text!r} is not a {what} (e.g. 4096, 4K, 256M, 1G)") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{text!r}: a {what} must be {'>= 0' if allow_zero else 'positive'}")
    return value

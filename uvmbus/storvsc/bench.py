"""Moved to :mod:`uvmbus.block.bench` (one benchmark for every block driver); kept importable."""

from uvmbus.block.bench import PATTERNS, BenchResult, pread_reference, run_disk

__all__ = ["PATTERNS", "BenchResult", "run_disk", "pread_reference"]

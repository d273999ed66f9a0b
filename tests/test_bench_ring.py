"""`uvmbus bench ring` runs end to end and reports all three variants (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_ring_json_reports_each_variant_against_the_c_loop():
    out = subprocess.run(
        [sys.executable, "-m", "uvmbus", "bench", "ring", "--sizes", "64,1500", "--seconds", "0.2", "--json"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    data = json.loads(out)
    rows = {(r["variant"], r["size"]): r for r in data["results"]}
    assert set(rows) == {(v, s) for v in ("c-loop", "python-burst", "python-per-packet") for s in (64, 1500)}
    for (variant, _size), r in rows.items():
        assert r["packets"] > 0 and r["seconds"] > 0
        assert r["mpps"] == round(r["packets"] / r["seconds"] / 1e6, 4)
        if variant == "c-loop":
            assert r["ratio_to_c"] == 1.0


def test_bench_ring_table_output():
    out = subprocess.run(
        [sys.executable, "-m", "uvmbus", "bench", "ring", "--sizes", "64", "--seconds", "0.1"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    assert "c-loop" in out and "python-burst" in out and "vs C loop" in out

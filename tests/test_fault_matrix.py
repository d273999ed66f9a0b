"""The fault matrix (tests/faultmatrix.py): every simulator fault against the netvsc driver,
the storvsc driver, the blk export and the net bridge daemons ends in a bounded time with no effect, a
recovery, or a clear uvmbus error after which the component works again — never a hang."""

from __future__ import annotations

from pathlib import Path

import pytest
from faultmatrix import FAULTS, markdown, run_matrix

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_fault_matrix(tmp_path: Path) -> None:
    rows = run_matrix(tmp_path)
    table = markdown(rows)
    bad = [r for r in rows if r["outcome"].startswith("FAIL")]
    assert not bad, table + "\n" + "\n".join(f"{r['component']} / {r['fault']}: {r['first_error']}" for r in bad)
    comps = {r["component"] for r in rows}
    assert {"netvsc driver", "storvsc driver"} <= comps
    for comp in comps:
        assert {r["fault"] for r in rows if r["component"] == comp} == set(FAULTS)
    by = {(r["component"], r["fault"]): r for r in rows}
    # a broken ring index is named as such by both drivers
    for comp in ("netvsc driver", "storvsc driver"):
        for f in ("corrupt_index rx", "corrupt_index tx"):
            o = by[(comp, f)]
            assert o["outcome"] in ("error: RingCorrupt", "no effect", "recovered"), o
    assert by[("storvsc driver", "corrupt_index tx")]["outcome"] == "error: RingCorrupt"
    for r in rows:
        assert r["seconds"] < 60, r

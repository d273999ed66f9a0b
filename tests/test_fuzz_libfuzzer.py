"""The coverage-guided fuzzers of fuzz/ (libFuzzer + ASan/UBSan over the C fast path, host and
guest side; atheris over the Python parsers of host data), bounded: every harness builds,
replays its regression inputs and seed corpus, fuzzes a few seconds and must end without a
crash.  `make fuzz FUZZ_SECONDS=N` runs the same harnesses longer (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

import build as fuzz_build  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SECONDS = int(os.environ.get("UVMBUS_CI_FUZZ_SECONDS", "3"))


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    if fuzz_build.find_clang() is None:
        pytest.skip("clang not installed: run .ci/install-deps as root (clang-14, libclang-rt-14-dev)")
    p = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), "--seconds", str(SECONDS), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=800)
    assert p.stdout, p.stderr[-3000:]
    out = json.loads(p.stdout)
    return {r["harness"]: r for r in out["results"]}


def test_every_harness_runs_without_a_crash(results: dict[str, dict]) -> None:
    expected = set(fuzz_build.harnesses()) | {"py_parsers"}
    assert set(results) == expected
    for name, r in results.items():
        assert r["exit"] == 0, f"{name} crashed: inputs kept in {r['crashes']}, log {r.get('log')}"
        assert r["executions"] > (200 if name == "py_parsers" else 5000), r
        assert r["coverage_edges"] > 50, r


def test_guest_and_host_harnesses_reach_the_code_they_are_for(results: dict[str, dict]) -> None:
    """Each harness covers edges of the source it targets (per its coverage report), and the
    netvsc harness reaches the full-queue path an earlier outside probe never reached."""
    targets = {"ring_read": "ring.c", "ring_write": "ring.c", "netvsc_rx": "netvsc.c",
               "storvsc_reap": "storvsc.c", "netvsp_pump": "netvsp.c", "storvsp_pump": "storvsp.c"}
    for name, src in targets.items():
        hit, _total = map(int, results[name]["coverage"]["files"][src].split("/"))
        assert hit > 40, (name, results[name]["coverage"])
    report = (ROOT / results["netvsc_rx"]["coverage"]["report"]).read_text()
    line = next(ln for ln in report.splitlines() if " drop_oldest_data " in ln)
    assert not line.strip().startswith("0/"), line

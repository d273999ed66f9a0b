"""Build and run every fuzz harness for a bounded time; print executions and coverage.

    python fuzz/run.py [--seconds N] [--only NAME ...] [--json] [--nice N]

For each libFuzzer harness (fuzz/*.c, built by fuzz/build.py) and the atheris harness
(fuzz/py_parsers.py): the inputs of fuzz/regressions/NAME (crashes found earlier, kept
forever) and the seeds of fuzz/corpus/NAME run first, then the fuzzer runs for N seconds
with new inputs in build/fuzz/corpus/NAME.  A crash makes the run fail; its input is
copied to fuzz/regressions/NAME/ (commit it with the fix).  The coverage report of each
harness (edges per function, from libFuzzer's -print_coverage) is written to
build/fuzz/coverage/NAME.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "build" / "fuzz"
sys.path.insert(0, str(HERE))

import build as fuzz_build  # noqa: E402

PY_HARNESSES = {"py_parsers": HERE / "py_parsers.py"}

_FUNC = re.compile(r"^(UN)?COVERED_FUNC: hits: (\d+) edges: (\d+)/(\d+) (\S+) (\S+)")
_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")


def _command(name: str, exe: list[str], seconds: int, nice: int) -> tuple[list[str], Path]:
    work = OUT / "corpus" / name
    work.mkdir(parents=True, exist_ok=True)
    crashes = OUT / "crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    dirs = [work] + [d for d in (HERE / "regressions" / name, HERE / "corpus" / name) if d.is_dir()]
    cmd = ([] if nice <= 0 else ["nice", "-n", str(nice)]) + exe + [
        f"-max_total_time={seconds}", "-max_len=512", "-print_final_stats=1", "-timeout=20",
        "-rss_limit_mb=4096", "-print_coverage=1" if name not in PY_HARNESSES else "-print_pcs=0",
        f"-artifact_prefix={crashes}/", *map(str, dirs)]
    return cmd, crashes


def _coverage(name: str, lines: list[str]) -> dict[str, object]:
    funcs = []
    for line in lines:
        m = _FUNC.match(line)
        if m:
            funcs.append((m.group(5), m.group(6), int(m.group(3)), int(m.group(4))))
    report = OUT / "coverage" / f"{name}.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    native = [f for f in funcs if "/native/" in f[1]]
    by_file: dict[str, list[int]] = {}
    for _fn, loc, hit, total in native:
        src = loc.split("/native/")[-1].split(":")[0]
        acc = by_file.setdefault(src, [0, 0])
        acc[0] += hit
        acc[1] += total
    with report.open("w") as f:
        f.write(f"# coverage of fuzz harness {name}: edges covered / edges per function\n")
        for src, (hit, total) in sorted(by_file.items()):
            f.write(f"{src}: {hit}/{total} edges\n")
        f.write("\n")
        for fn, loc, hit, total in sorted(native, key=lambda x: x[1]):
            f.write(f"{hit:5d}/{total:<5d} {fn}  {loc.split('/native/')[-1]}\n")
    return {"report": str(report.relative_to(ROOT)),
            "files": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_file.items())}}


def run_one(name: str, exe: list[str], seconds: int, nice: int) -> dict[str, object]:
    cmd, crashes = _command(name, exe, seconds, nice)
    before = set(crashes.iterdir())
    t0 = time.monotonic()
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")     # the harnesses keep state on purpose
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace", timeout=seconds * 4 + 300)
    lines = p.stdout.splitlines()
    stats = {m.group(1): int(m.group(2)) for m in map(_STAT.match, lines) if m}
    cov = ft = 0
    for line in lines:
        m = _DONE.search(line)
        if m:
            cov, ft = int(m.group(2)), int(m.group(3))
    if not cov:                      # a crash ends the run before DONE: take the last status
        for line in lines:
            m = re.search(r"cov: (\d+) ft: (\d+)", line)
            if m:
                cov, ft = int(m.group(1)), int(m.group(2))
    result: dict[str, object] = {
        "harness": name, "seconds": round(time.monotonic() - t0, 1),
        "executions": stats.get("number_of_executed_units", 0),
        "exec_per_sec": stats.get("average_exec_per_sec", 0),
        "coverage_edges": cov, "features": ft, "exit": p.returncode, "crashes": []}
    if name not in PY_HARNESSES:
        result["coverage"] = _coverage(name, lines)
    new = sorted(set(crashes.iterdir()) - before)
    if p.returncode != 0:
        keep = HERE / "regressions" / name
        keep.mkdir(parents=True, exist_ok=True)
        for c in new:
            shutil.copy2(c, keep / c.name)
        result["crashes"] = [str((keep / c.name).relative_to(ROOT)) for c in new]
        log = OUT / f"{name}.log"
        log.write_text(p.stdout)
        result["log"] = str(log.relative_to(ROOT))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "10")),
                    help="fuzzing time per harness (default $FUZZ_SECONDS or 10)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these")
    ap.add_argument("--nice", type=int, default=10, help="run the fuzzers under nice -n N (default 10)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    c_names = [n for n in fuzz_build.harnesses() if not args.only or n in args.only]
    py_names = [n for n in PY_HARNESSES if not args.only or n in args.only]
    unknown = set(args.only) - set(c_names) - set(py_names)
    if unknown:
        ap.error(f"unknown harness(es) {', '.join(sorted(unknown))}; known: "
                 f"{', '.join(fuzz_build.harnesses() + list(PY_HARNESSES))}")
    built = fuzz_build.build(c_names) if c_names else {}
    jobs = [(n, [str(built[n])]) for n in c_names]
    jobs += [(n, [sys.executable, str(PY_HARNESSES[n])]) for n in py_names]
    results = []
    for name, exe in jobs:
        r = run_one(name, exe, args.seconds, args.nice)
        results.append(r)
        if not args.json:
            cov = r.get("coverage", {})
            files = ", ".join(f"{k} {v}" for k, v in cov.get("files", {}).items()
                              if not v.startswith("0/")) if isinstance(cov, dict) else ""
            print(f"{name:14s} {r['executions']:>10,} execs {r['exec_per_sec']:>7,}/s  "
                  f"cov {r['coverage_edges']:>5} ft {r['features']:>5}  "
                  f"{'CRASH ' + ' '.join(r['crashes']) if r['exit'] else 'ok'}"  # type: ignore[arg-type]
                  + (f"\n{'':14s} edges: {files}" if files else ""), flush=True)
    failed = [r for r in results if r["exit"] != 0]
    if args.json:
        print(json.dumps({"seconds": args.seconds, "results": results, "failed": len(failed)}, indent=2))
    elif failed:
        for r in failed:
            print(f"FAILED: {r['harness']} (exit {r['exit']}); log {r.get('log')}; reproduce with "
                  f"build/fuzz/{r['harness']} {' '.join(r['crashes'])}", file=sys.stderr)  # type: ignore[arg-type]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make qemu-bench`: kernel nvme + fio vs uvmbus's userspace NVMe driver in the same QEMU
guest (Debian kernel, TCG, emulated NVMe behind intel-iommu), alternated; prints the table
for docs/performance.md.  Emulation makes absolute numbers meaningless: the ratio is the
figure.

usage: python tests/qemuvm/bench.py [--seconds S] [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuvm import harness

JOBS = ["randread:4k:32", "randread:4k:1", "randwrite:4k:32", "read:128k:8"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--iommu-pt", action="store_true",
                    help="boot with iommu=pt: the kernel's own DMA bypasses the emulated IOMMU "
                         "(vfio still gets a translated domain), the kernel's best case")
    ap.add_argument("jobs", nargs="*", default=JOBS, help="PATTERN:BS:QD (fio names)")
    args = ap.parse_args()
    missing = harness.missing_tools()
    if missing:
        print(f"missing Debian packages: {' '.join(missing)}", file=sys.stderr)
        return 2
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(harness.ROOT / "uvmbus")],
                   check=False)
    with tempfile.TemporaryDirectory(prefix="uvmbus-qemu-bench-") as tmp:
        w = Path(tmp)
        image = w / "nvme.img"
        with open(image, "wb") as f:           # real data: no sparse-read shortcut in QEMU
            chunk = bytes(range(256)) * 4096
            for _ in range(args.size_mib):
                f.write(chunk)
        script = harness.ROOT / "tests" / "qemuvm" / "guest_bench.py"
        cmd = (f"cd {harness.ROOT} && {sys.executable} {script} /tmp/out {args.seconds} "
               f"{args.rounds} {' '.join(args.jobs)}")
        run = harness.run_guest(cmd, image=image, workdir=w, timeout=3000,
                                extra_append="iommu=pt" if args.iommu_pt else "")
        res = w / "out" / "bench.json"
        if not res.exists():
            print(run.console[-4000:], file=sys.stderr)
            return 1
        data = json.loads(res.read_text())
    rows = data["results"]
    summary = []
    for job in dict.fromkeys((r["pattern"], r["bs"], r["qd"]) for r in rows):
        rs = [r for r in rows if (r["pattern"], r["bs"], r["qd"]) == job
              and "kernel_iops" in r and "uvmbus_iops" in r]
        if not rs:
            print(f"{job}: no complete round: {[r for r in rows if r['pattern'] == job[0]]}",
                  file=sys.stderr)
            continue
        k = statistics.median(r["kernel_iops"] for r in rs)
        u = statistics.median(r["uvmbus_iops"] for r in rs)
        summary.append({"pattern": job[0], "bs": job[1], "qd": job[2], "kernel_fio_iops": round(k),
                        "uvmbus_iops": round(u), "ratio": round(u / k, 2) if k else None,
                        "rounds": [[round(r["kernel_iops"]), round(r["uvmbus_iops"])] for r in rs]})
    if args.json:
        print(json.dumps({"fio": data["fio"], "seconds": data["seconds"], "summary": summary},
                         indent=2))
        return 0
    print(f"QEMU {harness.find_kernel().release if harness.find_kernel() else '?'} guest, TCG, "  # type: ignore[union-attr]
          f"{data['fio']}, {data['seconds']:g} s per run, medians of {args.rounds} alternated rounds"
          + (", kernel iommu=pt" if args.iommu_pt else ", intel_iommu=on (lazy)"))
    print("| pattern | bs | QD | kernel nvme + fio (IOPS) | uvmbus blk bench (IOPS) | ratio |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['pattern']} | {s['bs']} | {s['qd']} | {s['kernel_fio_iops']:,} | "
              f"{s['uvmbus_iops']:,} | {s['ratio']}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

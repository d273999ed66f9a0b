"""Runs INSIDE the QEMU guest: the kernel's nvme driver with fio vs the userspace driver with
`uvmbus blk bench`, same pattern, block size, queue depth and duration, alternated, on the
same emulated controller.  Writes OUT/bench.json.

usage: guest_bench.py OUTDIR SECONDS ROUNDS PATTERN:BS:QD [...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

UVMBUS = str(Path(sys.executable).parent / "uvmbus")
#: the kernel's fastest path here (libaio at QD32 is several times slower under TCG)
ENGINE = "io_uring"


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        print(f"$ {' '.join(cmd)} -> {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}", flush=True)
    return p


def kernel_dev(addr: str) -> str:
    from uvmbus.vfio import PciBus

    fn = PciBus("/").function(addr)
    for _ in range(200):
        b = fn.block_devices()
        if b and Path("/dev", b[0]).exists():
            return "/dev/" + b[0]
        time.sleep(0.05)
    raise RuntimeError("the kernel nvme driver made no block device")


def fio(dev: str, pattern: str, bs: str, qd: int, seconds: float) -> float:
    p = sh("fio", "--name=k", f"--filename={dev}", f"--rw={pattern}", f"--bs={bs}",
           f"--iodepth={qd}", f"--ioengine={ENGINE}", "--direct=1", "--time_based",
           f"--runtime={seconds}", "--ramp_time=0.2", "--norandommap", "--randrepeat=1",
           "--output-format=json")
    job = json.loads(p.stdout)["jobs"][0]
    side = job["write"] if "write" in pattern else job["read"]
    return float(side["iops"])


#: fio's pattern names -> uvmbus blk bench's
UVMBUS_PATTERN = {"read": "seqread", "write": "seqwrite", "randread": "randread",
                  "randwrite": "randwrite"}


def uvmbus(addr: str, pattern: str, bs: str, qd: int, seconds: float) -> float:
    p = sh(UVMBUS, "blk", "bench", addr, "--pattern", UVMBUS_PATTERN[pattern], "--bs", bs, "--qd", str(qd),
           "--seconds", str(seconds), "--no-reference", "--json")
    return float(json.loads(p.stdout)["iops"])


def main() -> int:
    out = Path(sys.argv[1])
    seconds = float(sys.argv[2])
    rounds = int(sys.argv[3])
    jobs = [(j.split(":")[0], j.split(":")[1], int(j.split(":")[2])) for j in sys.argv[4:]]
    from uvmbus.vfio import PciBus

    sh("modprobe", "nvme")
    sh("modprobe", "vfio-pci")
    addr = PciBus("/").functions(cls="nvme")[0].name
    fio_version = sh("fio", "--version").stdout.strip()
    results = []
    for pattern, bs, qd in jobs:
        for rnd in range(rounds):
            order = ("kernel", "uvmbus") if rnd % 2 == 0 else ("uvmbus", "kernel")
            row: dict[str, object] = {"pattern": pattern, "bs": bs, "qd": qd, "round": rnd}
            for who in order:
                try:
                    if who == "kernel":
                        sh(UVMBUS, "unbind", addr)
                        row["kernel_iops"] = fio(kernel_dev(addr), pattern, bs, qd, seconds)
                    else:
                        sh(UVMBUS, "bind", addr, "--force")
                        row["uvmbus_iops"] = uvmbus(addr, pattern, bs, qd, seconds)
                except Exception as exc:       # keep the other figures; report the failure
                    row[f"{who}_error"] = repr(exc)
            print("BENCH", json.dumps(row), flush=True)
            results.append(row)
    (out / "bench.json").write_text(json.dumps({"fio": f"{fio_version} ({ENGINE}, direct=1)",
                                                "seconds": seconds,
                                                "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

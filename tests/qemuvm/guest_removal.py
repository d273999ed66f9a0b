"""Runs INSIDE the QEMU guest: surprise removal.  Opens the NVMe controller with the
userspace driver, signals the host (OUT/ready) and reads until the host unplugs the device
(QMP device_del -> PCIe hotplug -> vfio-pci asks for the device back through the VFIO
request interrupt).  The driver must stop with DeviceRemoved, close without hanging, and the
kernel must then complete the removal.  Writes OUT/result.json.

usage: guest_removal.py OUTDIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

UVMBUS = str(Path(sys.executable).parent / "uvmbus")


def main(out: Path) -> dict[str, object]:
    import uvmbus.nvme as nvme
    from uvmbus.vfio import PciBus

    subprocess.run(["modprobe", "vfio-pci"], check=False)
    addr = PciBus("/").functions(cls="nvme")[0].name
    p = subprocess.run([UVMBUS, "bind", addr, "--force"], capture_output=True, text=True)
    res: dict[str, object] = {"address": addr, "bind": p.returncode}
    ctl = nvme.open(addr, timeout=20.0)
    ns = ctl.disk(0)
    reads = 0
    (out / "ready").write_text("1")
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 120:
            ns.read((reads % 64) * 4096, 4096)
            reads += 1
        res["error"] = None
    except Exception as exc:
        res["error"] = type(exc).__name__
        res["message"] = str(exc)
        res["after_s"] = round(time.monotonic() - t0, 1)
    res["reads"] = reads
    t1 = time.monotonic()
    ctl.close()
    res["close_s"] = round(time.monotonic() - t1, 2)
    gone = False
    for _ in range(300):
        if not (Path("/sys/bus/pci/devices") / addr).exists():
            gone = True
            break
        time.sleep(0.1)
    res["function_removed"] = gone
    return res


if __name__ == "__main__":
    out = Path(sys.argv[1])
    try:
        result = main(out)
    except Exception:
        result = {"exception": traceback.format_exc()}
    print("REMOVAL", json.dumps(result), flush=True)
    (out / "result.json").write_text(json.dumps(result))
    os.sync()

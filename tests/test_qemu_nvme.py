"""The userspace NVMe driver on a real kernel: Debian's kernel under QEMU (TCG) with an
emulated NVMe controller behind an emulated Intel IOMMU (real IOMMU groups, vfio-pci type1).

The guest (tests/qemuvm/guest_nvme.py) binds the function to vfio-pci with `uvmbus bind`,
writes and reads through `uvmbus blk` and the API (multi-transfer writes with FUA, write
zeroes, discard, batches, flush, polled and MSI-X completion), gives the function back to
the kernel's nvme driver and reads the data through it.  Here, on the host, the image file
must then hold exactly the planned bytes (sha256 of the whole image).

Needs qemu-system-x86, linux-image-amd64 and busybox-static (.ci/install-deps installs them);
takes about 2 minutes under TCG.  Debian's kernels do not build CONFIG_VFIO_NOIOMMU, so the
no-IOMMU path is covered by tests/test_vfio_ioctl.py against a recorded ioctl sequence.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from qemuvm import harness
from qemuvm import patterns as P

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest_ready() -> None:
    missing = harness.missing_tools()
    if missing:
        pytest.skip(f"needs Debian packages {' '.join(missing)} (run .ci/install-deps as root)")
    # byte-compile on the host: the guest's root is read-only and TCG makes imports slow
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(harness.ROOT / "uvmbus"),
                    str(harness.ROOT / "tests" / "qemuvm")], check=False)


@pytest.mark.timeout(600)
def test_nvme_round_trip_on_real_kernel(guest_ready: None, tmp_path: Path) -> None:
    image = tmp_path / "nvme.img"
    P.prefill_image(str(image))
    script = harness.ROOT / "tests" / "qemuvm" / "guest_nvme.py"
    run = harness.run_guest(f"cd {harness.ROOT} && {sys.executable} {script} /tmp/out",
                            image=image, workdir=tmp_path, timeout=540)
    (tmp_path / "console.txt").write_text(run.console)
    tail = run.console[-5000:]
    result = run.outdir / "result.json"
    assert result.exists(), f"guest wrote no result (qemu rc {run.returncode}):\n{tail}"
    checks = json.loads(result.read_text())["checks"]
    failed = [c for c in checks if not c["ok"]]
    assert not failed, f"guest checks failed: {failed}\n{tail}"
    assert len(checks) >= 15, f"guest stopped early: {checks}\n{tail}"
    assert run.guest_exit == 0, tail
    got = hashlib.sha256(image.read_bytes()).hexdigest()
    want = hashlib.sha256(P.expected_image()).hexdigest()
    assert got == want, f"the image does not hold what the guest wrote (sha256 {got} != {want})"


@pytest.mark.timeout(400)
def test_surprise_removal_on_real_kernel(guest_ready: None, tmp_path: Path) -> None:
    """QMP device_del while the userspace driver does I/O: PCIe hot-unplug makes vfio-pci
    raise the VFIO request interrupt; the driver must stop with DeviceRemoved (not hang until
    its command timeout), close, and let the kernel finish removing the function."""
    import time

    image = tmp_path / "nvme.img"
    image.write_bytes(bytes(8 << 20))

    def unplug(outdir: Path, qmp: harness.Qmp) -> None:
        deadline = time.monotonic() + 300
        while not (outdir / "ready").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        time.sleep(1.0)
        qmp.command("device_del", id="nvme0")

    script = harness.ROOT / "tests" / "qemuvm" / "guest_removal.py"
    run = harness.run_guest(f"cd {harness.ROOT} && {sys.executable} {script} /tmp/out",
                            image=image, workdir=tmp_path, timeout=360, hotplug_port=True,
                            host_action=unplug)
    tail = run.console[-4000:]
    result = run.outdir / "result.json"
    assert result.exists(), f"guest wrote no result:\n{tail}"
    res = json.loads(result.read_text())
    assert res.get("error") == "DeviceRemoved", f"{res}\n{tail}"
    assert "asked for the device back" in str(res.get("message")), res
    assert res["reads"] > 0, res
    assert res["function_removed"], f"the kernel could not finish the removal: {res}\n{tail}"

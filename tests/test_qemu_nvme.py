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

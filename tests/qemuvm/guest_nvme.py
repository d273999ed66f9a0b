"""Runs INSIDE the QEMU guest (as root, in the host's root shared over 9p): binds the NVMe
function to vfio-pci with `uvmbus bind`, drives it with the userspace NVMe driver (CLI and
API) following tests/qemuvm/patterns.py, hands it back to the kernel's nvme driver and checks
the kernel reads what the userspace driver wrote.  Writes OUT/result.json; the host then
checks the image file's sha256.

usage: guest_nvme.py OUTDIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qemuvm import patterns as P  # noqa: E402

UVMBUS = str(Path(sys.executable).parent / "uvmbus")
checks: list[dict[str, object]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    checks.append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"GUEST-CHECK {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def sh(*cmd: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    t = time.monotonic()
    p = subprocess.run(cmd, input=input, capture_output=True)
    print(f"$ {' '.join(cmd)}  -> {p.returncode} ({time.monotonic() - t:.1f} s)", flush=True)
    if p.returncode:
        print(p.stdout.decode(errors="replace")[-2000:], p.stderr.decode(errors="replace")[-2000:])
    return p


def main(out: Path) -> int:
    from uvmbus.vfio import PciBus

    sh("modprobe", "vfio-pci")
    sh("modprobe", "vfio_iommu_type1")
    fns = PciBus("/").functions(cls="nvme")
    check("nvme function found", len(fns) == 1, str([f.name for f in fns]))
    fn = fns[0]
    addr = fn.name
    check("iommu group", fn.iommu_group is not None, f"group {fn.iommu_group}")
    p = sh(UVMBUS, "list", "--pci")
    check("uvmbus list --pci shows it", p.returncode == 0 and addr in p.stdout.decode(),
           p.stdout.decode().strip().replace("\n", " | "))
    p = sh(UVMBUS, "bind", addr)
    check("uvmbus bind -> vfio-pci", p.returncode == 0 and fn.driver == "vfio-pci",
           (p.stdout + p.stderr).decode().strip())
    from uvmbus.vfio import bind_vfio

    t = time.monotonic()
    bind_vfio(PciBus("/"), addr)
    check("bind is idempotent", fn.driver == "vfio-pci", f"{time.monotonic() - t:.3f} s")
    p = sh(UVMBUS, "blk", "info", addr, "--json")
    info = json.loads(p.stdout) if p.returncode == 0 else {}
    (out / "info.json").write_bytes(p.stdout)
    check("blk info", p.returncode == 0 and info.get("luns", [{}])[0].get("size") == P.IMAGE_SIZE,
          f"iommu={info.get('iommu')} interrupts={info.get('interrupts')}")

    # CLI write + read
    off, n = P.CLI_WRITE
    src = Path("/tmp/cli.bin")
    src.write_bytes(P.stream("cli", n))
    p = sh(UVMBUS, "blk", "write", addr, "--offset", str(off), "-i", str(src))
    check("blk write", p.returncode == 0, p.stderr.decode().strip())
    p = sh(UVMBUS, "blk", "read", addr, "--offset", str(off), "--length", str(n), "-o", "/tmp/cli.out")
    check("blk read returns what blk write wrote", p.returncode == 0 and
          Path("/tmp/cli.out").read_bytes() == src.read_bytes())

    # API
    import uvmbus.nvme as nvme

    with nvme.open(addr, io_queues=2) as ctl:
        ns = ctl.disk(0)
        check("two I/O queues granted", len(ctl.io_queues) == 2, ctl.interrupt_mode)
        off, n = P.API_WRITE
        data = P.stream("api", n)
        ns.write(off, data, fua=True)
        check("API write/read multi-transfer", ns.read(off, n) == data,
              f"max_transfer={ctl.max_transfer}")
        ns.write_zeroes(*P.ZEROES)
        z_off, z_n = P.ZEROES
        check("write zeroes", ns.read(z_off - 4096, z_n + 8192) ==
              b"\xaa" * 4096 + bytes(z_n) + b"\xaa" * 4096)
        if ns.unmap_supported:
            ns.discard(*P.DISCARD)
            d = ns.read(*P.DISCARD)
            check("discard (deallocated blocks read zeros)", d == bytes(len(d)))
        for rnd in range(P.BATCH_ROUNDS):
            with ns.batch(P.BATCH_SLOTS, 4096, write=True) as b:
                for i, buf in enumerate(b.buffers):
                    buf.view[:] = P.batch_data(rnd, i)
                lbas = [(P.BATCH_BASE + i * 8192) // ns.block_size for i in range(P.BATCH_SLOTS)]
                b.submit(range(P.BATCH_SLOTS), lbas)
                b.drain()
                bad = b.errors
            check(f"batch write round {rnd}", bad == 0)
        with ns.batch(P.BATCH_SLOTS, 4096) as b:
            b.submit(range(P.BATCH_SLOTS), lbas)
            b.drain()
            same = all(bytes(b.buffers[i].view) == P.batch_data(P.BATCH_ROUNDS - 1, i)
                       for i in range(P.BATCH_SLOTS))
        check("batch read", same)
        # one queue pair per thread: two threads at once, each on its own queue
        import threading

        errs: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                base = P.THREAD_BASE + k * P.THREAD_SPAN
                for j in range(8):
                    blob = P.stream(f"thread:{k}:{j}", 65536)
                    ns.write(base + j * 65536, blob)
                    if ns.read(base + j * 65536, 65536) != blob:
                        raise AssertionError(f"thread {k} block {j} differs")
            except BaseException as exc:
                errs.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        used = [int(q.q.submitted) for q in ctl.io_queues]
        check("two threads at once (a queue pair each while they run)", not errs,
              f"{errs or ''} commands per queue {used}")
        ns.flush()
        st = ctl.stats()
        check("flush", True, f"doorbells={st['signals']}")
        # errors say what happened: a read beyond the end
        try:
            ns.read(ns.size, 4096)
            check("read past the end refused", False)
        except Exception as exc:
            check("read past the end refused", "beyond the end" in str(exc), str(exc))

    # polled mode, reopen (the controller was shut down cleanly)
    with nvme.open(addr, interrupts=False) as ctl:
        off, n = P.API_WRITE
        check("polled mode read after reopen", ctl.disk(0).read(off, 65536) ==
              P.stream("api", n)[:65536], ctl.interrupt_mode)

    # give it back to the kernel and read through the kernel's driver
    sh("modprobe", "nvme")
    p = sh(UVMBUS, "unbind", addr)
    check("uvmbus unbind -> nvme", p.returncode == 0 and fn.driver == "nvme",
          (p.stdout + p.stderr).decode().strip())
    dev = None
    for _ in range(100):
        blocks = fn.block_devices()
        if blocks and Path("/dev", blocks[0]).exists():
            dev = "/dev/" + blocks[0]
            break
        time.sleep(0.1)
    if dev is None:
        check("kernel block device", False)
    else:
        with open(dev, "rb") as f:
            f.seek(P.API_WRITE[0])
            got = f.read(65536)
        check("kernel nvme reads what userspace wrote", got == P.stream("api", P.API_WRITE[1])[:65536],
              dev)
    return 0


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rc = 1
    try:
        rc = main(out)
    except Exception:
        traceback.print_exc()
        checks.append({"name": "exception", "ok": False, "detail": traceback.format_exc()})
    (out / "result.json").write_text(json.dumps({"checks": checks}, indent=1))
    os.sync()
    sys.exit(rc)

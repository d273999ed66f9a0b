"""Boot Debian's own kernel under QEMU with an emulated NVMe controller behind an emulated
Intel IOMMU, the host's filesystem shared read-only as the guest's root (9p), and run one
command in the guest.

- kernel: /boot/vmlinuz-<v> and /lib/modules/<v> of the Debian package linux-image-amd64
  (this host may run another kernel; the guest boots Debian's);
- initramfs: built here (newc cpio): busybox-static as /init's shell and the modules that
  mount the 9p root (virtio-pci, 9pnet_virtio, 9p); the guest then chroots into the host's
  root, so it runs this checkout's virtualenv, Debian's kmod, fio, ...;
- devices: ``-device intel-iommu`` + ``intel_iommu=on`` (real IOMMU groups, vfio-pci type1),
  ``-device nvme`` on a raw image file of the host, a writable 9p share for results;
- accel: TCG (``UVMBUS_QEMU_ACCEL=kvm`` to try KVM).

Used by tests/test_qemu_nvme.py and by `make qemu-bench` (tests/qemuvm/bench.py).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the checkout

BOOT_MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p"]


@dataclass
class Kernel:
    release: str
    vmlinuz: Path
    modules: Path


def find_kernel() -> Kernel | None:
    """The newest Debian kernel with its modules installed (vmlinuz-*-amd64)."""
    found = []
    for vm in glob.glob("/boot/vmlinuz-*"):
        rel = vm[len("/boot/vmlinuz-"):]
        mods = Path("/lib/modules") / rel
        if (mods / "modules.dep").exists() and os.access(vm, os.R_OK):
            found.append(Kernel(rel, Path(vm), mods))
    if not found:
        return None

    def key(k: Kernel) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", k.release)]
    return sorted(found, key=key)[-1]


def missing_tools() -> list[str]:
    """What is missing to boot the guest (Debian package names)."""
    out = []
    if not shutil.which("qemu-system-x86_64"):
        out.append("qemu-system-x86")
    if find_kernel() is None:
        out.append("linux-image-amd64")
    if not Path("/bin/busybox").exists():
        out.append("busybox-static")
    return out


def _module_order(kernel: Kernel, names: list[str]) -> list[Path]:
    """Module files for ``names`` plus their dependencies (modules.dep), dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = os.path.basename(path)
        base = re.sub(r"\.ko(\.\w+)?$", "", base).replace("-", "_")
        by_name[base] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):
            visit(d)
        order.append(path)

    for n in names:
        p = by_name.get(n.replace("-", "_"))
        if p is None:
            continue            # built into this kernel
        visit(p)
    return [kernel.modules / p for p in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have mode 0o40755."""
    out = bytearray()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do $B insmod /mods/$m || echo "init: insmod $m failed"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot \
  || { echo "UVMBUS-GUEST: cannot mount the host root"; $B poweroff -f; }
$B mount -t proc proc /newroot/proc
$B mount -t sysfs sysfs /newroot/sys
$B mount -t devtmpfs dev /newroot/dev
$B mount -t tmpfs tmp /newroot/tmp
$B mount -t tmpfs run /newroot/run
$B mkdir -p /newroot/tmp/out
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /newroot/tmp/out \
  || echo "UVMBUS-GUEST: cannot mount the results share"
echo "UVMBUS-GUEST: booted $($B uname -r)"
$B chroot /newroot /bin/sh -c "$($B cat /guest.cmd)"
echo "UVMBUS-GUEST: exit $?"
$B sync
$B poweroff -f
"""


def build_initramfs(kernel: Kernel, dest: Path, command: str) -> Path:
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("mods", 0o40755, b""), ("proc", 0o40755, b""),
        ("sys", 0o40755, b""), ("dev", 0o40755, b""), ("newroot", 0o40755, b""),
        ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()),
        ("init", 0o100755, INIT.encode()),
        ("guest.cmd", 0o100644, command.encode()),
    ]
    names = []
    for mod in _module_order(kernel, BOOT_MODULES):
        entries.append((f"mods/{mod.name}", 0o100644, mod.read_bytes()))
        names.append(mod.name)
    entries.append(("modules.list", 0o100644, " ".join(names).encode()))
    dest.write_bytes(_cpio_newc(entries))
    return dest


@dataclass
class GuestRun:
    returncode: int | None
    console: str
    seconds: float
    outdir: Path

    @property
    def guest_exit(self) -> int | None:
        m = re.search(r"UVMBUS-GUEST: exit (\d+)", self.console)
        return int(m.group(1)) if m else None


class Qmp:
    """A minimal QMP client (QEMU's JSON monitor) on a Unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self._read()                                   # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP socket closed")
        return dict(json.loads(line))

    def command(self, name: str, **arguments: object) -> dict[str, object]:
        msg: dict[str, object] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.sock.close()


def run_guest(command: str, *, image: Path, workdir: Path, timeout: float = 600,
              memory: str = "1024M", smp: int = 1, nvme_opts: str = "",
              extra_append: str = "", hotplug_port: bool = False,
              host_action: Callable[[Path, Qmp], None] | None = None) -> GuestRun:
    """Boot the guest, run ``command`` (a /bin/sh -c string, in the host's root, as root) and
    power off.  ``workdir/out`` is the guest's /tmp/out (writable).  ``hotplug_port`` puts the
    NVMe controller (QEMU id ``nvme0``) behind a PCIe root port so it can be unplugged;
    ``host_action(outdir, qmp)`` runs in a thread while the guest runs."""
    kernel = find_kernel()
    if kernel is None:
        raise RuntimeError("no Debian kernel with modules in /boot and /lib/modules "
                           "(apt-get install linux-image-amd64)")
    outdir = workdir / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    initrd = build_initramfs(kernel, workdir / "initramfs.cpio", command)
    accel = os.environ.get("UVMBUS_QEMU_ACCEL", "tcg")
    machine = "q35,accel=" + accel + (",kernel-irqchip=split" if accel == "kvm" else "")
    console = workdir / "console.log"
    append = ("console=ttyS0 intel_iommu=on panic=-1 rdinit=/init loglevel=4 "
              "mitigations=off nokaslr no_timer_check " + extra_append)
    cmd = [
        "qemu-system-x86_64", "-machine", machine, "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(smp), "-m", memory, "-nodefaults", "-no-reboot", "-display", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", append,
        "-device", "intel-iommu",
        "-drive", f"file={image},if=none,id=nvm,format=raw,cache=writeback,discard=unmap",
        *(["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"] if hotplug_port else []),
        "-device", "nvme,id=nvme0,serial=uvmbus-qemu,drive=nvm"
        + (",bus=rp1" if hotplug_port else "") + (("," + nvme_opts) if nvme_opts else ""),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={outdir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        "-serial", f"file:{console}",
    ]
    qmp_path = workdir / "qmp.sock"
    if host_action is not None:
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    errors: list[str] = []
    if host_action is not None:
        def act() -> None:
            try:
                qmp = Qmp(qmp_path)
                try:
                    host_action(outdir, qmp)
                finally:
                    qmp.close()
            except Exception as exc:          # reported in the console text
                errors.append(f"[harness: host action failed: {exc!r}]")
        threading.Thread(target=act, daemon=True).start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
        extra = out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = None
        extra = out.decode(errors="replace") + f"\n[harness: killed after {timeout} s]"
    extra += "\n".join(errors)
    text = console.read_text(errors="replace") if console.exists() else ""
    return GuestRun(rc, text + extra, time.monotonic() - start, outdir)

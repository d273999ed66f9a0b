"""A real systemd (Debian's, as PID 1) in a container, for running uvmbus's units.

``tests/test_units_systemd.py`` uses it; ``make units-test`` runs that test alone.

* **Root file system**: ``mmdebstrap --variant=minbase --include=<ROOTFS_PACKAGES> bookworm``,
  cached under ``<repo>/.cache/units/rootfs-<key>`` (git-ignored; the key hashes the suite,
  variant and package list, so changing the list builds a new tree and drops the old one).
  The container never writes to it: it boots with ``--volatile=overlay`` (a tmpfs over the
  tree), so runs can share it and every run starts from the same tree.
* **Boot**: ``systemd-nspawn --boot --register=no --keep-unit --private-network`` with

  - ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: this machine's host has cgroup v1 controllers
    (mounted read-only inside a container) plus an empty cgroup2 at
    ``/sys/fs/cgroup/unified``.  On the v1 layout the container's systemd cannot apply
    ``DevicePolicy=``/``DeviceAllow=`` at all; on cgroup2 it does so with a
    ``BPF_PROG_TYPE_CGROUP_DEVICE`` program, which needs no controller;
  - ``--system-call-filter=bpf``: nspawn's own seccomp filter refuses ``bpf()``, and
    systemd 252 then silently skips device access control (it says so only at debug
    level) — every ``DevicePolicy=closed`` unit could open every device node;
  - ``--capability=CAP_NET_ADMIN,CAP_IPC_LOCK``: nspawn's default bounding set lacks both,
    and the net unit's ``CapabilityBoundingSet=`` can only keep what PID 1 has;
  - its own cgroup2 directory (``uvmbus-units-<pid>``), so ``--keep-unit`` never shares a
    payload cgroup with another run.

* **Driving it**: ``--register=yes`` (nspawn's default) fails here with "Failed to open system
  bus": the host's PID 1 is not systemd, there is no D-Bus or machined.  With
  ``--register=no`` nothing knows the machine, so ``machinectl``/``systemd-run -M`` cannot
  reach it either.  Commands run through ``nsenter --all`` into PID 1's
  namespaces (``Container.run``): ``systemctl`` talks to PID 1 over its private socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("UVMBUS_UNITS_CACHE", REPO / ".cache" / "units"))
SUITE = "bookworm"
VARIANT = "minbase"
# systemd as PID 1 (+ dbus for systemctl's friends), and what docs/deploy.md installs at run
# time: python3 + venv, nbdkit with its python plugin; libnbd-bin: nbdcopy/nbdinfo as clients.
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "nbdkit",
                   "nbdkit-plugin-python", "libnbd-bin")
TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    """Progress on stderr (pytest -s / make units-test shows it; -ra keeps it on failure)."""
    print(f"[units {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cannot_run_reason() -> str | None:
    """Why a real systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root (systemd-nspawn); run `make units-test` as root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"missing {', '.join(missing)}: install the Debian packages mmdebstrap, "
                "systemd-container, util-linux (`.ci/install-deps` does)")
    if cgroup2_mount() is None:
        return "no cgroup2 file system mounted (needed for the container's device policy)"
    return None


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


# Less to fetch and unpack (no recommends, docs, man pages, translations) and no fsync per
# file: the tree is a throw-away test fixture.
MMDEBSTRAP_OPTS = ("--dpkgopt=force-unsafe-io",
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/locale/*",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                   # nbdkit-plugin-python depends on python3-boto3 (for its S3 example);
                   # botocore's API descriptions are 75 MB of JSON nobody here reads
                   "--dpkgopt=path-exclude=/usr/lib/python3/dist-packages/botocore/data/*",
                   "--aptopt=Acquire::Languages \"none\"",
                   "--aptopt=APT::Install-Recommends \"false\"")


def rootfs_key() -> str:
    spec = json.dumps([SUITE, VARIANT, sorted(ROOTFS_PACKAGES), MMDEBSTRAP_OPTS])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def ensure_rootfs() -> Path:
    """The cached root file system for the current package list (built if missing)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / f"rootfs-{rootfs_key()}"
    with open(CACHE / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if (final / ".uvmbus-complete").exists():
            log(f"root file system from the cache: {final}")
            return final
        for old in CACHE.glob("*rootfs-*"):          # other package lists, broken builds
            shutil.rmtree(old, ignore_errors=True)
        tmp = CACHE / f".rootfs-{rootfs_key()}.tmp"
        t0 = time.monotonic()
        log(f"mmdebstrap --variant={VARIANT} {SUITE} (+{','.join(ROOTFS_PACKAGES)}) -> {final}")
        p = subprocess.run(["mmdebstrap", "--quiet", f"--variant={VARIANT}", *MMDEBSTRAP_OPTS,
                            f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(tmp)],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed ({p.returncode}):\n{p.stderr[-3000:]}")
        (tmp / ".uvmbus-complete").write_text(json.dumps(ROOTFS_PACKAGES) + "\n")
        os.rename(tmp, final)
        log(f"root file system built in {time.monotonic() - t0:.0f} s")
        return final


def source_key() -> str:
    """Hash of everything that goes into the wheel."""
    h = hashlib.sha256()
    files = [REPO / "pyproject.toml", REPO / "setup.py", *sorted((REPO / "systemd").glob("*")),
             *sorted((REPO / "native").glob("*.[ch]")), *sorted((REPO / "native").glob("*.py")),
             *sorted((REPO / "uvmbus").rglob("*.py"))]
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_wheelhouse() -> Path:
    """Wheels of this checkout and its dependencies, cached by :func:`source_key`."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / f"wheels-{source_key()}"
    with open(CACHE / ".wheels-lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if (final / ".uvmbus-complete").exists():
            log(f"wheels from the cache: {final}")
            return final
        for old in CACHE.glob("*wheels-*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        tmp = CACHE / f".wheels-{source_key()}.tmp"
        build_wheelhouse(tmp)
        (tmp / ".uvmbus-complete").write_text("")
        os.rename(tmp, final)
        return final


def build_wheelhouse(dest: Path) -> list[Path]:
    """``pip wheel`` of this checkout and its dependencies into ``dest``: what
    ``pip install /path/to/uvmbus`` builds (the container has no network, so pip inside
    installs from these files with ``--no-index``)."""
    t0 = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    with open("/tmp/uvmbus-build.lock", "w") as lk:         # `make build` shares the build dir
        fcntl.flock(lk, fcntl.LOCK_EX)
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                            "--disable-pip-version-check", "--no-build-isolation",
                            "-w", str(dest), str(REPO)],
                           capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    wheels = sorted(dest.glob("*.whl"))
    log(f"wheels built in {time.monotonic() - t0:.0f} s: {', '.join(w.name for w in wheels)}")
    return wheels


class Container:
    """A booted container (see the module docstring).  ``run`` executes inside it."""

    def __init__(self, rootfs: Path, binds: list[str], name: str):
        self.rootfs = rootfs
        self.name = name
        cg2 = cgroup2_mount()
        assert cg2 is not None
        self.cgroup = cg2 / f"uvmbus-units-{os.getpid()}-{name}"
        self.cgroup.mkdir(exist_ok=True)
        self.console_path = Path(tempfile.mkstemp(prefix=f"{name}-console-", suffix=".log")[1])
        self.console = open(self.console_path, "w")
        cmd = ["systemd-nspawn", "--quiet", "-D", str(rootfs), "--volatile=overlay", "--boot",
               "--register=no", "--keep-unit", "--private-network", f"--machine={name}",
               "--capability=CAP_NET_ADMIN,CAP_IPC_LOCK", "--system-call-filter=bpf",
               "--console=pipe", *[f"--bind={b}" for b in binds]]
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup() -> None:
            with open(procs, "w") as f:
                f.write("0\n")

        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.console,
                                     stderr=subprocess.STDOUT, env=env, preexec_fn=enter_cgroup)
        self.pid1 = self._find_pid1()

    def _find_pid1(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: "
                                   f"{self.console_text()[-3000:]}")
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            for k in kids:
                try:
                    if os.readlink(f"/proc/{k}/ns/pid") != os.readlink("/proc/self/ns/pid"):
                        return int(k)
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("systemd-nspawn started no container init within "
                           f"{timeout:.0f} s: {self.console_text()[-3000:]}")

    def console_text(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return ""

    def run(self, cmd: str, *, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``sh -c cmd`` inside the container (all of PID 1's namespaces, a clean env)."""
        e = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        argv = ["nsenter", "-t", str(self.pid1), "--all", "env", "-i",
                *[f"{k}={v}" for k, v in e.items()], "sh", "-c", cmd]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            journal = ""
            if "systemctl" in cmd:          # what the failing unit said
                journal = "\njournal:\n" + self.run("journalctl --no-pager -n 60 -o short-monotonic",
                                                    check=False).stdout
            raise AssertionError(f"in the container: {cmd!r} exited {p.returncode}\n"
                                 f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
                                 f"{journal[-6000:]}")
        return p

    def wait_booted(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        private = Path(f"/proc/{self.pid1}/root/run/systemd/private")   # systemctl's socket
        while not private.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("the container's systemd never opened its private socket: "
                                     f"{self.console_text()[-3000:]}")
            time.sleep(0.2)
        p = self.run("systemctl is-system-running --wait", check=False,
                     timeout=max(1.0, deadline - time.monotonic()))
        state = p.stdout.strip()
        if state not in ("running", "degraded"):
            raise AssertionError(f"the container's systemd did not finish booting: {state!r} "
                                 f"{p.stderr}\n{self.console_text()[-3000:]}")
        return state

    def show(self, unit: str, *props: str) -> dict[str, str]:
        p = self.run(f"systemctl show {unit} " + " ".join(f"-p {x}" for x in props))
        return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run(f"journalctl --no-pager -o cat -u {unit}", check=False).stdout

    def stop(self, timeout: float = 60) -> int | None:
        """Power the container off (SIGTERM to nspawn = orderly shutdown), then clean up."""
        rc: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            rc = self.proc.returncode
        self.console.close()
        self.console_path.unlink(missing_ok=True)
        # nspawn gone (or killed) with the container's init still alive, as after a SIGKILL:
        # end whatever is left in our cgroup, so no orphaned systemd outlives the test
        deadline = time.monotonic() + 10
        while self._cgroup_busy() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1\n")
            time.sleep(0.2)
        for d in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()
        return rc


    def _cgroup_busy(self) -> bool:
        for procs in self.cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                if procs.read_text().strip():
                    return True
        with contextlib.suppress(OSError):
            return bool((self.cgroup / "cgroup.procs").read_text().strip())
        return False


@contextlib.contextmanager
def booted(rootfs: Path, binds: list[str], name: str) -> Iterator[Container]:
    t0 = time.monotonic()
    ct = Container(rootfs, binds, name)
    try:
        state = ct.wait_booted()
        log(f"systemd booted in the container in {time.monotonic() - t0:.0f} s ({state})")
        yield ct
    finally:
        ct.stop()

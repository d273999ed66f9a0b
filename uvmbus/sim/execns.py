"""`uvmbus sim exec`: run an unmodified program as if the simulated devices were the machine's.

Two parts (docs/simulator.md, "Running unmodified programs"):

* a private mount namespace in which every entry of ``<root>/sys`` stands at the same place
  under ``/sys`` (``sys/bus/vmbus``, ``sys/class/uio``, the ``sys/devices/...`` subtree the
  device links point into, whatever the simulator lays out), the rest of the host's ``/sys`` and
  every other file system left as they are.  A directory the host lacks (the host has no
  ``/sys/bus/vmbus``) cannot be created in sysfs, so its parent is covered with a tmpfs on which
  the host's own entries are bound back one by one and the simulator's are added;
* the preload library (``native/preload/uvmbus_preload.c``, installed as
  ``uvmbus/_preload*.so``) that makes ``/dev/uioN`` behave like the kernel's uio character
  device over the simulator's endpoint socket, and with ``--guest-ram`` places a DPDK program's
  memory on the simulator's guest RAM.

The parent process stays outside the namespace, waits for the program and returns its exit
status (128 + N when it died of signal N), forwarding SIGTERM/SIGHUP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.resources
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from uvmbus.errors import ConfigError, NotFound, PrivilegeError, UvmbusError

__all__ = ["preload_library", "plan_mounts", "run_exec", "MountPlan"]

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RDONLY = 1


def preload_library() -> Path:
    """The installed preload library (built by ``pip install .`` / ``make build``)."""
    pkg = importlib.resources.files("uvmbus")
    for entry in pkg.iterdir():
        if entry.name.startswith("_preload") and entry.name.endswith(".so"):
            return Path(str(entry))
    raise NotFound("uvmbus's preload library (uvmbus/_preload*.so) is not installed: "
                   "reinstall with `pip install .` (or `make build` in a checkout)")


class MountPlan:
    """The mounts that put ``<root>/sys`` at ``/sys``: computed first (so it can be printed and
    tested without privileges), then applied inside the new namespace."""

    def __init__(self) -> None:
        #: host directories covered by a tmpfs whose original entries are bound back
        self.overlays: list[Path] = []
        #: (source, target): a bind of the simulator's entry (dirs and files)
        self.binds: list[tuple[Path, Path]] = []
        #: (link text, target): symlinks recreated on an overlay
        self.symlinks: list[tuple[str, Path]] = []

    def describe(self) -> list[str]:
        out = [f"tmpfs over {d} (host entries bound back)" for d in self.overlays]
        out += [f"bind {s} -> {t}" for s, t in self.binds]
        out += [f"symlink {t} -> {s}" for s, t in self.symlinks]
        return out


def _kind(p: Path) -> str:
    try:
        st = p.lstat()
    except FileNotFoundError:
        return "none"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def plan_mounts(sim_sys: Path, host_sys: Path = Path("/sys")) -> MountPlan:
    """Merge the simulator's ``sys`` tree into the host's ``/sys`` (see the module docstring).

    Where both have a directory of the same name, the merge goes one level down; where the
    host lacks an entry (or has a different kind of entry), the host directory holding it is
    overlaid.  Nothing depends on the exact shape of the simulated tree."""
    plan = MountPlan()

    def merge(sim_dir: Path, host_dir: Path) -> None:
        children = sorted(sim_dir.iterdir())
        needs_overlay = any(
            _kind(host_dir / c.name) == "none"
            or not (_kind(c) == "dir" and _kind(host_dir / c.name) == "dir")
            for c in children)
        if needs_overlay and host_dir not in plan.overlays:
            plan.overlays.append(host_dir)
        for c in children:
            target = host_dir / c.name
            if _kind(c) == "dir" and _kind(target) == "dir":
                merge(c, target)
            elif _kind(c) == "link":
                plan.symlinks.append((os.readlink(c), target))
            else:
                plan.binds.append((c, target))

    merge(sim_sys, host_sys)
    return plan


# ---- inside the new namespace ---------------------------------------------------------------

def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(s):
        return (s.encode() if s is not None else None)
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src or fstype} on {target}: {os.strerror(e)}")


def _placeholder(target: Path, is_dir: bool) -> None:
    if is_dir:
        target.mkdir(exist_ok=True)
    else:
        target.touch(exist_ok=True)


def apply_plan(plan: MountPlan, staging: Path) -> None:
    """Apply ``plan`` in the current (already private) mount namespace."""
    libc = _libc()
    _mount(libc, "tmpfs", str(staging), "tmpfs", 0, "mode=700")
    for n, host_dir in enumerate(plan.overlays):
        keep = staging / f"o{n}"
        keep.mkdir()
        _mount(libc, str(host_dir), str(keep), None, MS_BIND | MS_REC)
        _mount(libc, "tmpfs", str(host_dir), "tmpfs", 0, "mode=755")
        for entry in sorted(keep.iterdir()):
            target = host_dir / entry.name
            kind = _kind(entry)
            if kind == "link":
                target.symlink_to(os.readlink(entry))
                continue
            _placeholder(target, kind == "dir")
            _mount(libc, str(entry), str(target), None, MS_BIND | MS_REC)
    for src, target in plan.binds:
        if _kind(target) == "link":
            target.unlink()
        if _kind(target) == "none":
            _placeholder(target, _kind(src) == "dir")
        _mount(libc, str(src), str(target), None, MS_BIND | MS_REC)
    for text, target in plan.symlinks:
        if _kind(target) != "none":
            if _kind(target) == "dir":
                raise UvmbusError(f"cannot put the simulator's symlink at {target}: the host "
                                  "has a directory there")
            target.unlink()
        target.symlink_to(text)


def _enter_namespace() -> None:
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        if e == errno.EPERM:
            raise PrivilegeError("uvmbus sim exec needs a private mount namespace, which takes "
                                 "root (CAP_SYS_ADMIN): run it with sudo")
        raise UvmbusError(f"cannot create a mount namespace: {os.strerror(e)} (is this a "
                          "container without CAP_SYS_ADMIN or with namespaces disabled?)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)   # nothing we mount leaks out


# ---- the command -----------------------------------------------------------------------------

def check_simulator(root: Path, guest_ram: bool) -> None:
    """Clear errors before anything is mounted: no root, no simulator, no guest RAM."""
    from uvmbus.sim.control import ControlClient

    if root.resolve() == Path("/"):
        raise NotFound("`uvmbus sim exec` runs a program against a simulator's root: pass the root "
                       "that `uvmbus sim` printed (--root or UVMBUS_ROOT)")
    if not (root / "sys").is_dir():
        raise NotFound(f"{root} holds no simulated sys/ tree: start `uvmbus sim` and pass its "
                       "root (--root or UVMBUS_ROOT)")
    try:
        with ControlClient(root) as client:
            client.call("ping")
    except UvmbusError as exc:
        raise NotFound(f"the simulator under {root} is not running ({exc}): start `uvmbus sim "
                       f"--root {root}` first") from exc
    if guest_ram and not (root / "sim" / "guest-ram.json").is_file():
        raise ConfigError(f"--guest-ram: the simulator under {root} has no guest RAM; start "
                          "it with --guest-ram SIZE (at least the program's memory, e.g. 512M "
                          "for EAL's -m 256)")


def program_env(root: Path, guest_ram: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    lib = str(preload_library())
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env["UVMBUS_SIM_ROOT"] = str(root)
    if guest_ram:
        env["UVMBUS_PRELOAD_GUEST_RAM"] = "1"
    else:
        env.pop("UVMBUS_PRELOAD_GUEST_RAM", None)
    return env


def run_exec(root: str | os.PathLike[str], argv: Sequence[str], *, guest_ram: bool = False,
             verbose: bool = False) -> int:
    """Run ``argv`` in a private mount namespace showing the simulator under ``root``;
    returns its exit status."""
    if not argv:
        raise ConfigError("nothing to run: uvmbus sim exec [--root R] [--guest-ram] -- CMD ARGS...")
    root = Path(root).resolve()
    if os.geteuid() != 0:
        raise PrivilegeError("uvmbus sim exec needs root (a private mount namespace and bind "
                             "mounts over /sys): run it with sudo")
    check_simulator(root, guest_ram)
    exe = shutil.which(argv[0])
    if exe is None:
        raise NotFound(f"{argv[0]}: command not found")
    plan = plan_mounts(root / "sys")
    env = program_env(root, guest_ram)
    staging = Path(tempfile.mkdtemp(prefix="uvmbus-exec-"))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: namespace, mounts, exec
        os.close(rfd)
        try:
            _enter_namespace()
            apply_plan(plan, staging)
            if verbose:
                for line in plan.describe():
                    os.write(2, f"uvmbus sim exec: {line}\n".encode())
            os.execve(exe, list(argv), env)     # wfd is close-on-exec: EOF tells success
        except BaseException as exc:
            msg = str(exc) if isinstance(exc, UvmbusError) else f"{type(exc).__name__}: {exc}"
            try:
                os.write(wfd, msg.encode()[:4000])
            finally:
                os._exit(127)
    os.close(wfd)
    forwarded = {signal.SIGTERM, signal.SIGHUP}
    old = {s: signal.signal(s, lambda n, _f: os.kill(pid, n)) for s in forwarded}
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)   # the terminal sends it to the child
    try:
        err = b""
        while chunk := os.read(rfd, 4096):
            err += chunk
        os.close(rfd)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:    # pragma: no cover - PEP 475 retries
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, old_int)
        try:
            staging.rmdir()
        except OSError:
            pass
    if err:
        text = err.decode(errors="replace")
        if "needs" in text and "root" in text:
            raise PrivilegeError(text)
        raise UvmbusError(f"uvmbus sim exec: setting up the namespace failed: {text}")
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)

"""The DPDK peer of the tests and of the side-by-side benchmark.

``build_peer()`` compiles ``dpdk_peer.c`` against the system's DPDK (``pkg-config libdpdk``;
Debian's ``dpdk-dev``, installed by ``.ci/install-deps``) into ``build/dpdk-peer/``, cached by
the hash of the source and the DPDK version.  ``DpdkPeer`` runs it through
``uvmbus sim exec --guest-ram`` and talks to it line by line (see the commands in
``dpdk_peer.c``).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCE = HERE / "dpdk_peer.c"
BUILD_DIR = REPO / "build" / "dpdk-peer"


class PeerUnavailable(Exception):
    """DPDK (dpdk-dev) is not installed or the peer cannot be built here."""


def dpdk_version() -> str:
    if shutil.which("pkg-config") is None:
        raise PeerUnavailable("pkg-config is not installed (.ci/install-deps installs it)")
    r = subprocess.run(["pkg-config", "--modversion", "libdpdk"], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerUnavailable("DPDK's development files are missing (pkg-config libdpdk): "
                              "install Debian's dpdk and dpdk-dev (.ci/install-deps does)")
    return r.stdout.strip()


def build_peer() -> Path:
    """The compiled peer (built once per source/DPDK version; concurrent builds are safe)."""
    version = dpdk_version()
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    exe = BUILD_DIR / f"dpdk_peer-{digest}"
    if exe.exists():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libdpdk"], capture_output=True,
                           text=True, check=True).stdout.split()
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), *flags],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} against DPDK {version} failed:\n{r.stderr}")
    os.replace(tmp, exe)
    return exe


def uvmbus_cmd() -> list[str]:
    return [sys.executable, "-m", "uvmbus"]


class PeerError(AssertionError):
    pass


class DpdkPeer:
    """``uvmbus sim exec --root R --guest-ram -- dpdk_peer EAL...``: one DPDK process."""

    def __init__(self, root: Path | str, *, mem_mb: int = 96, lcores: str = "0",
                 extra_eal: tuple[str, ...] = (), rxd: int = 512, txd: int = 512,
                 ready_timeout: float = 60.0):
        exe = build_peer()
        self.prefix = f"uvbpeer{os.getpid()}x{int(time.monotonic() * 1000) % 100000}"
        cmd = [*uvmbus_cmd(), "sim", "exec", "--root", str(root), "--guest-ram", "--",
               str(exe), "--no-huge", "-m", str(mem_mb), "--iova-mode=va", "--no-pci",
               "-l", lcores, "--file-prefix", self.prefix, "--log-level=lib.eal:notice",
               *extra_eal, "--", "--rxd", str(rxd), "--txd", str(txd)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: list[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.ready = self._answer(ready_timeout, "startup")

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line)
            if line.startswith(("OK ", "ERR ")):
                self._lines.put(line)
        self._lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.append(line)

    @property
    def log(self) -> str:
        return "".join(self._log)

    def _answer(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise PeerError(f"DPDK peer: no answer to {what!r} within {timeout} s\n{self.log}") from None
        if line is None:
            self.proc.wait(10)
            raise PeerError(f"DPDK peer exited ({self.proc.returncode}) during {what!r}:\n{self.log}")
        ok, _, text = line.partition(" ")
        res = json.loads(text)
        res["ok"] = ok == "OK"
        return res

    def call(self, line: str, timeout: float = 60.0, *, check: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise PeerError(f"DPDK peer is gone before {line!r}:\n{self.log}") from None
        res = self._answer(timeout, line)
        if check and not res["ok"]:
            raise PeerError(f"DPDK peer: {line!r} failed: {res}\n{self.log}")
        return res

    def close(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise PeerError(f"DPDK peer did not exit within {timeout} s:\n{self.log}") from None
        self.cleanup()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Remove EAL's runtime directory of this (exited) process (its prefix is ours)."""
        for base in ("/var/run/dpdk", "/run/dpdk"):
            shutil.rmtree(Path(base) / self.prefix, ignore_errors=True)

    def __enter__(self) -> DpdkPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is not None:
            self.cleanup()
        else:
            try:
                self.close()
            except PeerError:
                if exc[0] is None:
                    raise

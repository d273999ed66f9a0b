"""Helpers shared by the services/e2e tests (no tests here).

* :class:`NotifyListener` — a real ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for systemd's
  ``NOTIFY_SOCKET``; it records every datagram and flattens them into events
  (``READY``, ``STATUS``, ``WATCHDOG``, ``STOPPING``, ...) in arrival order.
* :func:`start_daemon` / :class:`DaemonProc` — run a uvmbus daemon as a subprocess under that
  socket, wait for READY, stop it with SIGTERM and collect its exit status and output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

UVMBUS = [sys.executable, "-m", "uvmbus"]


class NotifyListener:
    """A fake systemd notification socket (path or abstract ``@name``)."""

    def __init__(self, where: Path | str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if isinstance(where, str) and where.startswith("@"):
            self.sock.bind(b"\0" + where[1:].encode())
            self.address = where
        else:
            self.sock.bind(str(where))
            self.address = str(where)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def events(self) -> list[tuple[str, str]]:
        """Every ``KEY=VALUE`` line of every datagram, in order."""
        with self._lock:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            for line in m.split("\n"):
                k, _, v = line.partition("=")
                out.append((k, v))
        return out

    def keys(self) -> list[str]:
        return [k for k, _ in self.events()]

    def wait_for(self, key: str, timeout: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                n = sum(1 for m in self.messages for line in m.split("\n") if line.startswith(key + "="))
                if n >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._t.join(2)


def first_order(keys: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """``wanted`` sorted by first occurrence in ``keys`` (missing ones left out)."""
    pos = {w: keys.index(w) for w in wanted if w in keys}
    return sorted(pos, key=pos.__getitem__)


class DaemonProc:
    """A daemon subprocess with stdout+stderr captured to a file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path):
        self.log = log
        self._f = open(log, "wb")
        self.proc = subprocess.Popen([*UVMBUS, *args], stdout=self._f, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    @property
    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.output}") from None
        finally:
            self._f.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._f.closed:
            self._f.close()


def start_daemon(args: Sequence[str], *, notify: NotifyListener | None, log: Path,
                 watchdog_usec: int | None = None, extra_env: dict[str, Any] | None = None,
                 ready_timeout: float = 60.0) -> DaemonProc:
    """Start ``python -m uvmbus ARGS`` (optionally under a fake NOTIFY_SOCKET) and wait for
    READY=1; on failure the daemon is killed and its output is in the assertion message."""
    env = dict(os.environ)
    env.pop("UVMBUS_ROOT", None)
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY", "UVMBUS_RUN_DIR"):
        env.pop(k, None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.address
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    d = DaemonProc(args, env, log)
    if notify is not None:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if notify.wait_for("READY", 0.2):
                return d
            if not d.alive():
                break
        d.kill()
        raise AssertionError(f"daemon never sent READY=1 (exit {d.proc.returncode}): "
                             f"{' '.join(args)}\n{d.output}")
    return d

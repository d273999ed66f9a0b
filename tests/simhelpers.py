"""Start a simulated VMBus host for a test: ``with run_sim(...) as sim:`` or the ``sim`` fixture.

The simulator is a subprocess (``python -m uvmbus sim --root <tmp> ...``); the test process
is the guest.  Typical use::

    from simhelpers import run_sim

    def test_something(tmp_path):
        with run_sim(tmp_path, "--echo", "1", "--kernel", "6.16") as sim:
            dev = sim.device("echo")                # ready-line entry of the echo device
            sim.bind(dev["device_id"])              # uvmbus.bus.bind_uio
            with open_device(dev["device_id"], sim.root) as cd:
                ...
            assert sim.totals()["needless_signals"] == 0

``sim.control(cmd, **args)`` sends a control request (see uvmbus/sim/control.py) and returns
the reply; ``sim.stats()``, ``sim.fault(name, value, device=...)``, ``sim.rescind(dev)``.
On exit the simulator gets SIGTERM and must exit 0 within the timeout (checked), its stderr
is kept in ``sim.stderr`` for failure messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SimProcess", "run_sim", "sim"]

READY_TIMEOUT = 30.0


class SimProcess:
    """A running simulator subprocess (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen[str], ready: dict[str, Any]):
        self.proc = proc
        self.ready = ready
        self.root = Path(ready["root"])
        self.devices: list[dict[str, Any]] = ready["devices"]
        self._stderr: list[str] = []
        self._client: Any = None
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    # -- devices ------------------------------------------------------------------------
    def device(self, model: str = "echo", index: int = 0) -> dict[str, Any]:
        """The ``index``-th device of ``model`` from the ready line."""
        found = [d for d in self.devices if d["model"] == model]
        if len(found) <= index:
            raise LookupError(f"simulator has {len(found)} {model} devices: {self.devices}")
        return found[index]

    def bind(self, device_id: str, timeout: float = 10.0) -> Any:
        """Bind to uio_hv_generic through the guest's bus layer (like `uvmbus bind`)."""
        from uvmbus.bus import Bus, bind_uio
        return bind_uio(Bus(self.root), device_id, timeout=timeout)

    def unbind(self, device_id: str, timeout: float = 10.0) -> Any:
        from uvmbus.bus import Bus, unbind_uio
        return unbind_uio(Bus(self.root), device_id, timeout=timeout)

    # -- control ------------------------------------------------------------------------
    def control(self, cmd: str, **args: Any) -> dict[str, Any]:
        from uvmbus.sim.control import ControlClient
        if self._client is None:
            self._client = ControlClient(self.root)
        return self._client.call(cmd, **args)

    def stats(self) -> dict[str, Any]:
        return self.control("stats")["stats"]

    def totals(self) -> dict[str, int]:
        return self.stats()["totals"]

    def device_stats(self, device_id: str) -> dict[str, Any]:
        for d in self.stats()["devices"]:
            if d["device_id"] == device_id:
                return d
        raise LookupError(device_id)

    def fault(self, name: str, value: Any = True, device: str = "*") -> dict[str, Any]:
        return self.control("fault", fault=name, value=value, device=device)

    def clear_faults(self, device: str = "*") -> dict[str, Any]:
        return self.control("clear_faults", device=device)

    def rescind(self, device: str, reoffer_after: float | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"device": device}
        if reoffer_after is not None:
            args["reoffer_after"] = reoffer_after
        return self.control("rescind", **args)

    def needless_report(self) -> str:
        """Per-channel signal counters, for assertion messages."""
        lines = []
        for d in self.stats()["devices"]:
            for relid, c in d["channels"].items():
                lines.append(f"{d['model']} relid {relid}: signals {c.get('guest_signals')} needed "
                             f"{c.get('needed_signals')} needless {c.get('needless_signals')} "
                             f"collateral {c.get('collateral_signals')}")
        return "\n".join(lines)

    # -- lifetime -----------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, and return the exit code (the root must be cleaned up)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)       # faulthandler: dump every thread
            time.sleep(1)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"simulator did not exit within {timeout} s of SIGTERM:\n{self.stderr}") from None
        self._reader.join(5)
        return rc


@contextmanager
def run_sim(tmp_path: Path | str, *args: str, root: Path | str | None = None,
            check_exit: bool = True, ready_timeout: float = READY_TIMEOUT) -> Iterator[SimProcess]:
    """Run ``python -m uvmbus sim --root ROOT <args>`` until the block ends.

    ROOT defaults to a new directory under /dev/shm (short: socket paths are limited to 107
    bytes; tmpfs: ring files are shared memory), else under ``tmp_path``; the simulator
    creates it and removes it at exit."""
    if root is None:
        base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tmp_path)
        root = Path(tempfile.mkdtemp(prefix="uvb-", dir=base)) / "r"
    root = Path(root)
    env = dict(os.environ)
    env.pop("UVMBUS_ROOT", None)
    cmd = [sys.executable, "-m", "uvmbus", "sim", "--root", str(root), "--quiet", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready: dict[str, Any] | None = None
    deadline = time.monotonic() + ready_timeout
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready "):
                ready = json.loads(line[len("ready "):])
                break
        if ready is None:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"simulator did not become ready: {cmd}\nstdout: {''.join(lines)}\n"
                                 f"stderr: {err}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    sp = SimProcess(proc, ready)
    failed = False
    try:
        yield sp
    except BaseException:
        failed = True
        raise
    finally:
        try:
            rc = sp.stop()
            if check_exit and not failed:
                assert rc == 0, f"simulator exited with {rc}:\n{sp.stderr}"
                assert not (root / "sys").exists(), f"simulator left {root}/sys behind"
        finally:
            if root.parent.name.startswith("uvb-") and root.parent.parent == Path("/dev/shm"):
                shutil.rmtree(root.parent, ignore_errors=True)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Any]:
    """A factory fixture: ``s = sim("--kernel", "6.16")`` starts a simulator stopped at teardown."""
    stack: list[Any] = []

    def start(*args: str) -> SimProcess:
        cm = run_sim(tmp_path / f"s{len(stack)}", *args)
        sp = cm.__enter__()
        stack.append(cm)
        return sp

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


def wait_closed(sim: SimProcess, model: str = "storvsc", timeout: float = 10.0) -> None:
    """Wait until the simulator processed the guest's last close of ``model``'s device (it
    does so asynchronously; a real kernel closes the channel inside close(2)), so the next
    open starts from the beginning of the protocol."""
    dev = sim.device(model)["device_id"]
    deadline = time.monotonic() + timeout
    while sim.device_stats(dev)["connections"]:
        assert time.monotonic() < deadline, "simulator did not process the close"
        time.sleep(0.01)

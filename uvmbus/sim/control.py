"""The control socket ``<root>/sim/control.sock``: JSON lines, one request → one reply.

Requests are objects with a ``cmd``; replies are ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.  Commands (``device`` accepts a GUID, a unique GUID
prefix, a model name matching one device, or ``"*"`` for every model device):

==================  ===========================================================
``ping``            liveness
``stats``           per-device, per-channel counters (signals, interrupts, ...)
``devices``         the devices and their bindings
``kernel``          the simulated kernel mode
``fault``           ``device``, ``fault`` (see :mod:`uvmbus.sim.faults`), ``value``
``clear_faults``    ``device`` (default ``*``)
``rescind``         ``device``, optional ``reoffer_after`` (seconds)
``reoffer``         ``device`` (a rescinded one)
``offer_subchannels``  ``device``, ``count``
``stop``            shut the simulator down (as SIGTERM)
==================  ===========================================================

:class:`ControlClient` is the client (used by ``uvmbus sim ctl`` and tests/simhelpers.py).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from uvmbus.errors import SimulatorError
from uvmbus.sockets import listen_private

__all__ = ["ControlClient", "ControlServer", "control_path"]


def control_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "sim" / "control.sock"


class ControlServer:
    """Listening side; the simulator's event loop drives it."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = listen_private(path, socket.SOCK_STREAM, backlog=16)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> ControlConnection | None:
        try:
            s, _ = self.sock.accept()
        except BlockingIOError:
            return None
        return ControlConnection(s)

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class ControlConnection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def requests(self) -> tuple[list[dict[str, Any] | str], bool]:
        """Complete request lines (parsed, or an error string), and whether the peer closed."""
        closed = False
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                closed = True
                break
            if not data:
                closed = True
                break
            self._buf += data
        out: list[dict[str, Any] | str] = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                out.append(req if isinstance(req, dict) else "request must be a JSON object")
            except ValueError as exc:
                out.append(f"bad JSON: {exc}")
        return out, closed

    def reply(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, default=str) + "\n").encode()
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError:
            pass
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


class ControlClient:
    """Talks to a running simulator: ``ControlClient(root).call("stats")``."""

    def __init__(self, root: str | os.PathLike[str], timeout: float = 30.0):
        self.path = control_path(root)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise SimulatorError(f"cannot reach the simulator at {self.path} ({exc.strerror}); "
                                 "is `uvmbus sim` running with this root?") from exc
        self._buf = b""

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request; return the reply, raising SimulatorError if it failed."""
        self.sock.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise SimulatorError(
                    f"the simulator at {self.path} did not answer {cmd!r} within "
                    f"{self.sock.gettimeout():g} s: is it stopped (SIGSTOP) or hung? "
                    "`kill -CONT PID` resumes a stopped one; `kill -USR1 PID` dumps its stacks") from exc
            if not data:
                raise SimulatorError("the simulator closed the control connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok"):
            what = f"{cmd} {args['op']!r}" if cmd == "model" and "op" in args else repr(cmd)
            raise SimulatorError(f"simulator refused {what}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""What every uvmbus daemon shares: run directory, pidfile, control socket, signals,
sd_notify (READY/STATUS/WATCHDOG/STOPPING), metrics publishing, worker heartbeats.

Files of a daemon of kind ``K`` (``net``, ``blk``) serving device ``D`` live in the run
directory (``$UVMBUS_RUN_DIR``, else systemd's ``$RUNTIME_DIRECTORY``, else
``<root>/run/uvmbus``; mode 0700):

* ``K-D.pid`` — the daemon's pid;
* ``K-D.sock`` — the control socket (``AF_UNIX`` stream, mode 0600, JSON lines:
  ``{"cmd": "status"}`` → the service's status and its metrics snapshot, ``{"cmd":
  "metrics"}`` → Prometheus text, ``{"cmd": "ping"}``, ``{"cmd": "stop"}``).

``uvmbus status`` finds daemons through these files (and psutil for ones whose socket is
gone).  The watchdog is only fed while every worker thread is alive and has called
:meth:`Daemon.beat` recently, so a wedged data path gets the service restarted by systemd.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, UvmbusError
from uvmbus.services.metrics import MetricsServer, Registry, TextfileWriter
from uvmbus.services.sdnotify import Notifier

__all__ = ["Daemon", "ServiceRef", "call_control", "find_services", "run_dir_for"]

log = logging.getLogger("uvmbus.services")

RUN_DIR_ENV = "UVMBUS_RUN_DIR"


def run_dir_for(root: str | os.PathLike[str] = "/", override: str | None = None) -> Path:
    """The run directory (see the module docstring)."""
    if override:
        return Path(override)
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    rd = os.environ.get("RUNTIME_DIRECTORY")       # systemd: RuntimeDirectory= (":"-separated)
    if rd:
        return Path(rd.split(":")[0])
    return Path(root) / "run" / "uvmbus"


# ---- control socket ------------------------------------------------------------------------------

class _Handler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("request must be a JSON object")
                reply = {"ok": True, **self.server.dispatch(req)}
            except (ValueError, UvmbusError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # report, never kill the daemon over a status query
                log.exception("control request failed")
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                self.wfile.write((json.dumps(reply, default=str) + "\n").encode())
                self.wfile.flush()
            except OSError:
                return


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, dispatch: Callable[[dict[str, Any]], dict[str, Any]]):
        self.dispatch = dispatch
        old = os.umask(0o177)          # the socket is created 0600, never briefly wider
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


def call_control(path: str | os.PathLike[str], cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """One request to a daemon's control socket; raises :class:`UvmbusError` if unreachable
    or refused."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
            s.sendall((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            buf = b""
            while b"\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise UvmbusError(f"{path}: the daemon closed the connection")
                buf += data
        except OSError as exc:
            raise UvmbusError(f"cannot reach the daemon at {path}: {exc}") from exc
    finally:
        s.close()
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not reply.get("ok"):
        raise UvmbusError(f"{path}: {cmd} refused: {reply.get('error')}")
    return reply


# ---- discovery ---------------------------------------------------------------------------------------

class ServiceRef:
    """A daemon found in a run directory."""

    def __init__(self, kind: str, device: str, pidfile: Path | None, sock: Path | None):
        self.kind = kind
        self.device = device
        self.pidfile = pidfile
        self.socket = sock

    @property
    def pid(self) -> int | None:
        if self.pidfile is None:
            return None
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __repr__(self) -> str:
        return f"<ServiceRef {self.kind}-{self.device} pid {self.pid}>"


def find_services(run_dir: Path) -> list[ServiceRef]:
    """Daemons with a pidfile or control socket in ``run_dir``."""
    found: dict[tuple[str, str], ServiceRef] = {}
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return []
    for p in entries:
        if p.suffix not in (".pid", ".sock") or "-" not in p.stem:
            continue
        kind, _, dev = p.stem.partition("-")
        ref = found.setdefault((kind, dev), ServiceRef(kind, dev, None, None))
        if p.suffix == ".pid":
            ref.pidfile = p
        else:
            ref.socket = p
    return list(found.values())


# ---- the daemon --------------------------------------------------------------------------------------

class Daemon:
    """Run-time scaffolding of one daemon (see the module docstring)."""

    def __init__(self, kind: str, *, root: str | os.PathLike[str] = "/", run_dir: str | None = None,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 metrics_file: str | None = None, metrics_interval: float = 10.0,
                 stale_after: float = 5.0, notifier: Notifier | None = None):
        if "-" in kind:
            raise ConfigError("daemon kind must not contain '-'")
        self.kind = kind
        self.root = Path(root)
        self.run_dir = run_dir_for(root, run_dir)
        self.device = ""
        self.registry = Registry()
        self.notifier = notifier if notifier is not None else Notifier.from_env(unset=True)
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.failed = False
        self.started = time.time()
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.metrics_file = metrics_file
        self.metrics_interval = metrics_interval
        self.stale_after = stale_after
        self.status_fn: Callable[[], dict[str, Any]] = dict
        #: a service-level problem ("device lost: ..."), "" when none: makes the daemon unhealthy
        #: (status, no watchdog) while its worker threads still run
        self.problem_fn: Callable[[], str] = str
        self.status_text = "starting"
        self._beats: dict[str, float] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._server: _ControlServer | None = None
        self._server_thread: threading.Thread | None = None
        self._http: MetricsServer | None = None
        self._textfile: TextfileWriter | None = None
        self._last_textfile = 0.0
        self._old_handlers: dict[int, Any] = {}
        self.pidfile: Path | None = None
        self.socket_path: Path | None = None

    # -- start -----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT/SIGHUP request a graceful stop (main thread only)."""
        def on_signal(signum: int, _frame: Any) -> None:
            self.request_stop(signal.Signals(signum).name)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_signal)

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()

    def start(self, device: str) -> None:
        """Create the run directory, pidfile and control socket; start metrics publishing."""
        self.device = device
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        base = f"{self.kind}-{device}"
        sock = self.run_dir / f"{base}.sock"
        pidfile = self.run_dir / f"{base}.pid"
        other = ServiceRef(self.kind, device, pidfile if pidfile.exists() else None, None)
        if other.alive() and other.pid != os.getpid():
            raise ConfigError(f"a {self.kind} daemon for {device} is already running "
                              f"(pid {other.pid}, {pidfile})")
        if len(str(sock).encode()) > 107:
            raise ConfigError(f"control socket path too long for AF_UNIX: {sock} "
                              f"(use --run-dir or ${RUN_DIR_ENV})")
        try:
            sock.unlink()
        except FileNotFoundError:
            pass
        tmp = pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, pidfile)
        self.pidfile = pidfile
        self._server = _ControlServer(sock, self._dispatch)
        self.socket_path = sock
        self._server_thread = threading.Thread(target=self._server.serve_forever,
                                               kwargs={"poll_interval": 0.25},
                                               name="control", daemon=True)
        self._server_thread.start()
        if self.metrics_port is not None:
            self._http = MetricsServer(self.registry, self.metrics_port, self.metrics_host).start()
            log.info("metrics on %s", self._http.url)
        if self.metrics_file:
            self._textfile = TextfileWriter(self.registry, self.metrics_file)

    @property
    def metrics_url(self) -> str | None:
        return self._http.url if self._http else None

    # -- workers -----------------------------------------------------------------------------------
    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Start a worker thread; an exception in it stops the daemon (exit code 1)."""
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                log.exception("worker %s failed", name)
                self.request_stop(f"worker {name} failed: {exc}")
                self.failed = True

        self._beats[name] = time.monotonic()
        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads[name] = t
        t.start()
        return t

    def retire(self, name: str) -> None:
        """Forget a worker that ended by design (the bridge's rx-Q of a queue the re-offered
        NIC no longer has): it no longer counts for health."""
        t = self._threads.get(name)
        if t is not None and t.is_alive():
            raise RuntimeError(f"worker {name} is still running")
        self._threads.pop(name, None)
        self._beats.pop(name, None)

    def beat(self, name: str) -> None:
        """A worker's "I am making progress" (at least every ``stale_after`` seconds)."""
        self._beats[name] = time.monotonic()

    def healthy(self) -> tuple[bool, str]:
        problem = self.problem_fn()
        if problem:
            return False, problem
        now = time.monotonic()
        for name, t in self._threads.items():
            if not t.is_alive() and not self.stop_event.is_set():
                return False, f"worker {name} died"
            age = now - self._beats.get(name, now)
            if t.is_alive() and age > self.stale_after:
                return False, f"worker {name} stuck for {age:.1f} s"
        return True, ""

    def join_workers(self, timeout: float) -> list[str]:
        """Join every worker; return the names still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        left = []
        for name, t in self._threads.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                left.append(name)
        return left

    # -- notifications -------------------------------------------------------------------------------
    def ready(self, status: str) -> None:
        self.status_text = status
        self.notifier.ready(status)
        log.info("ready: %s", status)

    def set_status(self, text: str) -> None:
        if text != self.status_text:
            self.status_text = text
            self.notifier.status(text)

    def tick(self) -> None:
        """Watchdog (only when healthy) and the metrics textfile; call every ≤ 0.5 s."""
        ok, why = self.healthy()
        if ok:
            self.notifier.watchdog_if_due()
        elif self.notifier.watchdog_due():
            log.error("not feeding the watchdog: %s", why)
        if self._textfile is not None and time.monotonic() - self._last_textfile >= self.metrics_interval:
            self._write_textfile()

    def _write_textfile(self) -> None:
        if self._textfile is None:
            return
        self._last_textfile = time.monotonic()
        try:
            self._textfile.write()
        except OSError as exc:
            log.warning("metrics textfile %s: %s", self._textfile.path, exc)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` (True: a stop was requested)."""
        return self.stop_event.wait(timeout)

    def run(self, on_tick: Callable[[], None] | None = None, period: float = 0.25) -> None:
        """Tick until a stop is requested."""
        while not self.stop_event.is_set():
            self.tick()
            if on_tick is not None:
                on_tick()
            self.stop_event.wait(period)

    # -- control -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ok, why = self.healthy()
        return {
            "kind": self.kind, "device": self.device, "pid": os.getpid(),
            "started": self.started, "uptime": round(time.time() - self.started, 3),
            "status": self.status_text, "healthy": ok, "problem": why,
            "metrics_url": self.metrics_url, "metrics_file": self.metrics_file,
            "watchdog": self.notifier.watchdog, "systemd": self.notifier.enabled,
            **self.status_fn(),
        }

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            st = self.status()
            self.registry.collect()
            st["metrics"] = self.registry.snapshot()
            return {"status": st}
        if cmd == "metrics":
            return {"text": self.registry.render()}
        if cmd == "stop":
            self.request_stop("control socket")
            return {}
        raise ConfigError(f"unknown command {cmd!r} (ping, status, metrics, stop)")

    # -- stop ----------------------------------------------------------------------------------------
    def stopping(self, status: str = "stopping") -> None:
        self.status_text = status
        self.notifier.stopping(status)

    def close(self) -> None:
        """Remove the socket and pidfile, stop publishing; restore signal handlers."""
        if self._textfile is not None:
            self._write_textfile()           # final figures
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for p in (self.socket_path, self.pidfile):
            if p is None:
                continue
            try:
                if p == self.pidfile and p.read_text().strip() != str(os.getpid()):
                    continue
                p.unlink()
            except (FileNotFoundError, ValueError):
                pass
        self.socket_path = self.pidfile = None
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers.clear()
        self.notifier.close()

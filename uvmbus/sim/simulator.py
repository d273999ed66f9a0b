"""The simulated VM: global state (relids, monitor ids, GPADLs, uio numbers, the int and
monitor pages, guest RAM), its devices, and the event loop that serialises every change.

Threads: the event loop (the caller of :meth:`Simulator.run`, normally the main thread) owns
the tree, bindings, endpoints, connections, control requests and timers; one worker per open
channel (:mod:`uvmbus.sim.channel`); one monitor-page scanner (:mod:`uvmbus.sim.monitor`).
Workers reach the loop only through :meth:`call_soon`.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import selectors
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, SimulatorError
from uvmbus.native import lib
from uvmbus.sim.binding import Binder
from uvmbus.sim.config import DeviceSpec, SimConfig
from uvmbus.sim.control import ControlConnection, ControlServer, control_path
from uvmbus.sim.device import SimDevice
from uvmbus.sim.endpoint import Connection
from uvmbus.sim.faults import FAULT_NAMES
from uvmbus.sim.kernel import FIRST_GPADL
from uvmbus.sim.memory import SharedMemfd
from uvmbus.sim.models import find_model
from uvmbus.sim.models.null import IC_CLASSES
from uvmbus.sim.monitor import MonitorScanner
from uvmbus.sim.tree import Tree
from uvmbus.sim.watch import DirWatcher

__all__ = ["Simulator", "prepare_root"]

_NAMESPACE = uuid.UUID("6c0a5f3e-7573-766d-6275-73696d000000")


def prepare_root(root: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Resolve ``--root``: a fresh directory under /dev/shm by default; an existing root must
    be empty or hold a dead simulator's files.  Returns (root, created_by_us)."""
    if root is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        return Path(tempfile.mkdtemp(prefix="uvmbus-sim-", dir=base)), True
    p = Path(root).absolute()
    if p == Path("/") or p.resolve() == Path("/"):
        raise ConfigError("refusing to simulate a VM over the real root '/': pass --root DIR")
    if not p.exists():
        made = [p]                       # the root and the parents we create for it
        while not made[-1].parent.exists():
            made.append(made[-1].parent)
        p.mkdir(parents=True)
        _CREATED_PARENTS[p] = made[1:]
        return p, True
    if not p.is_dir():
        raise ConfigError(f"--root {p} is not a directory")
    entries = [e.name for e in p.iterdir()]
    if not entries:
        return p, False
    state = p / "sim" / "state.json"
    try:
        pid = int(json.loads(state.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--root {p} is not empty and holds no simulator state "
                          f"({', '.join(sorted(entries)[:5])}...): use an empty or new directory") from None
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    if alive and pid != os.getpid():
        raise SimulatorError(f"--root {p} is in use by a running simulator (pid {pid})")
    Tree(p).remove_all(owns_root=False)        # stale files of a simulator that died
    return p, False


#: parents of a root that prepare_root created (``--root /a/b/c`` with no /a): removed with it
_CREATED_PARENTS: dict[Path, list[Path]] = {}


def remove_root_leftovers(root: Path, owns_root: bool) -> None:
    """After the tree is gone: the parents prepare_root created for it, and in a root that
    was given, ``run/uvmbus`` and ``run`` when daemons left them empty."""
    dirs = _CREATED_PARENTS.pop(root, []) if owns_root else [root / "run" / "uvmbus", root / "run"]
    for d in dirs:
        try:
            d.rmdir()                    # only if empty: never anything someone else put there
        except OSError:
            break


#: longest the event loop sleeps before re-checking whether it must stop (seconds)
_MAX_LOOP_SLEEP = 0.5


def _ic_spec(name: str, class_id: str) -> DeviceSpec:
    """An integration component offered by default: its host model (sim/models/ic.py) when
    loaded, else the null stand-in."""
    from uvmbus.sim.models import MODELS
    cls = MODELS.get(name)
    if cls is None or cls.class_id != class_id:
        return DeviceSpec("null", {"class_id": class_id, "kind": name, "ic": "1"})
    opts = {"kind": name, "ic": "1"}
    instance = getattr(sys.modules.get(cls.__module__), "IC_INSTANCE_IDS", {}).get(name)
    if instance:
        opts["device_id"] = instance
    return DeviceSpec(name, opts)


#: seconds between two refreshes of the live sysfs attribute files
ATTR_REFRESH = 1.0


class Simulator:
    """One simulated VM (see the module docstring)."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.kernel = config.kernel
        self.tree = Tree(config.root)
        self.counters: Counter[str] = Counter()
        self.devices: list[SimDevice] = []
        self.binder = Binder(self)
        self.guest_ram: Any = None
        self._relids = itertools.count(1)
        self._monitor_ids: set[int] = set()
        self._gpadl = FIRST_GPADL
        self._uio: dict[int, SimDevice] = {}
        self._ifnames = itertools.count(0)
        self._scsi_hosts = itertools.count(0)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._calls_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._timer_seq = itertools.count()
        self._stopping = False
        self._conn_owner: dict[Connection, SimDevice] = {}
        self._control: ControlServer | None = None
        #: model changes a control client asked to be undone when it disconnects (a bench
        #: killed with SIGKILL must not leave the NIC on the generator backend)
        self._leases: dict[ControlConnection, list[tuple[SimDevice, str, dict[str, Any]]]] = {}
        self._started = False
        self.int_page: SharedMemfd
        self.monitor_page: SharedMemfd
        self.monitor: MonitorScanner

    # ==== logging ============================================================================
    def log(self, message: str, *, debug: bool = False) -> None:
        if debug and not os.environ.get("UVMBUS_SIM_DEBUG"):
            return
        print(f"uvmbus-sim: {message}", file=sys.stderr, flush=True)

    # ==== allocators ===========================================================================
    def alloc_relid(self) -> int:
        relid = next(self._relids)
        if relid >= 8 * 2048:
            raise SimulatorError("out of relids (the int page has 16384 bits)")
        return relid

    def alloc_monitor_id(self) -> int:
        for i in range(128):
            if i not in self._monitor_ids:
                self._monitor_ids.add(i)
                return i
        raise SimulatorError("out of monitor ids (128 per VM): use --unmonitored for some channels")

    def free_monitor_id(self, mid: int) -> None:
        self._monitor_ids.discard(mid)

    def next_gpadl(self) -> int:
        g = self._gpadl
        self._gpadl += 1
        return g

    def alloc_uio(self, dev: SimDevice) -> int:
        n = next(i for i in itertools.count() if i not in self._uio)
        self._uio[n] = dev
        return n

    def free_uio(self, n: int) -> None:
        self._uio.pop(n, None)

    def alloc_ifname(self, dev: SimDevice) -> tuple[str, str]:
        n = next(self._ifnames)
        return f"simeth{n}", f"00:15:5d:33:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"

    def alloc_scsi_host(self, dev: SimDevice) -> int:
        return next(self._scsi_hosts)

    # ==== event loop plumbing ====================================================================
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (thread-safe)."""
        with self._calls_lock:
            self._calls.append((fn, args))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop after ``delay`` seconds (loop thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn, args))

    def request_stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    def add_endpoint(self, dev: SimDevice) -> None:
        assert dev.server is not None
        self._sel.register(dev.server, selectors.EVENT_READ, ("server", dev))

    def remove_endpoint(self, dev: SimDevice) -> None:
        if dev.server is not None:
            try:
                self._sel.unregister(dev.server)
            except (KeyError, ValueError):
                pass

    def _serve_connection(self, dev: SimDevice, conn: Connection) -> None:
        msgs, closed = conn.receive()
        if msgs and dev.messages(conn, msgs):
            return
        if closed:
            dev.connection_closed(conn)

    def forget_connection(self, conn: Connection) -> None:
        self._conn_owner.pop(conn, None)
        try:
            self._sel.unregister(conn)
        except (KeyError, ValueError):
            pass

    def watch_device(self, dev: SimDevice) -> None:
        self.watcher.add(self.tree.device_dir(dev.device_id))

    # ==== devices ===================================================================================
    def device_by_id(self, guid: str) -> SimDevice | None:
        for d in self.devices:
            if d.device_id == guid:
                return d
        return None

    def find(self, ref: str) -> list[SimDevice]:
        """Devices matching ``ref``: GUID, unique prefix, model name, or ``*`` (model devices)."""
        ref = (ref or "").strip().lower().strip("{}")
        if ref in ("*", "all"):
            return [d for d in self.devices if d.kind != "null"]
        exact = [d for d in self.devices if d.device_id == ref]
        if exact:
            return exact
        matches = [d for d in self.devices if d.device_id.startswith(ref) or d.kind == ref]
        if len(matches) != 1:
            names = ", ".join(f"{d.device_id} ({d.kind})" for d in self.devices)
            raise ConfigError(f"device {ref!r} matches {len(matches)} devices; devices: {names}")
        return matches

    def add_device(self, spec: DeviceSpec, index: int) -> SimDevice:
        cls = find_model(spec.model)
        name = spec.options.get("kind", spec.model)
        guid = str(spec.options.pop("device_id", None) or uuid.uuid5(_NAMESPACE, f"{name}-{index}"))
        dev = SimDevice(self, cls, spec.options, guid)
        self.devices.append(dev)
        self.offer(dev)
        return dev

    def offer(self, dev: SimDevice) -> None:
        relid = self.alloc_relid()
        mon = self.alloc_monitor_id() if dev.monitored else None
        dev.offered(relid, mon)

    def rescind(self, dev: SimDevice, reoffer_after: float | None = None) -> None:
        if not dev.present:
            return
        dev.rescinded()
        if dev.monitor_id is not None:
            self.free_monitor_id(dev.monitor_id)
        self.counters["rescinds"] += 1
        if reoffer_after is not None:
            self.later(reoffer_after, self.reoffer, dev)

    def reoffer(self, dev: SimDevice) -> None:
        if dev.present:
            return
        self.offer(dev)
        self.counters["reoffers"] += 1
        self.binder.attach(dev)

    # ==== start / run / stop ===========================================================================
    def start(self) -> None:
        cfg, k = self.config, self.kernel
        self.tree.create_base(k.release)
        self.int_page = SharedMemfd("int-page", k.int_map_size)
        self.monitor_page = SharedMemfd("monitor-page", k.int_map_size)
        if cfg.guest_ram:
            from uvmbus.dma.sim import GuestRam, create_guest_ram
            create_guest_ram(cfg.root, cfg.guest_ram, base_pfn=cfg.guest_ram_base_pfn)
            self.guest_ram = GuestRam(cfg.root)
        self.watcher = DirWatcher()
        for drv in self.tree.drivers.iterdir():
            self.watcher.add(drv)
        self.watcher.add(self.tree.vmbus)
        self.monitor = MonitorScanner(self.monitor_page.ptr, self.int_page.ptr + lib.HV_INT_PAGE_SEND_OFFSET,
                                      cfg.monitor_latency_us, cfg.honour_page_latency,
                                      cfg.monitor_idle_us)
        self.monitor.start()
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._sel.register(self.watcher, selectors.EVENT_READ, ("watch", None))
        self._control = ControlServer(control_path(cfg.root))
        self._sel.register(self._control, selectors.EVENT_READ, ("control", None))
        specs = list(cfg.devices)
        if cfg.ic_devices:
            specs = [_ic_spec(name, guid) for name, guid in IC_CLASSES] + specs
        for i, spec in enumerate(specs):
            self.add_device(spec, i)
        for spec, dev in zip(specs, self.devices, strict=True):
            if spec.bind:
                if spec.bind == "uio_hv_generic":
                    self.binder.uio_ids.add(dev.class_id)
                elif spec.bind != "none":
                    dev.driver_override = spec.bind
                    self.tree.set_driver_override(dev.device_id, spec.bind)
            elif cfg.bind_uio and spec.model != "null" and not spec.options.get("ic"):   # not the ICs
                self.binder.uio_ids.add(dev.class_id)
        for spec, dev in zip(specs, self.devices, strict=True):
            if spec.bind != "none":
                self.binder.attach(dev)
        self._write_state()
        self._started = True
        self.later(ATTR_REFRESH, self._refresh_attrs)

    def _refresh_attrs(self) -> None:
        """Live sysfs attributes (ring indices, masks, monitor fields, counters): sysfs computes
        them at each read; the simulator rewrites the files every ATTR_REFRESH seconds."""
        for dev in self.devices:
            try:
                dev.refresh_attrs()
            except OSError:            # the device left meanwhile
                pass
        self.later(ATTR_REFRESH, self._refresh_attrs)

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "root": str(self.config.root), "kernel": self.kernel.name,
                 "page_size": self.kernel.page_size, "control": str(control_path(self.config.root)),
                 "devices": [d.describe() for d in self.devices]}
        Tree.write(self.tree.sim / "state.json", json.dumps(state) + "\n", 0o600)

    def ready_info(self) -> dict[str, Any]:
        return {"root": str(self.config.root), "pid": os.getpid(), "kernel": self.kernel.name,
                "release": self.kernel.release, "page_size": self.kernel.page_size,
                "monitored": self.config.monitored, "control": str(control_path(self.config.root)),
                "guest_ram": self.config.guest_ram,
                "devices": [d.describe() for d in self.devices]}

    def run(self, ready: Callable[[Simulator], None] | None = None,
            install_signals: bool = True) -> int:
        """Start, announce readiness, serve until SIGTERM/SIGINT or ``stop``, clean up."""
        old: dict[signal.Signals, Any] = {}
        old_wakeup = -1
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, lambda *_: self.request_stop())
            # A signal may be delivered to any thread; the wakeup fd makes the C-level handler
            # wake the event loop's select so the Python handler runs at once.
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            self.start()
            if ready is not None:
                ready(self)
            self._loop()
        finally:
            if install_signals:
                signal.set_wakeup_fd(old_wakeup)
            self.shutdown()
            for sig, h in old.items():
                signal.signal(sig, h)
        return 0

    def _loop(self) -> None:
        while not self._stopping:
            # Never block for long: the stop request normally wakes the loop through the
            # wakeup fd, but a missed wake-up must not keep the simulator from exiting.
            timeout = _MAX_LOOP_SLEEP
            if self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
            events = self._sel.select(timeout)
            # hang-ups and messages of open connections first, new connections last: a guest
            # that closes and reopens must see the close processed before the open
            order = {"conn": 0, "wake": 1, "watch": 1, "control": 1, "ctlconn": 1, "server": 2}
            events.sort(key=lambda e: order.get(e[0].data[0], 1))
            for key, _mask in events:
                kind, obj = key.data
                try:
                    self._dispatch(kind, key.fileobj, obj)
                except Exception:
                    self.counters["loop_errors"] += 1
                    self.log(f"event loop error ({kind}):\n{traceback.format_exc()}")
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                self._safe(fn, *args)

    def _safe(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.counters["loop_errors"] += 1
            self.log(f"error in {getattr(fn, '__name__', fn)}:\n{traceback.format_exc()}")

    def _run_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                fn, args = self._calls.popleft()
            self._safe(fn, *args)

    def _dispatch(self, kind: str, fileobj: Any, obj: Any) -> None:
        if kind == "wake":
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif kind == "watch":
            for path in self.watcher.read():
                self.binder.handle_write(path)
        elif kind == "server":
            dev: SimDevice = obj
            if dev.server is None:
                return
            # A guest that closed (or died) and reconnects at once: finish the old file's
            # close before the new open, so the new session gets a freshly opened channel.
            for old in list(dev.connections):
                self._serve_connection(dev, old)
            while (conn := dev.server.accept()) is not None:
                self._conn_owner[conn] = dev
                self._sel.register(conn, selectors.EVENT_READ, ("conn", conn))
                try:
                    dev.connection_opened(conn)
                except Exception:
                    # the guest must see a failure (EOF), not wait for a hello forever
                    self.forget_connection(conn)
                    if conn in dev.connections:
                        dev.connection_closed(conn)
                    conn.close()
                    raise
        elif kind == "conn":
            dev2 = self._conn_owner.get(obj)
            if dev2 is None:
                return
            self._serve_connection(dev2, obj)
        elif kind == "control":
            assert self._control is not None
            while (cc := self._control.accept()) is not None:
                self._sel.register(cc, selectors.EVENT_READ, ("ctlconn", cc))
        elif kind == "ctlconn":
            cc2: ControlConnection = obj
            reqs, closed = cc2.requests()
            for req in reqs:
                cc2.reply(self._control_request(req, cc2))
            if closed:
                self._sel.unregister(cc2)
                cc2.close()
                self._end_leases(cc2)

    # ==== control requests ================================================================================
    def _end_leases(self, conn: ControlConnection) -> None:
        """Undo, newest first, what ``conn`` changed with ``until_disconnect``."""
        for dev, op, args in reversed(self._leases.pop(conn, [])):
            try:
                dev.model.control(op, args)
                self.log(f"control client gone: {dev.device_id[:8]} {op} {args} restored")
            except Exception as exc:          # a device rescinded since: nothing to restore
                self.log(f"control client gone: restoring {op} on {dev.device_id[:8]} failed: {exc}")

    def _lease(self, conn: ControlConnection | None, devs: list[SimDevice], op: str,
               until_disconnect: bool) -> None:
        """With ``until_disconnect``, remember how to undo ``op`` (only ``backend`` is undoable)
        on ``devs`` when ``conn`` closes; without, the client set it for good (e.g. restored
        it itself): forget the undo."""
        if conn is None or op != "backend":
            return
        if not until_disconnect:
            if conn in self._leases:
                self._leases[conn] = [x for x in self._leases[conn] if not (x[0] in devs and x[1] == op)]
            return
        for d in devs:
            prev = getattr(d.model, "backend", None)
            if prev is not None:
                self._leases.setdefault(conn, []).append((d, "backend", {"backend": str(prev)}))

    def _control_request(self, req: dict[str, Any] | str,
                         conn: ControlConnection | None = None) -> dict[str, Any]:
        if isinstance(req, str):
            return {"ok": False, "error": req}
        cmd = req.get("cmd")
        try:
            if cmd == "ping":
                return {"ok": True, "pid": os.getpid()}
            if cmd == "stats":
                return {"ok": True, "stats": self.stats()}
            if cmd == "devices":
                return {"ok": True, "devices": [d.describe() for d in self.devices]}
            if cmd == "kernel":
                return {"ok": True, "kernel": self.kernel.describe()}
            if cmd == "fault":
                name = str(req.get("fault", ""))
                devs = self.find(str(req.get("device", "*")))
                for d in devs:
                    d.faults.set(name, req.get("value", True))
                    d.poke_channels()
                return {"ok": True, "devices": [d.device_id for d in devs]}
            if cmd == "clear_faults":
                devs = self.find(str(req.get("device", "*")))
                for d in devs:
                    d.faults.clear()
                    d.poke_channels()
                return {"ok": True, "devices": [d.device_id for d in devs]}
            if cmd == "rescind":
                devs = self.find(str(req["device"]))
                after = req.get("reoffer_after")
                for d in devs:
                    self.rescind(d, None if after is None else float(after))
                return {"ok": True, "rescinded": [d.device_id for d in devs]}
            if cmd == "reoffer":
                devs = self.find(str(req["device"]))
                for d in devs:
                    self.reoffer(d)
                return {"ok": True, "reoffered": [d.device_id for d in devs],
                        "devices": [d.describe() for d in self.devices]}
            if cmd == "offer_subchannels":
                devs = self.find(str(req["device"]))
                for d in devs:
                    d._offer_subchannels(int(req.get("count", 1)))
                return {"ok": True, "devices": [d.device_id for d in devs]}
            if cmd == "model":      # model-specific operations (DeviceModel.control)
                devs = self.find(str(req["device"]))
                self._lease(conn, devs, str(req["op"]), bool(req.get("until_disconnect")))
                return {"ok": True, "results": {d.device_id: d.model.control(
                    str(req["op"]), dict(req.get("args") or {})) for d in devs}}
            if cmd == "stop":
                self.request_stop()
                return {"ok": True}
            return {"ok": False, "error": f"unknown command {cmd!r}; faults: {', '.join(FAULT_NAMES)}"}
        except KeyError as exc:
            what = f"model {req.get('op')!r}" if cmd == "model" and "op" in req else cmd
            how = (f"pass it as {exc.args[0]}=VALUE (`sim ctl model DEVICE {req.get('op')} "
                   f"{exc.args[0]}=VALUE`)" if cmd == "model" and "op" in req else "see `uvmbus sim ctl --help`")
            return {"ok": False, "error": f"{what}: missing argument {exc}: {how}"}
        except (ConfigError, SimulatorError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    def stats(self) -> dict[str, Any]:
        devs = [d.snapshot() for d in self.devices]
        totals: Counter[str] = Counter()
        for d in devs:
            totals.update(d["totals"])
        for key in devs[0]["totals"] if devs else ():
            totals.setdefault(key, 0)
        return {"kernel": self.kernel.name, "page_size": self.kernel.page_size,
                "monitor": self.monitor.describe() if hasattr(self, "monitor") else {},
                "counters": dict(self.counters), "totals": dict(totals), "devices": devs}

    def summary(self) -> str:
        """Human-readable needless-signal summary (printed at exit)."""
        st = self.stats()
        lines = [f"uvmbus-sim: exiting; kernel {st['kernel']}, guest signals "
                 f"{st['totals'].get('guest_signals', 0)}, needless "
                 f"{st['totals'].get('needless_signals', 0)}, collateral "
                 f"{st['totals'].get('collateral_signals', 0)}, interrupts "
                 f"{st['totals'].get('interrupts', 0)}, kernel oops {st['totals'].get('kernel_oops', 0)}"]
        for d in st["devices"]:
            for relid, c in d["channels"].items():
                if c.get("guest_signals") or c.get("packets_from_guest"):
                    lines.append(f"uvmbus-sim:   {d['model']} {d['device_id'][:8]} relid {relid}: "
                                 f"packets in {c.get('packets_from_guest', 0)}, signals "
                                 f"{c.get('guest_signals', 0)} (needless {c.get('needless_signals', 0)})")
        return "\n".join(lines)

    def shutdown(self) -> None:
        """Close every endpoint (guests see EOF), stop workers, remove the files."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        for dev in self.devices:
            for conn in list(dev.connections):
                try:
                    dev.connection_closed(conn)
                except Exception:
                    self.log(f"shutdown: {traceback.format_exc()}")
        if self._started:
            print(self.summary(), file=sys.stderr, flush=True)
        for dev in self.devices:
            try:
                if dev.driver:
                    dev.unbind()
            except Exception:
                self.log(f"shutdown: {traceback.format_exc()}")
        if hasattr(self, "monitor"):
            self.monitor.stop()
        if self._control is not None:
            self._control.close()
        if hasattr(self, "watcher"):
            self.watcher.close()
        if self.guest_ram is not None:
            self.guest_ram.close()
        for mem in (getattr(self, "int_page", None), getattr(self, "monitor_page", None)):
            if mem is not None:
                mem.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.tree.remove_all(self.config.owns_root)
        remove_root_leftovers(Path(self.config.root), self.config.owns_root)

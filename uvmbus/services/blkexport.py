"""``uvmbus blk export``: one LUN of a storvsc controller (or one namespace of an NVMe
controller driven by uvmbus.nvme over VFIO) served over NBD.

nbdkit speaks NBD; its python plugin (:mod:`uvmbus.services.nbdplugin`, shipped in this
package) forwards every request over a private Unix socket to this daemon, which owns the
controller and runs the requests on the device one at a time from a single thread (the
storvsc driver's queues have one owner each).  Why not open the device inside the plugin:
see docs/services.md ("Block export: why the daemon owns the device").

Mapping (NBD → SCSI through :class:`uvmbus.storvsc.Disk`; on NVMe the same block interface
gives READ/WRITE(FUA)/FLUSH/Dataset Management):

==============  ==========================================================================
NBD             device
==============  ==========================================================================
READ            READ(16); unaligned ranges read the covering blocks
WRITE           WRITE(16); FUA → the FUA bit; unaligned ranges read-modify-write the edge blocks
FLUSH           SYNCHRONIZE CACHE(16)
TRIM            UNMAP of the whole blocks inside the range (only if the LUN advertises it);
                FUA → then SYNCHRONIZE CACHE
WRITE_ZEROES    WRITE(16) of zeros (1 MiB at a time); FUA honoured
==============  ==========================================================================

Life: open the controller, start the IPC socket and its thread, start ``nbdkit
--exit-with-parent -f`` (from the main thread: the parent-death signal follows the thread
that forked), wait for nbdkit's pidfile (written once it listens), READY.  SIGTERM: STOPPING,
stop nbdkit (no new requests), finish the request in hand, flush the LUN, close the
controller (waits for in-flight commands).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.errors import (
    ChannelError,
    ConfigError,
    DataProtect,
    IllegalRequest,
    LunGone,
    NotFound,
    StorageError,
    UvmbusError,
)
from uvmbus.services import nbdplugin as P
from uvmbus.services.daemon import Daemon
from uvmbus.services.metrics import sim_collector
from uvmbus.services.reattach import DeviceWatch
from uvmbus.sockets import listen_private

__all__ = ["ExportOptions", "BlockExport", "run_export", "plugin_path"]

log = logging.getLogger("uvmbus.blk.export")

MAX_REQUEST = 32 << 20
ZERO_CHUNK = 1 << 20
READY_TIMEOUT = 30.0


def plugin_path() -> Path:
    """The nbdkit python plugin file shipped in the package."""
    return Path(P.__file__).resolve()


@dataclass
class ExportOptions:
    device: str
    root: str = "/"
    lun: int = 0
    socket: str | None = None
    port: int | None = None
    bind_address: str = "127.0.0.1"
    readonly: bool = False
    subchannels: int = 0
    nbdkit: str = "nbdkit"
    nbdkit_args: list[str] = field(default_factory=list)
    #: device is an NVMe controller (uvmbus.nvme over VFIO); lun = namespace index
    nvme: bool = False
    record: Any = None          # uvmbus.trace.Recorder (--record)
    #: seconds to wait for a re-offer after the device went away before giving up (exit 1)
    reattach_timeout: float = 10.0


@dataclass
class _OpStats:
    count: int = 0
    bytes: int = 0
    errors: int = 0


class DeviceLost(StorageError):
    """A request while the exported device is gone (answered EIO at once)."""


def _errno_for(exc: BaseException) -> int:
    if isinstance(exc, DataProtect):
        return errno.EPERM
    if isinstance(exc, (ConfigError, IllegalRequest)):
        return errno.EINVAL
    if isinstance(exc, LunGone):
        return errno.ESHUTDOWN
    return errno.EIO


class BlockExport:
    """The device side of the export (see the module docstring)."""

    def __init__(self, opts: ExportOptions, daemon: Daemon):
        self.opts = opts
        self.daemon = daemon
        self.hba: Any = None
        self.disk: Any = None
        self.ops = {name: _OpStats() for name in P.OP_NAMES.values() if name != "hello"}
        self.ipc_path: Path | None = None
        self.nbd_socket: Path | None = None
        self.nbd_pidfile: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lat: Any = None
        self._ctl_stats: dict[str, Any] = {}
        self._ctl_stats_at = 0.0
        self._iops = 0.0
        self._iops_base = (time.monotonic(), 0)
        self.connections = 0
        self._device_id = ""
        #: the device's loss and reattachment (shared with `net bridge`)
        self.watch = DeviceWatch(daemon, opts.root, opts.device, opts.reattach_timeout, log)
        self._size = 0

    # -- set-up ---------------------------------------------------------------------------------------
    def open(self) -> None:
        import uvmbus.storvsc as storvsc

        nbdkit = shutil.which(self.opts.nbdkit)
        if nbdkit is None:
            raise NotFound(f"{self.opts.nbdkit} not found: install nbdkit and nbdkit-plugin-python "
                           "(Debian: apt-get install nbdkit nbdkit-plugin-python)")
        self.opts.nbdkit = nbdkit
        probe = subprocess.run([nbdkit, "--dump-plugin", "python"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise NotFound("nbdkit has no python plugin: install nbdkit-plugin-python "
                           f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'no output'})")
        if self.opts.nvme:
            import uvmbus.nvme as nvme

            self.hba = nvme.open(self.opts.device, self.opts.root,
                                 io_queues=self.opts.subchannels + 1)
        else:
            self.hba = storvsc.open(self.opts.device, self.opts.root,
                                    subchannels=self.opts.subchannels, record=self.opts.record)
        try:
            self.disk = self.hba.disk(self.opts.lun)
        except BaseException:
            self.hba.close()
            self.hba = None
            raise
        self._size = int(self.disk.size)
        self.watch.device_id = self.device_id
        self._refresh_ctl_stats(force=True)

    # -- device loss and reattachment -------------------------------------------------------------------
    @property
    def lost(self) -> str:
        return self.watch.lost

    @property
    def reattaches(self) -> int:
        return self.watch.reattaches

    def mark_lost(self, reason: str) -> None:
        self.watch.mark_lost(reason)

    def _device_gone(self) -> str:
        if self.opts.nvme or self.hba is None:
            return ""
        return self.watch.gone_reason(getattr(getattr(self.hba.device, "uio", None), "endpoint", None))

    def check_device(self) -> None:
        """From the I/O thread: notice a loss; while lost, try to reattach (a re-offer brings
        the device back under the same GUID: open it again, same disk size)."""
        if not self.lost:
            why = self._device_gone()
            if why:
                self.mark_lost(why)
            return
        if not self.watch.may_retry():
            return
        self._drop_controller()
        import uvmbus.storvsc as storvsc

        try:
            hba = storvsc.open(self.opts.device, self.opts.root, subchannels=self.opts.subchannels,
                               record=self.opts.record)
        except UvmbusError as exc:
            log.info("reattach not possible yet: %s", exc)
            return
        try:
            disk = hba.disk(self.opts.lun)
            if int(disk.size) != self._size:
                raise StorageError(f"the re-offered LUN {self.opts.lun} has {int(disk.size)} bytes, "
                                   f"not {self._size}: not the exported disk")
        except UvmbusError as exc:
            hba.close()
            log.error("reattach failed: %s", exc)
            self.watch.give_up(f"reattach failed: {exc}")
            return
        self.hba, self.disk = hba, disk
        self.watch.reattached(self.status_line())

    def _drop_controller(self) -> None:
        if self.hba is None:
            return
        hba, self.hba, self.disk = self.hba, None, None
        try:
            hba.close()
        except Exception as exc:          # a dead device: closing it may fail in any way
            log.info("closing the lost controller: %s", exc)

    @property
    def device_id(self) -> str:
        if self.hba is not None:
            self._device_id = (str(self.hba.fn.name) if self.opts.nvme
                               else str(self.hba.device.device.device_id))
        return self._device_id or self.opts.device

    def info(self) -> dict[str, Any]:
        d = self.disk
        return {"size": int(d.size), "block_size": int(d.block_size),
                "preferred_block": max(4096, int(d.block_size)), "max_request": MAX_REQUEST,
                "readonly": self.opts.readonly, "can_trim": bool(d.unmap_supported),
                "lun": self.opts.lun, "device": self.device_id}

    @property
    def uri(self) -> str:
        if self.opts.port is not None:
            return f"nbd://{self.opts.bind_address}:{self.opts.port}/"
        return f"nbd+unix:///?socket={self.nbd_socket}"

    def start_ipc(self, run_dir: Path) -> None:
        self.ipc_path = run_dir / f"blk-{self.device_id}.io"
        self._listener = listen_private(self.ipc_path, socket.SOCK_STREAM, backlog=16)

    def start_nbdkit(self, run_dir: Path) -> None:
        """Start nbdkit (call from the main thread) and wait until it listens."""
        o = self.opts
        self.nbd_pidfile = run_dir / f"blk-{self.device_id}.nbdkit-pid"
        try:
            self.nbd_pidfile.unlink()
        except FileNotFoundError:
            pass
        cmd = [o.nbdkit, "--exit-with-parent", "--foreground", "--pidfile", str(self.nbd_pidfile)]
        if o.port is not None:
            cmd += ["--port", str(o.port), "--ipaddr", o.bind_address]
        else:
            self.nbd_socket = Path(o.socket) if o.socket else run_dir / f"blk-{self.device_id}.nbd"
            if len(str(self.nbd_socket).encode()) > 107:
                raise ConfigError(f"NBD socket path too long for AF_UNIX: {self.nbd_socket}")
            try:
                self.nbd_socket.unlink()
            except FileNotFoundError:
                pass
            cmd += ["--unix", str(self.nbd_socket)]
        if o.readonly:
            cmd.append("--readonly")
        cmd += o.nbdkit_args
        cmd += ["python", str(plugin_path()), f"ipc={self.ipc_path}"]
        log.info("starting %s", " ".join(cmd))
        old = os.umask(0o077)                # the NBD socket: 0600 like every control socket
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            os.umask(old)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise UvmbusError(f"nbdkit exited with status {rc} before listening (see its "
                                  f"messages above): {' '.join(cmd)}")
            if self._nbdkit_listening():
                if self.nbd_socket is not None:
                    os.chmod(self.nbd_socket, 0o600)     # nbdkit applies its own umask
                return
            if time.monotonic() > deadline:
                raise UvmbusError(f"nbdkit did not start listening within {READY_TIMEOUT:g} s")
            if self.daemon.wait(0.02):
                raise UvmbusError(f"stopped ({self.daemon.stop_reason}) while nbdkit was starting")

    def _nbdkit_listening(self) -> bool:
        assert self.nbd_pidfile is not None
        try:
            return bool(self.nbd_pidfile.read_text().strip())
        except FileNotFoundError:
            return False

    # -- the I/O thread -------------------------------------------------------------------------------
    def io_loop(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                self.daemon.beat("io")
                self.check_device()
                self.daemon.beat("io")
                for key, _ in sel.select(0.25):
                    if key.fileobj is self._listener:
                        try:
                            conn, _ = self._listener.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(True)
                        conn.settimeout(30.0)
                        self._conns.append(conn)
                        self.connections += 1
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    try:
                        self._serve_one(conn)
                    except (ConnectionError, TimeoutError, OSError) as exc:
                        if not isinstance(exc, ConnectionError):
                            log.warning("IPC connection dropped: %s", exc)
                        sel.unregister(conn)
                        conn.close()
                        self._conns.remove(conn)
                self._refresh_ctl_stats()
        finally:
            for c in self._conns:
                c.close()
            self._conns.clear()
            sel.close()

    def _serve_one(self, conn: socket.socket) -> None:
        op, flags, _, length, offset = P.REQ.unpack(P.recv_exact(conn, P.REQ.size))
        data = P.recv_exact(conn, length) if op == P.OP_WRITE and length else b""
        t0 = time.perf_counter()
        name = P.OP_NAMES.get(op, "?")
        try:
            if self.lost:
                raise DeviceLost(f"the device is gone ({self.lost}); waiting for a re-offer")
            body = self._execute(op, flags, length, offset, data)
            err = 0
        except (UvmbusError, ValueError) as exc:
            if not isinstance(exc, DeviceLost) and self._is_loss(exc):
                self.mark_lost(f"{type(exc).__name__}: {exc}")
            err = _errno_for(exc)
            body = str(exc).encode()[:4096]
            if name in self.ops:
                self.ops[name].errors += 1
            log.warning("%s %d+%d failed: %s", name, offset, length, exc)
        if name in self.ops and not err:
            st = self.ops[name]
            st.count += 1
            st.bytes += length if op in (P.OP_READ, P.OP_WRITE) else 0
            if self._lat is not None:
                self._lat.labels(self.device_id, str(self.opts.lun), name).observe(time.perf_counter() - t0)
        if len(body) <= 65536:
            conn.sendall(P.REP.pack(err, len(body)) + body)
        else:
            conn.sendall(P.REP.pack(err, len(body)))
            conn.sendall(body)

    def _is_loss(self, exc: BaseException) -> bool:
        """A failure of the channel or controller itself (not of one request)."""
        if self.watch.is_loss(exc):
            return True          # RingCorrupt, ChannelRevoked, ...
        return self.hba is not None and getattr(self.hba, "_failed", None) is not None

    def _execute(self, op: int, flags: int, length: int, offset: int, data: bytes) -> bytes:
        if op == P.OP_HELLO:
            return json.dumps(self.info()).encode()
        if op in (P.OP_WRITE, P.OP_TRIM, P.OP_ZERO) and self.opts.readonly:
            raise DataProtect(f"LUN {self.opts.lun} is exported read-only")
        if length > MAX_REQUEST and op in (P.OP_READ, P.OP_WRITE):
            raise ConfigError(f"request of {length} bytes exceeds the {MAX_REQUEST}-byte maximum")
        if op != P.OP_FLUSH and offset + length > self.disk.size:
            raise ConfigError(f"{offset}+{length} is beyond the end of the LUN ({self.disk.size} bytes)")
        fua = bool(flags & P.F_FUA)
        if op == P.OP_READ:
            return self._read(offset, length)
        if op == P.OP_WRITE:
            self._write(offset, data, fua)
        elif op == P.OP_FLUSH:
            self.disk.flush()
        elif op == P.OP_TRIM:
            self._trim(offset, length, fua)
        elif op == P.OP_ZERO:
            pos = 0
            zeros = bytes(min(ZERO_CHUNK, length))
            while pos < length:
                n = min(ZERO_CHUNK, length - pos)
                self._write(offset + pos, zeros[:n], fua)
                pos += n
        else:
            raise ConfigError(f"unknown IPC op {op}")
        return b""

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.disk.block_size
        return offset - offset % bs, -(-(offset + length) // bs) * bs

    def _read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        a, e = self._span(offset, length)
        if a == offset and e == offset + length:
            return bytes(self.disk.read(offset, length))
        data = self.disk.read(a, e - a)
        return bytes(data[offset - a:offset - a + length])

    def _write(self, offset: int, data: bytes, fua: bool) -> None:
        n = len(data)
        if n == 0:
            return
        bs = self.disk.block_size
        a, e = self._span(offset, n)
        if a == offset and e == offset + n:
            self.disk.write(offset, data, fua=fua)
            return
        buf = bytearray(e - a)                       # read-modify-write the edge blocks
        if offset != a:
            buf[:bs] = self.disk.read(a, bs)
        if offset + n != e and not (e - bs == a and offset != a):
            buf[e - a - bs:] = self.disk.read(e - bs, bs)
        buf[offset - a:offset - a + n] = data
        self.disk.write(a, buf, fua=fua)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        if not self.disk.unmap_supported:
            raise StorageError(f"LUN {self.opts.lun} does not support UNMAP")
        bs = self.disk.block_size
        a = -(-offset // bs) * bs                    # whole blocks inside the range only
        e = (offset + length) // bs * bs
        if e > a:
            self.disk.discard(a, e - a)
        if fua:
            self.disk.flush()

    # -- stop ---------------------------------------------------------------------------------------------
    def stop_nbdkit(self, timeout: float = 10.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("nbdkit did not exit within %g s of SIGTERM; killing it", timeout)
                p.kill()
                p.wait()
        return p.returncode

    def stop_io(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop_nbdkit()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for p in (self.ipc_path, self.nbd_socket if self.opts.port is None else None, self.nbd_pidfile):
            if p is not None:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        if self.hba is not None:
            try:
                if not self.opts.readonly and self.disk is not None and not self.disk.gone:
                    self.disk.flush()
            except UvmbusError as exc:
                log.warning("final flush failed: %s", exc)
            try:
                self.hba.close()             # waits for in-flight commands
            except (UvmbusError, ChannelError) as exc:
                log.warning("closing the controller: %s", exc)
            self.hba = None

    # -- observability ----------------------------------------------------------------------------------
    def _refresh_ctl_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._ctl_stats_at < 0.5:
            return
        self._ctl_stats_at = now
        if self.hba is not None:
            self._ctl_stats = self.hba.stats()
        t0, n0 = self._iops_base
        total = sum(s.count for s in self.ops.values())
        if now - t0 >= 1.0:
            self._iops = (total - n0) / (now - t0)
            self._iops_base = (now, total)

    def status(self) -> dict[str, Any]:
        st = self._ctl_stats
        queues = []
        for i, q in enumerate(st.get("queues", [])):
            queues.append({"queue": i, **q})
        io: dict[str, float] = {f"{k}_ops": v.count for k, v in self.ops.items()}
        io["read_bytes"] = self.ops["read"].bytes
        io["write_bytes"] = self.ops["write"].bytes
        io["errors"] = sum(v.errors for v in self.ops.values())
        io["iops"] = round(self._iops, 1)
        d: dict[str, Any] = {"device_id": self.device_id, "lun": self.opts.lun, "uri": self.uri,
                             "device_lost": self.lost or None, "reattaches": self.reattaches,
                             "nbdkit_pid": self.proc.pid if self.proc else None,
                             "connections": self.connections, "io": io, "queues": queues,
                             "controller": st.get("counters", {})}
        if self.disk is not None:
            d.update(size=int(self.disk.size), block_size=int(self.disk.block_size),
                     readonly=self.opts.readonly)
        return d

    def status_line(self) -> str:
        return (f"LUN {self.opts.lun} of {self.device_id[:8]} on {self.uri}: "
                f"{self.ops['read'].count} reads, {self.ops['write'].count} writes, "
                f"{sum(v.errors for v in self.ops.values())} errors")

    def register_metrics(self) -> None:
        reg = self.daemon.registry
        lab = ("device", "lun", "op")
        reqs = reg.counter("blk_requests_total", "NBD requests served, by operation", lab)
        nbytes = reg.counter("blk_bytes_total", "bytes read/written through the export", lab)
        errs = reg.counter("blk_errors_total", "requests that failed", lab)
        iops = reg.gauge("blk_iops", "requests per second over the last interval (>= 1 s)", ("device", "lun"))
        inflight = reg.gauge("storvsc_inflight", "commands in flight on the channel", ("device", "queue"))
        submitted = reg.counter("storvsc_commands_total", "commands submitted to the host", ("device", "queue"))
        ring_full = reg.counter("storvsc_ring_full_total", "submissions that found the ring full",
                                ("device", "queue"))
        signals = reg.counter("storvsc_signals_total", "guest->host signals issued", ("device", "queue"))
        ctl = reg.counter("storvsc_events_total", "controller events (timeouts, resets, bogus "
                          "completions, unit attentions, ...)", ("device", "event"))
        self._lat = reg.histogram("blk_request_seconds", "time to serve one NBD request", lab)

        def collect() -> None:
            d, lun = self.device_id, str(self.opts.lun)
            for name, s in self.ops.items():
                reqs.labels(d, lun, name).set(s.count)
                nbytes.labels(d, lun, name).set(s.bytes)
                errs.labels(d, lun, name).set(s.errors)
            iops.labels(d, lun).set(round(self._iops, 1))
            for i, q in enumerate(self._ctl_stats.get("queues", [])):
                inflight.labels(d, str(i)).set(q.get("inflight", 0))
                submitted.labels(d, str(i)).set(q.get("submitted", 0))
                ring_full.labels(d, str(i)).set(q.get("ring_full", 0))
                signals.labels(d, str(i)).set(q.get("signals", 0))
            for k, v in self._ctl_stats.get("counters", {}).items():
                ctl.labels(d, k).set(v)

        reg.add_collector(collect)
        sc = sim_collector(reg, self.opts.root, [self.device_id])
        if sc is not None:
            reg.add_collector(sc)


def run_export(opts: ExportOptions, daemon: Daemon) -> int:
    """The daemon's life (see the module docstring)."""
    if opts.port is not None and not 0 < opts.port < 65536:
        raise ConfigError(f"--port {opts.port}: 1..65535")
    daemon.install_signal_handlers()
    exp = BlockExport(opts, daemon)
    exp.open()
    rc = 0
    try:
        daemon.start(exp.device_id)
        exp.register_metrics()
        daemon.status_fn = exp.status
        daemon.problem_fn = exp.watch.problem
        exp.start_ipc(daemon.run_dir)
        daemon.spawn("io", exp.io_loop)
        exp.start_nbdkit(daemon.run_dir)
        daemon.ready(exp.status_line())
        last = time.monotonic()

        def on_tick() -> None:
            nonlocal last
            if exp.proc is not None and exp.proc.poll() is not None:
                log.error("nbdkit exited with status %s", exp.proc.returncode)
                daemon.failed = True
                daemon.request_stop(f"nbdkit exited ({exp.proc.returncode})")
            if exp.lost:
                exp.watch.check_expired()
            elif time.monotonic() - last >= 5.0:
                last = time.monotonic()
                daemon.set_status(exp.status_line())

        daemon.run(on_tick)
        daemon.stopping(f"stopping ({daemon.stop_reason}): closing the export")
        log.info("stopping (%s)", daemon.stop_reason)
        nrc = exp.stop_nbdkit()
        if nrc not in (0, None, -signal.SIGTERM):
            log.warning("nbdkit exited with status %s", nrc)
        exp.stop_io()
        left = daemon.join_workers(10.0)
        if left:
            log.warning("I/O thread still busy after 10 s")
    finally:
        exp.close()
        daemon.close()
    log.info("stopped: %s", exp.status_line())
    if daemon.failed:
        rc = 1
    return rc

"""``uvmbus ic run``: serve the integration components a VM offers, from userspace.

For every requested service the daemon finds the device of that class, hands it to
``uio_hv_generic`` (unbinding ``hv_utils``; :func:`uvmbus.bus.bind_uio`), opens its channel
and answers the host on one worker thread per service.  A device that goes away (rescind,
revoked channel) is reported lost and taken again when the host re-offers it
(:class:`uvmbus.services.reattach.DeviceWatch`, one per service).  On exit (SIGTERM, or no
re-offer within ``--reattach-timeout``) it gives every device it took back to its kernel driver (:func:`uvmbus.bus.unbind_uio`), so
the guest keeps its heartbeat/shutdown/time sync/KVP through hv_utils again.  fcopy has no
kernel driver since Linux 6.10: it is left unbound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uvmbus.errors import ConfigError, UvmbusError
from uvmbus.ic.fcopy import FcopyService
from uvmbus.ic.framework import IcDriver, IcService
from uvmbus.ic.heartbeat import HeartbeatService
from uvmbus.ic.kvp import DEFAULT_DIR, KvpPools, KvpService
from uvmbus.ic.shutdown import (
    ShutdownRequest,
    ShutdownService,
    hibernate_supported,
    systemctl_action,
)
from uvmbus.ic.timesync import TimeSyncService
from uvmbus.services.reattach import DeviceWatch

__all__ = ["SERVICE_NAMES", "IcOptions", "build_service", "run_ic"]

log = logging.getLogger("uvmbus.ic")

#: the services, in start order; fcopy only when asked for (it writes files)
SERVICE_NAMES = ("heartbeat", "shutdown", "timesync", "kvp", "fcopy")
DEFAULT_SERVICES = ("heartbeat", "shutdown", "timesync", "kvp")


@dataclass
class IcOptions:
    root: str = "/"
    services: list[str] = field(default_factory=lambda: list(DEFAULT_SERVICES))
    fcopy_root: str | None = None
    kvp_dir: str | None = None              # None: <root>/var/lib/hyperv
    shutdown_action: str = "systemctl"      # systemctl | log | command:CMD
    timesync_apply: str = "none"
    bind: bool = True
    give_back: bool = True
    bind_timeout: float = 10.0
    force: bool = False
    #: a uvmbus.trace.Recorder (shared by every IC channel; the caller closes it), or None
    record: Any = None
    #: seconds to wait for a rescinded IC device to be offered again (then exit 1)
    reattach_timeout: float = 8.0            # under uvmbus-ic.service's WatchdogSec=10s


def _shutdown_callback(spec: str) -> Callable[[ShutdownRequest], None]:
    if spec == "systemctl":
        return systemctl_action
    if spec == "log":
        return lambda req: log.warning("host requested %s (not acted on: --shutdown-action log)", req.action)
    if spec.startswith("command:"):
        argv = shlex.split(spec.split(":", 1)[1])
        if not argv:
            raise ConfigError("--shutdown-action command: needs a command")

        def run(req: ShutdownRequest) -> None:
            env = dict(os.environ, UVMBUS_SHUTDOWN_ACTION=req.action,
                       UVMBUS_SHUTDOWN_FORCE="1" if req.force else "0",
                       UVMBUS_SHUTDOWN_REASON=f"{req.reason_code:#x}")
            subprocess.run([*argv, req.action], env=env, check=False, timeout=60)
        return run
    raise ConfigError(f"--shutdown-action {spec!r}: use systemctl, log or command:CMD")


def build_service(name: str, opts: IcOptions) -> IcService:
    if name == "heartbeat":
        return HeartbeatService()
    if name == "shutdown":
        return ShutdownService(_shutdown_callback(opts.shutdown_action),
                               can_hibernate=lambda: hibernate_supported(opts.root))
    if name == "timesync":
        return TimeSyncService(opts.timesync_apply)
    if name == "kvp":
        kvp_dir = opts.kvp_dir or os.path.join(opts.root, DEFAULT_DIR.lstrip("/"))
        return KvpService(KvpPools(kvp_dir), root=opts.root)
    if name == "fcopy":
        if not opts.fcopy_root:
            raise ConfigError("fcopy needs --fcopy-root DIR: the directory host copies land in "
                              "(paths from the host are taken relative to it)")
        if not os.path.isdir(opts.fcopy_root):
            raise ConfigError(f"--fcopy-root {opts.fcopy_root}: not a directory")
        return FcopyService(opts.fcopy_root)
    raise ConfigError(f"unknown IC service {name!r}; known: {', '.join(SERVICE_NAMES)}")


class _Served:
    def __init__(self, name: str, service: IcService, dev: Any, cdev: Any, bound_by_us: bool,
                 watch: DeviceWatch):
        self.name = name
        self.service = service
        self.dev = dev
        self.cdev = cdev
        self.bound_by_us = bound_by_us
        self.driver = IcDriver(service, cdev.primary)
        #: the device's loss and reattachment (shared with `blk export` and `net bridge`)
        self.watch = watch


def run_ic(opts: IcOptions, daemon: Any) -> int:
    """Run the IC daemon until a stop is requested; returns the exit status."""
    from uvmbus.bus import Bus, bind_uio
    from uvmbus.bus.devices import UIO_DRIVER
    from uvmbus.channel import ChannelDevice
    from uvmbus.uio import UioDevice

    bad = [s for s in opts.services if s not in SERVICE_NAMES]
    if bad:
        raise ConfigError(f"unknown IC service(s) {', '.join(bad)}; known: {', '.join(SERVICE_NAMES)}")
    services = {name: build_service(name, opts) for name in opts.services}
    bus = Bus(opts.root)
    served: list[_Served] = []
    locks = contextlib.ExitStack()
    daemon.install_signal_handlers()
    try:
        daemon.start("+".join(opts.services))
        by_class = {d.class_name: d for d in bus.devices()}
        for name, svc in services.items():
            dev = by_class.get(name)
            if dev is None:
                log.warning("%s: this VM offers no %s device; not served", name, name)
                continue
            locks.enter_context(_lock(dev))
            bound_by_us = False
            if dev.driver != UIO_DRIVER:
                if not opts.bind:
                    raise ConfigError(f"{dev.device_id} ({name}) is bound to {dev.driver or 'no driver'}, "
                                      "not uio_hv_generic: drop --no-bind or bind it first "
                                      f"(`uvmbus bind {dev.device_id}`)")
                log.info("%s: taking %s from %s", name, dev.device_id, dev.driver or "no driver")
                try:
                    bind_uio(bus, dev, force=opts.force, timeout=opts.bind_timeout)
                except BaseException:
                    _give_back(bus, dev, opts, name)      # hv_utils may already be unbound
                    raise
                bound_by_us = True
            try:
                cdev = ChannelDevice(UioDevice(bus, bus.device(dev.device_id)), recorder=opts.record)
            except BaseException:
                if bound_by_us and opts.give_back:
                    _give_back(bus, dev, opts, name)
                raise
            served.append(_Served(name, svc, dev, cdev, bound_by_us,
                                  DeviceWatch(daemon, opts.root, dev.device_id, opts.reattach_timeout, log)))
        if not served:
            raise ConfigError(f"none of the requested IC devices ({', '.join(opts.services)}) exists "
                              f"under {opts.root}: `uvmbus list` shows what this VM offers")
        _metrics(daemon, served)
        daemon.status_fn = lambda: {"services": {s.name: {**s.service.status(), "device": s.dev.device_id,
                                                           "replies": s.driver.replies,
                                                           "device_lost": s.watch.lost or None,
                                                           "reattaches": s.watch.reattaches}
                                                  for s in served}}
        daemon.problem_fn = lambda: "; ".join(p for s in served if (p := s.watch.problem()))
        stop = daemon.stop_event
        for s in served:
            daemon.spawn(s.name, _worker(s, stop, daemon, bus, opts, locks, served))
        daemon.ready(f"serving {', '.join(s.name for s in served)}")
        daemon.run()
        daemon.stopping()
        left = daemon.join_workers(5.0)
        if left:
            log.warning("workers still running at exit: %s", ", ".join(left))
        return 1 if daemon.failed else 0
    finally:
        for s in served:
            if isinstance(s.service, FcopyService):
                s.service.close()
            with contextlib.suppress(UvmbusError, OSError):
                s.cdev.close()
            if s.bound_by_us and opts.give_back:
                _give_back(bus, s.dev, opts, s.name)
        locks.close()
        daemon.close()


def _give_back(bus: Any, dev: Any, opts: IcOptions, name: str) -> None:
    """Return ``dev`` to its kernel driver (hv_utils; none for fcopy); log, never raise."""
    from uvmbus.bus import unbind_uio
    if not dev.path.exists():
        log.warning("%s: %s is gone (rescinded by the host): nothing to give back", name, dev.device_id)
        return
    try:
        unbind_uio(bus, dev, timeout=opts.bind_timeout)
        log.info("%s: %s given back to %s", name, dev.device_id, dev.driver or "no driver")
    except UvmbusError as exc:
        log.error("%s: could not give %s back: %s (run `uvmbus unbind %s`)", name, dev.device_id,
                  exc, dev.device_id)


def _worker(s: _Served, stop: threading.Event, daemon: Any, bus: Any, opts: IcOptions,
            locks: contextlib.ExitStack, served: list[_Served]) -> Callable[[], None]:
    """Serve the channel; when it dies (rescind, host loss, corrupt ring) wait for a re-offer
    and serve the new channel (docs/ic.md, docs/reliability.md)."""
    def run() -> None:
        w = s.watch
        while not stop.is_set():
            if not w.lost:
                try:
                    s.driver.run(stop, beat=lambda: daemon.beat(s.name))
                    return
                except UvmbusError as exc:
                    endpoint = getattr(getattr(s.cdev, "uio", None), "endpoint", None)
                    why = w.gone_reason(endpoint)
                    if not why and not w.is_loss(exc):
                        raise
                    w.mark_lost(f"{s.name}: {why or f'{type(exc).__name__}: {exc}'}")
                    with contextlib.suppress(Exception):       # a dead channel may fail to close
                        s.cdev.close()
                continue
            daemon.beat(s.name)
            if w.check_expired():
                return
            if w.may_retry():
                _reattach(s, bus, opts, locks, served, daemon)
            stop.wait(0.1)
    return run


def _reattach(s: _Served, bus: Any, opts: IcOptions, locks: contextlib.ExitStack,
              served: list[_Served], daemon: Any) -> None:
    """The device is offered again (same GUID): take it again if it went to its kernel driver,
    open the new channel and serve it with the same service state."""
    from uvmbus.bus import bind_uio
    from uvmbus.bus.devices import UIO_DRIVER
    from uvmbus.channel import ChannelDevice
    from uvmbus.uio import UioDevice

    try:
        dev = bus.device(s.dev.device_id)
        locks.enter_context(_lock(dev))       # a re-offer is a new sysfs directory: hold it too
        if dev.driver != UIO_DRIVER:
            if not opts.bind:
                log.info("%s: the re-offered %s is on %s; waiting for it to be bound to "
                         "uio_hv_generic (--no-bind)", s.name, dev.device_id, dev.driver or "no driver")
                return
            log.info("%s: taking the re-offered %s from %s", s.name, dev.device_id, dev.driver or "no driver")
            bind_uio(bus, dev, force=opts.force, timeout=opts.bind_timeout)
            s.bound_by_us = True
        cdev = ChannelDevice(UioDevice(bus, bus.device(dev.device_id)), recorder=opts.record)
    except (UvmbusError, OSError) as exc:       # OSError: the endpoint reset while re-offered
        log.info("%s: reattach not possible yet: %s", s.name, exc)
        return
    s.dev, s.cdev = dev, cdev
    s.driver.channel = cdev.primary
    still = [o.name for o in served if o.watch.lost and o is not s]
    s.watch.reattached(f"serving {', '.join(o.name for o in served)}; {s.name} reattached"
                       + (f" (still lost: {', '.join(still)})" if still else ""))


@contextlib.contextmanager
def _lock(dev: Any) -> Any:
    from uvmbus.services.cli import device_lock
    with device_lock(dev, what="serve it"):
        yield


def _metrics(daemon: Any, served: list[_Served]) -> None:
    reg = daemon.registry
    msgs = reg.counter("ic_messages_total", "IC requests answered, by service and kind", ("service", "kind"))

    def collect() -> None:
        for s in served:
            for k, v in s.service.counters.items():
                msgs.labels(s.name, k).set(v)
    reg.add_collector(collect)

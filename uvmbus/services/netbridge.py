"""``uvmbus net bridge``: a netvsc NIC driven from userspace, joined to a TAP interface.

The kernel (or a network namespace) then uses the synthetic NIC through the TAP: frames the
host delivers to the NIC are written to the TAP; frames the kernel sends on the TAP go out of
the NIC.  An optional hook (:mod:`uvmbus.services.hooks`) sees every burst in both
directions and may pass, change or drop frames.

Threads (each queue has one owner, docs/netvsc.md):

* ``rx-Q`` per NIC queue: ``rx_burst(Q, timeout)`` → hook → ``write(tap)``;
* ``tx``: ``poll(tap)`` → up to a burst of ``read(tap)`` → hook → ``tx_burst(queue 0)``.
  Queue 0's calls take the NIC's lock, so the ``rx-0`` thread and this one can share it;
  on back-pressure ``tx`` retries ``tx_burst`` (which reaps completions) for up to
  ``TX_RETRY`` seconds and then drops the rest (counted);
* the main thread: signals, sd_notify (READY, STATUS, WATCHDOG only while every worker
  beats), metrics textfile.

Large sends (docs/services.md): when the host negotiated LSO (and no hook is set, ``--no-lso``
turns it off), the TAP is opened with ``IFF_VNET_HDR`` and TSO4/TSO6 + checksum offload and a
``gso_max_size`` of the NIC's large-send limit, so the kernel's TCP stack hands the bridge
frames of up to ~62 KiB; ``tx_burst(vnet=True)`` turns each GSO frame into one LSOv2 large
send (C, one call per burst) and completes partial checksums of the others.  Frames written
to the TAP then carry a zero virtio-net header.

SIGTERM: stop reading the TAP, let the workers finish the burst in hand, then close the NIC
(packet filter 0, wait for every send completion, ack what is still in the receive ring,
RNDIS HALT, revoke the buffers, close the channels) and the TAP.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from uvmbus.errors import ConfigError, UvmbusError
from uvmbus.services.daemon import Daemon
from uvmbus.services.hooks import Hook, load_hook
from uvmbus.services.metrics import Registry, sim_collector
from uvmbus.services.reattach import DeviceWatch
from uvmbus.tap import VNET_HDR_LEN, TapInterface

__all__ = ["BridgeOptions", "NetBridge", "run_bridge"]

log = logging.getLogger("uvmbus.net.bridge")

BURST = 256
RX_TIMEOUT = 0.2
RX_JOIN = 2.0
TX_RETRY = 0.05
STATUS_PERIOD = 5.0
#: the virtio-net header in front of every frame written to a TAP with IFF_VNET_HDR: no
#: offload information (the kernel verifies checksums itself)
_VNET_NONE = bytes(VNET_HDR_LEN)


@dataclass
class BridgeOptions:
    device: str
    tap: str
    root: str = "/"
    netns: str | None = None
    hook: str | None = None
    cpus: list[int] | None = None
    queues: int = 1
    mtu: int = 1500
    addresses: list[str] = field(default_factory=list)
    burst: int = BURST
    record: Any = None          # uvmbus.trace.Recorder (--record)
    #: seconds to wait for a re-offer after the device went away before giving up (exit 1)
    reattach_timeout: float = 8.0              # under uvmbus-net@.service's WatchdogSec=10s
    #: large sends through the TAP when the host negotiated LSO (and no hook is set)
    lso: bool = True


@dataclass
class _DirStats:
    frames: int = 0
    bytes: int = 0
    #: TX: frames sent as large sends (LSOv2)
    large_sends: int = 0
    hook_drops: int = 0
    hook_added: int = 0
    hook_errors: int = 0
    tap_drops: int = 0
    nic_drops: int = 0
    oversize: int = 0
    #: frames from the TAP dropped while the device was gone
    lost_drops: int = 0
    bursts: int = 0


class NetBridge:
    """The bridge itself (opened NIC + TAP + workers); :func:`run_bridge` is the daemon."""

    def __init__(self, opts: BridgeOptions, daemon: Daemon):
        self.opts = opts
        self.daemon = daemon
        self.nic: Any = None
        self.tap: TapInterface | None = None
        self.hook: Hook | None = None
        self.stats = {"rx": _DirStats(), "tx": _DirStats()}
        self.queue_stats: dict[int, _DirStats] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._hook_errors_logged = 0
        self._burst_hist: Any = None
        self._device_id = ""
        #: the device's loss and reattachment (shared with `blk export`)
        self.watch = DeviceWatch(daemon, opts.root, opts.device, opts.reattach_timeout, log)
        #: guards ``self.nic`` against a swap while the tx worker sends on it
        self._nic_lock = threading.Lock()
        self._rx_threads: list[threading.Thread] = []
        self.nic_mac = ""
        self.nic_mtu = opts.mtu
        self.nic_queues = 0
        self.nic_lso = (0, 0)
        #: what a re-offered NIC changed (queues / mtu / mac / lso): counts, and the last change
        self.nic_changes = {"queues": 0, "mtu": 0, "mac": 0, "lso": 0}
        self.last_change: dict[str, Any] | None = None
        #: the TAP carries virtio-net headers (large sends from the kernel)
        self.vnet = False

    # -- set-up ---------------------------------------------------------------------------------
    def open(self) -> None:
        import uvmbus.netvsc as nv

        o = self.opts
        if o.cpus:
            avail = os.sched_getaffinity(0)
            bad = [c for c in o.cpus if c not in avail]
            if bad:
                raise ConfigError(f"--cpu {','.join(map(str, bad))}: not among the CPUs this process "
                                  f"may use ({','.join(map(str, sorted(avail)))})")
            os.sched_setaffinity(0, set(o.cpus))
        if o.hook:
            self.hook, setup = load_hook(o.hook)
        else:
            setup = None
        self.nic = nv.open(o.device, o.root, queues=o.queues, mtu=o.mtu, record=o.record)
        try:
            lim = self.nic.lso_limits()
            self.vnet = bool(o.lso and (lim["ipv4_max"] or lim["ipv6_max"]))
            if self.vnet and o.hook:
                log.info("large sends are off with --hook (hooks see MTU-sized frames)")
                self.vnet = False
            gso_max = min(v for v in (lim["ipv4_max"], lim["ipv6_max"]) if v) if self.vnet else 0
            self.tap = TapInterface(o.tap, netns=o.netns, mac=self.nic.mac, mtu=self.nic.mtu,
                                    addresses=o.addresses, offload=self.vnet, tso4=bool(lim["ipv4_max"]),
                                    tso6=bool(lim["ipv6_max"]), gso_max_size=gso_max)
            self.tap.set_carrier(bool(self.nic.link_up))
            self.nic.on_link_change(self._link_changed)
            self.nic.on_vf_change(self._vf_changed)
            if setup is not None:
                setup({"device": self.nic.device_id, "mac": self.nic.mac, "mtu": self.nic.mtu,
                       "tap": o.tap, "netns": o.netns, "queues": self.nic.num_queues})
        except BaseException:
            self.close()
            raise
        for q in range(self.nic.num_queues):
            self.queue_stats[q] = _DirStats()
        self.watch.device_id = self.device_id
        self.nic_mac, self.nic_mtu = str(self.nic.mac), int(self.nic.mtu)
        self.nic_queues = int(self.nic.num_queues)
        self.nic_lso = (int(lim["ipv4_max"]), int(lim["ipv6_max"]))

    def _link_changed(self, up: bool) -> None:
        log.info("link %s", "up" if up else "down", extra={"device": self.device_id})
        if self.tap is not None:
            self.tap.set_carrier(up)

    def _vf_changed(self, vf: Any) -> None:
        """The host added or removed the accelerated-networking VF (Azure host servicing): the
        bridge stays on the synthetic path either way; the journal records it."""
        if vf.allocated:
            log.info("VF serial %s announced by the host (the bridge stays on the synthetic path)",
                     vf.serial, extra={"device": self.device_id})
        else:
            log.info("VF withdrawn by the host (data path %s)", vf.data_path,
                     extra={"device": self.device_id})

    @property
    def device_id(self) -> str:
        if self.nic is not None:
            self._device_id = str(self.nic.device_id)
        return self._device_id or self.opts.device

    # -- hook ---------------------------------------------------------------------------------------
    def _apply_hook(self, direction: str, frames: list[bytes]) -> list[bytes | bytearray] | None:
        assert self.hook is not None
        st = self.stats[direction]
        try:
            out = self.hook(direction, frames)
        except Exception:
            st.hook_errors += 1
            st.hook_drops += len(frames)
            if self._hook_errors_logged < 10:
                self._hook_errors_logged += 1
                log.exception("hook failed on a %s burst of %d frames (dropped)", direction, len(frames))
            return []
        if out is None:
            return None
        res = list(out)
        if len(res) < len(frames):
            st.hook_drops += len(frames) - len(res)
        else:
            st.hook_added += len(res) - len(frames)
        return res

    # -- NIC -> TAP -------------------------------------------------------------------------------
    def _rx_loop(self, q: int) -> None:
        name = f"rx-{q}"
        st = self.stats["rx"]
        qst = self.queue_stats[q]
        fd = self.tap.fd if self.tap else -1
        hist = self._burst_hist
        nic = self.nic
        while not self._stop.is_set() and not self.watch.lost:
            self.daemon.beat(name)
            try:
                burst = nic.rx_burst(q, self.opts.burst, timeout=RX_TIMEOUT)
            except UvmbusError as exc:
                if self._note_loss(nic, exc):
                    return                     # the main thread reattaches and starts a new rx-Q
                raise
            n = len(burst)
            if not n:
                continue
            t0 = time.perf_counter()
            frames: Iterable[Any]
            if self.hook is not None:
                got = self._apply_hook("rx", burst.frames())
                frames = burst if got is None else got
            else:
                frames = burst
            sent = nbytes = 0
            vnet = self.vnet
            for f in frames:
                try:
                    if vnet:
                        nbytes += os.writev(fd, (_VNET_NONE, f)) - VNET_HDR_LEN
                    else:
                        nbytes += os.write(fd, f)
                    sent += 1
                except OSError as exc:
                    st.tap_drops += 1
                    if exc.errno not in (errno.EAGAIN, errno.EIO, errno.ENOBUFS):
                        raise
            st.frames += sent
            st.bytes += nbytes
            st.bursts += 1
            qst.frames += sent
            if hist is not None:
                hist.labels(self.device_id, "rx").observe(time.perf_counter() - t0)

    # -- TAP -> NIC -------------------------------------------------------------------------------
    def _read_tap(self, limit: int) -> list[bytes]:
        fd = self.tap.fd if self.tap else -1
        out: list[bytes] = []
        size = 65536 + (VNET_HDR_LEN if self.vnet else 0)
        while len(out) < limit:
            try:
                out.append(os.read(fd, size))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
        return out

    def _note_loss(self, nic: Any, exc: BaseException) -> bool:
        """A worker's call on the NIC failed: if the device is gone (rescind, revoked channel,
        corrupt ring), mark it lost and return True; False for any other failure."""
        why = self.watch.gone_reason(self._endpoint(nic))
        if not why and not self.watch.is_loss(exc):
            return False
        self.watch.mark_lost(why or f"{type(exc).__name__}: {exc}")
        return True

    @staticmethod
    def _endpoint(nic: Any) -> Any:
        return getattr(getattr(getattr(nic, "cd", None), "uio", None), "endpoint", None)

    def _tx_loop(self) -> None:
        st = self.stats["tx"]
        fd = self.tap.fd if self.tap else -1
        p = select.poll()
        p.register(fd, select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            self.daemon.beat("tx")
            p.poll(int(RX_TIMEOUT * 1000))
            if self._stop.is_set():
                break
            frames = self._read_tap(self.opts.burst)
            if not frames:
                continue
            if self.watch.lost:                    # the device is gone: keep the TAP drained
                st.lost_drops += len(frames)
                continue
            with self._nic_lock:
                nic = self.nic
                if nic is None:
                    st.lost_drops += len(frames)
                    continue
                try:
                    # Ethernet header + one VLAN tag; the MTU may change on a reattach
                    self._send(nic, frames, self.nic_mtu + 18)
                except UvmbusError as exc:
                    if not self._note_loss(nic, exc):
                        raise
                    st.lost_drops += len(frames)

    def _send(self, nic: Any, frames: list[bytes], max_frame: int) -> None:
        """One burst read from the TAP → hook → ``tx_burst(queue 0)`` (retried on back-pressure)."""
        st = self.stats["tx"]
        hist = self._burst_hist
        t0 = time.perf_counter()
        vnet = self.vnet
        if not vnet:                    # with virtio-net headers, C sorts out what can go
            big = [f for f in frames if len(f) > max_frame]
            if big:
                st.oversize += len(big)
                frames = [f for f in frames if len(f) <= max_frame]
        out: list[Any] = frames
        if self.hook is not None:
            got = self._apply_hook("tx", frames)
            if got is not None:
                out = got
        if not out:
            return
        bad: list[int] = []             # frames that can never be sent (a hook's runt...)
        lso0 = nic.queue(0).raw.tx_lso if vnet else 0
        done = nic.tx_burst(out, 0, rejected=bad, vnet=vnet)
        pos = done + len(bad)
        if pos < len(out):
            deadline = time.monotonic() + TX_RETRY
            while pos < len(out) and time.monotonic() < deadline:
                time.sleep(0.0002)
                more: list[int] = []
                k = nic.tx_burst(out[pos:], 0, rejected=more, vnet=vnet)
                bad += [pos + i for i in more]
                done += k
                pos = done + len(bad)
            if pos < len(out):
                st.nic_drops += len(out) - pos
        if bad:
            st.oversize += len(bad)
        st.frames += done
        st.bytes += sum(len(f) for f in out[:pos]) - sum(len(out[i]) for i in bad)
        if vnet:
            st.bytes -= VNET_HDR_LEN * done
            st.large_sends += nic.queue(0).raw.tx_lso - lso0
        st.bursts += 1
        if hist is not None:
            hist.labels(self.device_id, "tx").observe(time.perf_counter() - t0)

    # -- run ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._start_rx()
        self.daemon.spawn("tx", self._tx_loop)

    def _start_rx(self) -> None:
        self._rx_threads = [self.daemon.spawn(f"rx-{q}", functools.partial(self._rx_loop, q))
                            for q in range(self.nic.num_queues)]

    # -- device loss and reattachment --------------------------------------------------------------
    def check_device(self) -> None:
        """From the main thread: notice a loss the workers have not met yet (rescind while idle)."""
        if not self.watch.lost and self.nic is not None:
            why = self.watch.gone_reason(self._endpoint(self.nic))
            if why:
                self.watch.mark_lost(why)

    def try_reattach(self) -> None:
        """From the main thread while the device is gone: once it is offered again, reopen it
        (with the options it was first opened with), fit the TAP to what the host now offers
        (:meth:`_adapt`: queue count, MTU, MAC, large sends) and start the rx workers again;
        the TAP (same ifindex) and the tx worker stay."""
        import uvmbus.netvsc as nv

        if not self.watch.may_retry():
            return
        if any(t.is_alive() for t in self._rx_threads):
            for t in self._rx_threads:               # they end within RX_TIMEOUT of the loss
                t.join(RX_JOIN)
            if any(t.is_alive() for t in self._rx_threads):
                log.warning("rx workers still busy on the lost device; retrying")
                return
        with self._nic_lock:
            old, self.nic = self.nic, None
        if old is not None:
            try:
                old.close()
            except Exception as exc:         # a dead device: closing it may fail in any way
                log.info("closing the lost NIC: %s", exc)
        o = self.opts
        try:
            nic = nv.open(o.device, o.root, queues=o.queues, mtu=o.mtu, record=o.record)
        except (UvmbusError, OSError) as exc:
            # its sysfs entry may still be there while the host tears the old device down:
            # any failure of that open means "not yet", never the end of the daemon
            log.info("reattach not possible yet: %s", exc)
            return
        try:
            changed = self._adapt(nic)
        except UvmbusError as exc:
            try:
                nic.close()
            except UvmbusError as cexc:
                log.info("closing the re-offered NIC: %s", cexc)
            log.error("reattach failed: %s", exc)
            self.watch.give_up(f"reattach failed: {exc}")
            return
        nic.on_link_change(self._link_changed)
        nic.on_vf_change(self._vf_changed)
        assert self.tap is not None
        self.tap.set_carrier(bool(nic.link_up))
        for q in range(int(nic.num_queues)):
            self.queue_stats.setdefault(q, _DirStats())
        for q in range(int(nic.num_queues), len(self._rx_threads)):
            self.daemon.retire(f"rx-{q}")      # ended with the lost NIC; that queue is no more
        with self._nic_lock:
            self.nic = nic
        what = "; ".join(changed)
        self.watch.reattached((f"reattached, the NIC changed: {what}; " if changed else "")
                              + self.status_line())
        self._start_rx()

    def _adapt(self, nic: Any) -> list[str]:
        """Fit the bridge to a re-offered NIC that differs from the one it had (docs/reliability.md):
        the TAP is kept (same ifindex, addresses, routes) and changed in place.  Returns what
        changed, in words; raises NetError if the TAP cannot follow."""
        tap = self.tap
        assert tap is not None
        lim = nic.lso_limits()
        got_q, got_mtu, got_mac = int(nic.num_queues), int(nic.mtu), str(nic.mac)
        got_lso = (int(lim["ipv4_max"]), int(lim["ipv6_max"]))
        changed: list[str] = []
        rec: dict[str, Any] = {}
        if got_q != self.nic_queues:
            # one TAP file descriptor (no IFF_MULTI_QUEUE): every rx-Q writes to it and tx sends
            # on queue 0, so only the rx workers follow the queue count
            changed.append(f"queues {self.nic_queues} -> {got_q} (rx workers follow; the TAP is "
                           "single-queue and stays)")
            rec["queues"] = [self.nic_queues, got_q]
            self.nic_changes["queues"] += 1
            self.nic_queues = got_q
        if got_mtu != self.nic_mtu:
            tap.set_mtu(got_mtu)
            changed.append(f"MTU {self.nic_mtu} -> {got_mtu} (set on the TAP)")
            rec["mtu"] = [self.nic_mtu, got_mtu]
            self.nic_changes["mtu"] += 1
            self.nic_mtu = got_mtu
        if got_mac.lower() != self.nic_mac.lower():
            tap.set_mac(got_mac)
            changed.append(f"MAC {self.nic_mac} -> {got_mac} (the TAP follows)")
            rec["mac"] = [self.nic_mac, got_mac]
            self.nic_changes["mac"] += 1
            self.nic_mac = got_mac
        if self.vnet and got_lso != self.nic_lso:
            # large sends only as far as the new NIC takes them: TUNSETOFFLOAD again
            tap.set_tso(bool(got_lso[0]), bool(got_lso[1]))
            changed.append(f"large sends IPv4/IPv6 max {self.nic_lso[0]}/{self.nic_lso[1]} -> "
                           f"{got_lso[0]}/{got_lso[1]} (TAP offloads set again)")
            rec["lso"] = [list(self.nic_lso), list(got_lso)]
            self.nic_changes["lso"] += 1
            self.nic_lso = got_lso
        if changed:
            rec["at"] = time.time()
            self.last_change = rec
            log.warning("the re-offered NIC differs: %s", "; ".join(changed),
                        extra={"device": self.device_id})
        return changed

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Stop reading, let the workers finish their bursts; names of workers left running."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        return self.daemon.join_workers(timeout)

    def close(self) -> None:
        # Workers first: when an error ends the main loop, they still poll/read the TAP and
        # send on the NIC; closing those under them made the tx worker read a closed (or
        # reused) fd number: EBADF, or another file's data
        if not self._stop.is_set():
            left = self.stop()
            if left:
                log.warning("workers still running after 5 s: %s", ", ".join(left))
        if self.nic is not None:
            try:
                self.nic.close()             # filter 0, drain completions, ack, HALT, revoke, close
            except UvmbusError as exc:
                log.warning("closing the NIC: %s", exc)
            self.nic = None
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # -- observability -------------------------------------------------------------------------------
    def queue_rows(self) -> list[dict[str, Any]]:
        nic = self.nic
        if nic is None:
            return []
        rows = []
        for q, s in enumerate(nic.stats()["queues"]):
            row = {"queue": q}
            for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_drops", "tx_drops",
                      "drops", "ring_full", "no_section", "host_errors", "signals", "tx_inflight"):
                row[k] = s.get(k, 0)
            rows.append(row)
        return rows

    def status(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "device_id": self.device_id,
            "tap": self.opts.tap, "netns": self.opts.netns, "hook": self.opts.hook,
            "cpus": self.opts.cpus,
            "bridge": {k: vars(v) for k, v in self.stats.items()},
            "queues": self.queue_rows(),
            "device_lost": self.watch.lost or None, "reattaches": self.watch.reattaches,
            "mac": self.nic_mac, "mtu": self.nic_mtu, "num_queues": self.nic_queues, "link_up": False,
            "nic_changes": dict(self.nic_changes), "last_nic_change": self.last_change,
            "lso": self.vnet,
        }
        nic = self.nic
        if nic is not None:
            d.update(link_up=bool(nic.link_up), vf=nic.vf.to_dict())
        return d

    def status_line(self) -> str:
        rx, tx = self.stats["rx"], self.stats["tx"]
        drops = sum(s.hook_drops + s.tap_drops + s.nic_drops + s.lost_drops for s in (rx, tx))
        nic = self.nic
        link = "up" if nic is not None and nic.link_up else "down"
        if self.watch.lost:
            link = "gone"
        return (f"{self.opts.tap}<->{self.device_id[:8]} link {link}: rx {rx.frames} frames, "
                f"tx {tx.frames} frames, dropped {drops}")

    def register_metrics(self, reg: Registry) -> None:
        dev = ("device", "queue", "direction")
        packets = reg.counter("net_packets_total", "frames through the NIC queue", dev)
        nbytes = reg.counter("net_bytes_total", "bytes through the NIC queue", dev)
        drops = reg.counter("net_drops_total", "frames the driver dropped", dev)
        ring_full = reg.counter("net_ring_full_total", "TX attempts that found the ring full",
                                ("device", "queue"))
        no_section = reg.counter("net_no_section_total", "TX attempts without a free send section",
                                 ("device", "queue"))
        host_err = reg.counter("net_host_errors_total", "malformed packets from the host (dropped)",
                               ("device", "queue"))
        signals = reg.counter("net_signals_total", "guest->host signals issued", ("device", "queue"))
        link = reg.gauge("net_link_up", "1 when the host reports the link up", ("device",))
        vf_alloc = reg.gauge("net_vf_allocated", "1 while the host has an accelerated-networking VF "
                             "associated with the NIC", ("device",))
        vf_assoc = reg.counter("net_vf_associations_total", "VF associations (added or removed) the "
                               "host sent this session", ("device",))
        bframes = reg.counter("bridge_frames_total", "frames the bridge moved", ("device", "direction"))
        bbytes = reg.counter("bridge_bytes_total", "bytes the bridge moved", ("device", "direction"))
        bdrops = reg.counter("bridge_drops_total", "frames the bridge dropped, by reason",
                             ("device", "direction", "reason"))
        hook_err = reg.counter("bridge_hook_errors_total", "hook calls that raised", ("device", "direction"))
        large = reg.counter("bridge_large_sends_total", "GSO frames from the TAP sent as one LSOv2 "
                            "large send (the host segments them)", ("device",))
        self._burst_hist = reg.histogram("bridge_burst_seconds",
                                         "time to move one burst (hook included)", ("device", "direction"))

        lost = reg.gauge("bridge_device_lost", "1 while the NIC is gone (rescind, host loss) and the "
                         "bridge waits for a re-offer", ("device",))
        reattaches = reg.counter("bridge_reattaches_total", "times the NIC came back and the bridge "
                                 "resumed", ("device",))
        nchanges = reg.counter("bridge_nic_changes_total", "reattaches to a NIC that came back with "
                               "another queue count, MTU, MAC or large-send limit, by what changed",
                               ("device", "what"))

        def collect() -> None:
            d = self.device_id
            lost.labels(d).set(1 if self.watch.lost else 0)
            reattaches.labels(d).set(self.watch.reattaches)
            for what, n in self.nic_changes.items():
                nchanges.labels(d, what).set(n)
            for row in self.queue_rows():
                q = str(row["queue"])
                packets.labels(d, q, "rx").set(row["rx_packets"])
                packets.labels(d, q, "tx").set(row["tx_packets"])
                nbytes.labels(d, q, "rx").set(row["rx_bytes"])
                nbytes.labels(d, q, "tx").set(row["tx_bytes"])
                drops.labels(d, q, "rx").set(row["rx_drops"])
                drops.labels(d, q, "tx").set(row["tx_drops"])
                ring_full.labels(d, q).set(row["ring_full"])
                no_section.labels(d, q).set(row["no_section"])
                host_err.labels(d, q).set(row["host_errors"])
                signals.labels(d, q).set(row["signals"])
            nic = self.nic
            link.labels(d).set(1 if nic is not None and nic.link_up else 0)
            vf_alloc.labels(d).set(1 if nic is not None and nic.vf_allocated else 0)
            vf_assoc.labels(d).set(nic.events["vf_associations"] if nic is not None else 0)
            for dirn, s in self.stats.items():
                bframes.labels(d, dirn).set(s.frames)
                bbytes.labels(d, dirn).set(s.bytes)
                for reason in ("hook_drops", "tap_drops", "nic_drops", "lost_drops", "oversize"):
                    bdrops.labels(d, dirn, reason.removesuffix("_drops")).set(getattr(s, reason))
                hook_err.labels(d, dirn).set(s.hook_errors)
            large.labels(d).set(self.stats["tx"].large_sends)

        reg.add_collector(collect)
        sc = sim_collector(reg, self.opts.root, [self.device_id])
        if sc is not None:
            reg.add_collector(sc)


def run_bridge(opts: BridgeOptions, daemon: Daemon) -> int:
    """The daemon's life: open, READY, run until SIGTERM, STOPPING, drain, close."""
    daemon.install_signal_handlers()
    bridge = NetBridge(opts, daemon)
    bridge.open()
    try:
        daemon.start(bridge.device_id)
        bridge.register_metrics(daemon.registry)
        daemon.status_fn = bridge.status
        daemon.problem_fn = bridge.watch.problem
        bridge.start()
        daemon.ready(bridge.status_line())
        last = time.monotonic()

        def on_tick() -> None:
            nonlocal last
            bridge.check_device()
            if bridge.watch.lost:
                if not bridge.watch.check_expired():
                    bridge.try_reattach()
            elif time.monotonic() - last >= STATUS_PERIOD:
                last = time.monotonic()
                daemon.set_status(bridge.status_line())

        daemon.run(on_tick)
        daemon.stopping(f"stopping ({daemon.stop_reason}): draining")
        log.info("stopping (%s)", daemon.stop_reason)
        left = bridge.stop()
        if left:
            log.warning("workers still running after 5 s: %s", ", ".join(left))
    finally:
        bridge.close()
        daemon.close()
    log.info("stopped: %s", bridge.status_line())
    return 1 if daemon.failed else 0

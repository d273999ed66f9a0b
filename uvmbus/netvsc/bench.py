"""``uvmbus net bench``: frames per second through the netvsc data path, with the ring's C
loop (``uvb_bench_loop``) measured in the same run as the reference.

Modes (the host decides where frames come from / go to; against the simulator the NIC's
backend is switched for the run through its control socket):

* ``rx``  — receive zero-copy bursts and release them (``copy=True``: copied bursts; host:
  generator backend);
* ``tx``  — send a prebuilt burst of UDP frames again and again (host: sink backend);
* ``fwd`` — receive a zero-copy burst and send it straight back out (the frames never
  leave the receive buffer in Python; host: generator, TX sunk).

One Python call per burst in every mode; each queue runs in its own thread (the C calls
release the GIL).  Gbit/s counts Ethernet frame bytes (no preamble, FCS or gap).

``proto="tcp"`` makes the generator send in-order TCP segments per flow; with ``rsc=True``
(rx only) the NIC asks for receive segment coalescing and the host delivers each flow's
segments coalesced — the frames get fewer and larger, and ``segments`` / ``payload_bytes``
count what they carry (docs/netvsc.md "RSC").
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, UvmbusError
from uvmbus.netvsc.burst import TxBatch
from uvmbus.netvsc.nic import Nic, Queue

__all__ = ["BenchResult", "bench_frame", "run_bench"]

MODES = ("rx", "tx", "fwd")
TCP_HEADERS = 14 + 20 + 20         # the generator's TCP segments: Ethernet + IPv4 + TCP
BACKEND_FOR = {"rx": "generator", "tx": "sink", "fwd": "generator"}


@dataclass
class BenchResult:
    mode: str
    size: int
    queues: int
    seconds: float
    frames: int
    burst: int
    per_queue: list[int] = field(default_factory=list)
    ring_c_loop_mpps: float = 0.0
    host: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    error: str | None = None     # the channel died during the run: the figures are not valid
    proto: str = "udp"
    rsc: bool = False            # receive segment coalescing in force during the run
    copy: bool = False           # rx: copied bursts instead of zero-copy
    bytes: int = 0               # rx: Ethernet frame bytes received (0: frames x size)

    @property
    def segments(self) -> int:
        """TCP rx: the generator's segments the frames carried (payload / segment payload)."""
        if self.proto != "tcp" or self.mode != "rx" or self.size <= TCP_HEADERS:
            return self.frames
        return self.payload_bytes // (self.size - TCP_HEADERS)

    @property
    def payload_bytes(self) -> int:
        """TCP rx: payload bytes (frame bytes less one 54-byte header per frame)."""
        return max(self.bytes - self.frames * TCP_HEADERS, 0) if self.proto == "tcp" else 0

    @property
    def mpps(self) -> float:
        return self.frames / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def gbits(self) -> float:
        total = self.bytes or self.frames * self.size
        return total * 8 / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def ring_c_loop_gbits(self) -> float:
        return self.ring_c_loop_mpps * 1e6 * self.size * 8 / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mpps"] = round(self.mpps, 4)
        d["gbit_per_s"] = round(self.gbits, 3)
        d["ring_c_loop_gbit_per_s"] = round(self.ring_c_loop_gbits, 3)
        d["ratio_to_ring_c_loop"] = round(self.mpps / self.ring_c_loop_mpps, 4) if self.ring_c_loop_mpps else None
        if self.proto == "tcp" and self.mode == "rx":
            d["segments"] = self.segments
            d["segments_per_s"] = round(self.segments / self.seconds) if self.seconds else 0
            d["payload_bytes"] = self.payload_bytes
            d["payload_gbit_per_s"] = round(self.payload_bytes * 8 / self.seconds / 1e9, 3) if self.seconds else 0.0
        return d


def bench_frame(size: int, i: int = 0) -> bytes:
    """An IPv4/UDP frame of ``size`` bytes (≥ 60) with a correct IP header checksum."""
    size = max(size, 60)
    plen = size - 42
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28 + plen, 0, 0x4000, 64, 17, 0,
                               bytes([10, 0, 1, i & 0xFF]), bytes([10, 0, 0, 1])))
    s = sum(struct.unpack(">10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack(">H", ~s & 0xFFFF)
    udp = struct.pack(">HHHH", 5000 + i, 9, 8 + plen, 0)
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(ip) + udp + bytes(plen)


def _sim_control(root: str) -> Any:
    """A control client when ``root`` is a running simulator's root, else None."""
    if not (Path(root) / "sim" / "control.sock").exists():
        return None
    from uvmbus.sim.control import ControlClient
    return ControlClient(root)


def _loop(q: Queue, mode: str, burst: int, batch: TxBatch | None, stop: threading.Event,
          out: list[int], slot: int, errors: list[BaseException], copy: bool = False) -> None:
    try:
        _run_loop(q, mode, burst, batch, stop, out, slot, copy)
    except Exception as exc:        # the channel died (rescind, corrupt ring...): end the run
        errors.append(exc)
        stop.set()


def _channel_error(nic: Nic) -> str | None:
    """Why a queue's channel is dead (a corrupt index, also one only a writer would see),
    or None."""
    for i in range(nic.num_queues):
        ch = nic.queue(i).channel
        try:
            _ = ch.tx.free              # validates read_index
            ch.raise_if_dead()
        except UvmbusError as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def _run_loop(q: Queue, mode: str, burst: int, batch: TxBatch | None, stop: threading.Event,
              out: list[int], slot: int, copy: bool = False) -> None:
    # When a queue has nothing to do it waits (interrupt-driven, ≤ 1 ms) instead of spinning:
    # on a small machine a spinning guest steals the CPU the host needs.
    n = 0
    rx, tx = q.rx_burst, q.tx_burst
    if mode == "rx":
        while not stop.is_set():
            n += len(rx(burst, 0.001, copy=copy))
    elif mode == "tx":
        assert batch is not None
        while not stop.is_set():
            n += tx(batch, timeout=0.001)
    else:
        while not stop.is_set():
            b = rx(burst, 0.001, copy=False)
            if len(b):
                n += tx(b, timeout=0.001)
    out[slot] = n


def run_bench(device: str, root: str, *, mode: str, size: int, seconds: float, queues: int = 1,
              burst: int = 256, warmup: float = 0.3, reference: bool = True,
              flows: int = 64, spin_us: int = 50, timeout: float = 10.0,
              record: Any = None, proto: str = "udp", rsc: bool = False, copy: bool = False) -> BenchResult:
    """Run one benchmark (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}")
    if proto not in ("udp", "tcp"):
        raise ConfigError("proto must be udp or tcp")
    if rsc and mode != "rx":
        raise ConfigError("RSC makes received frames larger than the MTU: benchmark it with --mode rx "
                          "(fwd and tx cannot send them back out)")
    if not 60 <= size <= 9014:
        raise ConfigError("frame size must be 60..9014 bytes")
    ctl = _sim_control(root)
    before = "loopback"
    if ctl is not None:
        before = sim_nic_backend(ctl, device) or before
        # until_disconnect: the simulator restores the backend itself if this process dies
        ctl.call("model", device=device, op="backend", args={"backend": BACKEND_FOR[mode]},
                 until_disconnect=True)
        ctl.call("model", device=device, op="generator", args={"size": size, "flows": flows, "count": 0,
                                                                 "proto": proto})
    mtu = max(1500, size - 14)
    try:
        with Nic(device, root, queues=queues, mtu=mtu, spin_us=spin_us, timeout=timeout,
                 record=record, rsc=rsc) as nic:
            if rsc and not nic.rsc:
                raise ConfigError("RSC was asked for but the host does not offer it (NVSP 6.1 and "
                                  "NDIS_OFFLOAD rsc for IPv4 and IPv6 needed; a simulated NIC with "
                                  "rsc=off does not): run without --rsc")
            nq = nic.num_queues
            batch = TxBatch([bench_frame(size, i) for i in range(burst)]) if mode == "tx" else None
            counts = [0] * nq
            stop = threading.Event()
            errors: list[BaseException] = []
            threads = [threading.Thread(target=_loop, args=(nic.queue(i), mode, burst, batch, stop, counts,
                                                            i, errors, copy),
                                        name=f"bench-q{i}", daemon=True) for i in range(nq)]
            try:
                for t in threads:
                    t.start()
                stop.wait(warmup)
                start_counts = _snapshot(nic, mode)
                start_bytes = _snapshot(nic, "rx_bytes")
                t0 = time.perf_counter()
                stop.wait(seconds)          # set early when a worker's channel died
                end_counts = _snapshot(nic, mode)
                end_bytes = _snapshot(nic, "rx_bytes")
                elapsed = time.perf_counter() - t0
                in_force = nic.rsc
            finally:        # also on Ctrl-C: closing the NIC under running workers would crash
                stop.set()
                for t in threads:
                    if t.ident is not None:     # started
                        t.join(10)
            per_queue = [e - s for s, e in zip(start_counts, end_counts, strict=True)]
            error = (f"{type(errors[0]).__name__}: {errors[0]}" if errors else None) or _channel_error(nic)
            if error:
                error = f"the channel died {elapsed:.2f} s into the run: {error}"
            guest = nic.stats()["total"]
            host: dict[str, Any] = {}
            if ctl is not None and not error:
                host = ctl.call("model", device=device, op="stats")["results"]
                host = next(iter(host.values())).get("netvsp", {}) if host else {}
                host = {k: host.get(k) for k in ("backend", "queues_active", "generated")} | {
                    "queues": {k: {kk: v[kk] for kk in ("rx_frames", "rx_nobuf", "rx_ring_full",
                                                         "sink_frames", "tx_frames", "rsc_units",
                                                         "rsc_segments")}
                               for k, v in host.get("queues", {}).items()}}
    finally:
        if ctl is not None:
            try:
                ctl.call("model", device=device, op="backend", args={"backend": before})
            finally:
                ctl.close()
    res = BenchResult(mode, size, nq, elapsed, sum(per_queue), burst, per_queue, host=host,
                      guest={k: guest[k] for k in ("rx_packets", "tx_packets", "drops", "tx_ring_full",
                                                   "tx_no_section", "host_errors", "signals",
                                                   "rx_rsc_frames", "rx_rsc_frags", "rx_rsc_errors")},
                      error=error, proto=proto, rsc=in_force, copy=copy,
                      bytes=sum(end_bytes) - sum(start_bytes) if mode == "rx" else 0)
    if reference and not error:
        from uvmbus.ring.bench import bench_c_loop
        res.ring_c_loop_mpps = bench_c_loop(size, min(seconds, 2.0), burst).mpps
    return res


def sim_nic_backend(ctl: Any, device: str) -> str | None:
    """The backend of a simulated NIC (``loopback``, ``generator``...), asked through a
    simulator control client; None when the device is not a simulated NIC."""
    res = ctl.call("model", device=device, op="stats").get("results") or {}
    st: Any = next(iter(res.values()), None)
    b = st.get("netvsp", {}).get("backend") if isinstance(st, dict) else None
    return str(b) if b else None


def _snapshot(nic: Nic, mode: str) -> list[int]:
    """Per-queue progress counters (C counters: safe to read from this thread)."""
    key = mode if mode == "rx_bytes" else "rx_packets" if mode == "rx" else "tx_packets"
    return [int(getattr(q.raw, key)) for q in nic.queues]


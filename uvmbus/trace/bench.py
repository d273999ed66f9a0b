"""`uvmbus trace bench`: what recording costs per packet, measured against itself.

The ring's native loop (``uvb_bench_loop``: in-band packets written, committed, read and
committed through one ring, ``burst`` per commit) runs alternately without and with a
recorder attached to the writing ring (one record per packet, as a guest records each
packet it sends once), into a file in ``directory`` (default /dev/shm: the figure is the
recorder's CPU cost, not a disk's).  Medians of ``rounds`` alternations are reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from uvmbus.native import ffi, lib
from uvmbus.ring.bench import DEFAULT_RING_BYTES, _close, _ring
from uvmbus.trace.recorder import Recorder


def _loop(size: int, seconds: float, burst: int, rec: Recorder | None) -> tuple[float, int]:
    mm, g, h = _ring(DEFAULT_RING_BYTES, 4096)
    port = None
    if rec is not None:
        port = rec.port(1, devclass="vmbus")
        port.attach(g.out.raw)
    scratch = ffi.new("uint8_t[]", max(burst * (size + 32), 65536))
    moved = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        n = lib.uvb_bench_loop(g.out.raw, h.inp.raw, size, 20_000, burst, scratch, len(scratch))
        if n < 0:
            raise RuntimeError(f"native bench loop failed: {n}")
        moved += n
    elapsed = time.perf_counter() - start
    if port is not None:
        port.detach()
    _close(mm, g, h)
    return moved / elapsed / 1e6, moved


def recorder_cost(size: int = 64, seconds: float = 1.0, burst: int = 32, rounds: int = 3,
                  directory: str = "/dev/shm") -> dict[str, Any]:
    off, on, sizes = [], [], []
    for _ in range(rounds):
        off.append(_loop(size, seconds, burst, None)[0])
        fd, path = tempfile.mkstemp(suffix=".pcapng", dir=directory)
        os.close(fd)
        try:
            with Recorder(path) as rec:
                mpps, n = _loop(size, seconds, burst, rec)
            on.append(mpps)
            sizes.append(os.path.getsize(path) / max(n, 1))
        finally:
            os.unlink(path)
    m_off, m_on = statistics.median(off), statistics.median(on)
    return {"size": size, "burst": burst, "seconds": seconds, "rounds": rounds,
            "mpps_without": round(m_off, 3), "mpps_with": round(m_on, 3),
            "ns_per_packet_added": round(1e3 / m_on - 1e3 / m_off, 1),
            "bytes_per_record": round(statistics.median(sizes), 1),
            "all_without": [round(x, 3) for x in off], "all_with": [round(x, 3) for x in on]}

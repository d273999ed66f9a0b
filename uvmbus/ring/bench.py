"""Ring benchmark: the Python burst API and the per-packet API against the C loop.

All three variants write and read in-band packets through one ring
(guest-side writer and host-side reader attached to the same memory, one
thread), so the figures isolate the cost of the API layer: (c) is the native
``uvb_bench_loop`` compiled into the extension, measured in the same run as
the reference.
"""

from __future__ import annotations

import array
import mmap
import time
from dataclasses import asdict, dataclass

from uvmbus.native import ffi, lib
from uvmbus.ring.ring import RingPair

#: a realistic per-direction ring: 2 MiB of data + one 4 KiB header page
DEFAULT_RING_BYTES = (2 << 20) + 4096


@dataclass
class BenchResult:
    variant: str
    size: int
    packets: int
    seconds: float

    @property
    def mpps(self) -> float:
        return self.packets / self.seconds / 1e6

    @property
    def gbytes_per_s(self) -> float:
        return self.packets * self.size / self.seconds / 1e9

    def to_dict(self) -> dict[str, float | int | str]:
        d: dict[str, float | int | str] = asdict(self)
        d["mpps"] = round(self.mpps, 4)
        d["gbytes_per_s"] = round(self.gbytes_per_s, 4)
        return d


def _ring(ring_bytes: int, header: int) -> tuple[mmap.mmap, RingPair, RingPair]:
    mm = mmap.mmap(-1, 2 * ring_bytes)
    RingPair.init_memory(mm, ring_bytes)
    guest = RingPair.attach(mm, ring_bytes, header, role="guest")
    host = RingPair.attach(mm, ring_bytes, header, role="host")
    return mm, guest, host


def _close(mm: mmap.mmap, *pairs: RingPair) -> None:
    for p in pairs:
        p.close()
    mm.close()


def bench_burst(size: int, seconds: float, burst: int, ring_bytes: int = DEFAULT_RING_BYTES,
                header: int = 4096) -> BenchResult:
    mm, g, h = _ring(ring_bytes, header)
    payloads = bytes(size * burst)
    lens = array.array("I", [size] * burst)
    tx, rx = g.out, h.inp
    moved = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            tx.put_burst(payloads, lens)
            tx.commit()
            moved += rx.read(burst).count
            rx.commit()
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    _close(mm, g, h)
    return BenchResult("python-burst", size, moved, elapsed)


def bench_per_packet(size: int, seconds: float, ring_bytes: int = DEFAULT_RING_BYTES,
                     header: int = 4096) -> BenchResult:
    mm, g, h = _ring(ring_bytes, header)
    payload = bytes(size)
    tx, rx = g.out, h.inp
    moved = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(1024):
            tx.send(payload)
            if rx.recv() is not None:
                moved += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    _close(mm, g, h)
    return BenchResult("python-per-packet", size, moved, elapsed)


def bench_c_loop(size: int, seconds: float, burst: int, ring_bytes: int = DEFAULT_RING_BYTES,
                 header: int = 4096) -> BenchResult:
    mm, g, h = _ring(ring_bytes, header)
    scratch = ffi.new("uint8_t[]", max(burst * (size + 32), 65536))
    chunk = 200_000
    moved = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        n = lib.uvb_bench_loop(g.out.raw, h.inp.raw, size, chunk, burst, scratch, len(scratch))
        if n < 0:
            raise RuntimeError(f"native bench loop failed: {n}")
        moved += n
    elapsed = time.perf_counter() - start
    _close(mm, g, h)
    return BenchResult("c-loop", size, moved, elapsed)


def run(sizes: list[int], seconds: float, burst: int) -> list[BenchResult]:
    results = []
    for size in sizes:
        results.append(bench_c_loop(size, seconds, burst))
        results.append(bench_burst(size, seconds, burst))
        results.append(bench_per_packet(size, seconds))
    return results

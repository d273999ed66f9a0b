"""Block benchmark for ``uvmbus blk bench``: the driver at a queue depth, then a C pread loop
over the same backing file as a reference, in the same run.  Written against the block
interface (:mod:`uvmbus.block.interface`): a storvsc LUN or an NVMe namespace.

The driver side runs the device's batch (:class:`~uvmbus.storvsc.IoBatch`,
:class:`~uvmbus.nvme.NvmeBatch`): positions are generated and
requests submitted and reaped in C, one call per batch, so Python costs a few microseconds
per batch, not per request.  Transfers larger than the host's maximum are split into
``ceil(bs / max_transfer)`` chunks submitted together; a logical I/O completes with its last
chunk.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from uvmbus.block.interface import BlockDevice
from uvmbus.errors import ConfigError, StorageError
from uvmbus.native import ffi, lib

__all__ = ["PATTERNS", "BenchResult", "run_disk", "pread_reference"]

PATTERNS = ("randread", "randwrite", "seqread", "seqwrite")


@dataclass
class BenchResult:
    name: str
    pattern: str
    bs: int
    qd: int
    seconds: float
    ios: int
    errors: int = 0

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.ios * self.bs / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def latency_us(self) -> float:
        """Mean latency by Little's law (qd / IOPS)."""
        return self.qd / self.iops * 1e6 if self.ios else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(iops=round(self.iops, 1), mb_per_s=round(self.mb_per_s, 2),
                 latency_us=round(self.latency_us, 2))
        return d


def run_disk(disk: BlockDevice, pattern: str, bs: int, qd: int, seconds: float, *,
             warmup: float = 0.2, seed: int = 1, channels: int = 1) -> BenchResult:
    """Keep ``qd`` I/Os of ``bs`` bytes in flight on ``disk`` for ``seconds``, spread over
    ``channels`` queues (a driver whose batch takes ``channels=``: storvsc)."""
    if pattern not in PATTERNS:
        raise ConfigError(f"pattern must be one of {', '.join(PATTERNS)}")
    ctl = disk.controller
    if bs <= 0 or bs % disk.block_size:
        raise ConfigError(f"--bs {bs} must be a positive multiple of the block size {disk.block_size}")
    if bs > disk.size:
        raise ConfigError(f"--bs {bs} exceeds the disk ({disk.size} bytes)")
    # a device may cap the controller's limit (storvsc: VPD 0xB0 of the LUN)
    limit = int(getattr(disk, "max_transfer", ctl.max_transfer))
    chunk = min(bs, limit)
    if bs % chunk:
        raise ConfigError(f"--bs {bs} must be a multiple of the maximum transfer "
                          f"({limit}) when larger than it")
    k = bs // chunk
    slots = qd * k
    depth = getattr(ctl, "queue_depth", 256)
    batch_kw: dict[str, Any] = {}
    if channels > 1:
        if "channels" not in inspect.signature(disk.batch).parameters:
            raise ConfigError(f"--channels {channels}: this device's batches use one queue")
        batch_kw["channels"] = channels
    if -(-slots // channels) > depth:
        raise ConfigError(f"qd {qd} x {k} chunks of {chunk} bytes = {slots} requests exceed the "
                          f"per-channel queue depth of {depth}; lower --qd")
    write = pattern.endswith("write")
    rand = pattern.startswith("rand")
    units = disk.size // bs                      # positions, in whole I/Os
    spb = bs // disk.block_size                  # blocks per I/O
    cpb = chunk // disk.block_size               # blocks per chunk
    with disk.batch(slots, chunk, write=write, **batch_kw) as b:
        if write:
            pat = os.urandom(chunk)
            for buf in b.buffers:
                buf.view[:] = pat
        lbas = ffi.new("uint64_t[]", max(slots, 256))
        group_lba = ffi.new("uint64_t[]", qd)
        state = ffi.new("uint64_t *", seed * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF or 1)
        pending = [0] * qd                        # chunks of each group still in flight
        seq = [0]

        def positions(n: int) -> None:
            """n new I/O start LBAs into group_lba-like scratch `lbas`."""
            if rand:
                lib.uvb_stor_random_lbas(lbas, n, units, spb, 0, state)
            else:
                s = seq[0]
                for i in range(n):
                    lbas[i] = ((s + i) % units) * spb
                seq[0] = s + n

        submit_slots = ffi.new("uint64_t[]", slots)
        submit_lbas = ffi.new("uint64_t[]", slots)

        def start_groups(groups: list[int]) -> None:
            positions(len(groups))
            n = 0
            for j, g in enumerate(groups):
                base = lbas[j]
                group_lba[g] = base
                pending[g] = k
                for c in range(k):
                    submit_slots[n] = g * k + c
                    submit_lbas[n] = base + c * cpb
                    n += 1
            _submit_all(b, submit_slots, submit_lbas, n)

        ios = 0
        counting = False
        start_groups(list(range(qd)))
        t_start = time.perf_counter()
        t_count = t_start + warmup
        t_end = t_count + seconds
        tags, ok = b.tags, b.ok
        if k == 1:
            # the hot loop: reap, new positions, resubmit the same slots (three C calls)
            while True:
                n = b.reap(timeout=5.0)
                if n == 0:
                    raise StorageError(f"benchmark stalled: no completion within 5 s "
                                       f"({b.inflight} in flight)")
                if b.errors:
                    raise b.error(next(i for i in range(n) if not ok[i]))
                now = time.perf_counter()
                if counting:
                    ios += n
                    if now >= t_end:
                        break
                elif now >= t_count:
                    counting = True
                    t_count = now
                positions(n)
                _submit_all(b, tags, lbas, n)
        else:
            while True:
                n = b.reap(timeout=5.0)
                if n == 0:
                    raise StorageError("benchmark stalled: no completion within 5 s")
                done_groups = []
                for i in range(n):
                    if not ok[i]:
                        raise b.error(i)
                    g = int(tags[i]) // k
                    pending[g] -= 1
                    if pending[g] == 0:
                        done_groups.append(g)
                now = time.perf_counter()
                if counting:
                    ios += len(done_groups)
                    if now >= t_end:
                        break
                elif now >= t_count:
                    counting = True
                    t_count = now
                if done_groups:
                    start_groups(done_groups)
        elapsed = time.perf_counter() - t_count
        b.drain()
    return BenchResult("driver", pattern, bs, qd, elapsed, ios, b.errors)


def _submit_all(b: Any, slots: Any, lbas: Any, n: int) -> None:
    done = b.submit(slots, lbas, n=n)
    while done < n:              # the ring filled: make room and send the rest
        b.reap(timeout=1.0)
        if b.errors:
            raise StorageError("I/O error while the ring was full")
        done += b.submit(slots + done, lbas + done, n=n - done)


def pread_reference(path: str, pattern: str, bs: int, seconds: float, *, seed: int = 1) -> BenchResult:
    """A C loop of pread(2) over ``path`` (reads for every pattern: the file is another
    program's disk image, not ours to overwrite)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < bs:
            raise ConfigError(f"{path}: {size} bytes, smaller than one {bs}-byte I/O")
        buf = ffi.new("uint8_t[]", bs)
        ns = ffi.new("uint64_t *")
        rc = lib.uvb_stor_pread_loop(fd, buf, bs, size, 1 if pattern.startswith("rand") else 0,
                                     seconds, seed, ns)
        if rc < 0:
            raise StorageError(f"pread reference on {path} failed: {os.strerror(-rc)}")
        return BenchResult("pread", pattern, bs, 1, ns[0] / 1e9, int(rc))
    finally:
        os.close(fd)

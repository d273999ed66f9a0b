"""Two processes share a file-backed ring (RingPair.create_file + open_file) and stream
>= 100,000 packets through small (64 KiB per direction) rings that wrap constantly.

Every packet's size, type, flags, trans id and content are derived from its sequence number
(seeded), so the receiver verifies order, size, content and zero padding of every packet.
There is no signalling between plain processes: both sides busy-poll with short sleeps, and
every loop has a deadline so a protocol bug fails the test instead of hanging it.
Throughput is printed (run with ``-s`` to see it), never asserted.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from uvmbus.ring import PKT_COMP, PKT_INBAND, PKT_XFER_PAGES, RingPair

RING_BYTES = 64 * 1024            # per direction, header page included
HEADER = 4096
N_PACKETS = 100_000
CHILD_TIMEOUT = 120.0             # seconds a child may run before it gives up (bug => failure)
BATCH = 64

PATTERN = random.Random(0x5EED).randbytes(1 << 16) * 2
ZEROS = bytes(8)


def sizes_for(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.random()
        if k < 0.80:
            out.append(rng.randrange(0, 300))
        elif k < 0.98:
            out.append(rng.randrange(300, 4000))
        else:
            out.append(rng.randrange(4000, 24000))
    return out


def pkt_for(seed: int, seq: int, size: int) -> tuple[int, int, int, int, list[tuple[int, int]]]:
    """(type, flags, trans_id, pattern offset, xfer ranges) of packet ``seq``."""
    tid = (seed << 40) ^ seq
    off = (seq * 2654435761 + seed) % (1 << 16)
    if seq % 101 == 0:
        return PKT_XFER_PAGES, 1, tid, off, [(seq & 0xFFFF, size), (seed, seq)]
    return (PKT_COMP if seq % 3 == 0 else PKT_INBAND), seq & 1, tid, off, []


class Sender:
    def __init__(self, pair: RingPair, seed: int, n: int) -> None:
        self.out = pair.out
        self.seed = seed
        self.sizes = sizes_for(seed, n)
        self.seq = 0
        self.n = n
        self.signals = 0
        self.waits = 0

    def pump(self) -> int:
        """Queue as many packets as fit (up to BATCH), commit; return how many."""
        put = 0
        while put < BATCH and self.seq < self.n:
            size = self.sizes[self.seq]
            ptype, flags, tid, off, ranges = pkt_for(self.seed, self.seq, size)
            data = PATTERN[off:off + size]
            if ptype == PKT_XFER_PAGES:
                ok = self.out.put_xfer_pages(self.seed & 0xFFFF, ranges, data, trans_id=tid,
                                             flags=flags)
            else:
                ok = self.out.put(data, trans_id=tid, flags=flags, type=ptype)
            if not ok:
                # blocked: record the request as a real driver would (no one signals us)
                total = ((16 + (8 + 8 * len(ranges)) + size + 7) & ~7) + 8
                if self.out.want_space(total):
                    continue                    # the reader freed space meanwhile
                self.waits += 1
                break
            self.seq += 1
            put += 1
        if put:
            self.signals += self.out.commit()
            self.out.clear_want()
        return put


class Receiver:
    def __init__(self, pair: RingPair, seed: int, n: int) -> None:
        self.inp = pair.inp
        self.seed = seed
        self.sizes = sizes_for(seed, n)
        self.seq = 0
        self.n = n
        self.signals = 0

    def pump(self) -> int:
        batch = self.inp.read(BATCH)
        got = len(batch)
        pattern = memoryview(PATTERN)
        for p in batch:
            seq = self.seq
            assert seq < self.n, "more packets than were sent"
            size = self.sizes[seq]
            ptype, flags, tid, off, ranges = pkt_for(self.seed, seq, size)
            if p.trans_id != tid:
                raise AssertionError(f"packet {seq}: trans_id {p.trans_id:#x}, expected {tid:#x} "
                                     "(lost, duplicated or reordered packet)")
            assert (p.type, p.flags) == (ptype, flags), f"packet {seq}: type/flags"
            pad = -size % 8
            assert len(p.payload) == size + pad, f"packet {seq}: payload {len(p.payload)} != {size}"
            assert p.payload[:size] == pattern[off:off + size], f"packet {seq}: content differs"
            assert p.payload[size:] == ZEROS[:pad], f"packet {seq}: padding not zero"
            if ranges:
                hdr = bytes(p.header)
                assert int.from_bytes(hdr[4:8], "little") == len(ranges), f"packet {seq}: ranges"
                assert hdr[8:] == b"".join(c.to_bytes(4, "little") + o.to_bytes(4, "little")
                                           for c, o in ranges), f"packet {seq}: range values"
            else:
                assert len(p.header) == 0
            self.seq += 1
        if got:
            self.signals += self.inp.commit()
        return got


def _child(role: str, path: str, mode: str, seed_tx: int, seed_rx: int, n: int,
           conn: Any) -> None:
    try:
        pair = RingPair.open_file(path, header_bytes=HEADER, role=role)
        sender = Sender(pair, seed_tx, n) if mode in ("send", "both") else None
        receiver = Receiver(pair, seed_rx, n) if mode in ("recv", "both") else None
        t0 = time.monotonic()
        deadline = t0 + CHILD_TIMEOUT
        idle = 0
        while (sender and sender.seq < n) or (receiver and receiver.seq < n):
            moved = (sender.pump() if sender else 0) + (receiver.pump() if receiver else 0)
            if moved:
                idle = 0
                continue
            idle += 1
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{role}: no progress before the deadline (sent "
                    f"{sender.seq if sender else '-'}, received {receiver.seq if receiver else '-'})")
            if idle > 200:
                time.sleep(0.00005)             # peer is behind: short sleep, then poll again
        elapsed = time.monotonic() - t0
        ctl_out, ctl_in = pair.out.control(), pair.inp.control()
        result = {
            "elapsed": elapsed,
            "sent": sender.seq if sender else 0,
            "received": receiver.seq if receiver else 0,
            "writer_signals": sender.signals if sender else 0,
            "writer_waits": sender.waits if sender else 0,
            "reader_signals": receiver.signals if receiver else 0,
            "out_stats": pair.out.stats(),
            "in_stats": pair.inp.stats(),
            "in_empty": ctl_in["write_index"] == ctl_in["read_index"] if receiver else None,
            "out_pending": ctl_out["pending_send_sz"],
        }
        pair.close()
        conn.send(("ok", result))
    except BaseException:  # noqa: B036 - report everything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run(tmp_path: Path, plan: list[tuple[str, str, int, int]], n: int) -> list[dict]:
    path = tmp_path / "ring"
    RingPair.create_file(path, RING_BYTES)
    ctx = multiprocessing.get_context("fork")
    procs = []
    for role, mode, seed_tx, seed_rx in plan:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(role, str(path), mode, seed_tx, seed_rx, n, child),
                        daemon=True)
        p.start()
        child.close()
        procs.append((p, parent, role))
    results = []
    try:
        for _p, conn, role in procs:
            if not conn.poll(CHILD_TIMEOUT + 30):
                pytest.fail(f"{role} process hung (no result within {CHILD_TIMEOUT + 30}s)")
            status, payload = conn.recv()
            if status != "ok":
                pytest.fail(f"{role} process failed:\n{payload}")
            results.append(payload)
    finally:
        for p, conn, _role in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()
    for p, _conn, role in procs:
        assert p.exitcode == 0, f"{role} exited with {p.exitcode}"
    return results


def test_one_way_stream_between_processes(tmp_path: Path) -> None:
    writer, reader = _run(tmp_path, [("guest", "send", 11, 0), ("host", "recv", 0, 11)],
                          N_PACKETS)
    assert writer["sent"] == N_PACKETS and reader["received"] == N_PACKETS
    assert writer["out_stats"]["packets"] == N_PACKETS
    assert reader["in_stats"]["packets"] == N_PACKETS
    assert reader["in_empty"]
    assert writer["out_pending"] == 0           # every want_space was cleared after success
    rate = N_PACKETS / max(reader["elapsed"], 1e-9)
    mb = reader["in_stats"]["bytes"] / max(reader["elapsed"], 1e-9) / 1e6
    print(f"\none-way: {N_PACKETS} packets in {reader['elapsed']:.2f}s = {rate:,.0f} packets/s "
          f"({mb:.1f} MB/s payload); writer blocked {writer['writer_waits']} times, "
          f"commit signals writer {writer['writer_signals']} reader {reader['reader_signals']}")


def test_bidirectional_stream_between_processes(tmp_path: Path) -> None:
    guest, host = _run(tmp_path, [("guest", "both", 21, 22), ("host", "both", 22, 21)],
                       N_PACKETS)
    for side in (guest, host):
        assert side["sent"] == N_PACKETS and side["received"] == N_PACKETS
        assert side["out_stats"]["packets"] == N_PACKETS
        assert side["in_stats"]["packets"] == N_PACKETS
        assert side["in_empty"]
    elapsed = max(guest["elapsed"], host["elapsed"])
    rate = 2 * N_PACKETS / max(elapsed, 1e-9)
    print(f"\nbidirectional: 2 x {N_PACKETS} packets in {elapsed:.2f}s = {rate:,.0f} packets/s "
          f"total; guest blocked {guest['writer_waits']}, host blocked {host['writer_waits']}")

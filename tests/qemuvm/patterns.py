"""The NVMe round trip's data plan, shared by the guest (which performs it) and the host
(which builds the expected image and compares sha256 digests)."""

from __future__ import annotations

import hashlib

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB

#: host pre-fill before boot: (offset, length, byte)
PREFILL = [(16 * MiB, MiB, 0xAA), (20 * MiB, MiB, 0xBB), (40 * MiB, 2 * MiB, 0xCC)]

CLI_WRITE = (1 * MiB, 256 * 1024)            # `uvmbus blk write` (offset, length)
API_WRITE = (8 * MiB, 3 * MiB)               # Namespace.write(fua=True): several max transfers
ZEROES = (16 * MiB + 4096, MiB - 8192)       # Namespace.write_zeroes inside the 0xAA area
DISCARD = (20 * MiB, MiB)                    # Namespace.discard over the 0xBB area
BATCH_BASE = 32 * MiB                        # NvmeBatch: slot i writes 4 KiB at base + i * 8 KiB
BATCH_SLOTS = 32
BATCH_ROUNDS = 4                             # each round rewrites every slot with new data
THREAD_BASE = 48 * MiB                       # thread k writes 8 x 64 KiB at base + k * span
THREAD_SPAN = MiB


def stream(tag: str, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes named ``tag``."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{tag}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def batch_data(rnd: int, slot: int) -> bytes:
    return stream(f"batch:{rnd}:{slot}", 4096)


def expected_image(*, discard_zeroes: bool = True) -> bytes:
    img = bytearray(IMAGE_SIZE)
    for off, n, b in PREFILL:
        img[off:off + n] = bytes([b]) * n
    off, n = CLI_WRITE
    img[off:off + n] = stream("cli", n)
    off, n = API_WRITE
    img[off:off + n] = stream("api", n)
    off, n = ZEROES
    img[off:off + n] = bytes(n)
    if discard_zeroes:
        off, n = DISCARD
        img[off:off + n] = bytes(n)
    for k in range(2):
        for j in range(8):
            o = THREAD_BASE + k * THREAD_SPAN + j * 65536
            img[o:o + 65536] = stream(f"thread:{k}:{j}", 65536)
    for slot in range(BATCH_SLOTS):
        o = BATCH_BASE + slot * 8192
        img[o:o + 4096] = batch_data(BATCH_ROUNDS - 1, slot)
    return bytes(img)


def prefill_image(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for off, n, b in PREFILL:
            f.seek(off)
            f.write(bytes([b]) * n)

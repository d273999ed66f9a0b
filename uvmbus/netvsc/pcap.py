"""Minimal pcap writer (libpcap format, Ethernet link type) for ``uvmbus net capture``."""

from __future__ import annotations

import struct
import time
from typing import BinaryIO

__all__ = ["PcapWriter"]

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1


class PcapWriter:
    """Write frames to ``f`` (opened in binary mode) as a pcap 2.4 capture."""

    def __init__(self, f: BinaryIO, snaplen: int = 65535):
        self.f = f
        self.snaplen = snaplen
        self.count = 0
        f.write(struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write(self, frame: bytes | bytearray | memoryview, ts: float | None = None,
              vlan: int | None = None) -> None:
        """One frame; ``vlan`` (a TCI the NIC stripped into metadata) is put back as an
        802.1Q tag, as the frame was on the wire."""
        data = bytes(frame)
        if vlan is not None and len(data) >= 12:
            data = data[:12] + struct.pack(">HH", 0x8100, vlan) + data[12:]
        t = time.time() if ts is None else ts
        sec = int(t)
        usec = int((t - sec) * 1e6)
        cap = data[:self.snaplen]
        self.f.write(struct.pack("<IIII", sec, usec, len(cap), len(data)))
        self.f.write(cap)
        self.count += 1

    def flush(self) -> None:
        self.f.flush()

"""Ring layer: the native ring fast path seen from Python (see ring.py)."""

from uvmbus.ring.ring import (
    DESCRIPTOR,
    FLAG_COMPLETION_REQUESTED,
    PKT_COMP,
    PKT_GPA_DIRECT,
    PKT_INBAND,
    PKT_XFER_PAGES,
    TRAILER,
    InRing,
    OutRing,
    Packet,
    PacketBatch,
    RingPair,
    packet_ring_bytes,
)

__all__ = [
    "DESCRIPTOR", "FLAG_COMPLETION_REQUESTED", "PKT_COMP", "PKT_GPA_DIRECT", "PKT_INBAND",
    "PKT_XFER_PAGES", "TRAILER", "InRing", "OutRing", "Packet", "PacketBatch", "RingPair",
    "packet_ring_bytes",
]

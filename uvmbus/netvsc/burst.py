"""Bursts of frames as the C data path hands them over: whole batches, no per-frame Python.

* :class:`RxBurst` — what ``rx_burst`` returns: one buffer (the receive buffer for a
  zero-copy burst, a per-queue copy buffer otherwise) plus a ``struct uvb_nvsc_frame[]``
  array of (offset, length, hash, checksum info, VLAN, flags).  Indexing gives a memoryview
  of one frame; the array and the buffer can go straight back to C (``tx_burst(burst)``
  forwards a burst without touching a frame in Python).
* :class:`TxBatch` — frames packed back to back in one buffer with their descriptors; build
  it once and send it many times (benchmarks, generators), or let ``tx_burst`` build one
  from a list of ``bytes``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from uvmbus.errors import ConfigError, NetError
from uvmbus.native import ffi, lib

__all__ = ["FrameMeta", "RxBurst", "TxBatch", "csum_request"]

F_VLAN = lib.UVB_NVSC_F_VLAN
F_HASH = lib.UVB_NVSC_F_HASH
F_CSUM = lib.UVB_NVSC_F_CSUM
F_TX_CSUM = lib.UVB_NVSC_F_TX_CSUM
F_RSC = lib.UVB_NVSC_F_RSC
F_TX_LSO = lib.UVB_NVSC_F_TX_LSO


@dataclass(frozen=True)
class FrameMeta:
    """Per-frame metadata from the host's per-packet info."""

    length: int
    vlan: int | None          # 802.1Q TCI (priority << 13 | DEI << 12 | VLAN id), None: untagged
    rss_hash: int | None      # the host's Toeplitz hash, None: not given
    csum: int | None          # raw checksum PPI (RX bits), None: not given
    coalesced: bool = False   # joined from RSC fragments (the host coalesced TCP segments)

    @property
    def vlan_id(self) -> int | None:
        return None if self.vlan is None else self.vlan & 0xFFF

    @property
    def ip_checksum_ok(self) -> bool:
        return self.csum is not None and bool(self.csum & lib.CSUM_RX_IP_OK)

    @property
    def l4_checksum_ok(self) -> bool:
        return self.csum is not None and bool(self.csum & (lib.CSUM_RX_TCP_OK | lib.CSUM_RX_UDP_OK))

    @property
    def checksum_failed(self) -> bool:
        bad = lib.CSUM_RX_IP_FAILED | lib.CSUM_RX_TCP_FAILED | lib.CSUM_RX_UDP_FAILED
        return self.csum is not None and bool(self.csum & bad)


class RxBurst(Sequence[memoryview]):
    """Frames received by one ``rx_burst`` call (see the module docstring).

    Copied bursts (``copy=True``, the default) own their frames: a copy that nothing else
    writes (the next ``rx_burst`` copies elsewhere), valid for as long as you keep the burst or
    a frame of it (each keeps its copy buffer alive; the frames are writable, e.g. to rewrite
    an address before forwarding).

    A frame the host coalesced (RSC) and sent as several fragments is joined by the C path:
    in a copied burst like any other frame; in a zero-copy burst it is copied into the
    queue's reassembly buffer, which follows the zero-copy rules below.

    Zero-copy bursts (``copy=False``) lend you the host's receive buffer: the frames are
    valid until :meth:`release` or the next ``rx_burst`` on the same queue (which releases
    them), after which the host may overwrite them.  From then on the burst and every frame
    view taken from it raise (``NetError`` / ``ValueError: released memoryview``) instead of
    silently showing other data.  Copy a frame (``bytes(frame)``) to keep it.
    """

    __slots__ = ("_view", "_base", "_arr", "_n", "zero_copy", "_queue", "_released", "_owner", "_views",
                 "_rsc")

    def __init__(self, view: memoryview, base: Any, arr: Any, count: int, *, zero_copy: bool,
                 queue: Any = None, owner: Any = None, rsc: memoryview | None = None):
        self._view = view
        #: zero-copy bursts holding coalesced frames: the queue's reassembly buffer (F_RSC
        #: frames' offsets index it); None otherwise
        self._rsc = rsc
        self._base = base
        self._arr = arr
        self._n = count
        self.zero_copy = zero_copy
        self._queue = queue
        self._released = False
        self._owner = owner
        #: zero-copy: the frame views handed out, released with the burst
        self._views: list[memoryview] | None = [] if zero_copy else None

    def __len__(self) -> int:
        return self._n

    def _check(self) -> None:
        if self._released:
            raise NetError("this zero-copy burst was released (release() or a later rx_burst on "
                           "its queue): its frames belong to the host again. Copy frames you "
                           "keep (bytes(frame)), or receive with copy=True")

    def __getitem__(self, i: int) -> memoryview:  # type: ignore[override]
        if self._released:
            self._check()
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        f = self._arr[i]
        v = self._rsc if self._rsc is not None and f.flags & F_RSC else self._view
        m = v[f.offset:f.offset + f.len]
        if self._views is not None:
            self._views.append(m)
        return m

    def __iter__(self) -> Iterator[memoryview]:
        self._check()
        v, a, keep, rv = self._view, self._arr, self._views, self._rsc
        for i in range(self._n):
            if self._released:
                self._check()
            f = a[i]
            m = (rv if rv is not None and f.flags & F_RSC else v)[f.offset:f.offset + f.len]
            if keep is not None:
                keep.append(m)
            yield m

    def frames(self) -> list[bytes]:
        """Every frame as independent ``bytes``."""
        self._check()
        v, a, rv = self._view, self._arr, self._rsc
        out = []
        for i in range(self._n):
            f = a[i]
            out.append(bytes((rv if rv is not None and f.flags & F_RSC else v)[f.offset:f.offset + f.len]))
        return out

    def lengths(self) -> list[int]:
        return [self._arr[i].len for i in range(self._n)]

    @property
    def nbytes(self) -> int:
        return sum(self._arr[i].len for i in range(self._n))

    def meta(self, i: int) -> FrameMeta:
        self._check()
        if not 0 <= i < self._n:
            raise IndexError(i)
        f = self._arr[i]
        fl = f.flags
        return FrameMeta(f.len, f.vlan if fl & F_VLAN else None, f.hash if fl & F_HASH else None,
                         f.csum if fl & F_CSUM else None, bool(fl & F_RSC))

    def metas(self) -> list[FrameMeta]:
        return [self.meta(i) for i in range(self._n)]

    @property
    def has_rsc_copies(self) -> bool:
        """A zero-copy burst with coalesced frames in the reassembly buffer: their
        descriptors are not relative to :attr:`base` (``tx_burst`` copies such a burst)."""
        return self._rsc is not None

    @property
    def descriptors(self) -> Any:
        """The ``struct uvb_nvsc_frame[]`` (offsets relative to :attr:`base`; in a zero-copy
        burst, frames flagged F_RSC are relative to the queue's reassembly buffer)."""
        self._check()
        return self._arr

    @property
    def base(self) -> Any:
        """``uint8_t *`` the descriptor offsets are relative to."""
        self._check()
        if self._base is None:                  # an empty burst
            self._base = ffi.new("uint8_t[]", 1)
        return self._base

    def release(self) -> None:
        """Zero-copy bursts: give the frames back to the host now (ack their packets); the
        burst and its frame views raise from now on.  Copied bursts: nothing to do."""
        if self.zero_copy and not self._released:
            q = self._queue
            self._invalidate()
            if q is not None:
                q._release(self)

    def _invalidate(self) -> None:
        """The frames went back to the host: make every use of them loud."""
        self._released = True
        self._queue = None
        views, self._views = self._views, None
        for m in views or ():
            try:
                m.release()
            except BufferError:     # a view of the view is alive (numpy...): it stays readable
                pass

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<RxBurst {self._n} frames{' zero-copy' if self.zero_copy else ''}{state}>"


def csum_request(frame: bytes | bytearray | memoryview) -> int | None:
    """The TX checksum PPI asking the host to fill the IPv4 header and TCP/UDP checksums of
    ``frame`` (§4.4), or None when the frame is not plain IPv4/IPv6 TCP/UDP."""
    if len(frame) < 34:
        return None
    et = struct.unpack_from(">H", frame, 12)[0]
    if et == 0x0800:
        ihl = (frame[14] & 0xF) * 4
        proto = frame[23]
        info = lib.CSUM_TX_IS_IPV4 | lib.CSUM_TX_IP_HDR
        l4 = 14 + ihl
    elif et == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        info = lib.CSUM_TX_IS_IPV6
        l4 = 54
    else:
        return None
    if proto == 6:
        info |= lib.CSUM_TX_TCP
    elif proto == 17:
        info |= lib.CSUM_TX_UDP
    else:
        return info if et == 0x0800 else None
    return info | (l4 << lib.CSUM_TX_TCP_HDR_OFFSET_SHIFT)


def _per_frame(value: int | Sequence[int | None] | None, n: int, what: str) -> list[int | None]:
    """One value for every frame, or a list of one per frame (checked)."""
    if value is None or isinstance(value, int):
        return [value] * n
    out = list(value)
    if len(out) != n:
        raise ConfigError(f"TxBatch: {len(out)} {what} for {n} frames")
    return out


class TxBatch:
    """Frames laid out back to back with their ``struct uvb_nvsc_frame`` descriptors.

    ``vlan`` (one TCI for all frames, or a list) asks the host to insert an 802.1Q tag;
    ``offload_csum=True`` asks it to compute IPv4/TCP/UDP checksums (frames it cannot parse
    are sent unchanged).  ``mss`` (one value for all frames, or a list with None for
    ordinary frames) makes frames TCP large sends: the host cuts each into segments of
    ``mss`` payload bytes and fills every checksum (LSOv2, docs/netvsc.md; the send path
    checks each one against the negotiated limits)."""

    __slots__ = ("buf", "_ptr", "arr", "_n", "nbytes")

    def __init__(self, frames: Iterable[bytes | bytearray | memoryview], *,
                 vlan: int | Sequence[int | None] | None = None, offload_csum: bool = False,
                 mss: int | Sequence[int | None] | None = None):
        frames = list(frames)
        n = len(frames)
        self._n = n
        self.buf = bytearray(b"".join(frames))
        self.nbytes = len(self.buf)
        self._ptr = ffi.from_buffer("uint8_t[]", self.buf) if self.buf else ffi.new("uint8_t[]", 1)
        self.arr = ffi.new("struct uvb_nvsc_frame[]", max(n, 1))
        vl = _per_frame(vlan, n, "VLAN tags")
        ml = _per_frame(mss, n, "MSS values")
        off = 0
        for i, fr in enumerate(frames):
            d = self.arr[i]
            d.offset = off
            d.len = len(fr)
            flags = 0
            if vl[i] is not None:
                tci = vl[i]
                assert tci is not None
                if not 0 <= tci <= 0xFFFF:
                    raise ConfigError(f"VLAN TCI {tci} out of range")
                d.vlan = tci
                flags |= F_VLAN
            m = ml[i]
            if m is not None:
                if not isinstance(m, int) or not 0 <= m <= 0xFFFFFFFF:
                    raise ConfigError(f"TxBatch: MSS {m!r} of frame {i} is not an integer 0..2^32-1")
                d.mss = m
                flags |= F_TX_LSO
            elif offload_csum:
                c = csum_request(fr)
                if c is not None:
                    d.csum = c
                    flags |= F_TX_CSUM
            d.flags = flags
            off += len(fr)

    @classmethod
    def repeat(cls, frame: bytes, count: int) -> TxBatch:
        """``count`` copies of one frame (benchmarks)."""
        return cls([frame] * count)

    @property
    def base(self) -> Any:
        return self._ptr

    @property
    def descriptors(self) -> Any:
        return self.arr

    def __len__(self) -> int:
        return self._n

"""The one block-device interface: what a storvsc LUN and an NVMe namespace both are.

Drivers implement these protocols (structurally: no base class to inherit; :class:`ByteIO`
is an optional mixin that gives ``read``/``readinto``/``write`` from a driver's ``_io``);
everything above
them — ``uvmbus blk``, the NBD export, the benchmark — is written against them only:

- :class:`BlockDevice`: ``size``/``block_size``/``blocks``, synchronous ``read``/``readinto``/
  ``write(fua=)``/``flush``/``discard``, ``describe()`` and ``batch()``;
- :class:`BlockBatch`: the array-based interface (prebuilt requests in slots, resubmitted at
  new LBAs in one C call, completions reaped into ``tags``/``ok`` arrays);
- :class:`BlockController`: what holds the devices (``disk(i)``, ``luns``, ``info()``,
  ``stats()``, ``channels`` = queues, ``max_transfer``).

Optional, where the device has it (same names whichever driver offers it):

- ``describe()`` keys shared by both drivers: ``unmap``, ``rotation_rate``,
  ``volatile_write_cache`` (None when the device does not say);
- :class:`PersistentReservations`: the ``pr_*`` methods, named after Linux's block-layer
  ``pr_ops`` (storvsc: SCSI-3 PERSISTENT RESERVE; NVMe reservations would take the same).

Implementations: :class:`uvmbus.storvsc.Disk` / :class:`~uvmbus.storvsc.IoBatch` /
:class:`~uvmbus.storvsc.Controller` and :class:`uvmbus.nvme.Namespace` /
:class:`~uvmbus.nvme.NvmeBatch` / :class:`~uvmbus.nvme.Controller`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from uvmbus.dma import DmaBuffer
from uvmbus.errors import ConfigError

__all__ = ["BlockBatch", "BlockController", "BlockDevice", "ByteIO", "PersistentReservations",
           "check_range", "piece_buffer"]


def check_range(what: str, offset: int, length: int, block_size: int, size: int, device: str) -> None:
    """ConfigError unless ``[offset, offset + length)`` is whole blocks inside a device of
    ``size`` bytes (``device`` names it in the message: "LUN 0", "namespace 1")."""
    bs = block_size
    if offset < 0 or length < 0:
        raise ConfigError(f"{what}: negative offset {offset} or length {length}")
    if offset % bs or length % bs:
        raise ConfigError(f"{what}: offset {offset} and length {length} must be multiples of "
                          f"the {bs}-byte block size of {device}")
    if offset + length > size:
        raise ConfigError(f"{what}: [{offset}, {offset + length}) lies beyond the end of "
                          f"{device} ({size} bytes)")


def piece_buffer(alloc: Callable[[int], DmaBuffer], dma: DmaBuffer | None, view: memoryview | None,
                 off: int, n: int, write: bool, bounce: list[DmaBuffer]) -> tuple[DmaBuffer, int]:
    """(buffer, offset in it) for bytes ``[off, off + n)`` of an I/O: the caller's ``dma``
    (zero copy), or a bounce buffer from ``alloc`` (appended to ``bounce`` for the caller to
    free; for a write, filled from ``view``)."""
    if dma is not None:
        return dma, off
    buf = alloc(n)
    bounce.append(buf)
    if write:
        assert view is not None
        buf.view[:n] = view[off:off + n]
    return buf, 0


class ByteIO:
    """``read``/``readinto``/``write`` over a driver's one I/O routine
    ``_io(write, offset, view, dma, length, fua) -> bytes done`` (exactly one of ``view`` — a
    byte memoryview the driver copies through its own DMA memory — and ``dma`` — the caller's
    DmaBuffer, zero copy — is given)."""

    def _io(self, write: bool, offset: int, view: memoryview | None, dma: DmaBuffer | None,
            length: int, fua: bool) -> int:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at byte ``offset``."""
        out = bytearray(length)
        self._io(False, offset, memoryview(out), None, length, False)
        return bytes(out)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Fill ``buffer`` (writable bytes-like, or a DmaBuffer: zero copy) from ``offset``."""
        if isinstance(buffer, DmaBuffer):
            return self._io(False, offset, None, buffer, buffer.size, False)
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ConfigError("readinto needs a writable buffer")
        return self._io(False, offset, view, None, len(view), False)

    def write(self, offset: int, data: Any, *, fua: bool = False) -> int:
        """Write ``data`` (bytes-like, or a DmaBuffer: zero copy) at ``offset``; ``fua`` forces
        it to stable storage before completion."""
        if isinstance(data, DmaBuffer):
            return self._io(True, offset, None, data, data.size, fua)
        view = memoryview(data).cast("B")
        return self._io(True, offset, view, None, len(view), fua)


class BlockBatch(Protocol):
    buffers: list[DmaBuffer]
    tags: Any
    ok: Any
    inflight: int
    errors: int

    def submit(self, slots: Sequence[int] | Any, lbas: Sequence[int] | Any, *,
               n: int | None = None, write: bool | None = None) -> int: ...

    def reap(self, timeout: float | None = 0.0) -> int: ...

    def error(self, i: int) -> Exception: ...

    def drain(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class BlockController(Protocol):
    @property
    def max_transfer(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...


class BlockDevice(Protocol):
    @property
    def controller(self) -> Any: ...

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def blocks(self) -> int: ...

    @property
    def unmap_supported(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...

    def write(self, offset: int, data: Any, *, fua: bool = False) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def batch(self, slots: int, size: int, *, write: bool = False, fua: bool = False) -> Any: ...


@runtime_checkable
class PersistentReservations(Protocol):
    """Reservations of a shared disk (types as SPC-4 / NVMe: 1 write exclusive, 3 exclusive
    access, 5/6 registrants only, 7/8 all registrants; names accepted too).  A refusal because
    of another initiator's reservation raises :class:`~uvmbus.errors.ReservationConflict`."""

    def pr_register(self, old_key: int, new_key: int, *, ignore: bool = False) -> None: ...

    def pr_reserve(self, key: int, pr_type: int | str) -> None: ...

    def pr_release(self, key: int, pr_type: int | str) -> None: ...

    def pr_preempt(self, key: int, victim_key: int, pr_type: int | str, *,
                   abort: bool = False) -> None: ...

    def pr_clear(self, key: int) -> None: ...

    def pr_read_keys(self) -> Any: ...

    def pr_read_reservation(self) -> Any: ...

    def pr_status(self) -> dict[str, Any]: ...

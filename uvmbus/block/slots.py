"""What the drivers' array batches (:class:`uvmbus.storvsc.IoBatch`, :class:`uvmbus.nvme.NvmeBatch`)
share: a fixed table of prebuilt requests ("slots") sent by slot number and LBA.

:class:`SlotBatch` turns :meth:`submit`'s arguments (Python sequences or ``uint64_t[]`` cdata,
an optional direction switch) into the arrays the drivers' C submit calls take, draws random
slot-aligned LBAs in C, and waits for everything in flight.  The submit and reap calls, the
request table and the error mapping stay with each driver.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import Any, Self

from uvmbus.errors import StorageError
from uvmbus.native import ffi, lib

__all__ = ["SlotBatch"]


class SlotBatch(abc.ABC):
    """Base of the drivers' batches; a subclass sets :attr:`disk`, :attr:`blocks_per_slot`,
    the request kinds it writes into the slot table, calls :meth:`_init_slots` and provides
    ``reap``/``close``."""

    #: request kinds of the driver's slot table (``write=`` of :meth:`submit`)
    READ_KIND: int
    WRITE_KIND: int
    disk: Any
    blocks_per_slot: int
    inflight: int

    def _init_slots(self, slots: int) -> None:
        self._slots = ffi.new("uint64_t[]", slots)
        self._lbas = ffi.new("uint64_t[]", slots)
        self._kinds = ffi.new("uint8_t[]", slots)

    def _submit_args(self, slots: Sequence[int] | Any, lbas: Sequence[int] | Any, n: int | None,
                     write: bool | None) -> tuple[int, Any, Any, Any]:
        """(count, slots, lbas, kinds) for the C submit call: cdata arrays are passed through,
        sequences copied into the batch's own; kinds is NULL unless ``write`` switches the
        slots' direction."""
        count = len(slots) if n is None else n
        sp = slots if isinstance(slots, ffi.CData) else self._fill(self._slots, slots, count)
        lp = lbas if isinstance(lbas, ffi.CData) else self._fill(self._lbas, lbas, count)
        kp = ffi.NULL
        if write is not None:
            k = self.WRITE_KIND if write else self.READ_KIND
            for i in range(count):
                self._kinds[i] = k
            kp = self._kinds
        return count, sp, lp, kp

    @staticmethod
    def _fill(arr: Any, values: Sequence[int], n: int) -> Any:
        for i in range(n):
            arr[i] = values[i]
        return arr

    def random_lbas(self, out: Any, n: int, state: Any, *, span_blocks: int | None = None) -> None:
        """Fill ``out[0:n]`` with random slot-aligned LBAs inside the disk (C; ``state`` is
        a ``uint64_t *`` seed/state)."""
        span = self.disk.blocks if span_blocks is None else span_blocks
        lib.uvb_stor_random_lbas(out, n, span // self.blocks_per_slot, self.blocks_per_slot, 0, state)

    @abc.abstractmethod
    def reap(self, timeout: float | None = 0.0) -> int:
        """Take completions (the driver's reap call); how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drain, free the buffers, give the queues back."""

    def drain(self, timeout: float = 10.0) -> None:
        """Wait for every request in flight."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StorageError(f"{type(self).__name__}: {self.inflight} requests still in "
                                   f"flight after {timeout} s")
            self.reap(remaining)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

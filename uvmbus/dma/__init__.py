"""DMA memory for GPA-direct packets: pinned, physically described buffers.

- :mod:`uvmbus.dma.memory`: :class:`DmaRegion`, :class:`DmaBuffer`, the
  :class:`DmaMemory` provider interface and :class:`DmaPool`.
- :mod:`uvmbus.dma.hugepage`: :class:`HugepageMemory` for real guests.
- :mod:`uvmbus.dma.sim`: the simulated guest-RAM file (:func:`create_guest_ram`,
  :class:`SimGuestMemory` for guests, :class:`GuestRam` for the host).

Typical driver use::

    mem = open_dma_memory(root)
    pool = DmaPool(mem, buffer_size=256 * 1024, max_regions=16)
    buf = pool.alloc()
    ring.put_gpa_direct([buf.gpa_range(0, nbytes)], request, trans_id=tid)
    ...  # on completion
    buf.free()
"""

from __future__ import annotations

import os
from pathlib import Path

from uvmbus.dma.hugepage import HugepageMemory
from uvmbus.dma.memory import (
    HV_PAGE_SHIFT,
    HV_PAGE_SIZE,
    MAX_GPA_BYTES,
    DmaBuffer,
    DmaMemory,
    DmaPool,
    DmaRegion,
)
from uvmbus.dma.sim import (
    DEFAULT_BASE_PFN,
    DEFAULT_CHUNK,
    GuestRam,
    GuestRamLayout,
    SimGuestMemory,
    create_guest_ram,
    load_guest_ram_layout,
)
from uvmbus.errors import ConfigError

__all__ = [
    "HV_PAGE_SHIFT", "HV_PAGE_SIZE", "MAX_GPA_BYTES", "DEFAULT_BASE_PFN", "DEFAULT_CHUNK",
    "DmaBuffer", "DmaMemory", "DmaPool", "DmaRegion", "HugepageMemory", "SimGuestMemory",
    "GuestRam", "GuestRamLayout", "create_guest_ram", "load_guest_ram_layout",
    "open_dma_memory",
]


def open_dma_memory(root: str | os.PathLike[str] = "/") -> DmaMemory:
    """The DMA memory provider for ``root``.

    :class:`SimGuestMemory` when ``<root>/sim/guest-ram.json`` exists (a
    simulator root), else :class:`HugepageMemory`, which only makes sense for
    the real system (``root="/"``)."""
    if (Path(root) / "sim" / "guest-ram.json").exists():
        return SimGuestMemory(root)
    if os.path.realpath(root) != "/":
        raise ConfigError(f"{root}: no simulated guest RAM (sim/guest-ram.json) here, and real "
                          "hugepage DMA memory is only available for root='/'. Start the "
                          "simulator for this root first, with guest RAM (not --guest-ram 0).")
    return HugepageMemory()

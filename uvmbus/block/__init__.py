"""block: the block-device interface shared by the storvsc and NVMe drivers, and the block
benchmark written against it (see :mod:`uvmbus.block.interface`)."""

from uvmbus.block.interface import (
    BlockBatch,
    BlockController,
    BlockDevice,
    PersistentReservations,
)

__all__ = ["BlockBatch", "BlockController", "BlockDevice", "PersistentReservations"]

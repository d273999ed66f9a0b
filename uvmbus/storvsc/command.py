"""One request to a storvsc controller, its result, and what a LUN's disk and batches may use
of their controller.

:class:`Command` and :class:`ScsiResult` sit below the controller so that the disk and the
batch interface can build requests without importing the controller (which creates disks):
``controller → disk → batch → command``, no circle (tests/test_imports.py).  The disk and
the batch see their controller through :class:`LunController`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from uvmbus.dma import DmaBuffer
from uvmbus.errors import StorageError
from uvmbus.storvsc import protocol as P
from uvmbus.storvsc import scsi

if TYPE_CHECKING:
    from uvmbus.storvsc.queue import IoQueue

__all__ = ["BlockLun", "Command", "LunController", "ScsiResult"]


class Command:
    """One request to the controller: a SCSI command (CDB) or a bare VSTOR operation.

    After completion: ``done`` is True, ``error`` holds the exception (None on success),
    ``transferred`` the bytes the host moved; :meth:`result` raises the error."""

    __slots__ = ("tag", "kind", "lun", "cdb", "data_in", "buffer", "buf_offset", "length", "lba",
                 "blocks", "fua", "operation", "what", "queue", "submit_ns", "done", "error",
                 "transferred", "srb_status", "scsi_status", "status", "sense", "retries",
                 "batch", "user", "latency_ns")

    def __init__(self, *, kind: int, lun: int = 0, cdb: bytes = b"", data_in: int = P.DataIn.NONE,
                 buffer: DmaBuffer | None = None, buf_offset: int = 0, length: int = 0,
                 lba: int = 0, blocks: int = 0, fua: bool = False, operation: int = 0,
                 what: str = "", user: Any = None) -> None:
        self.tag = 0
        self.kind = kind
        self.lun = lun
        self.cdb = cdb
        self.data_in = data_in
        self.buffer = buffer
        self.buf_offset = buf_offset
        self.length = length
        self.lba = lba
        self.blocks = blocks
        self.fua = fua
        self.operation = operation
        self.what = what
        self.queue: IoQueue | None = None
        self.submit_ns = 0
        self.done = False
        self.error: Exception | None = None
        self.transferred = 0
        self.srb_status = 0
        self.scsi_status = 0
        self.status = 0
        self.sense: scsi.Sense | None = None
        self.retries = 0
        self.batch = False
        self.user = user
        self.latency_ns = 0

    def result(self) -> int:
        """Bytes transferred; raises the command's error."""
        if not self.done:
            raise StorageError(f"{self.what}: not completed yet")
        if self.error is not None:
            raise self.error
        return self.transferred

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("ok" if self.error is None else f"error {self.error!r}")
        return f"<Command {self.what} lun {self.lun} tag {self.tag} {state}>"


@dataclass(frozen=True)
class ScsiResult:
    data: bytes
    transferred: int
    srb_status: int
    scsi_status: int
    sense: scsi.Sense | None = None


class LunController(Protocol):
    """What a :class:`~uvmbus.storvsc.disk.Disk` and an :class:`~uvmbus.storvsc.batch.IoBatch`
    use of their :class:`~uvmbus.storvsc.controller.Controller`."""

    _quarantine: dict[int, Command]

    @property
    def max_transfer(self) -> int: ...
    def execute(self, lun: int, cdb: bytes, *, data_in: int = 0, data_out: bytes | None = None,
                what: str | None = None, timeout: float | None = None, check: bool = True,
                buffer_len: int | None = None) -> ScsiResult: ...
    def run(self, cmds: list[Command], timeout: float | None = None) -> None: ...
    def alloc_buffer(self, size: int) -> DmaBuffer: ...
    def claim_queue(self, queue: IoQueue | None = None) -> IoQueue: ...
    def release_queue(self, queue: IoQueue) -> None: ...
    def _api_entry(self) -> None: ...
    def _wait_queue(self, q: IoQueue, timeout: float | None) -> None: ...
    def _wait_queues(self, queues: list[IoQueue], timeout: float | None) -> None: ...
    def _foreign_cpl(self, q: IoQueue, c: Any) -> None: ...
    def _error_for(self, cmd: Command, srb: int, sense: scsi.Sense | None) -> Exception: ...


class BlockLun(Protocol):
    """What an :class:`~uvmbus.storvsc.batch.IoBatch` uses of its
    :class:`~uvmbus.storvsc.disk.Disk`."""

    controller: LunController
    lun: int

    @property
    def block_size(self) -> int: ...
    @property
    def blocks(self) -> int: ...
    @property
    def max_transfer(self) -> int: ...

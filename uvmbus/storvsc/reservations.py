"""SCSI-3 persistent reservations of a LUN (PERSISTENT RESERVE IN/OUT, SPC-4 5.9, 6.15, 6.16).

The method names are those of Linux's block-layer ``pr_ops`` (``pr_register``,
``pr_reserve``, ``pr_release``, ``pr_preempt``, ``pr_clear``, ``pr_read_keys``,
``pr_read_reservation``), so another block driver (NVMe reservations) can offer the same
interface.  An initiator is this controller: every channel of it speaks for the same
I_T nexus (docs/storvsc.md).

Errors: a refusal because of another initiator's reservation, or a key this initiator did not
register, is :class:`~uvmbus.errors.ReservationConflict`; a LUN without reservations (on
Hyper-V anything but a shared VHDX) gives :class:`~uvmbus.errors.IllegalRequest` saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvmbus.errors import IllegalRequest, ProtocolError
from uvmbus.storvsc import scsi

if TYPE_CHECKING:
    from uvmbus.storvsc.command import LunController

__all__ = ["PersistentReservations", "PrKeys"]

_ALLOC = 8 + 8 * 255


@dataclass(frozen=True)
class PrKeys:
    generation: int
    keys: list[int]


class PersistentReservations:
    """Mixin for :class:`~uvmbus.storvsc.Disk` (needs ``controller``, ``lun``, ``_api``)."""

    controller: LunController
    lun: int

    def _pr_check(self) -> None:
        raise NotImplementedError

    def _unsupported(self, exc: IllegalRequest, what: str) -> IllegalRequest:
        if exc.asc == 0x20:
            return IllegalRequest(
                f"{what} on LUN {self.lun}: the LUN does not support persistent reservations "
                "(ILLEGAL REQUEST / invalid command): on Hyper-V only a shared VHDX has them; in "
                "the simulator add :pr to the disk spec", srb_status=exc.srb_status,
                scsi_status=exc.scsi_status, sense_key=exc.sense_key, asc=exc.asc, ascq=exc.ascq)
        return exc

    def _pr_in(self, sa: int, what: str, alloc: int = _ALLOC) -> bytes:
        """PR IN data; a list longer than ``alloc`` (ADDITIONAL LENGTH) is asked again in
        full (up to the CDB's 65535 bytes)."""
        self._pr_check()
        while True:
            try:
                res = self.controller.execute(self.lun, scsi.persistent_reserve_in(sa, alloc),
                                              data_in=alloc, what=what)
            except IllegalRequest as e:
                raise self._unsupported(e, what) from None
            data = res.data
            if sa == scsi.PRIN_REPORT_CAPABILITIES or len(data) < 8:
                return data
            need = 8 + int.from_bytes(data[4:8], "big")
            if need <= len(data) or need <= alloc or alloc >= 0xFFFF:   # once, growing
                return data
            alloc = min(need, 0xFFFF)

    def _pr_out(self, sa: int, what: str, key: int, sa_key: int = 0, pr_type: int = 0) -> None:
        self._pr_check()
        params = scsi.pr_out_parameters(key, sa_key)
        try:
            self.controller.execute(self.lun, scsi.persistent_reserve_out(sa, pr_type, len(params)),
                                    data_out=params, what=what)
        except IllegalRequest as e:
            raise self._unsupported(e, what) from None

    # ---- OUT ---------------------------------------------------------------------------------
    def pr_register(self, old_key: int, new_key: int, *, ignore: bool = False) -> None:
        """Register ``new_key`` for this initiator (``old_key`` 0 when not registered yet);
        ``new_key`` 0 unregisters.  ``ignore``: REGISTER AND IGNORE EXISTING KEY."""
        sa = scsi.PROUT_REGISTER_IGNORE if ignore else scsi.PROUT_REGISTER
        self._pr_out(sa, "PERSISTENT RESERVE OUT (REGISTER)", 0 if ignore else old_key, new_key)

    def pr_reserve(self, key: int, pr_type: int | str) -> None:
        """Take the reservation of ``pr_type`` (:class:`~uvmbus.storvsc.scsi.PrType`, number
        or name) with this initiator's registered ``key``."""
        t = scsi.pr_type(pr_type)
        self._pr_out(scsi.PROUT_RESERVE, f"PERSISTENT RESERVE OUT (RESERVE {scsi.pr_type_name(t)})",
                     key, 0, t)

    def pr_release(self, key: int, pr_type: int | str) -> None:
        """Release the reservation this initiator holds (type must match it)."""
        t = scsi.pr_type(pr_type)
        self._pr_out(scsi.PROUT_RELEASE, "PERSISTENT RESERVE OUT (RELEASE)", key, 0, t)

    def pr_preempt(self, key: int, victim_key: int, pr_type: int | str, *,
                   abort: bool = False) -> None:
        """Remove the registrations of ``victim_key`` (and take its reservation as
        ``pr_type`` if it held one); ``abort``: PREEMPT AND ABORT."""
        t = scsi.pr_type(pr_type)
        sa = scsi.PROUT_PREEMPT_AND_ABORT if abort else scsi.PROUT_PREEMPT
        self._pr_out(sa, "PERSISTENT RESERVE OUT (PREEMPT)", key, victim_key, t)

    def pr_clear(self, key: int) -> None:
        """Remove every registration and the reservation (needs this initiator's key)."""
        self._pr_out(scsi.PROUT_CLEAR, "PERSISTENT RESERVE OUT (CLEAR)", key)

    # ---- IN ----------------------------------------------------------------------------------
    def pr_read_keys(self) -> PrKeys:
        gen, keys = scsi.parse_pr_keys(self._pr_in(scsi.PRIN_READ_KEYS,
                                                   "PERSISTENT RESERVE IN (READ KEYS)"))
        return PrKeys(gen, keys)

    def pr_read_reservation(self) -> scsi.PrReservation | None:
        """The reservation (key, type), or None when there is none."""
        return scsi.parse_pr_reservation(self._pr_in(scsi.PRIN_READ_RESERVATION,
                                                     "PERSISTENT RESERVE IN (READ RESERVATION)"))[1]

    def pr_capabilities(self) -> scsi.PrCapabilities:
        return scsi.parse_pr_capabilities(self._pr_in(scsi.PRIN_REPORT_CAPABILITIES,
                                                      "PERSISTENT RESERVE IN (REPORT CAPABILITIES)",
                                                      8))

    def pr_full_status(self) -> tuple[int, list[scsi.PrRegistrant]]:
        """(generation, every registration with its holder flag and initiator TransportID)."""
        return scsi.parse_pr_full_status(self._pr_in(scsi.PRIN_READ_FULL_STATUS,
                                                     "PERSISTENT RESERVE IN (READ FULL STATUS)",
                                                     8192))

    def pr_status(self) -> dict[str, Any]:
        """Keys, reservation and capabilities as one JSON-able dict."""
        keys = self.pr_read_keys()
        res = self.pr_read_reservation()
        try:
            caps: Any = self.pr_capabilities()
        except (IllegalRequest, ProtocolError):
            caps = None
        return {
            "generation": keys.generation, "keys": [f"{k:#x}" for k in keys.keys],
            "reservation": None if res is None else {"key": f"{res.key:#x}", "type": res.type_name},
            "types": None if caps is None else [scsi.pr_type_name(t) for t in caps.types],
        }

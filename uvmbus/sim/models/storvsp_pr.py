"""SCSI-3 persistent reservations of the simulated disks (SPC-4 5.9, 6.15, 6.16).

The state belongs to the *image*, not to a controller: every LUN of every simulated SCSI
controller (in one ``uvmbus sim`` process) backed by the same file (same device and inode)
shares one :class:`PrState`, as the reservations of a Hyper-V shared VHDX belong to the
shared disk and are seen by every VM attached to it.

An initiator (I_T nexus) is one simulated SCSI controller: every channel of a controller
speaks for the same initiator, two controllers are two initiators.  On Hyper-V each VM's
synthetic SCSI controller is one initiator towards a shared VHDX; the VMBus protocol carries
no initiator identity (``vmscsi_request`` has only port/path/target/lun), so the host can
only tell initiators apart by the controller (VMBus channel set) the command came on.  This
is the model's choice, documented in docs/simulator.md.

Decisions follow SPC-4; what OpenVMM does (vm/devices/storage/scsidisk/src/reservation.rs:
parameter list of 24 bytes, SPEC_I_PT refused with INVALID FIELD IN PARAMETER LIST, scope
checked except for REGISTER/REGISTER AND IGNORE/CLEAR, RESERVATION CONFLICT with SRB ERROR
and no sense, APTPL ignored without PTPL support, the type checked before the state, 24 bytes
reported moved) is what the model does.  Not modelled: APTPL (PTPL_C = 0: reservations live
as long as the simulator), REGISTER AND MOVE, the task abort of PREEMPT AND ABORT (it acts
as PREEMPT), unit attentions to other initiators.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PrError", "PrState", "pr_state_for", "READ_CLASS", "WRITE_CLASS"]

WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
TYPES = (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)
ALL_REGISTRANTS = (WE_AR, EA_AR)

#: commands that only read the medium (or its state): refused to non-holders of an
#: Exclusive Access reservation (SPC-4 5.9.1 table, SBC-3 4.17)
READ_CLASS = frozenset({0x08, 0x28, 0xA8, 0x88, 0x2F, 0xAF, 0x8F, 0x1A, 0x5A, 0x9E12})
#: commands that change the medium or its settings: refused to non-holders of any type
WRITE_CLASS = frozenset({0x04, 0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x35, 0x91, 0x41,
                         0x93, 0x42, 0x15, 0x55, 0x16, 0x17, 0x1B})


class PrError(Exception):
    """``conflict`` (RESERVATION CONFLICT) or an ILLEGAL REQUEST with ``asc``/``ascq``."""

    def __init__(self, *, conflict: bool = False, asc: int = 0, ascq: int = 0):
        super().__init__("reservation conflict" if conflict else f"illegal request {asc:#x}/{ascq:#x}")
        self.conflict, self.asc, self.ascq = conflict, asc, ascq


ASC_INVALID_CDB, ASC_INVALID_PARAM_LIST, ASC_PARAM_LIST_LENGTH = 0x24, 0x26, 0x1A
ASCQ_INVALID_RELEASE = 0x04


@dataclass
class PrState:
    """Registrations (initiator -> key) and the reservation of one shared image."""

    generation: int = 0
    keys: dict[str, int] = field(default_factory=dict)
    holder: str | None = None
    type: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: called (outside the lock) when "a reservation exists" flips: the models route the
    #: LUN's commands through Python while one does (the C fast path does not check)
    watchers: dict[int, Callable[[], None]] = field(default_factory=dict)
    #: initiator -> relative target port identifier shown in READ FULL STATUS
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def reserved(self) -> bool:
        return self.type != 0

    # -- access checks --------------------------------------------------------------------
    def _holds(self, who: str) -> bool:
        if not self.type:
            return False
        if self.type in ALL_REGISTRANTS:
            return who in self.keys
        return self.holder == who

    def check_access(self, who: str, cls: str) -> None:
        """Raise a conflict if the reservation keeps ``who`` from a ``cls`` ("read"/"write")
        command."""
        with self.lock:
            t = self.type
            if not t or self._holds(who):
                return
            if t in (WE_RO, EA_RO) and who in self.keys:
                return
            exclusive_access = t in (EA, EA_RO, EA_AR)
            if cls == "write" or exclusive_access:
                raise PrError(conflict=True)

    # -- PERSISTENT RESERVE OUT -------------------------------------------------------------
    def out(self, who: str, sa: int, ptype: int, key: int, sa_key: int) -> None:
        was = self.reserved
        try:
            with self.lock:
                self._out(who, sa, ptype, key, sa_key)
        finally:
            if self.reserved != was:
                for cb in list(self.watchers.values()):
                    cb()

    def _out(self, who: str, sa: int, ptype: int, key: int, sa_key: int) -> None:
        mine = self.keys.get(who)
        if sa in (0, 6):                                # REGISTER / REGISTER AND IGNORE
            if sa == 0 and (key != (mine or 0)):
                raise PrError(conflict=True)
            if sa_key == 0:
                if mine is not None:
                    self._unregister(who)
                    self.generation += 1
                return
            self.keys[who] = sa_key
            self.ports.setdefault(who, len(self.ports) + 1)
            self.generation += 1
            return
        if mine is None or key != mine:                 # every other action needs our key
            raise PrError(conflict=True)
        if sa == 1:                                     # RESERVE
            if ptype not in TYPES:
                raise PrError(asc=ASC_INVALID_CDB)
            if self.type:
                if self._holds(who) and self.type == ptype:
                    return
                raise PrError(conflict=True)
            self.type, self.holder = ptype, who
            return
        if sa == 2:                                     # RELEASE
            if not self.type or not self._holds(who):
                return
            if ptype != self.type:
                raise PrError(asc=ASC_INVALID_PARAM_LIST, ascq=ASCQ_INVALID_RELEASE)
            self.type, self.holder = 0, None
            return
        if sa == 3:                                     # CLEAR
            self.keys.clear()
            self.type, self.holder = 0, None
            self.generation += 1
            return
        if sa in (4, 5):                                # PREEMPT (AND ABORT)
            self._preempt(who, ptype, sa_key)
            return
        raise PrError(asc=ASC_INVALID_CDB)              # REGISTER AND MOVE, reserved

    def _unregister(self, who: str) -> None:
        del self.keys[who]
        if self.type in ALL_REGISTRANTS:
            if not self.keys:
                self.type, self.holder = 0, None
        elif self.holder == who:
            self.type, self.holder = 0, None

    def _preempt(self, who: str, ptype: int, sa_key: int) -> None:
        victims = [w for w, k in self.keys.items() if k == sa_key and w != who]
        if self.type in ALL_REGISTRANTS:
            if sa_key == 0:                             # take over: everyone else goes
                if ptype not in TYPES:
                    raise PrError(asc=ASC_INVALID_CDB)
                for w in [w for w in self.keys if w != who]:
                    del self.keys[w]
                self.type, self.holder = ptype, who
            else:
                if not victims:
                    raise PrError(conflict=True)
                for w in victims:
                    del self.keys[w]
            self.generation += 1
            return
        holder_key = self.keys.get(self.holder) if self.holder else None
        if self.type and sa_key == holder_key:
            if ptype not in TYPES:
                raise PrError(asc=ASC_INVALID_CDB)
            for w in victims:
                del self.keys[w]
            self.type, self.holder = ptype, who
            self.generation += 1
            return
        if sa_key == 0:
            raise PrError(asc=ASC_INVALID_PARAM_LIST)
        if not victims:
            raise PrError(conflict=True)
        for w in victims:
            del self.keys[w]
        self.generation += 1

    # -- PERSISTENT RESERVE IN --------------------------------------------------------------
    def read_keys(self) -> bytes:
        with self.lock:
            keys = list(self.keys.values())
            return struct.pack(">II", self.generation, 8 * len(keys)) + \
                b"".join(struct.pack(">Q", k) for k in keys)

    def read_reservation(self) -> bytes:
        with self.lock:
            if not self.type:
                return struct.pack(">II", self.generation, 0)
            # all-registrants types report key 0 (SPC-4 6.15.3.2)
            key = 0 if self.type in ALL_REGISTRANTS else self.keys.get(self.holder or "", 0)
            desc = struct.pack(">Q4xBBH", key, 0, self.type & 0x0F, 0)
            return struct.pack(">II", self.generation, len(desc)) + desc

    def read_full_status(self) -> bytes:
        with self.lock:
            body = b""
            for who, key in self.keys.items():
                holds = self._holds(who)
                tid = who.encode()[:64]
                body += struct.pack(">Q4xBB4xHI", key, 0x02 | (1 if holds else 0),
                                    self.type & 0x0F if holds else 0, self.ports.get(who, 0),
                                    len(tid)) + tid
            return struct.pack(">II", self.generation, len(body)) + body


_registry: dict[tuple[int, int], PrState] = {}
_registry_lock = threading.Lock()


def pr_state_for(fd: int) -> PrState:
    """The reservation state of the image open as ``fd`` (shared by every LUN on it)."""
    st = os.fstat(fd)
    with _registry_lock:
        return _registry.setdefault((st.st_dev, st.st_ino), PrState())


def watch(state: PrState, owner: object, callback: Callable[[], None]) -> int:
    """Register ``callback`` until ``owner`` is collected or :func:`unwatch`; returns a token."""
    token = id(callback)
    with _registry_lock:
        state.watchers[token] = callback
    weakref.finalize(owner, state.watchers.pop, token, None)
    return token


def unwatch(state: PrState, token: int) -> None:
    state.watchers.pop(token, None)

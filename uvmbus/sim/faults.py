"""Fault injection: what a misbehaving host does, switchable while the simulator runs.

A :class:`Faults` object belongs to one device (all its channels).  Settings come from the
control socket (``{"cmd": "fault", "device": REF, "fault": NAME, "value": V}``) or
``uvmbus sim ctl fault NAME [VALUE] --device REF``.  Continuous faults stay until cleared;
counted ones (``drop_completions 3``) disarm themselves; actions (``corrupt_index``,
``spurious_interrupt``) happen once, at the next chance of the channel worker.

=====================  =================================================================
fault                  effect
=====================  =================================================================
stall                  host stops serving the device's rings (value: seconds, 0 = until
                       cleared); signals are still counted
slow_us                delay every guest packet by this many microseconds
drop_completions       drop the next N completions the model sends (-1: all)
dup_completions        send the next N completions twice
drop_packets           drop the next N non-completion packets the model sends
corrupt_descriptor     corrupt the descriptor of the next N packets sent to the guest
                       (value ``N`` or ``{"count": N, "field": "offset8|len8|type|flags"}``)
corrupt_index          once: make the guest RX write_index (``rx``) or the guest TX
                       read_index (``tx``) invalid (not 8-aligned / beyond the ring)
no_interrupts          never interrupt the guest (it must time out or poll)
spurious_interrupt     once: interrupt the guest N times with nothing new in its rings
ignore_rx_mask         interrupt the guest on every RX commit, masked or not
=====================  =================================================================
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from uvmbus.errors import ConfigError

__all__ = ["DESCRIPTOR_FIELDS", "FAULT_NAMES", "Faults"]

DESCRIPTOR_FIELDS = {"type": 0, "offset8": 1, "len8": 2, "flags": 3}


@dataclass
class Faults:
    stall_until: float = 0.0          # monotonic deadline; inf = until cleared; 0 = off
    slow_us: int = 0
    drop_completions: int = 0
    dup_completions: int = 0
    drop_packets: int = 0
    corrupt_descriptor: int = 0
    corrupt_field: str = "offset8"
    corrupt_index: str = ""           # "rx" / "tx" pending action
    no_interrupts: bool = False
    spurious_interrupt: int = 0
    ignore_rx_mask: bool = False
    generation: int = 0               # bumped on every change (workers re-evaluate)

    # -- queries used on the data path -----------------------------------------------------
    @property
    def stalled(self) -> bool:
        if not self.stall_until:
            return False
        if time.monotonic() >= self.stall_until:
            self.stall_until = 0.0
            return False
        return True

    @property
    def packet_faults(self) -> bool:
        """True when packets must take the Python path (the C fast path knows no faults)."""
        return bool(self.slow_us or self.drop_completions or self.dup_completions
                    or self.drop_packets or self.corrupt_descriptor or self.ignore_rx_mask)

    @property
    def pending_actions(self) -> bool:
        return bool(self.corrupt_index or self.spurious_interrupt)

    # -- control -------------------------------------------------------------------------
    def set(self, name: str, value: Any = True) -> None:
        if name == "stall":
            secs = _num(value, name, allow_bool=True)
            if value is False or secs < 0:
                self.stall_until = 0.0
            else:
                self.stall_until = float("inf") if value is True or secs == 0 else time.monotonic() + secs
        elif name in ("slow_us", "drop_completions", "dup_completions", "drop_packets",
                      "spurious_interrupt"):
            n = int(_num(value, name, allow_bool=True))
            if value is True:
                n = -1 if name in ("drop_completions", "dup_completions", "drop_packets") else 1
            if name == "slow_us" and n < 0:
                raise ConfigError("slow_us must be >= 0")
            setattr(self, name, n)
        elif name == "corrupt_descriptor":
            count, field = value, self.corrupt_field
            if isinstance(value, dict):
                count, field = value.get("count", 1), value.get("field", field)
            if field not in DESCRIPTOR_FIELDS:
                raise ConfigError(f"corrupt_descriptor field must be one of {sorted(DESCRIPTOR_FIELDS)}")
            self.corrupt_descriptor = 1 if count is True else int(_num(count, name))
            self.corrupt_field = field
        elif name == "corrupt_index":
            which = "rx" if value is True else str(value)
            if which not in ("rx", "tx", ""):
                raise ConfigError("corrupt_index value must be 'rx' (guest RX write_index) or 'tx'")
            self.corrupt_index = which
        elif name in ("no_interrupts", "ignore_rx_mask"):
            setattr(self, name, bool(value))
        else:
            raise ConfigError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
        self.generation += 1

    def clear(self) -> None:
        gen = self.generation
        self.__init__()  # type: ignore[misc]
        self.generation = gen + 1

    def take(self, name: str) -> bool:
        """Consume one unit of a counted fault; True if it applies now."""
        n = getattr(self, name)
        if n == 0:
            return False
        if n > 0:
            setattr(self, name, n - 1)
        return True

    def active(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("generation")
        d["stall"] = self.stalled
        d.pop("stall_until")
        if not self.corrupt_descriptor:
            d.pop("corrupt_field")
        return {k: v for k, v in d.items() if v}


FAULT_NAMES = ("stall", "slow_us", "drop_completions", "dup_completions", "drop_packets",
               "corrupt_descriptor", "corrupt_index", "no_interrupts", "spurious_interrupt",
               "ignore_rx_mask")


def _num(value: Any, name: str, allow_bool: bool = False) -> float:
    if isinstance(value, bool):
        if allow_bool:
            return 1.0 if value else -1.0
        raise ConfigError(f"fault {name} needs a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"fault {name}: {value!r} is not a number") from None

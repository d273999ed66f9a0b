"""Frame backends of the simulated NIC (NetVSP model): where guest TX frames go and where
guest RX frames come from.

* ``loopback``  — frames the guest sends come back to it (RSS-steered), in C;
* ``sink``      — TX frames are counted and dropped, in C;
* ``generator`` — RX frames synthesized in C at full speed (UDP/TCP, N flows), TX sunk;
* ``tap:NAME[@NETNS]`` — a real TAP interface (:mod:`uvmbus.sim.backends.tap`), created in
  network namespace NETNS (made if missing), so kernel traffic reaches the guest;
* ``none``      — nothing in, nothing out.

:func:`parse_backend` turns the option text into a :class:`BackendSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from uvmbus.errors import ConfigError
from uvmbus.native import lib

__all__ = ["BACKENDS", "BackendSpec", "parse_backend"]

BACKENDS = {
    "loopback": lib.UVB_NVSP_BACKEND_LOOPBACK,
    "sink": lib.UVB_NVSP_BACKEND_SINK,
    "generator": lib.UVB_NVSP_BACKEND_GENERATOR,
    "tap": lib.UVB_NVSP_BACKEND_FD,
    "none": lib.UVB_NVSP_BACKEND_NONE,
}


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    code: int
    ifname: str = ""
    netns: str = ""

    def __str__(self) -> str:
        if self.kind == "tap":
            return f"tap:{self.ifname}" + (f"@{self.netns}" if self.netns else "")
        return self.kind


def parse_backend(text: str) -> BackendSpec:
    """``loopback`` | ``sink`` | ``generator`` | ``none`` | ``tap:NAME[@NETNS]``."""
    t = (text or "loopback").strip()
    kind, _, rest = t.partition(":")
    kind = kind.lower()
    if kind not in BACKENDS:
        raise ConfigError(f"NIC backend {text!r}: use loopback, sink, generator, none or tap:NAME[@NETNS]")
    if kind != "tap":
        if rest:
            raise ConfigError(f"NIC backend {kind} takes no argument (got {text!r})")
        return BackendSpec(kind, BACKENDS[kind])
    name, _, ns = rest.partition("@")
    if not name or len(name) > 15 or "/" in name or " " in name:
        raise ConfigError(f"TAP backend {text!r}: interface name must be 1-15 characters")
    if "/" in ns or " " in ns:
        raise ConfigError(f"TAP backend {text!r}: bad network namespace name")
    return BackendSpec("tap", BACKENDS["tap"], name, ns)

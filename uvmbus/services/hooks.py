"""Frame hooks for ``uvmbus net bridge --hook MODULE:FUNCTION``: the packet-processing
prototype entry point.

A hook sees every frame the bridge moves, a burst at a time::

    def hook(direction: str, frames: list[bytes]) -> Iterable[bytes | bytearray] | None:
        ...

* ``direction`` is ``"rx"`` for frames that came from the NIC (the network) and go to the
  TAP (the kernel), ``"tx"`` for frames the kernel sent on the TAP, going out of the NIC;
* return ``None`` to pass the burst unchanged, or the frames to forward instead — leave a
  frame out to drop it, put different bytes in to change it, add frames to inject them (in
  the same direction).  The returned frames go out in order.

A hook written per frame is wrapped with :func:`per_frame`: the function gets
``(direction, frame)`` and returns the frame (same or changed) or ``None`` to drop it.

``MODULE`` is an importable module name or a path to a ``.py`` file
(``/etc/uvmbus/hooks/fw.py:filter``).  If the module defines ``setup(info)`` it is called
once before the first frame with a dict (device, MAC, MTU, TAP name, queues).  A hook that
raises drops its burst (fail closed); the error is logged and counted (``hook_errors``).

The hooks in this module are examples and test fixtures: :func:`drop_icmp`,
:func:`count_only`.
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError

__all__ = ["Hook", "count_only", "drop_icmp", "is_icmp", "load_hook", "per_frame"]

Hook = Callable[[str, list[bytes]], Iterable[bytes | bytearray] | None]


def per_frame(fn: Callable[[str, bytes], bytes | bytearray | None]) -> Hook:
    """Turn ``fn(direction, frame) -> frame | None`` into a burst hook."""
    def burst(direction: str, frames: list[bytes]) -> list[bytes | bytearray]:
        out = []
        for f in frames:
            r = fn(direction, f)
            if r is not None:
                out.append(r)
        return out

    burst.__name__ = getattr(fn, "__name__", "per_frame")
    burst.__doc__ = fn.__doc__
    return burst


def _load_module(spec: str) -> Any:
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"hook file {spec} does not exist")
        name = f"uvmbus_hook_{path.stem}"
        s = importlib.util.spec_from_file_location(name, path)
        if s is None or s.loader is None:
            raise ConfigError(f"cannot load {spec} as a Python module")
        mod = importlib.util.module_from_spec(s)
        sys.modules[name] = mod
        s.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigError(f"hook module {spec!r} cannot be imported: {exc}") from exc


def load_hook(spec: str) -> tuple[Hook, Callable[[dict[str, Any]], None] | None]:
    """``"module:function"`` → (hook, the module's ``setup`` or None)."""
    mod_name, sep, func = spec.rpartition(":")
    if not sep or not mod_name or not func:
        raise ConfigError(f"--hook {spec!r}: expected MODULE:FUNCTION (or /path/file.py:FUNCTION)")
    mod = _load_module(mod_name)
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ConfigError(f"--hook {spec!r}: {mod_name} has no callable {func!r}")
    setup = getattr(mod, "setup", None)
    return fn, setup if callable(setup) else None


# ---- examples ------------------------------------------------------------------------------------

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100


def is_icmp(frame: bytes | bytearray | memoryview) -> bool:
    """True for ICMP (IPv4) and ICMPv6 frames, VLAN-tagged or not (IPv6 extension headers
    are not followed: ICMPv6 directly after the fixed header, as ping sends it)."""
    if len(frame) < 14:
        return False
    off = 12
    (etype,) = struct.unpack_from(">H", frame, off)
    if etype == ETH_P_8021Q and len(frame) >= 18:
        off += 4
        (etype,) = struct.unpack_from(">H", frame, off)
    ip = off + 2
    if etype == ETH_P_IP and len(frame) >= ip + 20:
        return frame[ip + 9] == 1
    if etype == ETH_P_IPV6 and len(frame) >= ip + 40:
        return frame[ip + 6] == 58
    return False


def drop_icmp(direction: str, frames: list[bytes]) -> list[bytes]:
    """Drop every ICMP/ICMPv6 frame, both directions (``ping`` stops working, TCP does not).

    Note that this also drops IPv6 neighbour discovery (ICMPv6): IPv4 traffic is unaffected."""
    return [f for f in frames if not is_icmp(f)]


COUNTS: dict[str, int] = {"rx": 0, "tx": 0}


def count_only(direction: str, frames: list[bytes]) -> None:
    """Count frames per direction (in :data:`COUNTS`) and pass them unchanged."""
    COUNTS[direction] = COUNTS.get(direction, 0) + len(frames)
    return None

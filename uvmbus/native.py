"""Access to the compiled fast path (``uvmbus._native``): ``ffi`` and ``lib``.

Every layer imports the extension through this module so that a missing build
gives one clear message instead of an ImportError deep in a driver.
"""

from __future__ import annotations

from typing import Any

from uvmbus.errors import ConfigError

try:
    from uvmbus._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "uvmbus's native extension is not built. Run `pip install .` (or `make build` "
        "in a checkout) so that native/ is compiled into uvmbus._native."
    ) from exc

__all__ = ["ffi", "lib", "buffer_pointer", "release", "errmsg"]


def buffer_pointer(obj: Any, *, writable: bool = True) -> Any:
    """A ``uint8_t *`` cdata pointing into a Python buffer (bytes, bytearray, mmap, memoryview).

    The returned object keeps the buffer exported; call :func:`release` before
    closing an mmap.
    """
    try:
        return ffi.from_buffer("uint8_t[]", obj, require_writable=writable)
    except TypeError as exc:
        raise ConfigError(f"expected a {'writable ' if writable else ''}buffer, got {type(obj).__name__}") from exc


def release(cdata: Any) -> None:
    """Release a buffer exported by :func:`buffer_pointer` (idempotent)."""
    try:
        ffi.release(cdata)
    except (ValueError, TypeError):
        pass


def errmsg(ring_struct: Any) -> str:
    """The error message stored in a ``struct uvb_ring``."""
    return ffi.string(ring_struct.errmsg).decode(errors="replace")

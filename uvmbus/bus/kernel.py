"""What the running kernel's ``uio_hv_generic`` does, derived from its release string.

This is the ONE place that turns a kernel version into behaviour flags; nothing else in
uvmbus should compare version numbers.  Facts come from uio_vmbus.md:

- §1.6 (interrupt semantics by version) and §1.7: non-monitored ("low speed") channels are
  refused by probe before v6.10, and only from v6.10 does ``write(fd, 1)`` signal the host for
  them; from v6.16 irqcontrol covers every sub-channel; before v6.18 the kernel itself sets
  ``interrupt_mask = 1`` from its channel callback.
- §1.3: NIC-only receive/send buffer maps (≈v6.14, release unverified); int/monitor maps are
  exactly 4096 bytes from v6.16 (``PAGE_SIZE`` before).
- §1.5 / §1.8: ring sizes per version and when the sysfs ``ring`` file size became exact
  (v6.15, and the 6.12.42 stable backport).

The flags describe *mainline* behaviour.  Stable and distribution kernels backport fixes
(e.g. b15b7d2a1b09 "let userspace take care of interrupt mask" went to 5.4…6.17, and
d062463edf17 to 6.12/6.6/6.1/5.15/5.10 afterwards), so a version number cannot prove a
backport is absent.  Flags are therefore chosen so that the *safe* assumption is made when in
doubt, and callers must in any case:

- always use drain → unmask → re-check the ring → block (never trust the mask to stay 0);
- derive sizes from the tree (``maps/mapN/size``, ``stat(channels/<relid>/ring)``), using the
  predictions here only to cross-check or to lay out a simulated tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from uvmbus.bus.classes import UNKNOWN_PREF_RING_SIZE, lookup_class
from uvmbus.errors import ConfigError, KernelUnsupported, NotFound

__all__ = ["KernelQuirks", "parse_release"]

_RELEASE_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")

_SZ_2M = 2 * 1024 * 1024
_HV_RING_SIZE_PAGES = 512  # pre-6.10 ring size in guest pages


def parse_release(release: str) -> tuple[int, int, int]:
    """``"6.16.0-rc3+"`` → ``(6, 16, 0)``; ``"5.15.0-1064-azure"`` → ``(5, 15, 0)``.

    Raises :class:`ConfigError` when the string does not start with ``X.Y``.
    """
    m = _RELEASE_RE.match(release)
    if m is None:
        raise ConfigError(f"cannot parse kernel release {release!r}: expected 'X.Y[.Z][-extra]'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _page_align(n: int, page_size: int) -> int:
    return (n + page_size - 1) // page_size * page_size


@dataclass(frozen=True)
class KernelQuirks:
    """uio_hv_generic behaviour of one kernel release (see module docstring for caveats)."""

    release: str
    version: tuple[int, int, int]
    nonmonitored_supported: bool
    """≥6.10: probe accepts channels without a monitor id (before: ``-ENOTSUPP``)."""
    irqcontrol_signals_nonmonitored: bool
    """≥6.10: ``write(fd, 1)`` signals the host for a non-monitored channel."""
    irqcontrol_all_channels: bool
    """≥6.16: ``write(fd, 0/1)`` masks/unmasks (and signals) every sub-channel too."""
    subchannel_interrupts_safe: bool
    """≥6.16 (d062463edf17): a sub-channel's interrupt is routed to its device. Before, the
    uio callback dereferences a NULL ``device_obj`` for sub-channels, so a host interrupt on
    an unmasked sub-channel crashes the guest (uio_vmbus.md §1.6): keep them masked, poll."""
    kernel_may_set_mask: bool
    """<6.18: the kernel may set ``interrupt_mask = 1`` behind userspace's back."""
    ring_file_size_exact: bool
    """≥6.15 (or 6.12.42+): ``stat(channels/<relid>/ring).st_size`` is 2 × the real ring size."""
    nic_only_buffer_maps: bool
    """≥6.14 (⚠ release unverified): maps 3/4 (recv/send buffers) exist only for NICs."""
    int_map_is_hv_page: bool
    """≥6.16: int/monitor maps are 4096 bytes; before, ``PAGE_SIZE``."""

    @classmethod
    def from_release(cls, release: str) -> KernelQuirks:
        v = parse_release(release)
        mm = v[:2]
        return cls(
            release=release.strip(),
            version=v,
            nonmonitored_supported=mm >= (6, 10),
            irqcontrol_signals_nonmonitored=mm >= (6, 10),
            irqcontrol_all_channels=mm >= (6, 16),
            subchannel_interrupts_safe=mm >= (6, 16),
            kernel_may_set_mask=mm < (6, 18),
            ring_file_size_exact=mm >= (6, 15) or (mm == (6, 12) and v[2] >= 42),
            nic_only_buffer_maps=mm >= (6, 14),
            int_map_is_hv_page=mm >= (6, 16),
        )

    @classmethod
    def for_root(cls, root: str | os.PathLike[str] = "/") -> KernelQuirks:
        """Quirks of the kernel behind ``root``: reads ``<root>/proc/sys/kernel/osrelease``.

        For the real root ("/") an unreadable file falls back to ``os.uname().release``; for a
        simulated root the file must exist (the simulator writes it).
        """
        path = Path(root) / "proc/sys/kernel/osrelease"
        try:
            release = path.read_text()
        except OSError:
            if Path(root).resolve() != Path("/"):
                raise NotFound(
                    f"{path}: cannot read the kernel release of this (simulated) root"
                ) from None
            release = os.uname().release
        return cls.from_release(release)

    def require_nonmonitored(self, what: str) -> None:
        """Raise :class:`KernelUnsupported` if ``what`` (a non-monitored channel) is unusable."""
        if not self.nonmonitored_supported:
            raise KernelUnsupported(
                f"{what} is not monitor-allocated; uio_hv_generic supports such channels only "
                f"from Linux 6.10 (running {self.release}). Use a newer kernel."
            )

    # -- ring sizes (§1.5) ------------------------------------------------------------------

    def ring_size(self, class_id: str | None, *, subchannel: bool = False,
                  page_size: int = 4096) -> int:
        """Predicted ring size per direction (header page included) for a class GUID/name.

        ``class_id`` None or unknown means a class missing from the kernel's table.
        """
        if self.version[:2] < (6, 10):
            return _HV_RING_SIZE_PAGES * page_size
        if subchannel:
            return _SZ_2M
        cls = lookup_class(class_id) if class_id else None
        pref = cls.pref_ring_size if cls is not None else UNKNOWN_PREF_RING_SIZE
        size = pref or _SZ_2M
        if self.version[:2] >= (6, 16):
            size = _page_align(page_size + size, page_size)
        return size

    def ring_file_size(self, ring_size: int, *, page_size: int = 4096) -> int:
        """Size the sysfs ``ring`` file reports for a channel whose ring is ``ring_size``."""
        if self.ring_file_size_exact:
            return 2 * ring_size
        if self.version[:2] < (6, 10):
            return 2 * _HV_RING_SIZE_PAGES * page_size
        return 2 * _SZ_2M

    def int_map_size(self, page_size: int = 4096) -> int:
        """Size of maps 1 (int page) and 2 (monitor page)."""
        return 4096 if self.int_map_is_hv_page else page_size

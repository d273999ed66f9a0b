"""The simulated guest kernel's ``uio_hv_generic``: every version-dependent rule in one table.

Written from ../shared/reference/uio_vmbus.md (§1.2, §1.3, §1.5, §1.6, §1.8, §1.10), NOT from
the guest's own :mod:`uvmbus.bus.kernel`, so that the simulator does not inherit the guest's
misunderstandings.  Everything the simulator does differently per ``--kernel`` asks a
:class:`KernelMode` (sizes, maps, irqcontrol, who touches ``interrupt_mask``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from uvmbus.errors import ConfigError

__all__ = ["KERNEL_CLASS_PREF_RING", "TESTED_KERNELS", "KernelMode"]

#: the modes the test suite covers; any X.Y is accepted and mapped onto the thresholds below
TESTED_KERNELS = ("6.9", "6.10", "6.16", "6.18")

SZ_2M = 2 * 1024 * 1024
HV_RING_PAGES = 512                 # HV_RING_SIZE before 6.10, in guest pages
RECV_BUFFER_SIZE = 31 * 1024 * 1024
SEND_BUFFER_SIZE = 16 * 1024 * 1024
UNKNOWN_PREF_RING = 0x11000         # classes missing from the kernel's vmbus_devs table
FIRST_GPADL = 0xE1E10

#: pref_ring_size of the classes the kernel knows (0 = default 2 MiB), §1.5
KERNEL_CLASS_PREF_RING: dict[str, int] = {
    "f8615163-df3e-46c5-913f-f2d2f965ed0e": 0,       # NIC
    "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f": 0,       # SCSI
    "32412632-86cb-44a2-9b5c-50d1417354f5": 0,       # IDE
    "2f9bcc4a-0069-4af3-b76b-6fd0be528cda": 0,       # FC
    "34d14be3-dee4-41c8-9ae7-6b174977c192": 0x4000,  # FCOPY
    "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6": 0,       # KVP
    "9527e630-d0ae-497b-adce-e80ab0175caf": 0,       # timesync
    "57164f39-9115-4e78-ab55-382f3bd5422d": 0,       # heartbeat
    "0e0b6031-5213-4934-818b-38d90ced39db": 0,       # shutdown
    "35fa2e29-ea23-4236-96ae-3a6ebacba440": 0,       # VSS (backup)
    "525074dc-8985-46e2-8057-a307dc18a502": 0,       # dynamic memory
    "cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a": 0,       # mouse
    "f912ad6d-2b17-48ea-bd65-f927a61c7684": 0,       # keyboard
    "da0a7802-e377-4aac-8e77-0558eb1073f8": 0,       # synthetic video
    "8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501": 0,       # NetworkDirect
    "44c4f61d-4444-4400-9d52-802e27ede19f": 0,       # PCI pass-through
}

NIC_CLASS = "f8615163-df3e-46c5-913f-f2d2f965ed0e"


def _align(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


@dataclass(frozen=True)
class KernelMode:
    """uio_hv_generic of one simulated kernel version with one guest page size."""

    version: tuple[int, int]
    page_size: int

    @classmethod
    def parse(cls, text: str, page_size: int = 4096) -> KernelMode:
        m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text)
        if not m:
            raise ConfigError(f"--kernel {text!r}: expected a version like 6.16")
        version = (int(m.group(1)), int(m.group(2)))
        if version < (4, 18):
            raise ConfigError(f"--kernel {text}: the simulator models uio_hv_generic from 4.18 on")
        if page_size not in (4096, 16384, 65536):
            raise ConfigError(f"--page-size {page_size}: use 4096, 16384 or 65536")
        return cls(version, page_size)

    # -- identity --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def release(self) -> str:
        """What ``proc/sys/kernel/osrelease`` says."""
        return f"{self.name}.0-uvmbus-sim"

    def _at_least(self, major: int, minor: int) -> bool:
        return self.version >= (major, minor)

    # -- probe ---------------------------------------------------------------------------
    @property
    def accepts_unmonitored(self) -> bool:
        """Probe refuses channels without a monitor id before 6.10 (-ENOTSUPP)."""
        return self._at_least(6, 10)

    def has_buffer_maps(self, class_id: str) -> bool:
        """Maps 3/4 (recv/send buffers): every device before 6.14, NICs only from 6.14."""
        return class_id == NIC_CLASS or not self._at_least(6, 14)

    # -- sizes (§1.3, §1.5) ---------------------------------------------------------------
    def primary_ring_bytes(self, class_id: str) -> int:
        """Per-direction ring of the primary channel, header page included."""
        if not self._at_least(6, 10):
            return HV_RING_PAGES * self.page_size
        pref = KERNEL_CLASS_PREF_RING.get(class_id, UNKNOWN_PREF_RING) or SZ_2M
        if self._at_least(6, 16):
            return _align(self.page_size + pref, self.page_size)
        return pref

    def subchannel_ring_bytes(self) -> int:
        if not self._at_least(6, 10):
            return HV_RING_PAGES * self.page_size
        return SZ_2M

    def ring_file_bytes(self, ring_bytes: int) -> int:
        """Size of the sysfs ``ring`` file of a channel whose rings are ``ring_bytes`` each."""
        if self._at_least(6, 15):
            return 2 * ring_bytes
        if self._at_least(6, 10):
            return 2 * SZ_2M
        return 2 * HV_RING_PAGES * self.page_size

    @property
    def int_map_size(self) -> int:
        """Maps 1 (int page) and 2 (monitor page): PAGE_SIZE before 6.16, 4096 from 6.16."""
        return 4096 if self._at_least(6, 16) else self.page_size

    # -- interrupts (§1.6) ----------------------------------------------------------------
    @property
    def irqcontrol_all_channels(self) -> bool:
        """From 6.16 irqcontrol masks/unmasks (and signals) every channel of the device."""
        return self._at_least(6, 16)

    @property
    def irqcontrol_signals(self) -> bool:
        """From 6.10 write(1) signals the host for non-monitored channels (vmbus_setevent)."""
        return self._at_least(6, 10)

    @property
    def kernel_sets_mask(self) -> bool:
        """Before 6.18 the kernel sets RX interrupt_mask = 1 at open, in its interrupt
        handler and on new sub-channels."""
        return not self._at_least(6, 18)

    @property
    def subchannel_interrupt_crashes(self) -> bool:
        """Before 6.16 the interrupt handler of a sub-channel dereferences its NULL
        ``device_obj``: a host interrupt on an unmasked sub-channel oopses the guest."""
        return not self._at_least(6, 16)

    def describe(self) -> dict[str, object]:
        return {
            "kernel": self.name, "release": self.release, "page_size": self.page_size,
            "accepts_unmonitored": self.accepts_unmonitored,
            "irqcontrol_signals": self.irqcontrol_signals,
            "irqcontrol_all_channels": self.irqcontrol_all_channels,
            "kernel_sets_mask": self.kernel_sets_mask,
            "subchannel_ring_bytes": self.subchannel_ring_bytes(),
            "int_map_size": self.int_map_size,
        }

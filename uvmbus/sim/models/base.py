"""The device-model (VSP) plugin interface.

A device model is the host-side implementation of one VMBus device class: what Hyper-V's
VSP does with the packets the guest driver sends.  Subclass :class:`DeviceModel`, give it a
``name`` and ``class_id``, decorate it with :func:`uvmbus.sim.models.register_model` and the
simulator can offer devices of it (``uvmbus sim --device NAME``).

Hooks run on the channel's worker thread (one per open channel; ``reset`` on the simulator's
event loop after every worker stopped):

* ``open(channel)`` — the guest opened the channel (primary: first open of ``/dev/uioN``;
  sub-channel: when its ring is ready);
* ``packet(channel, pkt)`` — one packet from the guest; answer with ``channel.send`` /
  ``channel.complete`` / ``channel.send_xfer_pages`` (flushed after the batch);
  ``pkt.payload`` / ``pkt.header`` are only valid during the call;
* ``close(channel)`` — the channel closed (guest's last close, rescind, unbind, exit);
* ``reset()`` — the device was closed: forget all protocol state;
* ``tick(channel)`` — host-initiated work before each serve (returns when to run again);
* ``pump(channel, spin_ns)`` — optional C fast path (see native/host.h for the contract);
  return ``None`` to use ``packet`` instead.

The device (``self.device``, seen through :class:`uvmbus.sim.hostapi.HostDevice`) offers sub-channels,
the GPADL buffers (uio maps 3/4), guest RAM by PFN and logging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from uvmbus.ring import Packet

if TYPE_CHECKING:
    from uvmbus.sim.channel import HostChannel
    from uvmbus.sim.hostapi import HostDevice

__all__ = ["DeviceModel", "gpa_ranges", "xfer_ranges"]


class DeviceModel:
    """Base class of device models; every hook has a do-nothing default."""

    #: short name used on the command line (``--device NAME``) and in the ready line
    name: ClassVar[str] = ""
    #: class (interface type) GUID, lowercase, no braces
    class_id: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: in-kernel driver the device is bound to at start (None: left unbound)
    kernel_driver: ClassVar[str | None] = None
    #: the kernel's HV_NIC: uio_hv_generic gives it receive/send buffers (maps 3/4)
    is_nic: ClassVar[bool] = False
    #: None: follow --unmonitored; False: never monitored (e.g. integration components)
    monitored: ClassVar[bool | None] = None
    #: command-line option that creates devices of this model (e.g. "nic" for --nic N)
    cli_option: ClassVar[str | None] = None

    def __init__(self, device: HostDevice, **options: Any) -> None:
        self.device = device
        self.options = options

    @classmethod
    def from_cli(cls, value: Any) -> list[dict[str, Any]]:
        """Turn the value of ``--<cli_option>`` into one options dict per device."""
        if isinstance(value, int):
            return [{} for _ in range(value)]
        return [{"value": v} for v in value]

    def open(self, channel: HostChannel) -> None:
        """The guest opened ``channel``."""

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        """One packet from the guest on ``channel``."""

    def close(self, channel: HostChannel) -> None:
        """``channel`` was closed."""

    def reset(self) -> None:
        """The device was closed by the guest (last close): drop all VSP state."""

    def tick(self, channel: HostChannel) -> float | None:
        """Host-initiated work (requests the host starts, timers), on the worker before each
        serve; return seconds until it wants to run again (None: only when woken, e.g. by
        ``channel.poke()``).  Packets queued here are flushed when it returns a number."""
        return None

    def pump(self, channel: HostChannel, spin_ns: int) -> int | None:
        """Optional C fast path: drain the TX ring and answer (native/host.h contract).
        Return a UVB_HOST_* code, or None when this model has no fast path."""
        return None

    def describe(self) -> dict[str, Any]:
        """Extra fields for the ready line and ``stats``."""
        return {}

    def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Model-specific operation from the control socket (``{"cmd": "model", "device": REF,
        "op": OP, "args": {...}}``), run on the simulator's event loop; returns reply fields."""
        from uvmbus.errors import ConfigError
        raise ConfigError(f"device model {self.name!r} has no control operations")


def gpa_ranges(pkt: Packet) -> list[tuple[int, int, list[int]]]:
    """The ``(byte_count, byte_offset, pfns)`` ranges of a GPA-direct packet (type 9).

    The ring layer has already checked that they fit the packet's header."""
    h = bytes(pkt.header)
    count = int.from_bytes(h[4:8], "little")
    out, off = [], 8
    for _ in range(count):
        byte_count = int.from_bytes(h[off:off + 4], "little")
        byte_offset = int.from_bytes(h[off + 4:off + 8], "little")
        n = (byte_offset + byte_count + 4095) // 4096
        pfns = [int.from_bytes(h[off + 8 + 8 * i:off + 16 + 8 * i], "little") for i in range(n)]
        out.append((byte_count, byte_offset, pfns))
        off += 8 + 8 * n
    return out


def xfer_ranges(pkt: Packet) -> tuple[int, list[tuple[int, int]]]:
    """``(pageset_id, [(byte_count, byte_offset)])`` of a transfer-page packet (type 7)."""
    h = bytes(pkt.header)
    pageset = int.from_bytes(h[0:2], "little")
    count = int.from_bytes(h[4:8], "little")
    return pageset, [(int.from_bytes(h[8 + 8 * i:12 + 8 * i], "little"),
                      int.from_bytes(h[12 + 8 * i:16 + 8 * i], "little")) for i in range(count)]

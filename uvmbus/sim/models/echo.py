"""The echo device: the simulator's example device model and the guest core's test partner.

Behaviour (class ``0e7e0c0d-0000-4000-8000-7573766d6275``, unknown to the kernel, so its
primary ring has the "unknown class" size):

* every in-band packet (type 6) is sent back in-band with the same transaction id and the
  same payload (padding included); when the guest requested a completion, a completion
  (type 11, same id) with ``{u32 status = 0, u32 payload length}`` follows;
* a control message is an in-band packet whose payload starts with :data:`MAGIC`, followed by
  ``u32 op, u32 arg, u32 arg2, u32 reserved`` (:func:`control_message` builds one):

  - ``OP_OFFER_SUBCHANNELS`` (arg = n): offer ``n`` sub-channels (their ``ring`` files appear
    after ``--subchannel-delay``); completion ``{status, n}``;
  - ``OP_SEND`` (arg = count, arg2 = size): the host sends ``count`` in-band packets of
    ``size`` bytes (transaction ids 0..count-1, payload starts with the u32 index) — the
    host→guest direction under flow control; completion ``{status, count}`` after the last;

* a GPA-direct packet (type 9) reads the guest memory its ranges name and completes with
  ``{u32 status, u32 length}`` + the bytes (at most 64 KiB); if its in-band payload starts with
  ``b"W"``, the rest of the payload (trailing zero bytes removed: VMBus pads payloads to 8) is
  written, repeated, over the ranges instead.  A PFN
  outside guest RAM completes with status ``STATUS_ACCESS_VIOLATION``, as a real host fails
  such a request;
* anything else (completions, transfer pages) is counted and ignored.

The in-band path runs in C (``uvb_host_echo_pump``) unless a packet fault is active.
"""

from __future__ import annotations

import struct
from typing import Any

from uvmbus.bus.classes import CLASSES
from uvmbus.errors import ConfigError
from uvmbus.native import ffi, lib
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_GPA_DIRECT, PKT_INBAND, Packet
from uvmbus.sim.channel import HostChannel
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel, gpa_ranges

__all__ = ["ECHO_CLASS_ID", "MAGIC", "OP_OFFER_SUBCHANNELS", "OP_SEND", "EchoModel", "control_message"]

ECHO_CLASS_ID = next(c.guid for c in CLASSES if c.name == "echo")      # one definition: the bus table
MAGIC = b"uvbecho\0"
OP_OFFER_SUBCHANNELS = 1
OP_SEND = 2
STATUS_OK = 0
STATUS_INVALID = 0xC000000D          # STATUS_INVALID_PARAMETER
STATUS_ACCESS_VIOLATION = 0xC0000005
STATUS_NOT_SUPPORTED = 0xC00000BB
MAX_GPA_ECHO = 64 * 1024

_CTL = struct.Struct("<8sIIII")
_COMP = struct.Struct("<II")
_MAGIC_U64 = int.from_bytes(MAGIC, "little")


def control_message(op: int, arg: int = 0, arg2: int = 0) -> bytes:
    """The in-band payload of an echo control message."""
    return _CTL.pack(MAGIC, op, arg, arg2, 0)


@register_model
class EchoModel(DeviceModel):
    name = "echo"
    class_id = ECHO_CLASS_ID
    description = "echoes in-band packets; offers sub-channels on request"

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        self._pumps: dict[int, Any] = {}
        self._keep: dict[int, tuple[Any, ...]] = {}
        self.ignored = 0

    # -- fast path ------------------------------------------------------------------------
    def open(self, channel: HostChannel) -> None:
        e = ffi.new("struct uvb_host_echo *")
        scratch = ffi.new("uint8_t[]", 1 << 20)
        pkts = ffi.new("struct uvb_pkt[]", 256)
        e.tx = channel.tx.raw
        e.rx = channel.rx.raw
        e.irq = channel.irq
        e.kick = channel.kick
        e.scratch = scratch
        e.scratch_len = len(scratch)
        e.pkts = pkts
        e.max_pkts = len(pkts)
        e.magic = _MAGIC_U64
        self._pumps[channel.relid] = e
        self._keep[channel.relid] = (scratch, pkts)

    def pump(self, channel: HostChannel, spin_ns: int) -> int | None:
        e = self._pumps.get(channel.relid)
        if e is None:
            return None
        e.spin_ns = spin_ns
        before_in, before_comp = e.echoed, e.completions
        rc = int(lib.uvb_host_echo_pump(e))
        n = e.echoed - before_in
        channel.stats["packets_from_guest"] += n
        channel.stats["packets_to_guest"] += n + (e.completions - before_comp)
        return rc

    def close(self, channel: HostChannel) -> None:
        self._pumps.pop(channel.relid, None)
        self._keep.pop(channel.relid, None)

    # -- slow path ------------------------------------------------------------------------
    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        if pkt.type == PKT_INBAND:
            payload = pkt.payload
            if len(payload) >= _CTL.size and bytes(payload[:8]) == MAGIC:
                self._control(channel, pkt)
                return
            channel.send(payload, trans_id=pkt.trans_id)
            if pkt.flags & FLAG_COMPLETION_REQUESTED:
                channel.complete(pkt.trans_id, _COMP.pack(STATUS_OK, len(payload)))
        elif pkt.type == PKT_GPA_DIRECT:
            self._gpa(channel, pkt)
        else:
            self.ignored += 1

    def _control(self, channel: HostChannel, pkt: Packet) -> None:
        _magic, op, arg, arg2, _ = _CTL.unpack_from(pkt.payload)
        status, value = STATUS_OK, 0
        if op == OP_OFFER_SUBCHANNELS:
            if channel.is_primary and 0 < arg <= 64:
                value = self.device.offer_subchannels(arg)
            else:
                status = STATUS_INVALID
        elif op == OP_SEND:
            size = max(arg2, 4)
            for i in range(arg):
                channel.send(i.to_bytes(4, "little") + bytes(size - 4), trans_id=i)
            value = arg
        else:
            status = STATUS_INVALID
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            channel.complete(pkt.trans_id, _COMP.pack(status, value))

    def _gpa(self, channel: HostChannel, pkt: Packet) -> None:
        ranges = gpa_ranges(pkt)
        body = bytes(pkt.payload)
        status, data = STATUS_OK, b""
        ram = self.device.guest_ram
        if ram is None:
            status = STATUS_NOT_SUPPORTED
        else:
            try:
                if body[:1] == b"W":
                    fill = body[1:].rstrip(b"\0") or b"\0"   # the payload comes padded to 8
                    for count, offset, pfns in ranges:
                        ram.write(pfns, offset, (fill * (count // len(fill) + 1))[:count])
                else:
                    total = sum(c for c, _, _ in ranges)
                    if total > MAX_GPA_ECHO:
                        status = STATUS_INVALID
                    else:
                        data = b"".join(ram.read(pfns, offset, count) for count, offset, pfns in ranges)
            except ConfigError:      # a PFN outside guest RAM: the host fails the request
                status = STATUS_ACCESS_VIOLATION
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            channel.complete(pkt.trans_id, _COMP.pack(status, len(data)) + data)

"""Stand-ins for devices the simulator offers but does not implement (integration
components owned by hv_utils): packets are counted and dropped, completions are answered
with an empty completion so a guest that binds one does not hang on a request."""

from __future__ import annotations

from typing import ClassVar

from uvmbus.ring import FLAG_COMPLETION_REQUESTED, Packet
from uvmbus.sim.channel import HostChannel
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel

__all__ = ["IC_CLASSES", "NullModel"]

#: (name, class GUID) of the integration components a VM usually has (storvsc_ic.md §8)
IC_CLASSES = (
    ("heartbeat", "57164f39-9115-4e78-ab55-382f3bd5422d"),
    ("shutdown", "0e0b6031-5213-4934-818b-38d90ced39db"),
    ("timesync", "9527e630-d0ae-497b-adce-e80ab0175caf"),
    ("kvp", "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6"),
    ("fcopy", "34d14be3-dee4-41c8-9ae7-6b174977c192"),
)


@register_model
class NullModel(DeviceModel):
    name = "null"
    class_id = "57164f39-9115-4e78-ab55-382f3bd5422d"
    description = "accepts and drops packets (integration-component stand-in)"
    kernel_driver: ClassVar[str | None] = "hv_utils"
    monitored: ClassVar[bool | None] = False      # ICs are low-speed, non-monitored channels

    def __init__(self, device: object, **options: str) -> None:
        super().__init__(device, **options)  # type: ignore[arg-type]
        self.dropped = 0

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        self.dropped += 1
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            channel.complete(pkt.trans_id)

"""Channel layer: VMBus channels (ring pair + signalling + waiting) and a device's set of them."""

from uvmbus.channel.channel import AUTO_TID_BASE, DEFAULT_TIMEOUT, Channel, PollingWaiter, Waiter
from uvmbus.channel.device import ChannelDevice, DeviceWaiter, open_device

__all__ = [
    "AUTO_TID_BASE", "DEFAULT_TIMEOUT", "Channel", "ChannelDevice", "DeviceWaiter", "PollingWaiter",
    "Waiter", "open_device",
]

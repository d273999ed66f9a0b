"""UIO layer: the device endpoint (real /dev/uioN or the simulator's), maps,
interrupts, signalling set-up and sub-channel ring files."""

from uvmbus.uio.device import UIO_DRIVER, MappedRegion, SubchannelRing, UioDevice, open_uio
from uvmbus.uio.endpoint import OPEN_TIMEOUT, Endpoint, SimEndpoint, UioEndpoint, open_endpoint

__all__ = [
    "OPEN_TIMEOUT", "UIO_DRIVER", "Endpoint", "MappedRegion", "SimEndpoint", "SubchannelRing", "UioDevice",
    "UioEndpoint", "open_endpoint", "open_uio",
]

"""The simulated VMBus host (``uvmbus sim``): Hyper-V's host side plus the guest kernel's
uio_hv_generic, in a separate process, under a root directory.

Modules, by concept:

- :mod:`~uvmbus.sim.kernel`     the simulated kernel version: sizes, maps, irqcontrol, masks
- :mod:`~uvmbus.sim.tree`       the sysfs/dev/proc files under the root
- :mod:`~uvmbus.sim.binding`    what writes to new_id/bind/unbind/driver_override do
- :mod:`~uvmbus.sim.endpoint`   the ``dev/uioN`` socket server (hello, irqcontrol, rescind)
- :mod:`~uvmbus.sim.device`     one device: probe, open/close, sub-channels, rescind
- :mod:`~uvmbus.sim.channel`    one open channel: the host worker and its signal accounting
- :mod:`~uvmbus.sim.monitor`    the monitor-page scanner
- :mod:`~uvmbus.sim.faults`     fault injection
- :mod:`~uvmbus.sim.control`    the control socket (and its client)
- :mod:`~uvmbus.sim.models`     device models (VSPs): registry, ``echo``, ``null``
- :mod:`~uvmbus.sim.simulator`  the VM and its event loop

See docs/simulator.md.
"""

from uvmbus.sim.channel import ChannelStopped, HostChannel
from uvmbus.sim.config import DeviceSpec, SimConfig
from uvmbus.sim.control import ControlClient
from uvmbus.sim.device import SimDevice
from uvmbus.sim.kernel import TESTED_KERNELS, KernelMode
from uvmbus.sim.models import DeviceModel, register_model
from uvmbus.sim.simulator import Simulator, prepare_root

__all__ = [
    "TESTED_KERNELS", "ChannelStopped", "ControlClient", "DeviceModel", "DeviceSpec", "HostChannel",
    "KernelMode", "SimConfig", "SimDevice", "Simulator", "prepare_root", "register_model",
]

"""nvme: a userspace NVMe driver over VFIO, with the same block API as :mod:`uvmbus.storvsc`.

::

    import uvmbus.nvme as nvme

    with nvme.open("0000:00:04.0") as ctl:       # bound to vfio-pci (`uvmbus bind`)
        ns = ctl.disk(0)
        ns.write(0, b"x" * 4096, fua=True)
        assert ns.read(0, 4096) == b"x" * 4096
        with ns.batch(slots=32, size=4096) as b:   # the IoBatch interface
            ...

Modules: :mod:`~uvmbus.nvme.controller` (bring-up, admin commands, health),
:mod:`~uvmbus.nvme.queue` (a queue pair on the C fast path), :mod:`~uvmbus.nvme.namespace`
(a namespace as a block device, :class:`NvmeBatch`).  See docs/nvme.md.
"""

from uvmbus.nvme.controller import Controller, ControllerInfo, open
from uvmbus.nvme.namespace import Namespace, NvmeBatch
from uvmbus.nvme.queue import QueuePair, status_text

__all__ = ["Controller", "ControllerInfo", "Namespace", "NvmeBatch", "QueuePair", "open",
           "status_text"]

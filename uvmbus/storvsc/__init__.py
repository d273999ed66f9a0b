"""storvsc: a userspace driver for the Hyper-V synthetic SCSI controller (VSTOR protocol).

::

    import uvmbus.storvsc

    with uvmbus.storvsc.open("storvsc", root=root) as hba:      # negotiated, LUNs scanned
        disk = hba.luns[0]
        data = disk.read(0, 4096)
        disk.write(4096, b"x" * 4096, fua=True)
        disk.flush()
        disk.discard(0, 1 << 20)

Modules: :mod:`~uvmbus.storvsc.protocol` (VSTOR packets, versions, status codes),
:mod:`~uvmbus.storvsc.scsi` (CDBs, responses, sense), :mod:`~uvmbus.storvsc.queue` (one C
request table per channel), :mod:`~uvmbus.storvsc.controller` (negotiation, command engine,
recovery, LUN scan), :mod:`~uvmbus.storvsc.disk` (a LUN as a block device).  See
docs/storvsc.md.
"""

from uvmbus.storvsc.batch import IoBatch
from uvmbus.storvsc.controller import Command, Controller, LunChange, ScsiResult, open
from uvmbus.storvsc.disk import Disk
from uvmbus.storvsc.queue import HOST_QUEUE_DEPTH, IoQueue

__all__ = ["HOST_QUEUE_DEPTH", "Command", "Controller", "Disk", "IoBatch", "IoQueue", "LunChange",
           "ScsiResult", "open"]

"""Integration components (ICs) served from userspace over uio_hv_generic.

* :mod:`~uvmbus.ic.wire` — layouts of ``native/ic_wire.h`` (shared with the simulator);
* :mod:`~uvmbus.ic.framework` — ICMSG parsing, version negotiation (as the kernel's
  ``vmbus_prep_negotiate_resp``), answers in place, :class:`IcDriver` (a service on a channel);
* services: :class:`HeartbeatService`, :class:`ShutdownService`, :class:`TimeSyncService`,
  :class:`KvpService` (+ :class:`KvpPools`, hv_kvp_daemon's pool files), :class:`FcopyService`;
* the daemon (``uvmbus ic run``) is :mod:`uvmbus.services.icdaemon`.

See docs/ic.md.
"""

from uvmbus.ic.fcopy import FcopyService
from uvmbus.ic.framework import IcDriver, IcService, Reply, negotiate_in_place
from uvmbus.ic.heartbeat import HeartbeatService
from uvmbus.ic.kvp import KvpPools, KvpService
from uvmbus.ic.shutdown import ShutdownRequest, ShutdownService
from uvmbus.ic.timesync import TimeSample, TimeSyncService

__all__ = ["FcopyService", "HeartbeatService", "IcDriver", "IcService", "KvpPools", "KvpService",
           "Reply", "ShutdownRequest", "ShutdownService", "TimeSample", "TimeSyncService",
           "negotiate_in_place"]

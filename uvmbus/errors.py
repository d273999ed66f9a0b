"""The one exception hierarchy of uvmbus.

Every error raised by the package derives from :class:`UvmbusError`.  Messages
say what went wrong *and* what to do about it (which sysctl, which capability,
which kernel).  Layers add subclasses here rather than defining their own
roots, so callers can catch by concept::

    UvmbusError
    ├── ConfigError                   bad argument / option / unsupported mode
    │   └── DeviceBusy                device held by another user (pid in the message)
    ├── NotFound                      device, channel, uio node, map missing
    ├── BusError                      sysfs binding failed
    │   └── UnsafeDeviceError         device in use by the OS (mounted fs, address, route)
    ├── PrivilegeError                missing capability / permission
    ├── ResourceError                 hugepages, DMA memory, sections exhausted
    ├── KernelUnsupported             running kernel lacks a needed uio_hv_generic feature
    ├── ChannelError                  anything on a VMBus channel
    │   ├── ChannelRevoked            host rescinded the channel / endpoint gone (EIO)
    │   ├── RingCorrupt               peer broke the ring protocol; channel is dead
    │   ├── WouldBlock                ring or buffer full (back-pressure, retry later)
    │   └── ChannelTimeout            no answer in time (also a TimeoutError)
    ├── ProtocolError                 VSP answered something invalid / unexpected
    │   ├── NegotiationError          no common protocol version
    │   └── RequestFailed             VSP completed a request with a failure status
    ├── NetError                      netvsc driver errors
    │   ├── FrameRejected             a frame that can never be sent (runt, oversize)
    │   ├── QueueInvalidated          a queue of a NIC that was re-initialised since
    │   └── ReinitFailed              set_queues / set_mtu failed (``usable`` says the rest)
    ├── StorageError                  storvsc driver errors
    │   ├── ScsiError                 command failed with SCSI status / sense
    │   │   ├── MediumError           sense key 3 (and 1/4 hardware-class)
    │   │   ├── IllegalRequest        sense key 5
    │   │   ├── UnitAttention         sense key 6 (retryable)
    │   │   ├── DataProtect           sense key 7 (write protected)
    │   │   ├── NotReady              sense key 2
    │   │   └── ReservationConflict   SCSI status 0x18: another initiator holds a reservation
    │   ├── LunGone                   LUN removed / INVALID_LUN
    │   └── NvmeError                 NVMe command failed (status code type / code)
    │       ├── ControllerFatal       CSTS.CFS, invalid completion, timeout: controller dead
    │       └── DeviceRemoved         PCI function removed (VFIO request IRQ, surprise removal)
    ├── VfioError                     VFIO container/group/device set-up failed
    ├── SimulatorError                simulated host failed to start or misused
    └── TraceError                    unreadable trace file / replay divergence
        └── ReplayDivergence          the guest left the recorded session
"""

from __future__ import annotations

import errno as _errno


class UvmbusError(Exception):
    """Root of every uvmbus error."""


class ConfigError(UvmbusError, ValueError):
    """An argument, option or mode that cannot work."""


class DeviceBusy(ConfigError):
    """The device is open in another process (or already in this one): one user at a time."""

    def __init__(self, message: str, *, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class NotFound(UvmbusError, LookupError):
    """A device, channel, uio node, map or file that does not exist."""


class BusError(UvmbusError):
    """A sysfs bind/unbind/new_id operation failed."""

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.path = path


class UnsafeDeviceError(BusError):
    """The device is in use by the running system; taking it would break the OS."""


class PrivilegeError(UvmbusError, PermissionError):
    """A capability or permission is missing."""


class ResourceError(UvmbusError):
    """Memory, hugepages, buffer sections or similar resources are unavailable."""


class KernelUnsupported(UvmbusError):
    """The running kernel's uio_hv_generic lacks a feature this operation needs."""


class ChannelError(UvmbusError):
    """An error on a VMBus channel."""

    def __init__(self, message: str, *, channel: str | None = None):
        super().__init__(message if channel is None else f"{channel}: {message}")
        self.channel = channel


class ChannelRevoked(ChannelError):
    """The host rescinded the channel (the endpoint returned EIO). Close and rescan."""


class RingCorrupt(ChannelError):
    """The peer violated the ring protocol. The channel is dead and must be reopened."""


class WouldBlock(ChannelError):
    """The ring (or a buffer pool) is full; retry after the peer catches up."""


class ChannelTimeout(ChannelError, TimeoutError):
    """No answer from the host in time."""


class ProtocolError(UvmbusError):
    """The VSP sent something the protocol does not allow."""


class NegotiationError(ProtocolError):
    """No protocol version acceptable to both sides."""


class RequestFailed(ProtocolError):
    """The VSP completed a request with a failure status."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class NetError(UvmbusError):
    """netvsc driver error."""


class MacChangeRefused(NetError):
    """The host did not take a new MAC address: it refused the NetworkAddress parameter
    (``status`` is its RNDIS status) or accepted it but still reports the old address
    (``status`` is None)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class FrameRejected(NetError, ValueError):
    """``tx_burst`` met a frame that can never be sent (shorter than 14 bytes, longer than the
    MTU allows, or larger than a send section without GPA-direct memory; a large send the
    negotiated LSO cannot carry).  ``index`` is its
    position in the burst, ``length`` its size, ``queued`` how many frames before it were
    queued (they are sent)."""

    def __init__(self, message: str, *, index: int, length: int, queued: int, reason: str = "size"):
        super().__init__(message)
        self.index = index
        self.length = length
        self.queued = queued
        #: why: "size", or for large sends (``mss``) "lso-not-negotiated", "lso-not-tcp",
        #: "lso-mss", "lso-too-large", "lso-too-few-segments"
        self.reason = reason


class QueueInvalidated(NetError):
    """The queue belongs to a NIC session that no longer exists: the NIC was re-initialised
    (:meth:`~uvmbus.netvsc.Nic.set_queues`, ``set_mtu``) or closed since the queue was
    obtained (or exported).  Get the queue again from the NIC (``nic.queue(i)``), or a new
    ``QueueSpec`` from ``export_queue`` for another process."""


class ReinitFailed(NetError):
    """A NIC re-initialisation (``set_queues``, ``set_mtu``) failed.  ``usable`` True: the NIC
    was brought up again with its previous settings and works (new queue objects); False:
    that failed too and the NIC is closed — open it again."""

    def __init__(self, message: str, *, usable: bool):
        super().__init__(message)
        self.usable = usable


class StorageError(UvmbusError):
    """storvsc driver error."""


class ScsiError(StorageError):
    """A SCSI command completed with an error status and (usually) sense data."""

    def __init__(
        self,
        message: str,
        *,
        srb_status: int = 0,
        scsi_status: int = 0,
        sense_key: int | None = None,
        asc: int | None = None,
        ascq: int | None = None,
    ):
        super().__init__(message)
        self.srb_status = srb_status
        self.scsi_status = scsi_status
        self.sense_key = sense_key
        self.asc = asc
        self.ascq = ascq


class MediumError(ScsiError):
    """Unrecoverable read/write error on the medium (sense key 3)."""


class IllegalRequest(ScsiError):
    """The device rejected the command or its parameters (sense key 5)."""


class UnitAttention(ScsiError):
    """The device state changed (e.g. capacity); retrying the command is correct."""


class DataProtect(ScsiError):
    """The LUN is write protected (sense key 7)."""


class NotReady(ScsiError):
    """The LUN is not ready (sense key 2)."""


class ReservationConflict(ScsiError):
    """SCSI status RESERVATION CONFLICT (0x18): a persistent reservation held through another
    initiator (or a PERSISTENT RESERVE OUT with a key this initiator has not registered)
    refused the command.  Read the holder with ``disk.pr_read_reservation()``."""


class LunGone(StorageError):
    """The LUN no longer exists on the controller."""


class NvmeError(StorageError):
    """An NVMe command completed with an error status (``sct``/``sc`` set when known)."""

    def __init__(self, message: str, *, sct: int | None = None, sc: int | None = None) -> None:
        super().__init__(message)
        self.sct = sct
        self.sc = sc


class ControllerFatal(NvmeError):
    """The NVMe controller is unusable (CSTS.CFS, invalid completion, command timeout)."""


class DeviceRemoved(NvmeError):
    """The PCI function was removed or is being removed (VFIO request IRQ)."""


class VfioError(UvmbusError):
    """VFIO set-up failed (container, group, device, region, IRQ or DMA mapping)."""


class SimulatorError(UvmbusError):
    """The simulated host could not start or was used incorrectly."""


class TraceError(UvmbusError):
    """A trace file could not be written or read (uvmbus.trace)."""


class ReplayDivergence(TraceError):
    """A guest sent something other than the recorded session shows (``uvmbus sim --replay``)."""


def from_oserror(exc: OSError, what: str) -> UvmbusError:
    """Translate an OSError from a sysfs/dev operation into a helpful uvmbus error."""
    code = exc.errno
    if code in (_errno.EACCES, _errno.EPERM):
        return PrivilegeError(
            f"{what}: permission denied ({exc.strerror}). Run as root or grant the "
            "needed capability (CAP_SYS_ADMIN for sysfs binding and pagemap, "
            "CAP_IPC_LOCK for pinned memory, CAP_NET_ADMIN for TAP)."
        )
    if code == _errno.ENOENT:
        return NotFound(f"{what}: {exc.filename or 'file'} does not exist")
    if code == _errno.EIO:
        return ChannelRevoked(f"{what}: the device returned EIO (channel rescinded by the host)")
    return UvmbusError(f"{what}: {exc}")

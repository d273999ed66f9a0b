"""The ICMSG framework: parse a host request, negotiate versions, dispatch, answer in place.

Every integration component (IC) is a request/response protocol over one VMBus channel
(storvsc_ic.md §7.1): the host sends an in-band packet ``vmbuspipe_hdr (8) + icmsg_hdr (20) +
body``; the guest answers with the **same buffer, same length**: flags ``TRANSACTION |
RESPONSE``, a status (HRESULT) and the body edited in place, echoing the transaction id.

Version negotiation follows the kernel's ``vmbus_prep_negotiate_resp``
(drivers/hv/channel_mgmt.c and tools/hv/hv_fcopy_uio_daemon.c): the host lists framework
versions then message versions; for each of the guest's versions, newest first, the first
exact match in the host's list wins (so the answer is the highest version both support); the
reply carries counts 1/1 and the two chosen versions, or counts 0/0 when nothing matched;
``icmsgsize`` is 16.  A count above 100 or a list longer than the packet is refused.

Hostile host: the packet is copied out of the ring first (the channel layer does that), every
length is checked before a struct is read, and a message too short for its type is dropped
without an answer, as Linux's hv_utils does (the host times out); nothing the host sends can
raise out of :meth:`IcService.handle`.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvmbus.errors import ChannelError
from uvmbus.ic import wire
from uvmbus.ic.wire import (
    HDR_SIZE,
    MAX_VERSION_COUNT,
    NEGOTIATE_SIZE,
    PIPE_HDR_SIZE,
    MsgType,
    Status,
)

__all__ = ["Reply", "IcService", "IcDriver", "negotiate_in_place", "Version"]

log = logging.getLogger("uvmbus.ic")

Version = tuple[int, int]
_VER = struct.Struct("<HH")
_COUNTS = struct.Struct("<HH")


@dataclass
class Reply:
    """What :meth:`IcService.handle` produced: the bytes to send back and an action to run
    once they are sent (Linux answers a shutdown request *before* acting on it)."""

    data: bytes
    after: Callable[[], None] | None = None
    status: int = 0


def negotiate_in_place(buf: bytearray, fw_versions: tuple[Version, ...],
                       msg_versions: tuple[Version, ...]) -> tuple[Version, Version] | None:
    """Answer the negotiate request in ``buf`` (the whole packet payload) in place.

    Returns ``(framework, message)`` versions, or None when no common versions exist or
    the request is malformed (the reply then says counts 0/0)."""
    if len(buf) < HDR_SIZE + 4:                     # no room for the two counts
        return None
    struct.pack_into("<H", buf, PIPE_HDR_SIZE + 10, wire.NEGOTIATE_RESP_SIZE)   # icmsgsize
    fc, mc = _COUNTS.unpack_from(buf, HDR_SIZE)
    base = HDR_SIZE + NEGOTIATE_SIZE
    fw: Version = (fc, 0)
    msg: Version = (mc, 0)
    found = False
    if fc <= MAX_VERSION_COUNT and mc <= MAX_VERSION_COUNT and base + 4 * (fc + mc) <= len(buf):
        host = [_VER.unpack_from(buf, base + 4 * i) for i in range(fc + mc)]
        host_fw, host_msg = host[:fc], host[fc:]
        for v in fw_versions:
            if v in host_fw:
                fw, found = v, True
                break
        if found:
            found = False
            for v in msg_versions:
                if v in host_msg:
                    msg, found = v, True
                    break
    _COUNTS.pack_into(buf, HDR_SIZE, 1 if found else 0, 1 if found else 0)
    for i, v in enumerate((fw, msg)):             # the kernel writes both entries; we only
        if base + 4 * (i + 1) <= len(buf):         # write what fits in the host's buffer
            _VER.pack_into(buf, base + 4 * i, *v)
    return (fw, msg) if found else None


class IcService:
    """One IC's guest side: subclasses set the class attributes and implement
    :meth:`on_message`."""

    #: short name (the class table's, e.g. "heartbeat")
    name: ClassVar[str] = ""
    #: icmsgtype served besides NEGOTIATE
    msgtype: ClassVar[int] = -1
    #: framework versions, preferred (newest) first: Linux's util_fw_versions
    framework_versions: ClassVar[tuple[Version, ...]] = ((3, 0), (1, 0))
    #: message versions, preferred (newest) first
    message_versions: ClassVar[tuple[Version, ...]] = ()
    #: smallest body a message of ``msgtype`` must have (shorter ones are dropped)
    min_body: ClassVar[int] = 0

    def __init__(self) -> None:
        self.framework_version: Version | None = None
        self.message_version: Version | None = None
        self.counters: Counter[str] = Counter()
        self.last_error = ""
        self._lock = threading.Lock()

    # -- to implement -------------------------------------------------------------------------
    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        """Handle one service message; ``body`` (from offset 28 to the end of the packet) may
        be edited in place.  Returns ``(status, action to run after the reply is sent)``."""
        raise NotImplementedError

    def body_size(self) -> int:
        """Minimum body size for the negotiated version (default :attr:`min_body`)."""
        return self.min_body

    @property
    def version(self) -> Version:
        """The negotiated message version (the oldest supported one before negotiation)."""
        return self.message_version or self.message_versions[-1]

    # -- framework ------------------------------------------------------------------------------
    def _problem(self, counter: str, message: str) -> None:
        self.counters[counter] += 1
        self.last_error = message
        if self.counters[counter] <= 5 or self.counters[counter] % 1000 == 0:
            log.warning("%s: %s (%d so far)", self.name, message, self.counters[counter])

    def handle(self, payload: bytes | bytearray | memoryview) -> Reply | None:
        """The answer to one host packet payload, or None to drop it (too short)."""
        buf = bytearray(payload)
        if len(buf) < HDR_SIZE:
            self._problem("dropped_short", f"packet of {len(buf)} bytes is shorter than the "
                          f"{HDR_SIZE}-byte IC header; dropped")
            return None
        mtype = struct.unpack_from("<H", buf, PIPE_HDR_SIZE + 4)[0]
        status = int(Status.E_FAIL)
        after = None
        with self._lock:
            if mtype == MsgType.NEGOTIATE:
                got = negotiate_in_place(buf, self.framework_versions, self.message_versions)
                if got is None:
                    self._problem("negotiate_failed", "no common framework/message version with "
                                  "the host (or a malformed negotiate request)")
                else:
                    self.framework_version, self.message_version = got
                    self.counters["negotiated"] += 1
                    log.info("%s: framework %s, message version %s", self.name,
                             wire.version_str(got[0]), wire.version_str(got[1]))
                    status = int(Status.S_OK)
            elif mtype == self.msgtype:
                need = self.body_size()
                if len(buf) - HDR_SIZE < need:
                    self._problem("dropped_short", f"message of {len(buf) - HDR_SIZE} body bytes, "
                                  f"needs {need}; dropped")
                    return None
                try:
                    status, after = self.on_message(memoryview(buf)[HDR_SIZE:])
                except Exception as exc:        # a service bug must not kill the channel
                    log.exception("%s: message handling failed", self.name)
                    self._problem("errors", f"{type(exc).__name__}: {exc}")
                    status, after = int(Status.E_FAIL), None
                self.counters["messages"] += 1
            else:
                self._problem("unknown_type", f"message type {mtype} is not {self.name}'s; "
                              "answered E_FAIL")
        struct.pack_into("<I", buf, PIPE_HDR_SIZE + 12, status & 0xFFFFFFFF)
        buf[PIPE_HDR_SIZE + 17] = wire.RESPONSE_FLAGS
        return Reply(bytes(buf), after, status)

    def status(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "framework": wire.version_str(self.framework_version) if self.framework_version else None,
            "version": wire.version_str(self.message_version) if self.message_version else None,
            "counters": dict(self.counters), "last_error": self.last_error,
        }


class IcDriver:
    """Serve an :class:`IcService` on a channel: drain every packet, answer each one.

    ``channel`` is a :class:`uvmbus.channel.Channel` (``recv``/``send``)."""

    def __init__(self, service: IcService, channel: Any):
        self.service = service
        self.channel = channel
        self.replies = 0
        self.ignored = 0

    def serve(self, timeout: float | None = 0.5) -> int:
        """Wait up to ``timeout`` for packets, answer all of them; returns how many."""
        from uvmbus.ring import PKT_INBAND

        n = 0
        for pkt in self.channel.recv(timeout):
            n += 1
            if pkt.type != PKT_INBAND:
                self.ignored += 1
                self.service._problem("ignored_packets", f"packet type {pkt.type} ignored")
                continue
            reply = self.service.handle(pkt.payload)
            if reply is None:
                continue
            self.channel.send(reply.data, trans_id=pkt.trans_id)
            self.replies += 1
            if reply.after is not None:
                try:
                    reply.after()
                except Exception as exc:
                    log.exception("%s: action after the reply failed", self.service.name)
                    self.service._problem("errors", f"action failed: {exc}")
        return n

    def run(self, stop: threading.Event, beat: Callable[[], None] | None = None,
            period: float = 0.5) -> None:
        """Serve until ``stop`` is set; ``beat`` is called at least every ``period`` seconds.
        Raises :class:`ChannelError` when the channel dies."""
        while not stop.is_set():
            try:
                self.serve(period)
            except ChannelError:
                if stop.is_set():
                    return
                raise
            if beat is not None:
                beat()



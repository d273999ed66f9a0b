"""NetVSP: the simulated host side of the synthetic NIC (netvsc.md §10, openvmm's NetVSP).

Written from the reference's description of the host (§5–§7, §10), not from the guest
driver: it shares only the wire structs (``native/netvsc_wire.h`` via ``ffi``; its
message code is its own, :mod:`uvmbus.sim.models.netvsp_msg`),
so a driver bug meets the failure a real host would give.

State machine of the primary channel (§10.1):

* **Version**: only INIT (NVSP 1) is accepted; the version at @4 must be one the host offers
  (option ``versions``; default 2, 2.x, 4, 5, 6, 6.1) — else INIT_COMPLETE status 0 and the
  guest may retry.  From 6.1 on the host pads its messages to 40 bytes, before to 32.
* **Init**: SEND_NDIS_CONFIG (once, v2+; MTU outside 1514..9216 → 1514), SEND_NDIS_VER (once),
  SEND_RECV_BUF (once; needs NDIS_CONFIG first from v2; the GPADL must be the receive
  buffer's), SEND_SEND_BUF (once; the send buffer's GPADL; section size 6144).  Receive
  sub-allocations are 256 + mtu + 36 bytes; the reply is {1, 1, {0, size, count, end}}.
  Ready when all four are there — or when an RNDIS packet arrives with everything but the
  send buffer.  Anything else is fatal.
* **Ready**: SEND_RNDIS_PKT (data in C: ``native/netvsp*.c``; control here), RX acks (C),
  SUBCHANNEL (primary, v5+), REVOKE_*_BUF (primary: the data path stops silently),
  SWITCH_DATA_PATH (v4+; completed, empty), OID_QUERY_EX (NOT_SUPPORTED), completions
  of the host's own VF_ASSOCIATION / SWITCH_DATA_PATH messages (transaction ids
  0x8000000000000000 / ...01).
  Anything else is fatal.
* **Revoked**: REVOKE_RECV_BUF / REVOKE_SEND_BUF on the primary ends its processing, as the
  reference host's worker does (O ``process_ring_buffer`` → ``BufferRevoked``, which
  ``NetQueue::run`` does not treat as an error): every later packet on the primary is ignored
  without an answer and without a fatal error (counted ``after_revoke``) — also a new INIT;
  initialising again takes a channel close and re-open (a new session, as Linux's
  ``netvsc_detach``/``netvsc_attach`` do).  A revoke on a sub-channel is fatal.

**Fatal errors** (unknown NVSP type, bad section index/size, malformed GPA ranges, bad ack
transaction id, double ack, control-buffer ack on a sub-channel, duplicate INIT-phase
messages, SUBCHANNEL on a sub-channel, RNDIS INIT twice, RESET / INDICATE_STATUS / SET_EX
from the guest, ...) make the channel go silent: the model logs ``netvsp error`` with the
reason, counts it (``fatal_errors``) and stops the channel's worker — the guest gets no
error message, exactly like a real host.  **RNDIS-level errors** in a request are not fatal:
that request is completed with NVSP status 2 (FAILURE).

RNDIS (primary only; control on a sub-channel is completed with FAILURE): INIT →
INIT_CMPLT {8 packets per message, alignment 8, max transfer 0xEFFFFFFF}; QUERY of the OID
table of §4.5; SET of the packet filter (RX flows only while it is non-zero), offload
parameters (LSOv2 enable/disable per IP version; then a TASK_OFFLOAD_CURRENT_CONFIG
indication), RSS parameters (validated like
the reference host: key 40 bytes, table size non-zero and a multiple of 4, entries below the
queue maximum; shorter tables replicate), network addresses, config parameters;
KEEPALIVE; HALT is ignored.

Filters, MAC, statistics (docs/netvsc.md, from O ``handle_oid_set``/``handle_oid_query``):
the packet filter's bits are recorded but not applied — any non-zero filter delivers
everything the backend has, as the reference host does; SET OID_802_3_MULTICAST_LIST is an
unknown OID to the reference host (NOT_SUPPORTED; MAXIMUM_LIST_SIZE answers 0);
OID_GEN_RNDIS_CONFIG_PARAMETER is parsed (name/value ≤ 255 bytes, UTF-16, inside the
buffer) and "NetworkAddress" follows option ``mac_change``: ``ignore`` (default, the
reference host: SUCCESS, the current address stays the permanent one), ``apply`` (a host that
allows the change, e.g. Hyper-V with MAC address spoofing on: CURRENT_ADDRESS reports it
until the session ends), ``refuse`` (FAILURE).  Statistics: OID_802_3_RCV_ERROR_ALIGNMENT /
XMIT_ONE_COLLISION / XMIT_MORE_COLLISIONS answer 0 and the OID_GEN_* counters are
NOT_SUPPORTED, as the reference host; option ``stats=counters`` answers OID_GEN_XMIT_OK,
RCV_OK, XMIT_ERROR, RCV_ERROR, RCV_NO_BUFFER, BYTES_XMIT, BYTES_RCV, XMIT_DISCARDS and
RCV_DISCARDS (u64) from the model's own queue counters.  Responses go through the 16 reserved control sub-allocations
(transaction id = index); when they are all with the guest, responses queue (≤ 100 KiB),
then new requests fail.

Multi-queue (§7): SUBCHANNEL{ALLOCATE, n} is granted when n < max_queues and the receive
buffer has a sub-allocation per queue after the reserved ones; the sub-channels are then
offered; once all are open the host sends SEND_INDIRECTION_TABLE (16 entries, i % queues).
RX frames are steered with Toeplitz over the guest's key and table.

Link (§10.1): up at start with no indication; MEDIA_CONNECT_STATUS is always answered
"connected", as the reference host does (option ``media_status=link`` makes it follow the
backend); changes (``control("link", up=...)``) are sent as MEDIA_CONNECT / MEDIA_DISCONNECT
as soon as the primary channel is ready (a change before that — or a link that is down when
a session starts — is sent then, before RNDIS INIT if need be), paced: after one indication,
further changes within ``link_pacing`` seconds (default 5, as the reference host) are
coalesced into one.

VF / accelerated networking (§8; O ``guest_vf_is_available``, ``handle_state_change``,
``guest_vf_data_path_switched_to_synthetic``): the backend's VF is present from the start
with option ``vf=1`` or after ``control("vf", action="add")`` (``uvmbus sim ctl vf DEV
add``); it stays present across guest sessions.  SEND_VF_ASSOCIATION {allocated 1, serial}
(in-band, completion requested, transaction id 0x8000000000000000) is sent only when the
session negotiated NVSP >= 4 and the guest's NDIS config advertised SR-IOV, and only once
RNDIS is operational (right after INIT_CMPLT, or at once when the VF arrives later).  The
guest's SWITCH_DATA_PATH {VF} moves the data path to the VF when one was announced (else
nothing changes); either way it is completed, empty.  While on the VF, option ``vf_steer``
decides what the synthetic queues still get: ``unicast`` (default; Hyper-V: unicast goes to
the VF, broadcast and multicast stay on the synthetic path — netvsc.md §6 from DPDK
``hn_recv_pkts``) or ``all`` (OpenHCL/MANA: the vport's MAC filter moves to the VF); frames
taken by the VF are counted (``rx_to_vf``), TX from the guest on the synthetic path is still
forwarded.  ``remove``: if the data path is on the VF, SWITCH_DATA_PATH {SYNTHETIC}
(completion requested, transaction id ...01) first, then SEND_VF_ASSOCIATION {allocated 0,
serial 0}.

Options (``--device netvsc:KEY=VAL,...``; ``--nic N --nic-backend B``): ``backend``
(loopback, sink, generator, none, tap:NAME[@NETNS]), ``versions`` (e.g. ``5/6.1``), ``mac``,
``max_queues`` (default 8), ``max_mtu`` (the host's largest MTU, default 9202: the
OID_GEN_MAXIMUM_FRAME_SIZE answer is capped to it), ``link_speed`` (bit/s, default 10 G), ``link_pacing`` (s),
``lso`` (on: LSOv2 offered like the reference host, 62780 bytes / 2 segments; off),
``media_status`` (connected / link), ``mac_change`` (ignore / apply / refuse), ``stats``
(reference / counters), ``vf`` (1: a VF present from the start), ``vf_serial`` (default
derived from the device id), ``vf_steer`` (unicast / all), ``vf_remove`` (switch_first: the reference host; association_only:
only SEND_VF_ASSOCIATION {0}, the guest switches back itself), ``gen_size``, ``gen_flows``, ``gen_proto`` (udp/tcp), ``gen_count``, ``min_request`` (NVSP
requests shorter than this get no reply, like Windows hosts, §10.2; default 0 = off),
``rsc`` (on: offer receive segment coalescing at NVSP 6.1, as Windows Server 2019+ hosts —
the default; off: the reference host), ``rsc_segments`` (segments per coalesced unit, 0 = up
to one IP datagram; docs/simulator.md "RSC"),
``fault`` + ``fault_count`` (malformed host→guest messages: bad_range, bad_rndis_len,
bad_nvsp_type, bad_pageset, bad_data_offset, bad_ppi; ``unknown_inband`` sends an in-band
NVSP message of an unknown type).

Control operations (``uvmbus sim ctl model netvsc OP``): ``link`` (up), ``vf`` (action =
add / remove, optional serial), ``fault`` (kind, count), ``inband`` (hex payload),
``generator`` (size, flows, count, proto), ``backend`` (loopback / sink / generator / none,
switched while running), ``max_queues`` (the host's queue limit from the next RSS
capabilities query / SUBCHANNEL request on), ``mac`` (the permanent address answered from the
next OID query on: a NIC re-offered with another MAC), ``max_mtu`` (from the next OID query on),
``stats``.
"""

from __future__ import annotations

import struct
import threading
import uuid
from typing import Any, NoReturn

from uvmbus.errors import ConfigError, ProtocolError
from uvmbus.native import ffi, lib
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_GPA_DIRECT, PKT_INBAND, Packet
from uvmbus.sim.backends import BackendSpec, parse_backend
from uvmbus.sim.channel import ChannelStopped, HostChannel
from uvmbus.sim.models import netvsp_msg as M
from uvmbus.sim.models import register_model
from uvmbus.sim.models.base import DeviceModel, gpa_ranges

__all__ = ["NETVSC_CLASS_ID", "NetvspModel", "parse_versions"]

NETVSC_CLASS_ID = "f8615163-df3e-46c5-913f-f2d2f965ed0e"

NVSP_V1, NVSP_V2, NVSP_V4 = lib.NVSP_PROTOCOL_VERSION_1, lib.NVSP_PROTOCOL_VERSION_2, lib.NVSP_PROTOCOL_VERSION_4
NVSP_V5, NVSP_V6, NVSP_V61 = lib.NVSP_PROTOCOL_VERSION_5, lib.NVSP_PROTOCOL_VERSION_6, lib.NVSP_PROTOCOL_VERSION_61

VERSION_NAMES = {NVSP_V1: "1", NVSP_V2: "2", NVSP_V4: "4", NVSP_V5: "5", NVSP_V6: "6", NVSP_V61: "6.1"}
ALL_VERSIONS = (NVSP_V1, NVSP_V2, NVSP_V4, NVSP_V5, NVSP_V6, NVSP_V61)
_NAMES = {"1": NVSP_V1, "2": NVSP_V2, "4": NVSP_V4, "5": NVSP_V5, "6": NVSP_V6,
          "6.1": NVSP_V61, "61": NVSP_V61}

SECTION_SIZE = lib.UVB_NVSP_SECTION_SIZE
MTU_DEFAULT = 1514
STATUS_NOT_SUPPORTED = 0xC00000BB     # OID_QUERY_EX answer (§10.1)

FAULTS = {
    "bad_range": lib.UVB_NVSP_FAULT_BAD_RANGE,
    "bad_rndis_len": lib.UVB_NVSP_FAULT_BAD_RNDIS_LEN,
    "bad_nvsp_type": lib.UVB_NVSP_FAULT_BAD_NVSP_TYPE,
    "bad_pageset": lib.UVB_NVSP_FAULT_BAD_PAGESET,
    "bad_data_offset": lib.UVB_NVSP_FAULT_BAD_DATA_OFFSET,
    "bad_ppi": lib.UVB_NVSP_FAULT_BAD_PPI,
}
UNKNOWN_INBAND_TYPE = 0x6666
#: transaction ids of the host's own in-band messages that ask for a completion (O)
VF_ASSOCIATION_TID = 0x8000000000000000
SWITCH_DATA_PATH_TID = 0x8000000000000001
VF_STEER = {"unicast": lib.UVB_NVSP_VF_UNICAST, "all": lib.UVB_NVSP_VF_ALL}

# NVSP states
VERSION, INIT, READY = "version", "init", "ready"
# RNDIS states
R_INITIALIZING, R_OPERATIONAL, R_HALTED = "initializing", "operational", "halted"


def parse_versions(text: Any) -> tuple[int, ...]:
    """``"5/6.1"``, ``"5,6.1"``, ``"0x50000"`` or a list → NVSP version numbers."""
    if text is None or text == "" or text == "all":
        return ALL_VERSIONS
    items = text if isinstance(text, (list, tuple)) else str(text).replace(",", "/").split("/")
    out = []
    for it in items:
        s = str(it).strip().lower()
        if s in _NAMES:
            out.append(_NAMES[s])
            continue
        try:
            v = int(s, 0)
        except ValueError:
            raise ConfigError(f"NVSP version {it!r}: use 1, 2, 4, 5, 6, 6.1 or a number") from None
        if v not in ALL_VERSIONS:
            raise ConfigError(f"NVSP version {v:#x} does not exist")
        out.append(v)
    if not out:
        raise ConfigError("no NVSP version offered")
    return tuple(sorted(set(out)))


def _mac_for(device_id: str) -> bytes:
    h = bytes.fromhex(device_id.replace("-", "")[:8])
    return bytes([0x00, 0x15, 0x5D]) + h[1:4]


def _serial_for(device_id: str) -> int:
    """A stable, non-zero VF serial per device (Hyper-V numbers vPCI slots; any u32 > 0)."""
    return int(device_id.replace("-", "")[:4], 16) % 9000 + 1000


def _parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ConfigError(f"mac {text!r}: need 6 bytes")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"mac {text!r}: need 6 hex bytes, e.g. 00:15:5d:00:00:01") from None


def _num(opts: dict[str, Any], key: str, default: Any, conv: Any = int) -> Any:
    """Option ``key`` as a number (a clear error instead of a traceback for ``key=abc``)."""
    value = opts.pop(key, default)
    try:
        return conv(value)
    except (TypeError, ValueError):
        raise ConfigError(f"netvsc option {key}={value!r}: not a number") from None


class _Queue:
    """The C queue of one open channel plus what keeps its memory alive."""

    def __init__(self, channel: HostChannel, index: int):
        self.channel = channel
        self.index = index
        self.q: Any = ffi.new("struct uvb_nvsp_queue *")


@register_model
class NetvspModel(DeviceModel):
    name = "netvsc"
    class_id = NETVSC_CLASS_ID
    description = "synthetic NIC host (NetVSP): NVSP/RNDIS, RSS, sub-channels, link state"
    kernel_driver = "hv_netvsc"
    is_nic = True
    cli_option = "nic"

    @classmethod
    def from_cli(cls, value: Any) -> list[dict[str, Any]]:
        if isinstance(value, int):
            return [{} for _ in range(value)]
        return [{"backend": v} for v in value]

    def __init__(self, device: Any, **options: Any) -> None:
        super().__init__(device, **options)
        opts = dict(options)
        opts.pop("value", None)
        self.backend: BackendSpec = parse_backend(str(opts.pop("backend", "loopback")))
        self.versions = parse_versions(opts.pop("versions", None))
        mac = opts.pop("mac", None)
        self.mac = _parse_mac(str(mac)) if mac else _mac_for(device.device_id)
        self.max_queues = _num(opts, "max_queues", 8)
        #: the host's largest MTU: OID_GEN_MAXIMUM_FRAME_SIZE answers min(the guest's NDIS
        #: config, this); Linux lowers its MTU to a smaller answer (rndis_filter_device_add)
        self.max_mtu = _num(opts, "max_mtu", 9202)
        if not 68 <= self.max_mtu <= 9202:
            raise ConfigError("max_mtu must be 68..9202")
        if not 1 <= self.max_queues <= lib.UVB_NVSP_MAX_QUEUES:
            raise ConfigError(f"max_queues must be 1..{lib.UVB_NVSP_MAX_QUEUES}")
        self.link_speed = int(_num(opts, "link_speed", 10e9, float))
        self.link_pacing = _num(opts, "link_pacing", 5.0, float)
        self.media_status = str(opts.pop("media_status", "connected")).lower()
        if self.media_status not in ("connected", "link"):
            raise ConfigError("media_status must be connected (the reference host) or link")
        self.mac_change = str(opts.pop("mac_change", "ignore")).lower()
        if self.mac_change not in ("ignore", "apply", "refuse"):
            raise ConfigError("mac_change must be ignore (the reference host), apply or refuse")
        self.stats_mode = str(opts.pop("stats", "reference")).lower()
        if self.stats_mode not in ("reference", "counters"):
            raise ConfigError("stats must be reference (the reference host) or counters")
        self.min_request = _num(opts, "min_request", 0)
        lso = str(opts.pop("lso", "on")).lower()
        if lso not in ("on", "off"):
            raise ConfigError("lso must be on (the reference host offers LSOv2) or off")
        self.lso_offered = lso == "on"
        vf = str(opts.pop("vf", "0")).lower()
        if vf not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError("vf must be 1 (a VF present from the start) or 0 (none until "
                              "`uvmbus sim ctl vf DEV add`)")
        self.vf_present = vf in ("1", "true", "yes", "on")
        self.vf_serial = _num(opts, "vf_serial", _serial_for(device.device_id))
        if not 0 < self.vf_serial < 1 << 32:
            raise ConfigError("vf_serial must be 1..4294967295 (u32; 0 means no VF)")
        steer = str(opts.pop("vf_steer", "unicast")).lower()
        if steer not in VF_STEER:
            raise ConfigError("vf_steer must be unicast (Hyper-V) or all (OpenHCL/MANA)")
        self.vf_steer = steer
        self.vf_remove_mode = str(opts.pop("vf_remove", "switch_first")).lower()
        if self.vf_remove_mode not in ("switch_first", "association_only"):
            raise ConfigError("vf_remove must be switch_first (the reference host) or association_only")
        self._vf_pci: tuple[str, str, str, str] | None = None
        self.gen = {
            "size": _num(opts, "gen_size", 1514),
            "flows": _num(opts, "gen_flows", 64),
            "proto": str(opts.pop("gen_proto", "udp")).lower(),
            "count": _num(opts, "gen_count", 0),
        }
        if self.gen["proto"] not in ("udp", "tcp"):
            raise ConfigError("gen_proto must be udp or tcp")
        rsc = str(opts.pop("rsc", "on")).lower()
        if rsc not in ("on", "off", "1", "0", "true", "false"):
            raise ConfigError("rsc must be on (offer receive segment coalescing, as Windows Server "
                              "2019+ hosts) or off (the reference host)")
        self.rsc_offered = rsc in ("on", "1", "true")
        self.rsc_segments = _num(opts, "rsc_segments", 0)
        if not 0 <= self.rsc_segments <= 65535:
            raise ConfigError("rsc_segments must be 0 (only the 64 KiB datagram limit) .. 65535")
        fault = opts.pop("fault", None)
        fault_count = _num(opts, "fault_count", 1)
        if opts:
            raise ConfigError(f"netvsc: unknown option(s) {', '.join(sorted(opts))}")
        self._lock = threading.RLock()
        self.nic: Any = ffi.new("struct uvb_nvsp *")
        self.nic.backend = self.backend.code
        self.nic.backend_fd = -1
        self.nic.link_up = 1
        self.nic.rx_hash_ppi = 1
        self.nic.rx_verify_csum = 1
        self.nic.max_ranges = lib.NVSP_MAX_PACKETS_PER_RECEIVE
        self.nic.rsc_max_segs = self.rsc_segments
        self.nic.lso_max = M.LSO_MAX_SIZE
        self._apply_gen()
        self._queues: dict[int, _Queue] = {}
        self._tap: Any = None
        self._link_up = True          # backend state
        self._guest_link = True       # what the guest was last told (up: no initial indication)
        self._pending_link: bool | None = None   # a link action waiting for the Ready state
        self._link_timer = False
        self._link_gen = 0
        self.counters: dict[str, int] = {
            "fatal_errors": 0, "rndis_requests": 0, "rndis_failed": 0, "link_indications": 0,
            "subchannel_grants": 0, "ignored_short": 0, "send_tables": 0, "ctrl_overflow": 0,
            "inband_injected": 0, "vf_associations": 0, "vf_switches": 0, "vf_switch_ignored": 0,
            "vf_switch_backs": 0, "vf_completions": 0, "revokes": 0, "after_revoke": 0,
            "rsc_undeclared": 0,
        }
        self.fatal_messages: list[str] = []
        self._after_response: list[bytes] = []
        self._reset_state()
        if fault:
            self.set_fault(str(fault), fault_count)

    # ==== protocol state ==================================================================
    def _reset_state(self) -> None:
        self.state = VERSION
        self.version = 0
        self.msg_size = 32
        self.ndis_config: tuple[int, int] | None = None
        self.ndis_version: tuple[int, int] | None = None
        self.recv_buf_id: int | None = None
        self.send_buf_ok = False
        self.mtu = MTU_DEFAULT
        self.rndis = R_INITIALIZING
        self.revoked = False
        self.granted = 0
        self.subchannel_requested = False
        self.table_sent = False
        self.filter = 0
        self.current_mac = self.mac
        self.config_params: dict[str, str | int | None] = {}
        self.offload_params: dict[str, int] = {}
        self.lso_enabled = {"ipv4": False, "ipv6": False}
        self.rss: M.RssRequest | None = None
        self.dead_channels: set[int] = set()
        self.vf_advertised = False         # this session was told allocated=1
        self.data_path_vf = False          # the guest switched the data path to the VF
        self._host_tids: set[int] = set()  # host messages sent with a completion request
        n = self.nic
        n.vf_steer = lib.UVB_NVSP_VF_OFF
        n.data_ready = 0
        n.filter = 0
        n.rss_enabled = 0
        n.lso_v4 = n.lso_v6 = 0
        self._set_rsc(0, 0)
        n.num_queues = 1
        n.msg_size = 32
        n.recv_buf_id = lib.NVSP_RECV_BUF_ID
        n.dead = 0
        n.sub_size = n.sub_count = 0
        n.send_buf = ffi.NULL
        n.send_size = n.section_count = 0

    def reset(self) -> None:
        """The guest closed the device: forget the protocol state (buffers stay GPADL'd)."""
        with self._lock:
            for entry in list(self._queues.values()):
                self._drop_queue(entry)
            self._queues.clear()
            lib.uvb_nvsp_fini(self.nic)
            self._reset_state()
            # a new session starts "up, no indication" (§10.1); a link that is down is
            # reported with an indication once the new session is ready
            self._guest_link = True
            self._pending_link = None if self._link_up else False
            self._link_timer = False
            self._link_gen += 1               # a pacing timer of the old session is void

    def _apply_gen(self) -> None:
        g = self.nic.gen
        g.size = self.gen["size"]
        g.flows = self.gen["flows"]
        g.proto = lib.UVB_NVSP_GEN_TCP4 if self.gen["proto"] == "tcp" else lib.UVB_NVSP_GEN_UDP4
        g.limit = self.gen["count"]
        g.burst = 0
        ffi.memmove(g.dst_mac, self.mac, 6)
        ffi.memmove(g.src_mac, bytes([0x02, 0x00, 0x00, 0xAA, 0xBB, 0xCC]), 6)
        g.src_ip = 0x0A000001           # 10.0.0.1 (+ flow number)
        g.dst_ip = 0x0A0000FE           # 10.0.0.254
        g.src_port = 10000
        g.dst_port = 9
        self.nic.cfg_epoch += 1

    # ==== channel hooks ===================================================================
    def open(self, channel: HostChannel) -> None:
        with self._lock:
            ram = self.device.guest_ram
            if ram is not None:
                # GPA-direct TX (bounds-checked in C); the size grows with every NIC buffer
                # segment (this NIC's were added at bind, before any open)
                self.nic.guest_ram = ram.ptr
                self.nic.ram_size = ram.size
                self.nic.ram_base_pfn = ram.base_pfn
            if channel.is_primary and self._tap is None and self.backend.kind == "tap":
                self._start_tap()
            entry = _Queue(channel, channel.subchannel_id)
            rc = lib.uvb_nvsp_queue_init(entry.q, self.nic, entry.index, channel.tx.raw, channel.rx.raw,
                                         channel.irq, channel.kick)
            if rc:
                raise ConfigError(f"netvsp: queue {entry.index} set-up failed ({rc})")
            self._queues[channel.relid] = entry
            if self.nic.priv != ffi.NULL:
                lib.uvb_nvsp_attach_queue(self.nic, entry.q)
            if not channel.is_primary:
                self._maybe_send_table()

    def close(self, channel: HostChannel) -> None:
        with self._lock:
            entry = self._queues.pop(channel.relid, None)
            if entry is not None:
                self._drop_queue(entry)
            if channel.is_primary and self._tap is not None:
                self._stop_tap()

    def _drop_queue(self, entry: _Queue) -> None:
        if self.nic.priv != ffi.NULL:
            lib.uvb_nvsp_detach_queue(self.nic, entry.q)
        lib.uvb_nvsp_queue_fini(entry.q)

    def pump(self, channel: HostChannel, spin_ns: int) -> int | None:
        entry = self._queues.get(channel.relid)
        if entry is None or self.nic.priv == ffi.NULL or channel.relid in self.dead_channels:
            return None
        q = entry.q
        while True:
            before = (q.tx_msgs, q.rx_acks, q.rx_xfer, q.completions)
            rc = int(lib.uvb_nvsp_pump(q, spin_ns))
            st = channel.stats
            st["packets_from_guest"] += int(q.tx_msgs + q.rx_acks - before[0] - before[1])
            st["packets_to_guest"] += int(q.rx_xfer + q.completions - before[2] - before[3])
            mask = int(q.poke_mask)
            if mask:
                q.poke_mask = 0
                self._poke(mask)
                if rc == lib.UVB_HOST_KICKED and not channel.kick[0]:
                    continue
            return rc

    def _poke(self, mask: int) -> None:
        for entry in list(self._queues.values()):
            if mask & (1 << entry.index):
                entry.channel.poke()

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        entry = self._queues.get(channel.relid)
        if entry is not None and entry.q.punt_fatal:
            msg = ffi.string(entry.q.punt_msg).decode(errors="replace")
            entry.q.punt_fatal = 0
            self._fatal(channel, msg)
        if self.min_request and pkt.type != PKT_COMP and len(pkt.payload) < self.min_request:
            self.counters["ignored_short"] += 1
            return
        with self._lock:
            if self.revoked and channel.is_primary:
                # the reference host ends the primary channel's processing at a revoke (O
                # process_ring_buffer: BufferRevoked, "terminating channel processing"; not an
                # error in NetQueue::run): nothing more is read or answered on it — a guest that
                # wants to initialise again must close the channel and open it again
                self.counters["after_revoke"] += 1
                return
            if self.state == READY and entry is not None and self.nic.priv != ffi.NULL:
                rc = self._process_c(entry, channel, pkt)
                if rc is not None:
                    lib.uvb_nvsp_service(entry.q)
                    return
            self._handle(channel, pkt)
            if entry is not None and self.nic.priv != ffi.NULL:
                lib.uvb_nvsp_service(entry.q)

    def _process_c(self, entry: _Queue, channel: HostChannel, pkt: Packet) -> int | None:
        """The data path for a packet that reached Python (packet faults active, or a punt):
        returns None when Python must handle it (control)."""
        hdr, pl = bytes(pkt.header), bytes(pkt.payload)
        head = 16 + len(hdr)
        raw = struct.pack("<HHHHQ", pkt.type, head // 8, (head + len(pl)) // 8, pkt.flags, pkt.trans_id) + hdr + pl
        info = ffi.new("struct uvb_pkt *")
        info.type, info.flags, info.trans_id = pkt.type, pkt.flags, pkt.trans_id
        info.pkt_offset, info.pkt_len = 0, len(raw)
        info.data_offset, info.data_len = head, len(pl)
        rc = int(lib.uvb_nvsp_process(entry.q, raw, info))
        if rc == lib.UVB_HOST_SLOWPATH:
            if entry.q.punt_fatal:
                entry.q.punt_fatal = 0
                self._fatal(channel, ffi.string(entry.q.punt_msg).decode(errors="replace"))
            return None
        if rc < 0:
            raise ProtocolError(f"netvsp data path failed ({rc})")
        if rc & 0x100:
            self._complete(channel, pkt.trans_id, rndis_pkt_complete(rc & 0xFF, self.msg_size))
        return rc

    # ==== errors ==========================================================================
    def _fatal(self, channel: HostChannel, why: str) -> NoReturn:
        msg = (f"netvsp error: relid {channel.relid} (queue {channel.subchannel_id}): {why}; the "
               "channel goes silent, as a real host's does (netvsc.md §10.1)")
        self.counters["fatal_errors"] += 1
        self.fatal_messages.append(msg)
        self.device.log(msg)
        self.dead_channels.add(channel.relid)
        if channel.is_primary:
            self.nic.dead = 1
        raise ChannelStopped(msg, channel=f"relid {channel.relid}")

    def _complete(self, channel: HostChannel, tid: int, payload: bytes) -> None:
        channel.complete(tid, payload)

    def _nvsp_reply(self, msg: bytes) -> bytes:
        return msg[:self.msg_size].ljust(self.msg_size, b"\0")

    # ==== NVSP ===========================================================================
    def _handle(self, channel: HostChannel, pkt: Packet) -> None:
        if pkt.type == PKT_COMP and pkt.trans_id in self._host_tids and channel.is_primary:
            # O parse_packet: SendVfAssociationCompletion / SwitchDataPathCompletion
            self._host_tids.discard(pkt.trans_id)
            self.counters["vf_completions"] += 1
            return
        if pkt.type == PKT_COMP:
            # not an RX ack the data path accepted (those never get here in Ready)
            self._fatal(channel, f"completion (transaction {pkt.trans_id:#x}) for nothing the host "
                                 f"sent in state {self.state}")
        if pkt.type not in (PKT_INBAND, PKT_GPA_DIRECT):
            self._fatal(channel, f"VMBus packet type {pkt.type} is not used by NVSP")
        payload = bytes(pkt.payload)
        if len(payload) < 4:
            self._fatal(channel, f"NVSP message of {len(payload)} bytes")
        mtype = M.nvsp_msg_type(payload)
        if not channel.is_primary and self.state != READY:
            self._fatal(channel, f"NVSP message {mtype} on sub-channel before the NIC is ready")
        if self.state == VERSION:
            self._state_version(channel, pkt, mtype, payload)
        elif self.state == INIT:
            self._state_init(channel, pkt, mtype, payload)
        else:
            self._state_ready(channel, pkt, mtype, payload)

    def _need(self, channel: HostChannel, payload: bytes, ctype: str, what: str) -> Any:
        if len(payload) < ffi.sizeof(ctype):
            self._fatal(channel, f"{what} of {len(payload)} bytes (needs {ffi.sizeof(ctype)})")
        return M.nvsp_fields(payload, ctype)

    def _state_version(self, channel: HostChannel, pkt: Packet, mtype: int, payload: bytes) -> None:
        if mtype != lib.NVSP_MSG_TYPE_INIT:
            self._fatal(channel, f"NVSP message type {mtype} before INIT (version negotiation)")
        m = self._need(channel, payload, "struct nvsp_init", "INIT")
        requested = m.min_protocol_ver          # the reference host reads @4 only
        ok = requested in self.versions
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            # built before the switch to the negotiated message size: INIT_COMPLETE itself is
            # padded to the legacy 32 bytes even for 6.1 (the reference host's order, §10.1)
            negotiated = (2 if requested == NVSP_V1 else 0xFFFFFFFF) if ok else 0
            reply = M.nvsp_reply(lib.NVSP_MSG_TYPE_INIT_COMPLETE, negotiated, 34,
                                 lib.NVSP_STAT_SUCCESS if ok else lib.NVSP_STAT_NONE, size=self.msg_size)
            self._complete(channel, pkt.trans_id, reply)
        if ok:
            self.version = requested
            self.msg_size = 40 if requested >= NVSP_V61 else 32
            self.nic.msg_size = self.msg_size
            self.state = INIT

    def _state_init(self, channel: HostChannel, pkt: Packet, mtype: int, payload: bytes) -> None:
        want_comp = bool(pkt.flags & FLAG_COMPLETION_REQUESTED)
        if mtype == lib.NVSP_MSG2_TYPE_SEND_NDIS_CONFIG:
            if self.version < NVSP_V2:
                self._fatal(channel, "SEND_NDIS_CONFIG does not exist in NVSP version 1")
            if self.ndis_config is not None:
                self._fatal(channel, "second SEND_NDIS_CONFIG")
            m = self._need(channel, payload, "struct nvsp_send_ndis_config", "SEND_NDIS_CONFIG")
            mtu = m.mtu
            self.ndis_config = (mtu, m.capability)
            self.mtu = mtu if 1514 <= mtu <= 9216 else MTU_DEFAULT
            if want_comp:                   # "can be empty": the reference host's is (§2.4)
                self._complete(channel, pkt.trans_id, b"")
        elif mtype == lib.NVSP_MSG1_TYPE_SEND_NDIS_VER:
            if self.ndis_version is not None:
                self._fatal(channel, "second SEND_NDIS_VER")
            m = self._need(channel, payload, "struct nvsp_send_ndis_ver", "SEND_NDIS_VER")
            self.ndis_version = (m.ndis_major_ver, m.ndis_minor_ver)
            if want_comp:                   # an empty completion, only when requested (§2.4)
                self._complete(channel, pkt.trans_id, b"")
        elif mtype == lib.NVSP_MSG1_TYPE_SEND_RECV_BUF:
            self._recv_buf(channel, pkt, payload)
        elif mtype == lib.NVSP_MSG1_TYPE_SEND_SEND_BUF:
            self._send_buf(channel, pkt, payload)
        elif mtype == lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT and self._init_done(without_send_buf=True):
            self._become_ready()
            self._state_ready(channel, pkt, mtype, payload)
            return
        else:
            self._fatal(channel, f"NVSP message type {mtype} during initialization (state init)")
        if self._init_done():
            self._become_ready()

    def _init_done(self, without_send_buf: bool = False) -> bool:
        cfg = self.ndis_config is not None or self.version < NVSP_V2
        return (cfg and self.ndis_version is not None and self.recv_buf_id is not None
                and (self.send_buf_ok or without_send_buf))

    def _become_ready(self) -> None:
        self.state = READY
        n = self.nic
        n.num_queues = 1
        if self._pending_link is not None and not self._link_timer:
            # the reference host sends a pending link indication from its Ready state, as soon
            # as a control sub-allocation is free: RNDIS INIT is not needed (§10.1)
            up, self._pending_link = self._pending_link, None
            self._link_action(up, on_loop=False)

    def _recv_buf(self, channel: HostChannel, pkt: Packet, payload: bytes) -> None:
        if self.recv_buf_id is not None:
            self._fatal(channel, "second SEND_RECV_BUF")
        if self.version >= NVSP_V2 and self.ndis_config is None:
            self._fatal(channel, "SEND_RECV_BUF before SEND_NDIS_CONFIG (required from NVSP 2)")
        m = self._need(channel, payload, "struct nvsp_send_recv_buf", "SEND_RECV_BUF")
        buf = self.device.buffer("recv")
        if buf is None or m.gpadl_handle != buf.gpadl:
            self._fatal(channel, f"SEND_RECV_BUF names GPADL {m.gpadl_handle:#x}, which is not an "
                                 f"established buffer (receive buffer: {buf.gpadl if buf else None})")
        rc = lib.uvb_nvsp_set_recv_buf(self.nic, buf.ptr, buf.size, self.mtu)
        if rc:
            self._fatal(channel, f"receive buffer of {buf.size} bytes unusable with MTU {self.mtu}")
        self.recv_buf_id = m.id
        self.nic.recv_buf_id = m.id
        for entry in self._queues.values():
            lib.uvb_nvsp_attach_queue(self.nic, entry.q)
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            n = self.nic
            body = struct.pack("<IIIIIII", lib.NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE, lib.NVSP_STAT_SUCCESS, 1, 0,
                               n.sub_size, n.sub_count, n.sub_size * n.sub_count)
            self._complete(channel, pkt.trans_id, self._nvsp_reply(body))

    def _send_buf(self, channel: HostChannel, pkt: Packet, payload: bytes) -> None:
        if self.send_buf_ok:
            self._fatal(channel, "second SEND_SEND_BUF")
        m = self._need(channel, payload, "struct nvsp_send_send_buf", "SEND_SEND_BUF")
        buf = self.device.buffer("send")
        if buf is None or m.gpadl_handle != buf.gpadl:
            self._fatal(channel, f"SEND_SEND_BUF names GPADL {m.gpadl_handle:#x}, which is not an "
                                 f"established buffer (send buffer: {buf.gpadl if buf else None})")
        n = self.nic
        n.send_buf = buf.ptr
        n.send_size = buf.size
        n.section_size = SECTION_SIZE
        n.section_count = buf.size // SECTION_SIZE
        self.send_buf_ok = True
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            body = struct.pack("<III", lib.NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE, lib.NVSP_STAT_SUCCESS, SECTION_SIZE)
            self._complete(channel, pkt.trans_id, self._nvsp_reply(body))

    def _state_ready(self, channel: HostChannel, pkt: Packet, mtype: int, payload: bytes) -> None:
        want_comp = bool(pkt.flags & FLAG_COMPLETION_REQUESTED)
        if mtype == lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT:
            self._rndis_pkt(channel, pkt, payload)
        elif mtype == lib.NVSP_MSG5_TYPE_SUBCHANNEL:
            if not channel.is_primary:
                self._fatal(channel, "SUBCHANNEL request on a sub-channel")
            if self.version < NVSP_V5:
                self._fatal(channel, f"SUBCHANNEL request in NVSP version {self.version:#x} (needs 5)")
            m = self._need(channel, payload, "struct nvsp_subchannel_request", "SUBCHANNEL")
            granted = self._grant(m.op, m.num_subchannels)
            if want_comp:
                body = struct.pack("<III", lib.NVSP_MSG5_TYPE_SUBCHANNEL,
                                   lib.NVSP_STAT_SUCCESS if granted else lib.NVSP_STAT_FAIL, granted)
                self._complete(channel, pkt.trans_id, self._nvsp_reply(body))
        elif mtype in (lib.NVSP_MSG1_TYPE_REVOKE_RECV_BUF, lib.NVSP_MSG1_TYPE_REVOKE_SEND_BUF):
            if not channel.is_primary:
                # O process_ring_buffer: the revoke arm needs the primary's state; on a
                # sub-channel it is an unexpected packet (an error, the channel stops)
                self._fatal(channel, "REVOKE_*_BUF on a sub-channel")
            self.revoked = True
            self.counters["revokes"] += 1
            self.nic.data_ready = 0
            self.nic.filter = 0
        elif mtype == lib.NVSP_MSG4_TYPE_SWITCH_DATA_PATH:
            if self.version < NVSP_V4:
                self._fatal(channel, "SWITCH_DATA_PATH before NVSP 4")
            m = self._need(channel, payload, "struct nvsp_switch_data_path", "SWITCH_DATA_PATH")
            self._switch_data_path(m.active_datapath == lib.NVSP_DATA_PATH_VF)
            if want_comp:
                self._complete(channel, pkt.trans_id, b"")
        elif mtype == lib.NVSP_MSG5_TYPE_OID_QUERY_EX:
            if want_comp:
                body = struct.pack("<III", lib.NVSP_MSG5_TYPE_OID_QUERY_EX_COMP, STATUS_NOT_SUPPORTED, 0)
                self._complete(channel, pkt.trans_id, self._nvsp_reply(body))
        else:
            self._fatal(channel, f"NVSP message type {mtype} in state ready")

    # ==== sub-channels / RSS =============================================================
    def _grant(self, op: int, n: int) -> int:
        """§7: exactly n when n < max_queues and the buffer has a sub-allocation per queue."""
        if op != lib.NVSP_SUBCHANNEL_OP_ALLOCATE or self.subchannel_requested or n == 0:
            return 0
        if n >= self.max_queues:
            return 0
        data_ids = int(self.nic.sub_count) - lib.UVB_NVSP_CTRL_IDS
        if data_ids < n + 1:
            return 0
        self.subchannel_requested = True
        self.granted = n
        self.counters["subchannel_grants"] += 1
        lib.uvb_nvsp_set_queues(self.nic, 1 + n)
        self.device.offer_subchannels(n)
        return n

    def _maybe_send_table(self) -> None:
        """Once every granted sub-channel is open: SEND_INDIRECTION_TABLE (§7)."""
        if self.table_sent or not self.granted:
            return
        opened = sum(1 for e in self._queues.values() if e.index > 0)
        if opened < self.granted:
            return
        chans = 1 + opened
        table = [i % chans for i in range(lib.NVSP_SEND_TABLE_ENTRIES)]
        msg = struct.pack("<III", lib.NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE, lib.NVSP_SEND_TABLE_ENTRIES, 12) + \
            struct.pack("<16I", *table)
        lib.uvb_nvsp_post_inband(self.nic, msg, len(msg), 0, 0)
        self.table_sent = True
        self.counters["send_tables"] += 1
        self._poke_primary()

    def _poke_primary(self) -> None:
        for entry in list(self._queues.values()):
            if entry.index == 0:
                entry.channel.poke()

    # ==== RNDIS ==========================================================================
    def _rndis_bytes(self, channel: HostChannel, pkt: Packet, m: Any) -> bytes | None:
        """The RNDIS byte stream of a SEND_RNDIS_PKT: section bytes, then GPA ranges (§5)."""
        n = self.nic
        idx, size = m.send_buf_section_index, m.send_buf_section_size
        data = b""
        if idx != lib.NVSP_SECTION_INDEX_NONE:
            if not self.send_buf_ok or idx >= n.section_count:
                self._fatal(channel, f"SEND_RNDIS_PKT with send-buffer section {idx}: only "
                                     f"{int(n.section_count)} sections exist")
            if size == 0 or size > SECTION_SIZE:
                self._fatal(channel, f"SEND_RNDIS_PKT with section {idx} size {size}")
            data = bytes(ffi.buffer(n.send_buf + idx * SECTION_SIZE, size))
        elif size:
            self._fatal(channel, f"SEND_RNDIS_PKT without a section but size {size}")
        if pkt.type == PKT_GPA_DIRECT:
            ram = self.device.guest_ram
            if ram is None:
                return None
            try:
                data += b"".join(ram.read(pfns, off, count) for count, off, pfns in gpa_ranges(pkt))
            except ConfigError:
                return None                 # a PFN outside guest RAM fails the request
        return data

    def _rndis_pkt(self, channel: HostChannel, pkt: Packet, payload: bytes) -> None:
        want_comp = bool(pkt.flags & FLAG_COMPLETION_REQUESTED)
        m = self._need(channel, payload, "struct nvsp_send_rndis_pkt", "SEND_RNDIS_PKT")
        if self.revoked:
            return                          # the data path stopped silently
        data = self._rndis_bytes(channel, pkt, m)
        if data is None or len(data) < 8:
            self._fail_request(channel, pkt)
            return
        rtype = struct.unpack_from("<I", data)[0]
        if rtype == lib.RNDIS_MSG_PACKET:
            # data before RNDIS is operational (the C path punts it here)
            self._fail_request(channel, pkt)
            return
        if not channel.is_primary:
            self._fail_request(channel, pkt)        # control on a sub-channel (§7)
            return
        self.counters["rndis_requests"] += 1
        try:
            msg = M.read_rndis_request(data)
        except M.BadRequest:
            self._fail_request(channel, pkt)
            return
        self._after_response = []
        response = self._rndis_control(channel, msg)
        if response is not None:
            if lib.uvb_nvsp_post_ctrl(self.nic, response, len(response)) != 0:
                self.counters["ctrl_overflow"] += 1
                self._fail_request(channel, pkt)
                return
        for extra in self._after_response:
            if lib.uvb_nvsp_post_ctrl(self.nic, extra, len(extra)) != 0:
                self.counters["ctrl_overflow"] += 1
        if msg.type == lib.RNDIS_MSG_INIT:
            self._announce_vf()           # O: right after INIT_CMPLT (RNDIS operational)
        if want_comp:
            self._complete(channel, pkt.trans_id, rndis_pkt_complete(lib.NVSP_STAT_SUCCESS, self.msg_size))

    def _fail_request(self, channel: HostChannel, pkt: Packet) -> None:
        self.counters["rndis_failed"] += 1
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            self._complete(channel, pkt.trans_id, rndis_pkt_complete(lib.NVSP_STAT_FAIL, self.msg_size))

    def _rndis_control(self, channel: HostChannel, msg: M.RndisRequest) -> bytes | None:
        t = msg.type
        if t == lib.RNDIS_MSG_INIT:
            if self.rndis != R_INITIALIZING:
                self._fatal(channel, "second RNDIS INITIALIZE")
            self.rndis = R_OPERATIONAL
            if self.nic.priv != ffi.NULL:
                self.nic.data_ready = 1
            return M.init_complete(msg.req_id)
        if t == lib.RNDIS_MSG_QUERY:
            status, data = self._query(msg)
            return M.query_complete(msg.req_id, status, data)
        if t == lib.RNDIS_MSG_SET:
            # the reference host reads the info buffer right after the 20-byte body (§4.1)
            return M.set_complete(msg.req_id, self._set(channel, msg.oid, msg.info))
        if t == lib.RNDIS_MSG_KEEPALIVE:
            return M.keepalive_complete(msg.req_id)
        if t == lib.RNDIS_MSG_HALT:
            self.rndis = R_HALTED
            return None
        self._fatal(channel, f"RNDIS message {msg.name} from the guest")
        return None

    def _query(self, msg: M.RndisRequest) -> tuple[int, bytes]:
        oid = msg.oid
        mtu = self.frame_max
        u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)  # noqa: E731
        ndis_minor = self.ndis_version[1] if self.ndis_version else 0
        simple: dict[int, bytes] = {
            lib.OID_GEN_HARDWARE_STATUS: u32(0),
            lib.OID_GEN_MEDIA_SUPPORTED: u32(0),
            lib.OID_GEN_MEDIA_IN_USE: u32(0),
            lib.OID_GEN_MAXIMUM_LOOKAHEAD: u32(mtu - 14),
            lib.OID_GEN_CURRENT_LOOKAHEAD: u32(mtu - 14),
            lib.OID_GEN_MAXIMUM_FRAME_SIZE: u32(mtu - 14),
            lib.OID_GEN_LINK_SPEED: u32(self.link_speed // 100),
            lib.OID_GEN_TRANSMIT_BUFFER_SPACE: u32(256 * 1024),
            lib.OID_GEN_RECEIVE_BUFFER_SPACE: u32(256 * 1024),
            lib.OID_GEN_TRANSMIT_BLOCK_SIZE: u32(mtu),
            lib.OID_GEN_RECEIVE_BLOCK_SIZE: u32(mtu),
            lib.OID_GEN_MAXIMUM_TOTAL_SIZE: u32(mtu),
            lib.OID_GEN_VENDOR_ID: u32(0x155D),
            lib.OID_GEN_VENDOR_DESCRIPTION: b"Microsoft Corporation\0",
            lib.OID_GEN_CURRENT_PACKET_FILTER: u32(0),
            lib.OID_GEN_DRIVER_VERSION: struct.pack("<H", 0x0100),
            lib.OID_GEN_VENDOR_DRIVER_VERSION: struct.pack("<H", 0x0100),
            lib.OID_GEN_MAC_OPTIONS: u32(0x24D),
            # the reference host always answers "connected" and reports the link with
            # indications (§10.1); media_status=link makes the answer follow the backend
            lib.OID_GEN_MEDIA_CONNECT_STATUS: u32(lib.NDIS_MEDIA_STATE_CONNECTED
                                                if self.media_status == "connected" or self._link_up
                                                else lib.NDIS_MEDIA_STATE_DISCONNECTED),
            lib.OID_GEN_MAXIMUM_SEND_PACKETS: u32(0xFFFFFFFF),
            lib.OID_GEN_MAX_LINK_SPEED: struct.pack("<QQ", self.link_speed, self.link_speed),
            lib.OID_GEN_FRIENDLY_NAME: "Network Device".encode("utf-16-le").ljust(512, b"\0"),
            lib.OID_802_3_PERMANENT_ADDRESS: self.mac,
            lib.OID_802_3_CURRENT_ADDRESS: self.current_mac,
            lib.OID_802_3_MAXIMUM_LIST_SIZE: u32(0),
            lib.OID_802_3_RCV_ERROR_ALIGNMENT: u32(0),
            lib.OID_802_3_XMIT_ONE_COLLISION: u32(0),
            lib.OID_802_3_XMIT_MORE_COLLISIONS: u32(0),
        }
        counters = self._stat_counters() if self.stats_mode == "counters" else {}
        if oid in simple:
            return lib.RNDIS_STATUS_SUCCESS, simple[oid]
        if oid in counters:
            return lib.RNDIS_STATUS_SUCCESS, struct.pack("<Q", counters[oid])
        if oid == lib.OID_GEN_SUPPORTED_LIST:
            major = self.ndis_version[0] if self.ndis_version else 0
            if major not in (5, 6):
                return lib.RNDIS_STATUS_BAD_VERSION, b""
            # listed though not all answered, as the reference host lists them
            oids = sorted({*simple, lib.OID_GEN_NETWORK_LAYER_ADDRESSES, lib.OID_802_3_MULTICAST_LIST,
                           lib.OID_GEN_RNDIS_CONFIG_PARAMETER, *counters})
            if major == 6:
                oids += [lib.OID_GEN_BYTES_RCV, lib.OID_GEN_BYTES_XMIT] if not counters else []
                oids += [lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES, lib.OID_TCP_OFFLOAD_CURRENT_CONFIG,
                         lib.OID_TCP_OFFLOAD_PARAMETERS]
                if ndis_minor >= 30:
                    oids += [lib.OID_GEN_RECEIVE_SCALE_CAPABILITIES, lib.OID_GEN_RECEIVE_SCALE_PARAMETERS]
            return lib.RNDIS_STATUS_SUCCESS, struct.pack(f"<{len(oids)}I", *oids)
        if oid in (lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES, lib.OID_TCP_OFFLOAD_CURRENT_CONFIG):
            rev = 3
            if len(msg.info) >= 4 and msg.info[0] == lib.NDIS_OBJTYPE_OFFLOAD and msg.info[1] in (1, 2, 3):
                rev = msg.info[1]
            if oid == lib.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES:
                lso4 = lso6 = self.lso_offered
                rsc4 = rsc6 = self._rsc_capable()
            else:
                lso4, lso6 = self.lso_enabled["ipv4"], self.lso_enabled["ipv6"]
                rsc4, rsc6 = bool(self.nic.rsc_ip4), bool(self.nic.rsc_ip6)
            return lib.RNDIS_STATUS_SUCCESS, M.offload_capabilities(rev, lso4=lso4, lso6=lso6,
                                                                   rsc4=rsc4, rsc6=rsc6)
        if oid == lib.OID_GEN_RECEIVE_SCALE_CAPABILITIES:
            return lib.RNDIS_STATUS_SUCCESS, M.rss_capabilities(self.max_queues)
        return lib.RNDIS_STATUS_NOT_SUPPORTED, b""

    def _set(self, channel: HostChannel, oid: int, info: bytes) -> int:
        if oid == lib.OID_GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                return lib.RNDIS_STATUS_INVALID_DATA
            self.filter = struct.unpack_from("<I", info)[0]
            self.nic.filter = self.filter
            if self.filter:
                self._kick_all()
            return lib.RNDIS_STATUS_SUCCESS
        if oid == lib.OID_TCP_OFFLOAD_PARAMETERS:
            # §4.7: NDIS object header type 0x80, revision >= 1, header size >= 20 (the
            # revision-1 size) and not beyond the buffer the guest sent
            params = M.read_offload_request(info)
            if params is None:
                return lib.RNDIS_STATUS_INVALID_DATA
            if params["lso_v1"] == lib.NDIS_OFFLOAD_PARAM_LSO_ENABLED:
                return lib.RNDIS_STATUS_NOT_SUPPORTED
            on = lib.NDIS_OFFLOAD_PARAM_LSO_ENABLED
            want = {k: params[f"lso_v2_{k}"] for k in ("ipv4", "ipv6")}
            if not self.lso_offered and on in want.values():
                # like LSOv1 above: an offload this host does not offer cannot be enabled
                return lib.RNDIS_STATUS_NOT_SUPPORTED
            if not self._rsc_capable() and lib.NDIS_OFFLOAD_PARAM_RSC_ENABLED in (
                    params["rsc_ip_v4"], params["rsc_ip_v6"]):
                return lib.RNDIS_STATUS_NOT_SUPPORTED     # the same for RSC
            for k, v in want.items():          # 0 = no change, 1 = disabled, 2 = enabled
                if v in (lib.NDIS_OFFLOAD_PARAM_LSO_DISABLED, on):
                    self.lso_enabled[k] = v == on
            self.nic.lso_v4 = int(self.lso_enabled["ipv4"])
            self.nic.lso_v6 = int(self.lso_enabled["ipv6"])
            self.offload_params = params
            self._offload_rsc(params)
            # sent after the SET completion, like the reference host's pending_offload_change
            self._after_response.append(
                M.status_indication(lib.RNDIS_STATUS_TASK_OFFLOAD_CURRENT_CONFIG,
                                    M.offload_capabilities(3, lso4=self.lso_enabled["ipv4"],
                                                           lso6=self.lso_enabled["ipv6"],
                                                           rsc4=bool(self.nic.rsc_ip4),
                                                           rsc6=bool(self.nic.rsc_ip6))))
            return lib.RNDIS_STATUS_SUCCESS
        if oid == lib.OID_GEN_RECEIVE_SCALE_PARAMETERS:
            return self._set_rss(info)
        if oid == lib.OID_GEN_RNDIS_CONFIG_PARAMETER:
            return self._set_config_parameter(info)
        if oid == lib.OID_GEN_NETWORK_LAYER_ADDRESSES:
            return lib.RNDIS_STATUS_SUCCESS
        # OID_802_3_MULTICAST_LIST included: the reference host has no SET for it
        return lib.RNDIS_STATUS_NOT_SUPPORTED

    # ---- RSC (docs/simulator.md "RSC") -------------------------------------------------
    def _rsc_capable(self) -> bool:
        """RSC exists from NVSP 6.1 (netvsc.md §2.1) and is offered when option ``rsc`` is on."""
        return self.rsc_offered and self.version >= NVSP_V61

    def _offload_rsc(self, params: dict[str, int]) -> None:
        """rsc_ip_v4 / rsc_ip_v6 of OID_TCP_OFFLOAD_PARAMETERS: 0 no change, 1 disable, 2
        enable (netvsc.md §4.7).  Coalescing starts only for a guest that can take fragments:
        one that declared NVSP_NDIS_CAP_RSC in SEND_NDIS_CONFIG (L-c negotiate_nvsp_ver);
        values in the 22-byte form (NVSP <= 4) do not exist and read as 0."""
        v4, v6 = int(self.nic.rsc_ip4), int(self.nic.rsc_ip6)
        for key, cur in (("rsc_ip_v4", "v4"), ("rsc_ip_v6", "v6")):
            val = params.get(key, 0)
            on = val == lib.NDIS_OFFLOAD_PARAM_RSC_ENABLED
            if val in (lib.NDIS_OFFLOAD_PARAM_RSC_ENABLED, lib.NDIS_OFFLOAD_PARAM_RSC_DISABLED):
                if cur == "v4":
                    v4 = int(on)
                else:
                    v6 = int(on)
        declared = self.ndis_config is not None and bool(self.ndis_config[1] & lib.NVSP_NDIS_CAP_RSC)
        if (v4 or v6) and not declared:
            self.counters["rsc_undeclared"] += 1
            v4 = v6 = 0
        self._set_rsc(v4, v6)

    def _set_rsc(self, v4: int, v6: int) -> None:
        n = self.nic
        n.rsc_ip4, n.rsc_ip6 = v4, v6
        # a coalesced unit takes several ranges of one packet: up to 562 with RSC (§6)
        n.max_ranges = lib.NVSP_MAX_PACKETS_PER_RECEIVE_RSC if (v4 or v6) else lib.NVSP_MAX_PACKETS_PER_RECEIVE
        n.cfg_epoch += 1

    def _set_config_parameter(self, info: bytes) -> int:
        try:
            p = M.read_config_parameter(info)
        except M.AccessError:
            return lib.RNDIS_STATUS_FAILURE
        except M.BadRequest:
            return lib.RNDIS_STATUS_INVALID_DATA
        if p.name == "NetworkAddress" and p.ptype == lib.RNDIS_CONFIG_PARAM_TYPE_STRING:
            if self.mac_change == "refuse":
                return lib.RNDIS_STATUS_FAILURE
            if self.mac_change == "apply":
                text = str(p.value)
                try:
                    mac = bytes.fromhex(text) if len(text) == 12 else b""
                except ValueError:
                    mac = b""
                if len(mac) != 6 or mac[0] & 1 or mac == bytes(6):
                    return lib.RNDIS_STATUS_INVALID_DATA
                self.current_mac = mac
        self.config_params[p.name] = p.value
        return lib.RNDIS_STATUS_SUCCESS

    def _stat_counters(self) -> dict[int, int]:
        """OID_GEN_* counters from the queues' own counts (option ``stats=counters``)."""
        names = ("tx_frames", "tx_bytes", "tx_failed", "tx_dropped", "rx_frames", "rx_bytes", "rx_nobuf",
                 "rx_filtered", "rx_oversize", "rx_ring_full")
        t = dict.fromkeys(names, 0)
        with self._lock:
            entries = list(self._queues.values())
        for e in entries:
            for k in names:
                t[k] += int(getattr(e.q, k))
        return {
            lib.OID_GEN_XMIT_OK: t["tx_frames"], lib.OID_GEN_RCV_OK: t["rx_frames"],
            lib.OID_GEN_XMIT_ERROR: t["tx_failed"], lib.OID_GEN_RCV_ERROR: t["rx_oversize"],
            lib.OID_GEN_RCV_NO_BUFFER: t["rx_nobuf"] + t["rx_ring_full"],
            lib.OID_GEN_BYTES_XMIT: t["tx_bytes"], lib.OID_GEN_BYTES_RCV: t["rx_bytes"],
            lib.OID_GEN_XMIT_DISCARDS: t["tx_dropped"], lib.OID_GEN_RCV_DISCARDS: t["rx_filtered"],
        }

    def _set_rss(self, info: bytes) -> int:
        """§4.8 host validation; §10.1: an RSS change restarts the queues."""
        try:
            p = M.read_rss_request(info)
        except M.BadRequest:
            return lib.RNDIS_STATUS_INVALID_DATA
        n = self.nic
        if p.flags & lib.NDIS_RSS_FLAG_DISABLE_RSS or not (p.hash_info & 0xFF):
            n.rss_enabled = 0
            self.rss = p
            n.cfg_epoch += 1
            return lib.RNDIS_STATUS_SUCCESS
        if len(p.key) != 40 or not p.table or any(e >= self.max_queues for e in p.table):
            return lib.RNDIS_STATUS_INVALID_DATA
        table = [p.table[i % len(p.table)] for i in range(lib.NDIS_RSS_TABLE_ENTRIES)]
        ffi.memmove(n.rss_key, p.key, 40)
        for i, e in enumerate(table):
            n.rss_table[i] = e
        n.hash_info = p.hash_info
        n.rss_enabled = 1
        n.cfg_epoch += 1
        self.rss = p
        self._kick_all()
        return lib.RNDIS_STATUS_SUCCESS

    def _kick_all(self) -> None:
        for entry in list(self._queues.values()):
            entry.channel.poke()

    # ==== accelerated-networking VF (§8) =====================================================
    def _vf_capable(self) -> bool:
        """O guest_vf_is_available: NVSP >= 4 and the guest advertised SR-IOV."""
        return (self.version >= NVSP_V4 and self.ndis_config is not None
                and bool(self.ndis_config[1] & lib.NVSP_NDIS_CAP_SRIOV))

    def _can_announce(self) -> bool:
        return (self.state == READY and self.rndis == R_OPERATIONAL and self.nic.priv != ffi.NULL
                and not self.revoked and not self.nic.dead)

    def _post_host_inband(self, msg: bytes, tid: int) -> None:
        body = self._nvsp_reply(msg)
        if lib.uvb_nvsp_post_inband(self.nic, body, len(body), tid, FLAG_COMPLETION_REQUESTED) != 0:
            self.counters["ctrl_overflow"] += 1
            return
        self._host_tids.add(tid)
        self._poke_primary()

    def _announce_vf(self) -> None:
        if not self.vf_present or self.vf_advertised or not self._can_announce() or not self._vf_capable():
            return
        msg = struct.pack("<III", lib.NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION, 1, self.vf_serial)
        self._post_host_inband(msg, VF_ASSOCIATION_TID)
        self.vf_advertised = True
        self.counters["vf_associations"] += 1
        self._offer_vf_pci()

    def _vf_pci_names(self) -> tuple[str, str, str]:
        """(vPCI instance GUID, PCI address, interface name) of this NIC's VF: the domain is
        bytes 4-5 of the GUID, as pci-hyperv derives it; device 2, function 0."""
        vpci = str(uuid.uuid5(uuid.UUID(self.device.device_id), f"vf-{self.vf_serial}"))
        dom = int(vpci.split("-")[1], 16)
        return vpci, f"{dom:04x}:00:02.0", f"simvf{self.vf_serial}"

    def _offer_vf_pci(self) -> None:
        """The VF's PCI function appears once the guest was told about it (O offers the VTL0
        VF after the association — 1 s later, to keep interface names stable — and keeps it
        across guest sessions); sysfs only, a Mellanox ConnectX-4 Lx VF with the NIC's MAC."""
        if self._vf_pci is not None:
            return
        vpci, bdf, ifname = self._vf_pci_names()
        slot = str(self.vf_serial)
        self.device.vm.tree.add_vpci_function(
            vpci, bdf, slot=slot, vendor=0x15B3, device=0x1016, cls=0x020000,
            ifname=ifname, mac=":".join(f"{b:02x}" for b in self.mac))
        self._vf_pci = (vpci, bdf, ifname, slot)

    def _revoke_vf_pci(self) -> None:
        if self._vf_pci is None:
            return
        vpci, bdf, ifname, slot = self._vf_pci
        self._vf_pci = None
        self.device.vm.tree.remove_vpci_function(vpci, bdf, slot=slot, ifname=ifname)

    def _switch_data_path(self, to_vf: bool) -> None:
        """The guest's SWITCH_DATA_PATH: to the VF only when one was announced."""
        if to_vf and not self.vf_advertised:
            self.counters["vf_switch_ignored"] += 1
            return
        self.counters["vf_switches"] += 1
        self.data_path_vf = to_vf
        self.nic.vf_steer = VF_STEER[self.vf_steer] if to_vf else lib.UVB_NVSP_VF_OFF
        self._kick_all()

    def vf_add(self, serial: int | None = None) -> None:
        with self._lock:
            if serial is not None:
                if not 0 < serial < 1 << 32:
                    raise ConfigError("a VF serial is 1..4294967295")
                if self.vf_present and serial != self.vf_serial:
                    raise ConfigError(f"a VF (serial {self.vf_serial}) is present: remove it first")
                self.vf_serial = serial
            self.vf_present = True
            self._announce_vf()

    def vf_remove(self) -> None:
        """O handle_state_change: data path back to synthetic (if switched), then
        VF_ASSOCIATION {allocated 0}; the PCI function goes after the guest was told."""
        with self._lock:
            self.vf_present = False
            try:
                self._withdraw_vf()
            finally:
                self._revoke_vf_pci()

    def _withdraw_vf(self) -> None:
        if not self.vf_advertised:
            return
        if self.data_path_vf:
            # the VF is gone: whatever the guest does next, nothing can reach it any more
            self.data_path_vf = False
            self.nic.vf_steer = lib.UVB_NVSP_VF_OFF
            self.counters["vf_switch_backs"] += 1
            if self._can_announce() and self.vf_remove_mode == "switch_first":
                msg = struct.pack("<II", lib.NVSP_MSG4_TYPE_SWITCH_DATA_PATH, lib.NVSP_DATA_PATH_SYNTHETIC)
                self._post_host_inband(msg, SWITCH_DATA_PATH_TID)
            self._kick_all()
        self.vf_advertised = False
        if self._can_announce():
            msg = struct.pack("<III", lib.NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION, 0, 0)
            self._post_host_inband(msg, VF_ASSOCIATION_TID)
            self.counters["vf_associations"] += 1

    # ==== link state =======================================================================
    def set_link(self, up: bool) -> None:
        """Backend link change (control socket, event loop).  Paced like the reference host."""
        with self._lock:
            if (up == self._link_up == self._guest_link and self._pending_link is None
                    and not self._link_timer):
                return                       # no change at all
            self._link_up = up
            self.nic.link_up = 1 if up else 0
            if self._link_timer:
                return                       # coalesced: the timer sends the final state
            if not self._can_indicate():
                self._pending_link = up      # sent when the primary channel becomes ready
                return
            self._link_action(up)

    def _can_indicate(self) -> bool:
        """The reference host sends link indications from its Ready state (buffers connected;
        a control sub-allocation is all it needs, RNDIS INIT or not)."""
        return self.state == READY and self.nic.priv != ffi.NULL and not self.revoked

    def _link_action(self, up: bool, *, on_loop: bool = True) -> None:
        """§10.1: a change relative to what the guest was told is sent now; if the link
        bounced (the new state is the one the guest already has), the intermediate transition
        is sent now and the final one after the pacing delay."""
        self._indicate(not up if up == self._guest_link else up)
        self._arm_link_timer(on_loop)

    def _arm_link_timer(self, on_loop: bool = True) -> None:
        self._link_timer = True
        self._link_gen += 1
        gen = self._link_gen
        vm = self.device.vm
        if on_loop:
            vm.later(self.link_pacing, self._link_timer_fired, gen)
        else:                                # from a channel worker: timers live on the loop
            vm.call_soon(vm.later, self.link_pacing, self._link_timer_fired, gen)

    def _link_timer_fired(self, gen: int) -> None:
        with self._lock:
            if gen != self._link_gen:
                return
            self._link_timer = False
            if self._link_up != self._guest_link:
                if not self._can_indicate():
                    self._pending_link = self._link_up
                    return
                self._indicate(self._link_up)
                self._arm_link_timer()

    def _indicate(self, up: bool) -> None:
        ind = M.status_indication(lib.RNDIS_STATUS_MEDIA_CONNECT if up else lib.RNDIS_STATUS_MEDIA_DISCONNECT)
        if lib.uvb_nvsp_post_ctrl(self.nic, ind, len(ind)) != 0:
            self.counters["ctrl_overflow"] += 1
            return
        self._guest_link = up
        self.counters["link_indications"] += 1
        self._poke_primary()

    # ==== faults / backends ==================================================================
    def set_fault(self, kind: str, count: int = 1) -> None:
        if kind == "unknown_inband":
            self.inject_inband(struct.pack("<I", UNKNOWN_INBAND_TYPE).ljust(40, b"\0"))
            return
        if kind in ("", "none", "clear"):
            self.nic.fault_count = 0
            self.nic.fault_kind = 0
            return
        code = FAULTS.get(kind)
        if code is None:
            raise ConfigError(f"netvsc fault {kind!r}: known: {', '.join([*FAULTS, 'unknown_inband'])}")
        self.nic.fault_kind = code
        self.nic.fault_count = max(0, count)

    def inject_inband(self, payload: bytes) -> None:
        if self.nic.priv == ffi.NULL:
            raise ConfigError("netvsc: the NIC has no receive buffer yet")
        lib.uvb_nvsp_post_inband(self.nic, payload, len(payload), 0, 0)
        self.counters["inband_injected"] += 1
        self._poke_primary()

    def _start_tap(self) -> None:
        from uvmbus.sim.backends.tap import TapDevice
        self._tap = TapDevice(self.backend.ifname, self.backend.netns, mtu=self.frame_max - 14)
        self.nic.backend_fd = self._tap.fd
        self._tap.start(self.nic, self._poke)

    def _stop_tap(self) -> None:
        tap, self._tap = self._tap, None
        self.nic.backend_fd = -1
        if tap is not None:
            tap.close()

    @property
    def frame_max(self) -> int:
        """The frame size the host answers (OID_GEN_MAXIMUM_FRAME_SIZE + 14): the guest's NDIS
        config capped by ``max_mtu``; the receive buffer keeps the NDIS config's layout."""
        return min(self.mtu, self.max_mtu + 14)

    def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Model operations (``uvmbus sim ctl model netvsc OP``; simulator event loop)."""
        if op == "link":
            up = args.get("up", True)
            if isinstance(up, str):
                up = up.lower() not in ("0", "down", "false", "no", "off")
            self.set_link(bool(up))
            return {"link": "up" if up else "down"}
        if op == "vf":
            action = str(args.get("action", "")).lower()
            if action == "add":
                self.vf_add(int(args["serial"]) if args.get("serial") not in (None, "") else None)
            elif action == "remove":
                self.vf_remove()
            else:
                raise ConfigError("netvsc vf: action must be add or remove")
            return self._vf_describe()
        if op == "fault":
            self.set_fault(str(args.get("kind", "")), int(args.get("count", 1)))
            return {"fault": args.get("kind")}
        if op == "inband":
            payload = bytes.fromhex(str(args["payload"]))
            self.inject_inband(payload)
            return {"injected_bytes": len(payload)}
        if op == "generator":
            for k in ("size", "flows", "count"):
                if k in args:
                    self.gen[k] = int(args[k])
            if "proto" in args:
                self.gen["proto"] = str(args["proto"])
            self.nic.gen.generated = 0
            self._apply_gen()
            self._kick_all()
            return {"generator": dict(self.gen)}
        if op == "backend":
            spec = parse_backend(str(args.get("backend", "")))
            if spec.kind == "tap" or self.backend.kind == "tap":
                raise ConfigError("netvsc: the TAP backend is chosen at start (--nic-backend tap:...)")
            self.backend = spec
            self.nic.backend = spec.code
            self._kick_all()
            return {"backend": str(spec)}
        if op == "max_queues":
            # the host's queue limit changes (O: max_queues = min(configured, backend queues),
            # so a new endpoint can change it); applies to the next RSS capabilities answer and
            # SUBCHANNEL request, not to sub-channels already granted
            n = int(args.get("max_queues", args.get("value", 0)))
            if not 1 <= n <= lib.UVB_NVSP_MAX_QUEUES:
                raise ConfigError(f"max_queues must be 1..{lib.UVB_NVSP_MAX_QUEUES}")
            with self._lock:
                self.max_queues = n
            return {"max_queues": n}
        if op == "mac":
            # a NIC re-offered with another permanent address (the VM's adapter changed while
            # it was rescinded): answered from the next OID_802_3_PERMANENT_ADDRESS query on
            mac = _parse_mac(str(args.get("mac", args.get("value", ""))))
            with self._lock:
                self.mac = mac
            return {"mac": ":".join(f"{b:02x}" for b in mac)}
        if op == "max_mtu":
            # the host's largest MTU, from the next SEND_NDIS_CONFIG (next session) on
            n = int(args.get("max_mtu", args.get("value", 0)))
            if not 68 <= n <= 9202:
                raise ConfigError("max_mtu must be 68..9202")
            with self._lock:
                self.max_mtu = n
            return {"max_mtu": n}
        if op == "stats":
            return self.describe()
        raise ConfigError(f"netvsc: unknown control operation {op!r}; known: link, vf, fault, inband, "
                          "generator, backend, max_queues, mac, max_mtu, stats")

    # ==== reporting ============================================================================
    def _vf_describe(self) -> dict[str, Any]:
        return {"vf": {"present": self.vf_present, "serial": self.vf_serial, "advertised": self.vf_advertised,
                       "data_path": "vf" if self.data_path_vf else "synthetic", "steer": self.vf_steer,
                       "guest_sriov": self._vf_capable(),
                       "pci": self._vf_pci[1] if self._vf_pci else None,
                       "vpci": self._vf_pci[0] if self._vf_pci else None}}

    def describe(self) -> dict[str, Any]:
        n = self.nic
        queues = {}
        with self._lock:
            entries = sorted(self._queues.items())
        for relid, e in entries:
            q = e.q
            queues[str(e.index)] = {
                "relid": relid, **{k: int(getattr(q, k)) for k in (
                    "tx_msgs", "tx_frames", "tx_bytes", "tx_failed", "tx_dropped", "rx_frames", "rx_bytes",
                    "rx_xfer", "rx_acks", "rx_nobuf", "rx_filtered", "rx_oversize", "rx_ring_full",
                    "inbox_drops", "gen_frames", "sink_frames", "completions", "punts", "rx_to_vf",
                    "tx_lso", "tx_lso_segments", "tx_lso_invalid", "tx_lso_not_enabled", "tx_lso_oversize", "rsc_units", "rsc_segments",
                    "rsc_fragments")},
                "free_ids": int(lib.uvb_nvsp_free_ids(n, e.index)) if n.priv != ffi.NULL else 0,
            }
        return {"netvsp": {
            "state": self.state, "rndis": self.rndis,
            "version": VERSION_NAMES.get(self.version, hex(self.version)) if self.version else None,
            "offered_versions": [VERSION_NAMES[v] for v in self.versions],
            "ndis_version": None if self.ndis_version is None else f"{self.ndis_version[0]}.{self.ndis_version[1]}",
            "mtu": self.mtu, "mac": ":".join(f"{b:02x}" for b in self.mac), "backend": str(self.backend),
            "current_mac": ":".join(f"{b:02x}" for b in self.current_mac), "mac_change": self.mac_change,
            "config_params": dict(self.config_params),
            "sub_alloc_size": int(n.sub_size), "sub_allocs": int(n.sub_count),
            "queues_active": int(n.num_queues), "max_queues": self.max_queues, "granted": self.granted,
            "filter": self.filter, "rss": bool(n.rss_enabled), "lso_offered": self.lso_offered,
            "lso_enabled": dict(self.lso_enabled), "link": "up" if self._link_up else "down",
            "rsc": {"offered": self.rsc_offered, "ipv4": bool(n.rsc_ip4), "ipv6": bool(n.rsc_ip6),
                    "max_segments": int(n.rsc_max_segs)},
            "guest_link": "up" if self._guest_link else "down",
            "guest_owned": int(lib.uvb_nvsp_guest_owned(n)) if n.priv != ffi.NULL else 0,
            "ctrl_pending": int(lib.uvb_nvsp_ctrl_pending(n)) if n.priv != ffi.NULL else 0,
            "faults_injected": int(n.faults_injected), "generated": int(n.gen.generated),
            "queues": queues, **self.counters, **self._vf_describe(), "fatal": self.fatal_messages[-5:],
        }}


def rndis_pkt_complete(status: int, size: int) -> bytes:
    """NVSP SEND_RNDIS_PKT_COMPLETE padded to the host's message size."""
    return struct.pack("<II", lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE, status).ljust(size, b"\0")

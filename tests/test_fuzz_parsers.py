"""Hostile-host fuzzing of the Python parsers of host messages: whatever bytes the host sends,
each parser returns a value or raises a uvmbus error (ProtocolError) — never struct.error,
IndexError, KeyError, ValueError, OverflowError or anything else a caller would not expect.

Covered: NVSP and RNDIS messages and their NDIS objects (uvmbus/netvsc/protocol.py), the
netvsc driver's dispatch of control records (link indications, responses, completions,
in-band messages: Nic._dispatch), VSTOR packets / properties / SRBs
(uvmbus/storvsc/protocol.py) and SCSI data-in and sense parsers (uvmbus/storvsc/scsi.py).
"""

from __future__ import annotations

import logging
import struct
import types
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_netvsc import rndis_message
from test_fuzz_ring import FAST, SLOW

from uvmbus.errors import UvmbusError
from uvmbus.native import ffi, lib
from uvmbus.netvsc import nic as nicmod
from uvmbus.netvsc import protocol as NP
from uvmbus.netvsc.nic import Nic
from uvmbus.storvsc import protocol as SP
from uvmbus.storvsc import scsi

pytestmark = pytest.mark.timeout(120)


def structured(head: list[int]) -> st.SearchStrategy[bytes]:
    """Bytes that start like a real message (one of ``head`` as the first u32, a plausible
    length next) followed by fields drawn from boundary values and random bytes."""
    u32 = st.one_of(st.sampled_from([0, 1, 4, 8, 12, 16, 20, 24, 28, 36, 40, 44, 64, 0x7FFFFFFF,
                                     0xFFFFFFFF, 0xFFFFFFF8]), st.integers(0, 0xFFFFFFFF))
    return st.tuples(st.sampled_from(head), u32, st.lists(u32, max_size=24),
                     st.binary(max_size=64), st.integers(0, 200)).map(
        lambda t: (struct.pack("<II", t[0], t[1]) + struct.pack(f"<{len(t[2])}I", *t[2]) + t[3])[:t[4] or None])


RNDIS_TYPES = [NP.RNDIS_PACKET, NP.RNDIS_INIT_C, NP.RNDIS_QUERY_C, NP.RNDIS_SET_C, NP.RNDIS_RESET_C,
               NP.RNDIS_INDICATE, NP.RNDIS_KEEPALIVE, NP.RNDIS_KEEPALIVE_C, NP.RNDIS_QUERY,
               NP.RNDIS_SET, 0x12345678]
NVSP_TYPES = sorted(NP.NVSP_STRUCTS) + [NP.MSG_SEND_INDIRECTION_TABLE] * 4 + [0, 3, 0xFFFFFFFF]
VSTOR_OPS = list(range(0, 16)) + [0xFFFFFFFF]

def _cut(msg: bytes, n: int) -> bytes:
    """``msg`` cut to n bytes with msg_len saying so (a message that ends early)."""
    out = bytearray(msg[:n])
    if n >= 8:
        struct.pack_into("<I", out, 4, n)
    return bytes(out)


host_bytes = st.one_of(st.binary(max_size=300), structured(RNDIS_TYPES), structured(NVSP_TYPES),
                       structured(VSTOR_OPS), rndis_message(),
                       rndis_message().flatmap(lambda m: st.integers(0, len(m)).map(
                           lambda n: _cut(m, n))))


def only_uvmbus_errors(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except UvmbusError as exc:
        assert str(exc), f"{fn.__name__}: an error without a message"
        return exc


def all_parsers(data: bytes) -> None:
    # netvsc
    m = only_uvmbus_errors(NP.parse_nvsp, data)
    if isinstance(m, NP.NvspMessage):
        assert m.type == struct.unpack_from("<I", data)[0]
    only_uvmbus_errors(NP.nvsp_type, data)
    r = only_uvmbus_errors(NP.parse_rndis, data)
    if isinstance(r, NP.RndisMessage):
        assert 8 <= r.length <= len(data) and len(r.info) <= r.length
    p = only_uvmbus_errors(NP.parse_rndis_packet, data)
    if isinstance(p, NP.RxPacket):
        assert len(p.frame) <= len(data)
    if NP.nvsp_type(data) == NP.MSG_SEND_INDIRECTION_TABLE:     # its caller checks the type
        for v in (NP.NVSP_V6, NP.NVSP_V61):
            t = only_uvmbus_errors(NP.send_table_from, data, v)
            if isinstance(t, list):
                assert len(t) == 16
    only_uvmbus_errors(NP.parse_ndis_offload, data)
    only_uvmbus_errors(NP.parse_offload_params, data)
    only_uvmbus_errors(NP.parse_rss_caps, data)
    rp = only_uvmbus_errors(NP.parse_rss_params, data)
    if isinstance(rp, NP.RssParams):
        assert 4 * len(rp.table) + len(rp.key) <= 2 * len(data)
    # storvsc
    vp = only_uvmbus_errors(SP.parse_packet, data)
    if isinstance(vp, SP.VstorPacket):
        only_uvmbus_errors(vp.properties)
        assert 0 <= vp.version() <= 0xFFFF
        assert isinstance(vp.op_name, str) and vp.ok in (True, False)
    only_uvmbus_errors(SP.ChannelProperties.from_bytes, data)
    srb = SP.parse_srb(data)
    assert len(srb.sense()) <= 20
    # SCSI data-in (the host fills the buffer and says how much it moved)
    for fn in (scsi.parse_inquiry, scsi.parse_vpd_supported, scsi.parse_vpd_serial,
               scsi.parse_vpd_device_ids, scsi.parse_vpd_block_limits, scsi.parse_vpd_rotation_rate,
               scsi.parse_vpd_lbp, scsi.parse_report_luns, scsi.parse_read_capacity10,
               scsi.parse_read_capacity16, scsi.parse_vpd_block_characteristics,
               scsi.parse_vpd_third_party_copy, scsi.parse_mode_pages, scsi.parse_lba_status,
               scsi.parse_supported_opcodes, scsi.parse_one_opcode, scsi.parse_pr_keys,
               scsi.parse_pr_reservation, scsi.parse_pr_capabilities, scsi.parse_pr_full_status):
        only_uvmbus_errors(fn, data)
    only_uvmbus_errors(lambda d: scsi.parse_mode_pages(d, ten=True), data)
    only_uvmbus_errors(lambda d: scsi.parse_lba_status(d, blocks=1000), data)
    scsi.parse_caching_page(data)
    scsi.parse_control_page(data)
    s = scsi.parse_sense(data)
    if s is not None:
        str(s)
        e = scsi.sense_exception(s, "fuzz", srb_status=data[0] if data else 0)
        assert isinstance(e, UvmbusError)
    if len(data) >= 8:
        only_uvmbus_errors(scsi.decode_lun, data[:8])
    for x in data[:4]:
        SP.srb_status_name(x)
        SP.op_name(x)
    SP.ntstatus_name(struct.unpack_from("<I", data.ljust(4, b"\0"))[0])


@FAST
@given(host_bytes)
def test_fuzz_host_message_parsers(data: bytes) -> None:
    all_parsers(data)


@pytest.mark.slow
@SLOW
@given(host_bytes)
def test_fuzz_host_message_parsers_slow(data: bytes) -> None:
    all_parsers(data)


def test_rndis_packet_with_a_short_ppi_area_is_a_protocol_error() -> None:
    """Found by the fuzzer: PPIs at the end of the message, their area shorter than one
    element header, made parse_rndis_packet raise struct.error."""
    msg = bytearray(NP.rndis_packet(bytes(20)) + bytes(4))
    struct.pack_into("<I", msg, 4, len(msg))
    struct.pack_into("<II", msg, 28, 36 + 20, 4)            # 4 bytes of PPI after the frame
    with pytest.raises(UvmbusError, match="per-packet info"):
        NP.parse_rndis_packet(bytes(msg))


# ---- the netvsc driver's control-record dispatch ------------------------------------------

def _bare_nic(strict: bool) -> Nic:
    """A Nic with the state its dispatch uses and nothing else (no device)."""
    nic = object.__new__(Nic)
    nic.strict = strict
    nic._responses = {}
    nic._completions = {}
    nic._send_failures = 0
    nic.send_table = []
    nic.link_up = True
    nic.link_speed = 0
    nic.nvsp_version = NP.NVSP_V61
    nic.events = {"link_changes": 0, "unknown_messages": 0, "vf_associations": 0,
                  "offload_indications": 0, "network_changes": 0,
                  "vf_host_switches": 0, "vf_switch_backs": 0}
    nic.sriov = True
    nic.vf_allocated = False
    nic.vf_serial = None
    nic.data_path = NP.DATA_PATH_SYNTHETIC
    nic._async_tids = set()
    nic._switch_back_owed = False
    nic._vf_cbs = []
    nic.closed = True          # nothing is sent from a bare Nic (an owed switch-back stays owed)
    nic.last_host_error = ""
    nic._link_cbs = []
    nic.cd = types.SimpleNamespace(device=types.SimpleNamespace(device_id="f022" * 8))
    return nic


class _Records:
    """Stands in for a Queue: hands out the given control records (as the C queue would)."""

    def __init__(self, records: list[tuple[int, bytes, int]]):
        self.records = list(records)

    def next(self, raw: Any, rec: Any, buf: Any, buflen: int) -> int:
        if not self.records:
            return 0
        kind, data, tid = self.records.pop(0)
        rec.kind, rec.trans_id = kind, tid
        n = min(len(data), buflen)
        ffi.memmove(buf, data, n)
        rec.len = n
        return n or 1


record = st.tuples(st.sampled_from([lib.UVB_NVSC_CTRL_RNDIS, lib.UVB_NVSC_CTRL_INBAND,
                                    lib.UVB_NVSC_CTRL_COMP, lib.UVB_NVSC_CTRL_SENDFAIL]),
                   host_bytes, st.integers(0, 2**64 - 1))


class _Lib:
    """``lib`` for uvmbus.netvsc.nic with uvb_nvsc_ctrl_next replaced."""

    def __init__(self, ctrl_next: Callable[..., int]):
        self.uvb_nvsc_ctrl_next = ctrl_next

    def __getattr__(self, name: str) -> Any:
        return getattr(lib, name)


def dispatch(records: list[tuple[int, bytes, int]], strict: bool) -> None:
    nic = _bare_nic(strict)
    src = _Records(records)
    q = types.SimpleNamespace(raw=None)
    logging.disable(logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nicmod, "lib", _Lib(src.next))
            while src.records:
                try:
                    nic._dispatch(q)  # type: ignore[arg-type]
                except UvmbusError as exc:           # strict mode: a named protocol error
                    assert strict and str(exc)
    finally:
        logging.disable(logging.NOTSET)
    assert nic.link_up in (True, False)
    assert len(nic.send_table) in (0, 16)


@FAST
@given(st.lists(record, max_size=8), st.booleans())
def test_fuzz_nic_control_dispatch(records: list, strict: bool) -> None:
    dispatch(records, strict)


@pytest.mark.slow
@SLOW
@given(st.lists(record, max_size=8), st.booleans())
def test_fuzz_nic_control_dispatch_slow(records: list, strict: bool) -> None:
    dispatch(records, strict)

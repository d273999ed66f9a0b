"""Replay (`uvmbus sim --replay`): recordings of this project's netvsc bring-ups and of a
storvsc `blk info` session (with the data its reads brought) under tests/data/ play the
host side against the current driver; a driver made to send a
different message fails, and the report names the first divergent message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

import uvmbus.netvsc as nv
from uvmbus.errors import UvmbusError
from uvmbus.netvsc import protocol as P
from uvmbus.trace.decode import HDR, decode, read_records

DATA = Path(__file__).resolve().parent / "data"
RECORDINGS = {"netvsc-bringup.pcapng": 1, "netvsc-4queues.pcapng": 4}


@pytest.mark.parametrize("name", sorted(RECORDINGS))
def test_recorded_bringup_replays_against_the_current_driver(tmp_path, name):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(DATA / name)) as sim:
        dev = sim.device("netvsc")["device_id"]
        sim.bind(dev)
        out = subprocess.run([sys.executable, "-m", "uvmbus", "net", "info", dev, "--root", str(sim.root),
                              "--queues", str(RECORDINGS[name]), "--timeout", "10", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        r = sim.device_stats(dev)["replay"]
        assert r["status"] == "complete" and r["divergence"] is None, r
        assert sim.totals()["needless_signals"] == 0
    # exit status 0: everything recorded was replayed


def test_recorded_storvsc_session_replays_with_its_read_data(tmp_path):
    """`blk info` parses what its reads brought (REPORT LUNS, INQUIRY, READ CAPACITY, VPD
    pages): the recording holds those bytes (EV_DATA) and the replay gives them back, so the
    whole session replays and the driver reports the recorded disk."""
    trace = DATA / "storvsc-info.pcapng"
    recorded = [m for m in read_trace(trace) if m.name == "EVENT DATA"]
    assert len(recorded) >= 5 and all(m.fields["recorded"] == m.fields["transferred"] for m in recorded)
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(trace)) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        out = subprocess.run([sys.executable, "-m", "uvmbus", "blk", "info", dev, "--root", str(sim.root),
                              "--timeout", "10", "--json"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        r = sim.device_stats(dev)["replay"]
        assert r["status"] == "complete" and r["divergence"] is None, r
        assert r["reads_given_back"] == len(recorded)
        assert sim.totals()["needless_signals"] == 0
    info = json.loads(out.stdout)
    (lun,) = info["luns"]
    assert (lun["lun"], lun["size"], lun["block_size"]) == (0, 4 << 20, 512)
    assert (lun["vendor"], lun["product"]) == ("Msft", "Virtual Disk")
    assert "0xb0" in lun["vpd_pages"] and lun["device_ids"]


def test_a_storvsc_recording_without_read_data_stops_at_the_first_parsed_read(tmp_path):
    """The same session recorded with --no-payload (no read data): the replay gives the driver
    zeros, so it stops early and the recording is reported as not played to its end."""
    src = DATA / "storvsc-info.pcapng"
    stripped = tmp_path / "nodata.pcapng"
    _without_data_events(src, stripped)
    assert not [m for m in read_trace(stripped) if m.name == "EVENT DATA"]
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(stripped), check_exit=False) as sim:
        dev = sim.device("storvsc")["device_id"]
        sim.bind(dev)
        subprocess.run([sys.executable, "-m", "uvmbus", "blk", "info", dev, "--root", str(sim.root),
                        "--timeout", "5", "--json"], capture_output=True, text=True, timeout=120)
        r = sim.device_stats(dev)["replay"]
        assert r["status"] != "complete" and r["reads_given_back"] == 0, r


def read_trace(path: Path) -> list:
    return [decode(i, r) for i, r in enumerate(read_records(path))]


def _without_data_events(src: Path, dst: Path) -> None:
    """Copy a pcapng trace without its EV_DATA event blocks."""
    import struct

    from uvmbus.native import lib

    raw = src.read_bytes()
    out = bytearray()
    off = 0
    while off + 12 <= len(raw):
        btype, blen = struct.unpack_from("<II", raw, off)
        block = raw[off:off + blen]
        keep = True
        if btype == 6:                                   # Enhanced Packet Block
            body = block[28:]
            if len(body) >= HDR + 4 and body[1] == lib.UVB_TRACE_KIND_EVENT:
                code, = struct.unpack_from("<I", body, HDR)   # uvb_trace_hdr, then the event
                keep = code != lib.UVB_TRACE_EV_DATA
        if keep:
            out += block
        off += blen
    dst.write_bytes(bytes(out))


def test_replay_names_the_first_divergent_message(tmp_path):
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(DATA / "netvsc-bringup.pcapng"),
                 check_exit=False) as sim:
        dev = sim.device("netvsc")["device_id"]
        sim.bind(dev)
        # the driver made to send a different message: it proposes NVSP 5 instead of 6.1
        with pytest.raises(UvmbusError):
            nv.open(dev, sim.root, versions=(P.NVSP_V5,), timeout=2)
        r = sim.device_stats(dev)["replay"]
        assert r["status"] == "diverged", r
        dv = r["divergence"]
        assert dv["message"] == 1 and dv["subchannel"] == 0
        assert "NVSP INIT min_protocol_ver=393217" in dv["expected"]
        assert "NVSP INIT min_protocol_ver=327680" in dv["got"]
    assert sim.proc.returncode == 3
    assert "first divergence at recorded message #1" in "".join(getattr(sim, "_stderr", []))


def test_replay_of_a_file_without_devices_is_refused(tmp_path):
    from uvmbus.trace import Recorder

    empty = tmp_path / "empty.pcapng"
    Recorder(empty).close()
    out = subprocess.run([sys.executable, "-m", "uvmbus", "sim", "--root", str(tmp_path / "r"), "--replay", str(empty)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no netvsc or storvsc packets to replay" in out.stderr


def _cut(src: Path, dst: Path, n: int) -> int:
    """Copy the first n bytes of a trace; returns the offset of the block the cut falls in."""
    data = src.read_bytes()
    dst.write_bytes(data[:n])
    at = 0
    while at + int.from_bytes(data[at + 4:at + 8], "little") <= n:
        at += int.from_bytes(data[at + 4:at + 8], "little")
    return at


def test_a_truncated_trace_is_reported_by_show_diff_and_replay(tmp_path):
    import json

    from uvmbus.trace import pcapng

    whole = DATA / "netvsc-bringup.pcapng"
    cut = tmp_path / "t.pcapng"
    at = _cut(whole, cut, 3000)
    assert 0 < at < 3000
    st = pcapng.ReadStatus()
    with open(cut, "rb") as f:
        n = len(list(pcapng.read(f, "t", st)))
    assert st.truncated and st.truncated_at == at and st.size == 3000 and n > 0
    st = pcapng.ReadStatus()
    with open(whole, "rb") as f:
        list(pcapng.read(f, "w", st))
    assert not st.truncated and st.size == whole.stat().st_size

    uv = [sys.executable, "-m", "uvmbus", "trace"]
    show = subprocess.run([*uv, "show", str(cut)], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and show.stdout
    assert f"is truncated: the block at byte {at} is cut off" in show.stderr, show.stderr
    show = subprocess.run([*uv, "show", "--json", str(cut)], capture_output=True, text=True, timeout=60)
    j = json.loads(show.stdout)
    assert j["truncated"] is True and j["truncated_at"] == at and j["messages"]
    show = subprocess.run([*uv, "show", "--json", str(whole)], capture_output=True, text=True, timeout=60)
    j = json.loads(show.stdout)
    assert j["truncated"] is False and j["truncated_at"] is None and not show.stderr

    d = subprocess.run([*uv, "diff", str(whole), str(cut)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 2 and "--allow-truncated" in d.stderr and f"byte {at}" in d.stderr, d.stderr
    d = subprocess.run([*uv, "diff", "--json", str(cut), str(whole)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 2 and json.loads(d.stdout)["left_trace"]["truncated_at"] == at
    d = subprocess.run([*uv, "diff", "--allow-truncated", "--json", str(whole), str(cut)],
                       capture_output=True, text=True, timeout=60)
    j = json.loads(d.stdout)
    assert d.returncode == 1 and j["truncated"] is True and j["right_trace"]["truncated"] is True
    assert j["differences"] and j["differences"][-1]["op"] == "delete"       # the missing tail
    d = subprocess.run([*uv, "diff", str(whole), str(whole)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0 and not d.stderr

    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--replay", str(cut), check_exit=False) as sim:
        assert sim.device("netvsc")
    assert f"is truncated: the block at byte {at} is cut off" in "".join(getattr(sim, "_stderr", []))

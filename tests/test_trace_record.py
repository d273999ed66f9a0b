"""Recording VMBus sessions (uvmbus.trace): the C recorder, pcapng files, rotation, the
guest hooks (record= on netvsc/storvsc), `uvmbus sim --record`, `trace show` and `trace diff`."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

import uvmbus.netvsc as nv
import uvmbus.storvsc as sv
from uvmbus.errors import ConfigError, TraceError
from uvmbus.native import lib
from uvmbus.netvsc import protocol as P
from uvmbus.trace import Recorder, pcapng
from uvmbus.trace.decode import decode_file
from uvmbus.trace.diff import diff

UVMBUS = [sys.executable, "-m", "uvmbus"]


def inband(payload: bytes, tid: int = 7, type: int = 6) -> bytes:
    """A ring packet (descriptor + payload, padded to 8)."""
    pad = -len(payload) % 8
    n8 = (16 + len(payload) + pad) // 8
    return (type.to_bytes(2, "little") + (2).to_bytes(2, "little") + n8.to_bytes(2, "little")
            + (0).to_bytes(2, "little") + tid.to_bytes(8, "little") + payload + b"\0" * pad)


def test_recorder_writes_pcapng_that_reads_back(tmp_path):
    path = tmp_path / "t.pcapng"
    with Recorder(path, comment="unit") as rec:
        p0 = rec.port(5, devclass="netvsc", instance="abc")
        p1 = rec.port(6, subchan=1, devclass="storvsc")
        p0.packet(inband((1).to_bytes(4, "little") + bytes(36)), to_host=True)
        p1.event(lib.UVB_TRACE_EV_INTERRUPT, 3, text="hello", to_host=False)
        assert not (tmp_path / "t.pcapng").exists()          # written as .part until complete
    assert rec.files == [path]
    with open(path, "rb") as f:
        recs = list(pcapng.read(f))
    assert [r.iface for r in recs] == [0, 1]
    assert recs[0].interface.name == "netvsc/5" and "instance abc" in recs[0].interface.description
    msgs = decode_file(path)
    assert msgs[0].name == "NVSP INIT" and msgs[0].dir == "g2h" and msgs[0].relid == 5
    assert msgs[1].name == "EVENT INTERRUPT" and msgs[1].fields["text"] == "hello" and msgs[1].subchan == 1
    if shutil.which("capinfos"):
        out = subprocess.run(["capinfos", "-c", "-E", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "USER 0" in out.stdout and "2" in out.stdout, out.stdout + out.stderr


def test_rotation_by_size_and_bad_options(tmp_path):
    """A tight loop, never flushed by hand: C starts each next file itself, so every file
    stays within the size (blocks are never split), holds every interface it uses (a port
    added while recording too), and no record is lost."""
    path = tmp_path / "r.pcapng"
    size = 64 * 1024
    rec = Recorder(path, rotate_bytes=size, buffer_bytes=65536, flush_interval=3600)
    ports = [rec.port(1, devclass="netvsc")]
    pkt = inband(bytes(400))
    sent = {0: 0, 1: 0}
    for i in range(4000):                # ~1.9 MiB of records
        if i == 1500:
            ports.append(rec.port(2, subchan=1, devclass="netvsc"))
        k = i % len(ports)
        ports[k].packet(pkt + i.to_bytes(8, "little"), to_host=bool(i & 1))
        sent[k] += 1
    rec.close()
    assert rec.stats()["dropped"] == 0 and rec.stats()["rotate_errors"] == 0
    assert len(rec.files) > 20 and rec.files[0] == path and rec.files[1].name == "r.1.pcapng"
    assert not list(tmp_path.glob("*.part"))
    got = {0: 0, 1: 0}
    seq = []
    for f in rec.files:
        assert f.stat().st_size <= size, (f, f.stat().st_size)
        with open(f, "rb") as fh:
            recs = list(pcapng.read(fh))
        assert recs                                          # each file self-contained
        for r in recs:
            got[int(r.interface.name == "netvsc/2")] += 1
            seq.append(int.from_bytes(r.data[-8:], "little"))
        if shutil.which("capinfos"):
            out = subprocess.run(["capinfos", "-c", "-M", str(f)], capture_output=True, text=True)
            assert out.returncode == 0 and f"Number of packets:   {len(recs)}" in out.stdout, out.stdout + out.stderr
    assert got == sent and seq == list(range(4000))
    with pytest.raises(ConfigError, match="pcapng"):
        Recorder(tmp_path / "x.pcap")
    with pytest.raises(ConfigError, match="snap"):
        Recorder(tmp_path / "x.pcapng", snaplen=-1)
    (tmp_path / "bad.pcapng").write_bytes(b"not a trace at all")
    with pytest.raises(TraceError, match="not a pcapng"):
        decode_file(tmp_path / "bad.pcapng")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The acceptance session: `net info`, a short `net bench` and `blk info` + `blk write` +
    `blk read`, each recorded by the guest (--record), all recorded by the host
    (`uvmbus sim --record`); plus API recordings (record=) and a bring-up with NVSP 5 only.
    Returns the directory holding the traces."""
    d = tmp_path_factory.mktemp("trrec")
    (d / "in.bin").write_bytes(bytes(range(256)) * 16)
    with run_sim(d, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback",
                 "--disk", f"{d / 'disk.img'}:size=8M", "--record", str(d / "host.pcapng")) as sim:
        for dev in sim.devices:
            sim.bind(dev["device_id"])
        nic, disk = sim.device("netvsc")["device_id"], sim.device("storvsc")["device_id"]
        root = ["--root", str(sim.root)]
        runs = [["net", "info", nic, "--record", str(d / "a.pcapng")],
                ["net", "info", nic, "--record", str(d / "b.pcapng")],
                ["net", "bench", nic, "--mode", "tx", "--seconds", "0.2", "--burst", "8",
                 "--record", str(d / "bench.pcapng"), "--snaplen", "128"],
                ["blk", "info", disk, "--record", str(d / "blkinfo.pcapng")],
                ["blk", "write", disk, "-i", str(d / "in.bin"), "--record", str(d / "blkw.pcapng")],
                ["blk", "read", disk, "--length", "4096", "-o", str(d / "out.bin"), "--record", str(d / "blkr.pcapng")]]
        for argv in runs:
            out = subprocess.run([*UVMBUS, *argv, *root], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, (argv, out.stderr)
        frame = b"\x00\x15\x5d\x00\x00\x01" * 2 + b"\x88\xb5" + bytes(50)
        with nv.open(nic, sim.root, record=d / "api.pcapng") as n:
            assert n.tx_burst([frame] * 3, timeout=5) == 3
            assert n.recorder is not None
        with nv.open(nic, sim.root, versions=(P.NVSP_V5,), record=d / "v5.pcapng"):
            pass
        with sv.open(disk, sim.root, record=str(d / "apiblk.pcapng")) as hba:
            lun = hba.luns[0]
            lun.write(0, b"\xab" * 4096)
            assert lun.read(0, 4096) == b"\xab" * 4096
    assert (d / "host.pcapng").exists()          # complete once the simulator stopped
    assert (d / "out.bin").read_bytes() == (d / "in.bin").read_bytes()[:4096]
    return d


def test_guest_records_netvsc_and_storvsc(session):
    msgs = decode_file(session / "api.pcapng")
    names = [m.summary() for m in msgs]
    assert names[0] == "NVSP INIT" and names[1] == "NVSP INIT_COMPLETE"
    assert "NVSP SEND_RNDIS_PKT / RNDIS INIT" in names
    assert any(s.startswith("NVSP SEND_RNDIS_PKT / RNDIS QUERY OID_802_3_PERMANENT_ADDRESS") for s in names)
    assert any("RNDIS SET OID_GEN_CURRENT_PACKET_FILTER" in s for s in names)
    assert any("RNDIS PACKET" in s for s in names)            # the frames, from send sections
    assert all(not m.problems for m in msgs), [m.problems for m in msgs if m.problems]
    assert {m.side for m in msgs} == {"guest"}
    names = [m.name for m in decode_file(session / "apiblk.pcapng")]
    assert names[0] == "VSTOR BEGIN_INITIALIZATION"
    assert "VSTOR QUERY_PROTOCOL_VERSION" in names and "VSTOR END_INITIALIZATION" in names
    assert "VSTOR EXECUTE_SRB INQUIRY" in names and "VSTOR EXECUTE_SRB REPORT_LUNS" in names
    assert any(n.startswith("VSTOR EXECUTE_SRB WRITE") for n in names)
    assert any(n.startswith("VSTOR EXECUTE_SRB READ") and "CAPACITY" not in n for n in names)


def test_diff_same_bringup_and_another_nvsp_version(session):
    r = subprocess.run([*UVMBUS, "trace", "diff", str(session / "a.pcapng"), str(session / "b.pcapng")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("no differences"), r.stdout
    r = subprocess.run([*UVMBUS, "trace", "diff", "--json", str(session / "a.pcapng"), str(session / "v5.pcapng")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    diffs = json.loads(r.stdout)["differences"]
    # the version proposal differs, and the NDIS config capabilities: the RSC bit (0x80) is
    # declared at 6.1 only, as Linux does; the rest of the bring-up is the same (NDIS 6.30)
    assert len(diffs) == 2 and all(d["op"] == "replace" for d in diffs), diffs
    assert all(len(d["left"]) == len(d["right"]) == 1 for d in diffs)
    assert "NVSP INIT min_protocol_ver=393217" in diffs[0]["left"][0]
    assert "NVSP INIT min_protocol_ver=327680" in diffs[0]["right"][0]
    assert "SEND_NDIS_CONFIG mtu=1514 capability=172" in diffs[1]["left"][0]     # 0x80 | 0x2C
    assert "SEND_NDIS_CONFIG mtu=1514 capability=44" in diffs[1]["right"][0]
    show = subprocess.run([*UVMBUS, "trace", "show", "--json", str(session / "a.pcapng")],
                          capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["messages"][0]["name"] == "NVSP INIT" and shown["truncated"] is False


def test_host_side_records_packets_and_events(session):
    msgs = decode_file(session / "host.pcapng")
    assert {m.side for m in msgs} == {"host"}
    names = {m.name for m in msgs}
    assert "NVSP INIT" in names and "VSTOR BEGIN_INITIALIZATION" in names
    assert "EVENT IRQCONTROL" in names or "EVENT SIGNAL" in names
    assert "EVENT INTERRUPT" in names and "EVENT MASK" in names
    # the host sees the RNDIS messages too (send sections and receive buffer are shared)
    assert any(r["name"] == "RNDIS INIT" for m in msgs for r in m.inner)
    assert all(not m.problems for m in msgs), [m.problems for m in msgs if m.problems][:3]


TSHARK = shutil.which("tshark")
LIMIT = 3000          # records of the (large) bench trace given to tshark


def tshark(path: Path, *args: str) -> list[str]:
    from uvmbus.trace.wireshark import dissector_path

    out = subprocess.run([TSHARK or "tshark", "-n", "-X", f"lua_script:{dissector_path()}", "-r", str(path), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Lua" not in out.stderr or "error" not in out.stderr.lower(), out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (.ci/install-deps installs it)")
def test_tshark_dissects_every_packet_of_both_sides(session):
    files = ["a.pcapng", "bench.pcapng", "blkinfo.pcapng", "blkw.pcapng", "blkr.pcapng", "host.pcapng"]
    for name in files:
        f = session / name
        with open(f, "rb") as fh:
            n = min(len(list(pcapng.read(fh))), LIMIT)
        # the bench frames are UDP from port 5000, which Wireshark hands to its TAPA
        # dissector: that one calls zero payloads malformed, so it is switched off
        rows = tshark(f, "-c", str(LIMIT), "--disable-protocol", "tapa",
                      "-T", "fields", "-e", "frame.number", "-e", "uvmbus.kind", "-e", "_ws.malformed")
        assert len(rows) == n and n > 0, name
        assert all(r.split("\t")[1] in ("1", "2") for r in rows), name          # every record dissected
        assert not any(r.split("\t")[2] for r in rows), f"malformed frames in {name}"
    net = tshark(session / "a.pcapng", "-T", "fields", "-e", "nvsp.type", "-e", "hv_rndis.type", "-e", "hv_rndis.oid")
    text = "\n".join(net)
    assert text.splitlines()[0].startswith("1\t")                                 # NVSP INIT
    info = "\n".join(tshark(session / "a.pcapng"))
    for want in ("NVSP INIT", "RNDIS INIT", "RNDIS QUERY OID_802_3_PERMANENT_ADDRESS",
                 "RNDIS SET OID_GEN_CURRENT_PACKET_FILTER", "RNDIS QUERY_C", "NVSP SEND_RECV_BUF_COMPLETE"):
        assert want in info, want
    blk = "\n".join(tshark(session / "blkw.pcapng") + tshark(session / "blkr.pcapng"))
    for want in ("VSTOR BEGIN_INITIALIZATION", "VSTOR QUERY_PROTOCOL_VERSION", "VSTOR QUERY_PROPERTIES",
                 "VSTOR END_INITIALIZATION", "VSTOR EXECUTE_SRB INQUIRY", "VSTOR EXECUTE_SRB REPORT_LUNS",
                 "VSTOR EXECUTE_SRB WRITE", "VSTOR EXECUTE_SRB READ"):
        assert want in blk, want
    # completions are paired with their requests by transaction id
    pairs = tshark(session / "a.pcapng", "-T", "fields", "-e", "frame.number", "-e", "vmbus.response_to")
    assert sum(1 for r in pairs if r.split("\t")[1]) >= 5
    # the frames went to Wireshark's Ethernet dissector
    eth = tshark(session / "api.pcapng", "-Y", "eth.type == 0x88b5", "-T", "fields", "-e", "frame.number")
    assert eth


def test_dissector_tables_match_the_wire_headers():
    from uvmbus.trace.wireshark.gen import current, render

    assert current() == render(), "run: python -m uvmbus.trace.wireshark.gen"
    out = subprocess.run([*UVMBUS, "trace", "dissector"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("uvmbus.lua") and Path(out.stdout.strip()).is_file()


def test_diff_names_the_difference():
    from uvmbus.trace.decode import Message

    def msg(name: str, **f: int) -> Message:
        return Message(0, 0, "netvsc/1", "guest", "g2h", "netvsc", 1, 0, "packet",
                       {"type_name": "INBAND", "flags": 1, "trans_id": 5}, "nvsp", name, dict(f))

    a = [msg("NVSP INIT", min_protocol_ver=0x60001), msg("NVSP SEND_RECV_BUF", gpadl_handle=1)]
    b = [msg("NVSP INIT", min_protocol_ver=0x50000), msg("NVSP SEND_RECV_BUF", gpadl_handle=2)]
    r = diff(a, b)
    assert len(r.hunks) == 1 and r.hunks[0][:3] == ("replace", 0, 1)
    assert diff(a, a).same


@pytest.mark.parametrize("no_payload", [False, True])
def test_send_section_attachment_snap_and_no_payload(tmp_path, no_payload):
    from uvmbus.native import ffi
    from uvmbus.trace.decode import HDR, fields

    sec = 6144
    buf = bytearray(4 * sec)
    frame = b"\x00\x15\x5d\x00\x00\x01" * 2 + b"\x88\xb5" + b"F" * 100
    rndis = P.rndis_packet(frame)
    buf[sec:sec + len(rndis)] = rndis                       # section 1 holds a data message
    query = P.rndis_query(7, P.OID_802_3_PERMANENT_ADDRESS)
    buf[2 * sec:2 * sec + len(query)] = query               # section 2 a control message
    cbuf = ffi.from_buffer(buf)
    path = tmp_path / "s.pcapng"
    with Recorder(path, snaplen=64, no_payload=no_payload) as rec:
        port = rec.port(3, devclass="netvsc")
        port.set_send_buffer(cbuf, len(buf), sec)
        for idx, msg in ((1, rndis), (2, query), (9, rndis)):          # 9: outside the buffer
            nvsp = struct.pack("<IIII", lib.NVSP_MSG1_TYPE_SEND_RNDIS_PKT, 0, idx, len(msg)) + bytes(24)
            port.packet(inband(nvsp), to_host=True)
    with open(path, "rb") as f:
        recs = list(pcapng.read(f))
    caps = []
    for r in recs:
        h = fields("struct uvb_trace_hdr", r.data)
        att = r.data[HDR + h["pkt_cap"]:]
        caps.append((h["flags"], fields("struct uvb_trace_chunk", att)["cap"] if att else None))
    hdr_len = 8 + struct.unpack_from("<I", rndis, 8)[0]     # RNDIS header + per-packet info
    assert caps[0][1] == (hdr_len if no_payload else 64)   # the frame: cut at the snap length / header
    assert caps[0][0] & lib.UVB_TRACE_F_ATT_TRUNC
    assert caps[1][1] == len(query)                         # a control message fits whole
    assert caps[2] == (lib.UVB_TRACE_F_ATT_LOST | (lib.UVB_TRACE_F_NO_PAYLOAD if no_payload else 0), None)
    msgs = decode_file(path)
    assert msgs[1].inner[0]["name"] == "RNDIS QUERY OID_802_3_PERMANENT_ADDRESS"


def test_trace_bench_reports_both_runs():
    from uvmbus.trace.bench import recorder_cost

    r = recorder_cost(size=64, seconds=0.05, rounds=1)
    assert r["mpps_without"] > 0 and r["mpps_with"] > 0 and r["bytes_per_record"] >= 32 + 32 + 16 + 64


def test_host_records_integration_service_messages(tmp_path):
    import signal
    import time

    host = tmp_path / "ic.pcapng"
    with run_sim(tmp_path, "--echo", "0", "--record", str(host)) as sim:
        p = subprocess.Popen([*UVMBUS, "ic", "run", "--root", str(sim.root)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while time.monotonic() < deadline and "ICMSG HEARTBEAT" not in names:
            time.sleep(0.5)
            part = host.with_name(host.name + ".part")
            names = {m.name for m in decode_file(part)} if part.exists() else set()
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    msgs = decode_file(host)
    assert {"ICMSG NEGOTIATE", "ICMSG HEARTBEAT"} <= {m.name for m in msgs}
    assert {m.devclass for m in msgs if m.name.startswith("ICMSG")} == {"ic"}
    assert not [m.problems for m in msgs if m.problems]
    if TSHARK:
        rows = tshark(host, "-T", "fields", "-e", "icmsg.ic_msg_hdr.icmsgtype", "-e", "_ws.malformed")
        assert any(r.split("\t")[0] == "1" for r in rows) and not any(r.split("\t")[1] for r in rows)


def test_a_failed_command_never_replaces_an_older_trace(tmp_path):
    """`--record FILE` on a command that fails keeps the older FILE; the new trace is named
    FILE-failed.pcapng (both for the simulator and a guest command)."""
    keep = tmp_path / "keep.pcapng"
    with Recorder(keep) as rec:
        rec.port(1, devclass="netvsc").packet(inband(bytes(40)), to_host=True)
    old = keep.read_bytes()
    out = subprocess.run([*UVMBUS, "sim", "--root", str(tmp_path / "r"), "--record", str(keep),
                          "--disk", str(tmp_path / "missing" / "x.img")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "does not exist" in out.stderr, out.stderr
    assert keep.read_bytes() == old
    assert (tmp_path / "keep-failed.pcapng").exists()
    (tmp_path / "keep-failed.pcapng").unlink()
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--disk", f"{tmp_path / 'disk.img'}:size=1M") as sim:
        disk = sim.device("storvsc")["device_id"]
        sim.bind(disk)
        out = subprocess.run([*UVMBUS, "blk", "read", disk, "--root", str(sim.root), "--offset", "2M",
                              "--length", "4096", "-o", str(tmp_path / "o.bin"), "--record", str(keep)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0, out.stdout
    assert keep.read_bytes() == old
    assert decode_file(tmp_path / "keep-failed.pcapng")          # the failed session's trace is kept
    with Recorder(keep):                                           # a success replaces it as before
        pass
    assert keep.read_bytes() != old


def test_net_bench_fwd_rotates_within_the_size(tmp_path):
    """The reviewer's case: `net bench --mode fwd --record --rotate` at full data-path rate.
    Every file is within SIZE (or holds one record larger than it), complete and readable."""
    size = 256 * 1024
    with run_sim(tmp_path, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback") as sim:
        for dev in sim.devices:
            sim.bind(dev["device_id"])
        nic = sim.device("netvsc")["device_id"]
        out = subprocess.run([*UVMBUS, "net", "bench", nic, "--mode", "fwd", "--seconds", "0.5",
                              "--record", str(tmp_path / "rot.pcapng"), "--rotate", "256K",
                              "--root", str(sim.root)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    files = sorted(tmp_path.glob("rot*.pcapng*"))
    assert len(files) >= 2 and not [f for f in files if f.name.endswith(".part")], files
    for f in files:
        with open(f, "rb") as fh:
            st = pcapng.ReadStatus()
            recs = list(pcapng.read(fh, str(f), st))
        assert recs and not st.truncated
        assert f.stat().st_size <= size or len(recs) == 1, (f, f.stat().st_size, len(recs))


@pytest.mark.parametrize(("hunk", "header"), [
    (("replace", 4, 6, 4, 7), "@@ -5,2 +5,3 @@ replace"),
    (("insert", 4, 4, 4, 5), "@@ -4,0 +5,1 @@ insert"),
    (("delete", 0, 1, 0, 0), "@@ -1,1 +0,0 @@ delete"),
])
def test_diff_hunk_header_is_unified_diff_style(hunk, header):
    from uvmbus.trace.diff import DiffResult

    left, right = [f"m{i}" for i in range(8)], [f"n{i}" for i in range(8)]
    assert DiffResult(left, right, [hunk]).lines()[0] == header


def test_host_fault_events_say_what_changed(tmp_path):
    """No FAULT event for a channel that simply starts fault-free; a set and a clear each
    give one, naming the fault."""
    from uvmbus.channel import open_device
    from uvmbus.ring import PKT_COMP

    trace = tmp_path / "host.pcapng"
    with run_sim(tmp_path, "--echo", "1", "--no-ic", "--record", str(trace)) as sim:
        dev = sim.device("echo")["device_id"]
        sim.bind(dev)
        with open_device(dev, sim.root) as cd:
            assert cd.primary.request(b"a", timeout=10).type == PKT_COMP
            sim.fault("slow_us", 1)
            assert cd.primary.request(b"b", timeout=10).type == PKT_COMP
            sim.clear_faults()
            assert cd.primary.request(b"c", timeout=10).type == PKT_COMP
    faults = [m.fields["text"] for m in decode_file(trace) if m.name == "EVENT FAULT"]
    assert faults == ["faults: slow_us=1", "faults cleared"], faults

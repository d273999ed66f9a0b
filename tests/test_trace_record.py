"""Recording VMBus sessions (uvmbus.trace): the C recorder, pcapng files, rotation, the
guest hooks (record= on netvsc/storvsc), `uvmbus sim --record`, `trace show` and `trace diff`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from simhelpers import run_sim

import uvmbus.netvsc as nv
import uvmbus.storvsc as sv
from uvmbus.errors import ConfigError, TraceError
from uvmbus.native import lib
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
    path = tmp_path / "r.pcapng"
    rec = Recorder(path, rotate_bytes=64 * 1024, buffer_bytes=65536)
    port = rec.port(1, devclass="netvsc")
    pkt = inband(bytes(400))
    for i in range(2000):                # ~900 KiB of records
        port.packet(pkt, to_host=bool(i & 1))
        if i % 100 == 0:
            rec.flush()
    rec.close()
    assert len(rec.files) > 3 and rec.files[0] == path and rec.files[1].name == "r.1.pcapng"
    total = 0
    for f in rec.files:
        with open(f, "rb") as fh:
            recs = list(pcapng.read(fh))
        assert recs and all(r.interface.name == "netvsc/1" for r in recs)   # each file self-contained
        total += len(recs)
    assert total == 2000
    with pytest.raises(ConfigError, match="pcapng"):
        Recorder(tmp_path / "x.pcap")
    with pytest.raises(ConfigError, match="snap"):
        Recorder(tmp_path / "x.pcapng", snaplen=-1)
    (tmp_path / "bad.pcapng").write_bytes(b"not a trace at all")
    with pytest.raises(TraceError, match="not a pcapng"):
        decode_file(tmp_path / "bad.pcapng")


@pytest.fixture(scope="module")
def rsim(tmp_path_factory):
    """A simulator recording the host side: a loopback NIC and a disk."""
    d = tmp_path_factory.mktemp("trrec")
    host = d / "host.pcapng"
    with run_sim(d, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback",
                 "--disk", f"{d / 'disk.img'}:size=8M", "--record", str(host)) as sim:
        for dev in sim.devices:
            sim.bind(dev["device_id"])
        sim.trace_dir = d
        sim.host_trace = host
        yield sim
    assert host.exists()


def test_guest_records_netvsc_and_storvsc(rsim):
    d = rsim.trace_dir
    nic = rsim.device("netvsc")["device_id"]
    frame = b"\x00\x15\x5d\x00\x00\x01" * 2 + b"\x08\x00" + bytes(50)
    with nv.open(nic, rsim.root, record=d / "net.pcapng") as n:
        assert n.tx_burst([frame] * 3, timeout=5) == 3
        assert n.recorder is not None
    msgs = decode_file(d / "net.pcapng")
    names = [m.summary() for m in msgs]
    assert names[0] == "NVSP INIT" and names[1] == "NVSP INIT_COMPLETE"
    assert "NVSP SEND_RNDIS_PKT / RNDIS INIT" in names
    assert any(s.startswith("NVSP SEND_RNDIS_PKT / RNDIS QUERY OID_802_3_PERMANENT_ADDRESS") for s in names)
    assert any("RNDIS SET OID_GEN_CURRENT_PACKET_FILTER" in s for s in names)
    assert any("RNDIS PACKET" in s for s in names)            # the frames, from send sections
    assert all(not m.problems for m in msgs), [m.problems for m in msgs if m.problems]
    assert {m.side for m in msgs} == {"guest"}
    disk = rsim.device("storvsc")["device_id"]
    with sv.open(disk, rsim.root, record=str(d / "blk.pcapng")) as hba:
        lun = hba.luns[0]
        lun.write(0, b"\xab" * 4096)
        assert lun.read(0, 4096) == b"\xab" * 4096
    names = [m.name for m in decode_file(d / "blk.pcapng")]
    assert names[0] == "VSTOR BEGIN_INITIALIZATION"
    assert "VSTOR QUERY_PROTOCOL_VERSION" in names and "VSTOR END_INITIALIZATION" in names
    assert "VSTOR EXECUTE_SRB INQUIRY" in names and "VSTOR EXECUTE_SRB REPORT_LUNS" in names
    assert any(n.startswith("VSTOR EXECUTE_SRB WRITE") for n in names)
    assert any(n.startswith("VSTOR EXECUTE_SRB READ") and "CAPACITY" not in n for n in names)


def test_cli_record_and_diff_of_two_bringups(rsim):
    d = rsim.trace_dir
    nic = rsim.device("netvsc")["device_id"]
    for name in ("a", "b"):
        out = subprocess.run([*UVMBUS, "net", "info", nic, "--root", str(rsim.root), "--json",
                              "--record", str(d / f"{name}.pcapng")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    r = subprocess.run([*UVMBUS, "trace", "diff", str(d / "a.pcapng"), str(d / "b.pcapng")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("no differences"), r.stdout
    show = subprocess.run([*UVMBUS, "trace", "show", "--json", str(d / "a.pcapng")],
                          capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)[0]["name"] == "NVSP INIT"


def test_host_side_records_events(rsim):
    # the host's file is complete only when the simulator stops: read what is flushed so far
    import time
    time.sleep(0.5)
    part = rsim.host_trace.with_name(rsim.host_trace.name + ".part")
    msgs = decode_file(part)
    assert {m.side for m in msgs} == {"host"}
    names = {m.name for m in msgs}
    assert "NVSP INIT" in names and "VSTOR BEGIN_INITIALIZATION" in names
    assert "EVENT IRQCONTROL" in names or "EVENT SIGNAL" in names
    assert "EVENT INTERRUPT" in names
    # the host sees the RNDIS messages too (send sections and receive buffer are shared)
    assert any(r["name"] == "RNDIS INIT" for m in msgs for r in m.inner)


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

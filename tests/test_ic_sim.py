"""`uvmbus ic run` against the simulator's IC host models, end to end (with no capabilities at
all when root, as uvmbus-ic.service runs it): version negotiation
with new, old and incompatible hosts, heartbeat answered without a miss, a file copied in
(content and mode; traversal refused), a shutdown request reaching the action, KVP round trips
and the IP query, faults (truncated messages, oversized names), the devices given back to
hv_utils at exit, and no needless signals.

The heartbeat runs for ``UVMBUS_IC_HEARTBEAT_SECONDS`` (default 3; `make ic-soak` runs minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simhelpers import run_sim

from uvmbus.bus import Bus
from uvmbus.services.daemon import call_control

pytestmark = pytest.mark.timeout(int(os.environ.get("UVMBUS_IC_HEARTBEAT_SECONDS", "3")) + 150)

UVMBUS = [sys.executable, "-m", "uvmbus"]
HEARTBEAT_SECONDS = float(os.environ.get("UVMBUS_IC_HEARTBEAT_SECONDS", "3"))


def ctl_cli(sim, *args: str, check: bool = True) -> dict:
    """`uvmbus sim ctl --json ic DEVICE OP ...` as a user runs it."""
    p = subprocess.run([*UVMBUS, "sim", "ctl", "--root", str(sim.root), "--json", "ic", *args],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, f"ctl ic {args}: rc {p.returncode}\n{p.stdout}{p.stderr}"
    return json.loads(p.stdout) if p.stdout.strip() else {"rc": p.returncode, "stderr": p.stderr}


def ctl(sim, device: str, op: str, *kv: str, check: bool = True, wait: float = 30.0) -> dict:
    """The same operation through the control socket in-process (what the CLI does, without
    a Python start-up per call): the ticket is polled until the guest answered."""
    args = dict(a.split("=", 1) for a in kv)
    res = sim.control("model", device=device, op=op, args=args)["results"][device]
    if "ticket" in res:
        ticket = res["ticket"]
        deadline = time.monotonic() + wait
        while not (res := sim.control("model", device=device, op="result",
                                      args={"ticket": ticket})["results"][device])["done"]:
            assert time.monotonic() < deadline, f"{op}: no answer within {wait} s"
            time.sleep(0.02)
        if check:
            assert res["status"] == 0, f"{op} {kv}: {res}"
    return res


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def no_capabilities() -> list[str]:
    """A command prefix dropping every capability (uvmbus-ic.service's empty
    CapabilityBoundingSet=), when we are root and have setpriv; else nothing."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]


class IcDaemon:
    def __init__(self, sim, tmp: Path, services: str, *extra: str, prefix: list[str] | None = None):
        self.run_dir = tmp / "run"
        self.log = tmp / "ic.log"
        self.proc = subprocess.Popen(
            [*(prefix or []), *UVMBUS, "ic", "run", "--root", str(sim.root), "--services", services,
             "--run-dir", str(self.run_dir), *extra],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, text=True)
        self.sock = self.run_dir / f"ic-{services.replace(',', '+')}.sock"
        wait_for(lambda: self.sock.exists() and self._ready() or self.proc.poll() is not None,
                 60, "the IC daemon")
        assert self.proc.poll() is None, self.log.read_text()

    def _ready(self) -> bool:
        try:
            return call_control(self.sock, "status")["status"]["status"].startswith("serving")
        except Exception:
            return False

    def status(self) -> dict:
        return call_control(self.sock, "status")["status"]["services"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def devices_by_model(sim) -> dict[str, str]:
    return {d["model"]: d["device_id"] for d in sim.devices}


def test_ic_end_to_end(tmp_path):
    fc = tmp_path / "fc"
    fc.mkdir()
    marker = tmp_path / "shutdown.log"
    with run_sim(tmp_path / "sim", "--echo", "0", "--no-ic",
                 "--device", "heartbeat:interval=0.05,reply_timeout=5",
                 "--device", "shutdown", "--device", "timesync:interval=0.2,skew=2.5",
                 "--device", "kvp:reply_timeout=10", "--device", "fcopy") as sim:
        ids = devices_by_model(sim)
        d = IcDaemon(sim, tmp_path, "heartbeat,shutdown,timesync,kvp,fcopy",
                     "--fcopy-root", str(fc), "--kvp-dir", str(tmp_path / "kvp"),
                     "--shutdown-action", f"command:sh -c 'echo \"$0\" >> {marker}'",
                     prefix=no_capabilities())
        try:
            # -- negotiation with an OpenVMM-like host: the highest common versions ----------
            want = {"heartbeat": "3.0", "shutdown": "3.2", "timesync": "4.0", "kvp": "4.0", "fcopy": "1.1"}
            for name, ver in want.items():
                st = wait_for(lambda n=name: (s := ctl(sim, ids[n], "status"))["state"] == "ready" and s,
                              30, f"{name} negotiation")
                assert st["version"] == ver and st["framework"] == "3.0", (name, st)
            devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
            assert all(devs[n].driver == "uio_hv_generic" for n in want)

            # -- heartbeat: answered for a while without a miss ----------------------------------
            t0 = ctl(sim, ids["heartbeat"], "status")["counters"].get("beats", 0)
            time.sleep(HEARTBEAT_SECONDS)
            hb = ctl(sim, ids["heartbeat"], "status")
            assert hb["counters"].get("beats", 0) > t0
            assert hb["counters"].get("missed", 0) == 0 and hb["counters"].get("bad_beats", 0) == 0, hb
            print(f"heartbeat: {hb['counters']['beats'] - t0} beats in {HEARTBEAT_SECONDS:g} s, "
                  f"none missed; reply latency mean {hb['reply_ms']['mean']} ms, max {hb['reply_ms']['max']} ms")

            # -- file copy in: content and mode; traversal refused -------------------------------
            src = tmp_path / "src.bin"
            src.write_bytes(os.urandom(50_000))
            r = ctl_cli(sim, ids["fcopy"], "copy", f"src={src}", "path=/in/sub", "name=data.bin",
                        "create_path=1")
            assert r["status"] == 0 and r["bytes"] == r["size"] == 50_000, r
            out = fc / "in/sub/data.bin"
            assert out.read_bytes() == src.read_bytes() and (out.stat().st_mode & 0o777) == 0o744
            r = ctl(sim, ids["fcopy"], "copy", "data=x", "path=/in/sub", "name=data.bin", check=False)
            assert r["status_name"] == "ALREADY_EXISTS" and r["bytes"] == 0 and r["size"] == 1, r
            for path, name in (("/../../etc", "evil"), ("/in/../..", "evil"), ("/", "../evil")):
                r = ctl(sim, ids["fcopy"], "copy", "data=evil", f"path={path}", f"name={name}",
                        "create_path=1", "overwrite=1", check=False)
                assert r["status_name"] == "E_FAIL", r
            assert not list(tmp_path.glob("**/evil"))
            r = ctl(sim, ids["fcopy"], "copy", "data=abc", "path=/in", "name=c.txt", "cancel_after=0",
                    check=False)
            assert r.get("cancelled") and not (fc / "in/c.txt").exists()

            # -- shutdown reaches the action (after the reply) ------------------------------------
            r = ctl(sim, ids["shutdown"], "shutdown", "action=reboot")
            assert r["status"] == 0
            wait_for(lambda: marker.exists() and "reboot" in marker.read_text(), 20, "the shutdown action")

            # -- KVP round trips, pool files, the IP query ---------------------------------------
            assert ctl(sim, ids["kvp"], "kvp_set", "pool=0", "key=Role", "value=web-01")["status"] == 0
            assert ctl(sim, ids["kvp"], "kvp_get", "pool=0", "key=Role")["value"] == "web-01"
            items = ctl(sim, ids["kvp"], "kvp_enumerate", "pool=0")["items"]
            assert items == [["Role", "web-01"]]
            raw = (tmp_path / "kvp/.kvp_pool_0").read_bytes()
            assert raw[:5] == b"Role\0" and raw[512:519] == b"web-01\0" and len(raw) == 2560
            auto = dict(ctl(sim, ids["kvp"], "kvp_enumerate", "pool=2")["items"])
            assert auto["ProcessorArchitecture"] == os.uname().machine and "127.0.0.1" in auto["NetworkAddressIPv4"]
            assert ctl(sim, ids["kvp"], "kvp_delete", "pool=0", "key=Role")["status"] == 0
            assert ctl(sim, ids["kvp"], "kvp_get", "pool=0", "key=Role", check=False)["status_name"] == "E_FAIL"
            ip = ctl(sim, ids["kvp"], "kvp_ip", "mac=00:00:00:00:00:00")
            assert "127.0.0.1" in ip["ip_addr"].split(";"), ip

            # -- faults: a truncated message is dropped (no reply), the next one works ------------
            ctl(sim, ids["kvp"], "fault", "kind=truncate", "size=20", "timeout=1")
            r = ctl(sim, ids["kvp"], "kvp_get", "pool=0", "key=x", check=False)
            assert r.get("error") == "no reply", r
            assert ctl(sim, ids["kvp"], "kvp_set", "pool=1", "key=a", "value=b")["status"] == 0
            ctl(sim, ids["fcopy"], "fault", "kind=oversized_name")
            r = ctl(sim, ids["fcopy"], "copy", "data=x", "path=/", "name=n", check=False)
            assert r["status_name"] == "E_FAIL"
            st = d.status()
            assert st["kvp"]["counters"]["dropped_short"] == 1
            assert st["fcopy"]["counters"]["refused"] >= 4
            assert st["heartbeat"]["counters"]["beats"] >= hb["counters"]["beats"]

            # -- time sync: the host's skew is seen as the offset ----------------------------------
            assert st["timesync"]["offset"] == pytest.approx(2.5, abs=1.0)

            # -- renegotiation: an incompatible host fails, a good one recovers -------------------
            ctl(sim, ids["heartbeat"], "renegotiate", "versions=9.0")
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["state"] == "failed", 20, "failed negotiation")
            ctl(sim, ids["heartbeat"], "renegotiate", "versions=1.0/3.0")
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["state"] == "ready", 20, "renegotiation")
        finally:
            rc = d.stop()
        log = d.log.read_text()
        assert rc == 0, log
        devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
        for n in ("heartbeat", "shutdown", "timesync", "kvp"):
            assert devs[n].driver == "hv_utils", (n, devs[n].driver)
        assert devs["fcopy"].driver is None
        assert sim.totals()["needless_signals"] == 0, sim.needless_report()
        assert not list(fc.rglob(".*uvmbus-fcopy*"))


def test_ic_old_and_incompatible_hosts(tmp_path):
    with run_sim(tmp_path / "sim", "--echo", "0", "--no-ic",
                 "--device", "heartbeat:fw=1.0,versions=1.0,interval=0.1",
                 "--device", "shutdown:versions=1.0/3.0",
                 "--device", "kvp:versions=9.0") as sim:
        ids = devices_by_model(sim)
        d = IcDaemon(sim, tmp_path, "heartbeat,shutdown,kvp", "--kvp-dir", str(tmp_path / "kvp"),
                     "--shutdown-action", "log")
        try:
            hb = wait_for(lambda: (s := ctl(sim, ids["heartbeat"], "status"))["state"] == "ready" and s, 30)
            assert (hb["framework"], hb["version"]) == ("1.0", "1.0")
            sd = wait_for(lambda: (s := ctl(sim, ids["shutdown"], "status"))["state"] == "ready" and s, 30)
            assert sd["version"] == "3.0"
            # a 3.0 host cannot ask for a restart (flag added in 3.1)
            r = subprocess.run([*UVMBUS, "sim", "ctl", "--root", str(sim.root), "ic", ids["shutdown"],
                                "shutdown", "action=reboot"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "needs shutdown version 3.1" in r.stderr
            assert ctl(sim, ids["shutdown"], "shutdown", "action=poweroff")["status"] == 0
            kv = wait_for(lambda: (s := ctl(sim, ids["kvp"], "status"))["state"] == "failed" and s, 30)
            assert "negotiation failed" in kv["last_error"]
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["counters"].get("beats", 0) >= 3, 30)
            assert d.status()["kvp"]["counters"]["negotiate_failed"] == 1
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0, d.log.read_text()


def test_ic_bind_refused_leaves_devices_with_hv_utils(tmp_path):
    """Linux < 6.10: uio_hv_generic refuses the (non-monitored) IC channels; the daemon fails
    with the reason and every device stays with (or goes back to) hv_utils."""
    with run_sim(tmp_path / "sim", "--echo", "0", "--kernel", "6.9") as sim:
        p = subprocess.run([*UVMBUS, "ic", "run", "--root", str(sim.root), "--run-dir", str(tmp_path / "run"),
                            "--kvp-dir", str(tmp_path / "kvp"), "--bind-timeout", "2"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "6.10" in p.stderr, p.stderr
        devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
        for n in ("heartbeat", "shutdown", "timesync", "kvp"):
            assert devs[n].driver == "hv_utils", (n, devs[n].driver)
        assert not (tmp_path / "run" / "ic-heartbeat+shutdown+timesync+kvp.pid").exists()


def test_ic_reattaches_after_rescind_and_reoffer(tmp_path):
    """A rescinded IC device (issue 12 follow-up): the daemon reports it at once (status
    unhealthy with the reason, the service's device_lost), keeps serving the other services,
    and when the host offers the device again it takes it again and answers on the new channel
    (the host's heartbeats counted again, version renegotiated)."""
    with run_sim(tmp_path / "sim", "--echo", "0", "--no-ic",
                 "--device", "heartbeat:interval=0.05,reply_timeout=5", "--device", "kvp") as sim:
        ids = devices_by_model(sim)
        d = IcDaemon(sim, tmp_path, "heartbeat,kvp", "--kvp-dir", str(tmp_path / "kvp"),
                     "--reattach-timeout", "60")
        try:
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["state"] == "ready", 30, "negotiation")
            sim.rescind(ids["heartbeat"], reoffer_after=3.0)
            st = wait_for(lambda: (x := call_control(d.sock, "status")["status"])["healthy"] is False and x,
                          30, "unhealthy after the rescind")
            assert "device lost" in st["problem"] and "heartbeat" in st["problem"], st
            wait_for(lambda: call_control(d.sock, "status")["status"]["healthy"], 60, "reattached")
            svc = d.status()
            assert svc["heartbeat"]["reattaches"] == 1 and svc["heartbeat"]["device_lost"] is None, svc
            assert svc["kvp"]["reattaches"] == 0, svc
            # the new channel is served: negotiated again and beats answered with no miss
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["state"] == "ready", 30,
                     "negotiation on the re-offered channel")
            t0 = ctl(sim, ids["heartbeat"], "status")["counters"].get("beats", 0)
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["counters"].get("beats", 0) > t0 + 3,
                     30, "beats answered after the reattach")
            assert ctl(sim, ids["heartbeat"], "status")["counters"].get("missed", 0) == 0
            devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
            assert devs["heartbeat"].driver == "uio_hv_generic"
            assert d.proc.poll() is None, d.log.read_text()
        finally:
            rc = d.stop()
        log = d.log.read_text()
        assert rc == 0, log
        assert "device lost" in log and "reattached" in log, log
        devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
        assert devs["heartbeat"].driver == "hv_utils" and devs["kvp"].driver == "hv_utils", devs


def test_ic_rescind_ends_the_daemon_with_an_error(tmp_path):
    """A rescinded IC channel with no re-offer: after --reattach-timeout the daemon exits 1
    (systemd restarts it), giving the other devices back."""
    with run_sim(tmp_path / "sim", "--echo", "0") as sim:
        d = IcDaemon(sim, tmp_path, "heartbeat,kvp", "--kvp-dir", str(tmp_path / "kvp"),
                     "--reattach-timeout", "1")
        try:
            sim.rescind(sim.device("heartbeat")["device_id"])
            rc = d.proc.wait(60)
        finally:
            if d.proc.poll() is None:
                d.stop()
        log = d.log.read_text()
        assert rc == 1 and "rescinded" in log, log
        devs = {dv.class_name: dv for dv in Bus(sim.root).devices()}
        assert devs["kvp"].driver == "hv_utils" and "heartbeat" not in devs


def test_ic_run_records_the_session(tmp_path):
    """`uvmbus ic run --record`: every IC channel's packets land in one trace, and `uvmbus
    trace show` decodes them as ICMSG requests (host to guest) and in-place replies (guest to
    host, TRANSACTION|RESPONSE, same VMBus transaction id)."""
    trace = tmp_path / "ic.pcapng"
    with run_sim(tmp_path / "sim", "--echo", "0", "--no-ic",
                 "--device", "heartbeat:interval=0.05,reply_timeout=5",
                 "--device", "kvp:reply_timeout=10") as sim:
        ids = devices_by_model(sim)
        d = IcDaemon(sim, tmp_path, "heartbeat,kvp", "--kvp-dir", str(tmp_path / "kvp"),
                     "--record", str(trace))
        try:
            for name in ("heartbeat", "kvp"):
                wait_for(lambda n=name: ctl(sim, ids[n], "status")["state"] == "ready", 30,
                         f"{name} negotiation")
            assert ctl(sim, ids["kvp"], "kvp_set", "pool=0", "key=Role", "value=rec")["status"] == 0
            wait_for(lambda: ctl(sim, ids["heartbeat"], "status")["counters"].get("beats", 0) >= 3,
                     30, "three heartbeats")
        finally:
            rc = d.stop()
        log = d.log.read_text()
        assert rc == 0, log
        beats = ctl(sim, ids["heartbeat"], "status")["counters"]["beats"]
        assert not trace.with_name(trace.name + ".part").exists()

    p = subprocess.run([*UVMBUS, "trace", "show", "--json", str(trace)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    msgs = [m for m in json.loads(p.stdout)["messages"] if m["kind"] == "packet"]
    assert msgs and all(m["devclass"] == "ic" and m["proto"] == "icmsg" and not m["problems"]
                        for m in msgs), msgs[:5]
    by = {}
    for m in msgs:
        by.setdefault((m["iface"].split("/")[0], m["name"], m["dir"]), []).append(m)
    for dev in ("heartbeat", "kvp"):
        assert by.get((dev, "ICMSG NEGOTIATE", "h2g")) and by.get((dev, "ICMSG NEGOTIATE", "g2h")), \
            sorted(by)
    assert len(by[("heartbeat", "ICMSG HEARTBEAT", "g2h")]) >= beats
    # the KVP SET: the host's request and the guest's answer, paired by transaction id
    (req,) = by[("kvp", "ICMSG KVPEXCHANGE", "h2g")]
    (rep,) = by[("kvp", "ICMSG KVPEXCHANGE", "g2h")]
    assert rep["vmbus"]["trans_id"] == req["vmbus"]["trans_id"]
    assert (req["fields"]["icflags"], rep["fields"]["icflags"]) == (0x03, 0x05)
    assert rep["fields"]["status"] == 0
    assert (req["fields"]["icvermsg.major"], rep["fields"]["icvermsg.major"]) == (4, 4)  # KVP 4.0
    assert req["fields"]["pipe.msgsize"] == rep["fields"]["pipe.msgsize"]   # same length back
    # every heartbeat request the guest read was answered (at most the last one was in flight
    # when the daemon stopped)
    n_req = len(by[("heartbeat", "ICMSG HEARTBEAT", "h2g")])
    n_rep = len(by[("heartbeat", "ICMSG HEARTBEAT", "g2h")])
    assert n_req - 1 <= n_rep <= n_req, (n_req, n_rep)
    text = subprocess.run([*UVMBUS, "trace", "show", str(trace)], capture_output=True, text=True,
                          timeout=60).stdout
    assert "ICMSG KVPEXCHANGE" in text and "ICMSG HEARTBEAT" in text, text[:2000]

"""`uvmbus status`: devices and persisted bindings from the root, daemons found through the
run directory (control socket 0600, pidfile), other uvmbus processes through psutil."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from simhelpers import run_sim

from uvmbus.services.cli import main
from uvmbus.services.daemon import call_control, find_services
from uvmbus.services.status import _is_ours, _root_arg, collect_status, format_status

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _default_run_dir(monkeypatch):
    """Daemons and `status` must agree on <root>/run/uvmbus (no inherited overrides)."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("UVMBUS_RUN_DIR", raising=False)

FAKE = textwrap.dedent("""
    import sys
    from uvmbus.services.daemon import Daemon

    d = Daemon("net", root=sys.argv[1])
    d.install_signal_handlers()
    d.start(sys.argv[2])
    d.status_fn = lambda: {"queues": [{"queue": 0, "rx_packets": 11, "rx_bytes": 1100,
                                        "tx_packets": 22, "tx_bytes": 2200, "drops": 1}]}
    d.registry.counter("net_packets_total", "x", ("direction",)).labels("rx").set(11)
    d.ready("fake bridge")
    print("ready", flush=True)
    d.run()
    d.close()
""")


@pytest.mark.parametrize(("cmd", "kind"), [
    (["/usr/bin/python3", "-m", "uvmbus", "net", "bridge", "x", "--tap", "t"], "net bridge"),
    (["/opt/venv/bin/uvmbus", "blk", "export", "storvsc", "--port", "1"], "blk export"),
    (["/opt/venv/bin/python", "/opt/venv/bin/uvmbus", "sim", "--nic", "1"], "sim"),
    (["/usr/sbin/nbdkit", "--foreground", "python", "/x/uvmbus/services/nbdplugin.py", "ipc=/r"],
     "nbdkit (blk export)"),
    (["/opt/venv/bin/uvmbus", "list"], None),
    (["/usr/bin/python3", "-m", "http.server"], None),
    (["bash"], None),
    ([], None),
])
def test_process_recognition(cmd, kind):
    assert _is_ours(cmd) == kind


def test_status_with_a_running_daemon(tmp_path, capsys):
    with run_sim(tmp_path, "--echo", "1", "--no-ic") as sim:
        dev = sim.device("echo")["device_id"]
        sim.bind(dev)
        script = tmp_path / "fake.py"
        script.write_text(FAKE)
        p = subprocess.Popen([sys.executable, str(script), str(sim.root), dev], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run_dir = sim.root / "run" / "uvmbus"
            assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
            sock = run_dir / f"net-{dev}.sock"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            refs = find_services(run_dir)
            assert [(r.kind, r.device, r.pid) for r in refs] == [("net", dev, p.pid)]
            assert call_control(sock, "metrics")["text"].count("uvmbus_net_packets_total") >= 1

            st = collect_status(sim.root, sample=0.1)
            assert [d["device_id"] for d in st["devices"]] == [dev]
            assert st["devices"][0]["driver"] == "uio_hv_generic"
            svc = st["services"][0]
            assert svc["alive"] and svc["status"]["healthy"] and svc["status"]["status"] == "fake bridge"
            assert svc["process"]["rss_bytes"] > 0 and svc["process"]["cpu_percent"] is not None
            assert svc["status"]["metrics"]["uvmbus_net_packets_total"][0]["value"] == 11
            assert any(x["kind"] == "sim" and x["pid"] == sim.proc.pid for x in st["processes"])
            assert st["simulator"]["totals"]["needless_signals"] == 0
            text = format_status(st)
            assert "fake bridge" in text and "queue 0: rx 11 pkts/1100 B tx 22 pkts/2200 B" in text

            assert main(["status", "--root", str(sim.root), "--json", "--sample", "0"]) == 0
            js = json.loads(capsys.readouterr().out)
            assert js["services"][0]["pid"] == p.pid

            assert call_control(sock, "stop") == {"ok": True}
            assert p.wait(20) == 0
            assert list(run_dir.iterdir()) == []          # socket and pidfile removed
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_stale_pidfile_is_reported(tmp_path):
    run_dir = tmp_path / "run" / "uvmbus"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "blk-abc.pid").write_text(f"{dead.pid}\n")
    st = collect_status(tmp_path, sample=0)
    assert st["services"][0]["alive"] is False and "stale" in st["services"][0]["error"]
    assert "stale files" in format_status(st)


def test_second_daemon_for_the_same_device_is_refused(tmp_path):
    from uvmbus.errors import ConfigError
    from uvmbus.services.daemon import Daemon
    from uvmbus.services.sdnotify import Notifier

    run_dir = tmp_path / "run" / "uvmbus"
    run_dir.mkdir(parents=True)
    (run_dir / "net-dev.pid").write_text(f"{os.getppid()}\n")     # a live process
    d = Daemon("net", root=tmp_path, notifier=Notifier(None))
    with pytest.raises(ConfigError, match="already running"):
        d.start("dev")
    d2 = Daemon("net", root=tmp_path, notifier=Notifier(None))
    d2.start("other")
    try:
        assert (run_dir / "net-other.pid").read_text().strip() == str(os.getpid())
    finally:
        d2.close()


def test_status_shows_only_the_processes_of_its_root(tmp_path):
    """Other simulators on the machine are counted, not listed (listed with --all)."""
    with run_sim(tmp_path / "a", "--echo", "1", "--no-ic") as a, \
            run_sim(tmp_path / "b", "--echo", "1", "--no-ic") as b:
        st = collect_status(a.root, sample=0)
        pids = [p["pid"] for p in st["processes"]]
        assert a.proc.pid in pids and b.proc.pid not in pids
        assert st["other_roots"]["processes"] >= 1 and "list" not in st["other_roots"]
        text = format_status(st)
        assert f"pid {b.proc.pid} " not in text and "`uvmbus status --all` lists them" in text

        st = collect_status(a.root, sample=0, all_roots=True)
        other = {p["pid"]: p for p in st["other_roots"]["list"]}
        assert other[b.proc.pid]["root"] == os.path.realpath(b.root)
        assert f"pid {b.proc.pid} sim (root {os.path.realpath(b.root)})" in format_status(st)


@pytest.mark.parametrize(("cmd", "root"), [
    (["uvmbus", "sim", "--root", "/r1"], "/r1"),
    (["uvmbus", "sim", "--root=/r2", "--nic", "1"], "/r2"),
    (["uvmbus", "net", "bridge", "x"], None),
])
def test_root_argument_of_a_process(cmd, root):
    assert _root_arg(cmd) == root

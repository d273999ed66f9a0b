"""sd_notify without libsystemd, on real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import textwrap
import time

import pytest
from test_services_helpers import NotifyListener, first_order

from uvmbus.errors import ConfigError
from uvmbus.services.sdnotify import Notifier, notify, watchdog_interval

pytestmark = pytest.mark.timeout(120)


def test_path_socket_receives_fields_in_order(tmp_path):
    lst = NotifyListener(tmp_path / "notify")
    try:
        n = Notifier(str(tmp_path / "notify"))
        assert n.ready("up and running")
        assert n.status("busy")
        assert n.ping()
        assert n.stopping()
        assert lst.wait_for("STOPPING", 5)
        assert lst.messages == ["READY=1\nSTATUS=up and running", "STATUS=busy", "WATCHDOG=1", "STOPPING=1"]
        n.close()
    finally:
        lst.close()


def test_abstract_socket(tmp_path):
    name = f"@uvmbus-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = NotifyListener(name)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": name})
        assert lst.wait_for("READY", 5)
        assert lst.messages == ["READY=1"]
    finally:
        lst.close()


def test_no_socket_is_a_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.ping() is False
    assert n.watchdog_if_due() is False


def test_gone_manager_does_not_raise(tmp_path):
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.ready() is False           # ECONNREFUSED/ENOENT: reported, never raised


def test_values_are_one_line(tmp_path):
    n = Notifier(str(tmp_path / "x"))
    with pytest.raises(ConfigError):
        n.status("two\nlines")


def test_bad_address():
    n = Notifier("relative/path")
    with pytest.raises(ConfigError):
        n.send_raw("READY=1")


@pytest.mark.parametrize(("env", "pid", "expect"), [
    ({}, 10, None),
    ({"WATCHDOG_USEC": "0"}, 10, None),
    ({"WATCHDOG_USEC": "junk"}, 10, None),
    ({"WATCHDOG_USEC": "10000000"}, 10, 5.0),                       # no WATCHDOG_PID: ours
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "10"}, 10, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "11"}, 10, None),  # meant for another process
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, 10, None),
])
def test_watchdog_interval(env, pid, expect):
    assert watchdog_interval(env, pid) == expect


def test_watchdog_if_due_pings_at_half_the_interval(tmp_path):
    lst = NotifyListener(tmp_path / "n")
    try:
        n = Notifier(str(tmp_path / "n"), watchdog=0.05)
        n.ready()
        assert not n.watchdog_if_due()          # just pinged by READY
        time.sleep(0.06)
        assert n.watchdog_if_due()
        assert not n.watchdog_if_due()
        assert lst.wait_for("WATCHDOG", 5)
    finally:
        lst.close()


def test_from_env_unset_keeps_children_clean(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset=True)
    assert n.address == str(tmp_path / "n") and n.watchdog == 1.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


DAEMON = textwrap.dedent("""
    import sys
    from uvmbus.services.daemon import Daemon

    d = Daemon("test", root=sys.argv[1])
    d.install_signal_handlers()
    d.start("fake-device")
    d.spawn("worker", lambda: [d.beat("worker") or d.wait(0.05) for _ in iter(lambda: d.stop_event.is_set(), True)])
    d.ready("serving the fake device")
    d.run()
    d.stopping("bye")
    d.join_workers(5)
    d.close()
""")


def test_real_daemon_process_sends_ready_status_watchdog_stopping(tmp_path):
    """A real daemon process (the shared Daemon scaffolding) under a fake NOTIFY_SOCKET with
    a 0.4 s watchdog: READY (with STATUS), WATCHDOG pings, then STOPPING on SIGTERM."""
    script = tmp_path / "d.py"
    script.write_text(DAEMON)
    lst = NotifyListener(tmp_path / "notify")
    try:
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items()
               if k not in ("WATCHDOG_PID", "RUNTIME_DIRECTORY", "UVMBUS_RUN_DIR")}
        env.update(NOTIFY_SOCKET=lst.address, WATCHDOG_USEC="400000")
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "root")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert lst.wait_for("READY", 30), p.stdout
            assert lst.wait_for("WATCHDOG", 10, count=2)
            p.terminate()
            out, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, out
        assert lst.wait_for("STOPPING", 5)
        keys = lst.keys()
        assert first_order(keys, ["READY", "STATUS", "WATCHDOG", "STOPPING"]) == \
            ["READY", "STATUS", "WATCHDOG", "STOPPING"], keys
        assert keys[0] == "READY"
        assert "WATCHDOG" not in keys[keys.index("STOPPING"):], keys      # no ping after STOPPING
        # the run directory is left clean
        assert list((tmp_path / "root" / "run" / "uvmbus").iterdir()) == []
    finally:
        lst.close()


def test_watchdog_stops_when_a_worker_hangs(tmp_path):
    """The watchdog is fed only while every worker beats: a hung worker must starve it."""
    script = tmp_path / "d.py"
    script.write_text(textwrap.dedent("""
        import sys, threading
        from uvmbus.services.daemon import Daemon

        d = Daemon("test", root=sys.argv[1], stale_after=0.3)
        d.install_signal_handlers()
        d.start("hang")
        hang = threading.Event()
        d.spawn("worker", lambda: hang.wait())       # never beats again
        d.ready("about to hang")
        d.run()
        hang.set()
        d.stopping()
        d.join_workers(5)
        d.close()
    """))
    lst = NotifyListener(tmp_path / "notify")
    try:
        import subprocess
        import sys

        env = dict(os.environ, NOTIFY_SOCKET=lst.address, WATCHDOG_USEC="200000")
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "root")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert lst.wait_for("READY", 30)
            time.sleep(1.5)                          # >> stale_after: the worker is "stuck"
            before = lst.keys().count("WATCHDOG")
            time.sleep(1.0)
            after = lst.keys().count("WATCHDOG")
            p.terminate()
            out, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert after == before, f"watchdog kept being fed while the worker hung: {lst.keys()}"
        assert "not feeding the watchdog" in out
    finally:
        lst.close()

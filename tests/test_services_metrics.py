"""Prometheus text format, the HTTP endpoint, the textfile writer, structured logs."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import stat
import time
import urllib.request

import pytest
from simhelpers import run_sim

from uvmbus.errors import ConfigError
from uvmbus.services.logs import JsonFormatter, setup_logging
from uvmbus.services.metrics import (
    CONTENT_TYPE,
    MetricsServer,
    Registry,
    TextfileWriter,
    parse_text,
    sim_collector,
)

pytestmark = pytest.mark.timeout(120)


def sample_registry() -> Registry:
    r = Registry()
    c = r.counter("net_packets_total", "frames through the queue", ("device", "queue", "direction"))
    c.labels("dev1", "0", "rx").inc(5)
    c.labels(device="dev1", queue="0", direction="tx").set(7)
    g = r.gauge("net_link_up", "link state", ("device",))
    g.labels("dev1").set(1)
    h = r.histogram("blk_request_seconds", "latency", ("op",), buckets=(0.001, 0.01, 0.1))
    h.labels("read").observe(0.0005)
    h.labels("read").observe(0.005, count=3)
    h.labels("read").observe(5.0)
    weird = r.gauge("label_escape", 'help with \\ and\nnewline', ("v",))
    weird.labels('a "quoted" \\ back\nslash').set(2.5)
    return r


def test_render_exact_text():
    text = sample_registry().render()
    assert 'uvmbus_net_packets_total{device="dev1",queue="0",direction="rx"} 5' in text
    assert 'uvmbus_net_packets_total{device="dev1",queue="0",direction="tx"} 7' in text
    assert "# TYPE uvmbus_net_packets_total counter" in text
    assert "# TYPE uvmbus_blk_request_seconds histogram" in text
    assert 'uvmbus_blk_request_seconds_bucket{op="read",le="0.001"} 1' in text
    assert 'uvmbus_blk_request_seconds_bucket{op="read",le="0.01"} 4' in text
    assert 'uvmbus_blk_request_seconds_bucket{op="read",le="0.1"} 4' in text
    assert 'uvmbus_blk_request_seconds_bucket{op="read",le="+Inf"} 5' in text
    assert 'uvmbus_blk_request_seconds_count{op="read"} 5' in text
    assert "# HELP uvmbus_label_escape help with \\\\ and\\nnewline" in text
    assert 'uvmbus_label_escape{v="a \\"quoted\\" \\\\ back\\nslash"} 2.5' in text
    assert text.endswith("\n")


def test_round_trip_through_parser():
    fams = parse_text(sample_registry().render())
    h = fams["uvmbus_blk_request_seconds"]
    assert h.kind == "histogram"
    by = {(s.name, s.labels.get("le")): s.value for s in h.samples}
    assert by[("uvmbus_blk_request_seconds_bucket", "+Inf")] == 5
    assert math.isclose(by[("uvmbus_blk_request_seconds_sum", None)], 0.0005 + 0.015 + 5.0)
    w = fams["uvmbus_label_escape"]
    assert w.samples[0].labels["v"] == 'a "quoted" \\ back\nslash'
    assert w.help == "help with \\ and\nnewline"


@pytest.mark.parametrize("bad", [
    "uvmbus_x 1\n",                                          # sample before TYPE
    "# TYPE x counter\nx{a=b} 1\n",                           # unquoted label
    "# TYPE x gauge\nx one\n",                                # bad value
    "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 3\n",   # not cumulative
    "# TYPE h histogram\nh_bucket{le=\"1\"} 5\n",              # no +Inf
])
def test_parser_rejects_malformed(bad):
    with pytest.raises(ConfigError):
        parse_text(bad)


def test_registry_rules():
    r = Registry()
    with pytest.raises(ConfigError):
        r.counter("no_suffix", "x")
    with pytest.raises(ConfigError):
        r.gauge("bad-name", "x")
    with pytest.raises(ConfigError):
        r.histogram("h_seconds", "x", ("le",))
    c = r.counter("a_total", "x", ("l",))
    with pytest.raises(ConfigError):
        c.labels("1").inc(-1)
    with pytest.raises(ConfigError):
        c.labels()
    with pytest.raises(ConfigError):
        r.gauge("a_total", "x", ("l",))                       # same name, other kind
    assert r.counter("a_total", "x", ("l",)) is c


def test_collector_runs_before_render_and_errors_are_contained():
    r = Registry()
    g = r.gauge("g", "x")
    state = {"v": 1}
    r.add_collector(lambda: g.labels().set(state["v"]))
    r.add_collector(lambda: 1 / 0)
    assert "uvmbus_g 1" in r.render()
    state["v"] = 3
    assert "uvmbus_g 3" in r.render()
    assert r.collector_errors == 2


def test_histogram_quantile_snapshot():
    r = sample_registry()
    snap = r.snapshot()["uvmbus_blk_request_seconds"][0]
    assert snap["count"] == 5 and snap["p50"] == 0.01 and snap["p99"] == math.inf


def test_http_endpoint():
    r = sample_registry()
    srv = MetricsServer(r, 0).start()
    try:
        assert srv.port > 0
        with urllib.request.urlopen(srv.url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            body = resp.read().decode()
        assert parse_text(body)["uvmbus_net_link_up"].samples[0].value == 1
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/other", timeout=10)
        assert ei.value.code == 404
    finally:
        srv.close()


def test_textfile_is_replaced_atomically(tmp_path):
    r = Registry()
    g = r.gauge("g", "x")
    g.labels().set(1)
    path = tmp_path / "sub" / "uvmbus.prom"
    w = TextfileWriter(r, path)
    w.write()
    ino1 = os.stat(path).st_ino
    g.labels().set(2)
    w.write()
    st = os.stat(path)
    assert st.st_ino != ino1                                   # a new file renamed over the old one
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert "uvmbus_g 2" in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["uvmbus.prom"]   # no temp files left
    w.remove()
    assert not path.exists()


def test_sim_collector_exports_needless_signals(tmp_path):
    """Per-channel needless-signal counter from the simulator: 0 after a proper request, 1
    after a deliberate signal on an empty ring.

    The deliberate signal must come after every signal the request may have entitled the
    guest to has expired.  If the host's first re-arm (TX mask cleared, ring re-checked)
    finds the request already there, it cannot tell whether the guest saw the clear mask,
    so it gives the guest one "may signal" credit for --signal-grace (default 5 s); under
    load the worker may re-arm only after the guest's commit (2 of 40 fresh opens with four
    CPU hogs on the 2 CPUs, 0 of 40 without), and a deliberate signal 0.6 s later used that
    credit (needless stayed 0).  The monitor's idle back-off (at most --monitor-idle-us,
    2 ms) only delays the signal, well within the 10 s wait.  The credit is created before the
    host serves the request, i.e. before request() returns: a short grace and a sleep
    longer than it after the completion leave no credit, whatever the load."""
    from uvmbus.channel import open_device
    from uvmbus.native import lib

    def needless(r: Registry) -> list[float]:
        return [s.value for s in parse_text(r.render())["uvmbus_sim_needless_signals_total"].samples]

    grace = 0.3
    with run_sim(tmp_path, "--echo", "1", "--no-ic", "--signal-grace", str(grace)) as sim:
        dev = sim.device("echo")["device_id"]
        sim.bind(dev)
        r = Registry()
        col = sim_collector(r, sim.root, [dev])
        assert col is not None
        r.add_collector(col)
        with open_device(dev, sim.root) as cd:
            cd.primary.request(b"x", timeout=10)
            assert needless(r) == [0]
            time.sleep(grace + 0.1)               # any "may signal" credit has expired
            lib.uvb_signal(cd.primary.signal)     # nothing written: needless
            deadline = time.monotonic() + 10
            while needless(r) != [1] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert needless(r) == [1]
            fams = parse_text(r.render())
            assert fams["uvmbus_sim_guest_signals_total"].samples[0].labels["device"] == dev
    assert sim_collector(Registry(), tmp_path) is None         # not a simulator root


def test_json_log_lines():
    buf = io.StringIO()
    h = setup_logging("json", "debug", stream=buf)
    try:
        log = logging.getLogger("uvmbus.test")
        log.info("hello %s", "world", extra={"device": "abc", "queue": 2})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert lines[0]["msg"] == "hello world" and lines[0]["level"] == "info"
        assert lines[0]["device"] == "abc" and lines[0]["queue"] == 2
        assert lines[0]["logger"] == "uvmbus.test" and lines[0]["ts"].endswith("Z")
        assert lines[1]["level"] == "error" and "ValueError: boom" in lines[1]["exc"]
    finally:
        logging.getLogger().removeHandler(h)


def test_journal_format_when_stderr_is_the_journal(tmp_path, monkeypatch):
    f = open(tmp_path / "journal", "w")
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    h = setup_logging("text", "info", stream=f)
    try:
        logging.getLogger("uvmbus.j").warning("careful")
        f.flush()
        assert (tmp_path / "journal").read_text() == "<4>uvmbus.j: careful\n"
    finally:
        logging.getLogger().removeHandler(h)
        f.close()


def test_json_formatter_is_one_line_per_record():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "a\nb", (), None)
    assert "\n" not in JsonFormatter().format(rec)


def test_bad_log_options():
    with pytest.raises(ConfigError):
        setup_logging("xml")
    with pytest.raises(ConfigError):
        setup_logging("text", "loud")

"""Prometheus text-format metrics without a client library.

A :class:`Registry` holds metric families (:meth:`~Registry.counter`, :meth:`~Registry.gauge`,
:meth:`~Registry.histogram`) with labels; :meth:`~Registry.render` produces the text
exposition format 0.0.4.  Daemons publish it two ways, both optional:

* :class:`MetricsServer` — ``http.server`` in a thread on a localhost port (``/metrics``);
* :class:`TextfileWriter` — an atomically replaced file (write to a temporary file in the
  same directory, then ``rename``), the node_exporter textfile-collector convention.

Counters mirror the drivers' own counters (they are monotonic there), so besides ``inc`` a
counter child has ``set`` for "the source says the total is now N".  Collectors registered
with :meth:`~Registry.add_collector` run before every render and copy such snapshots in.

:func:`parse_text` reads the format back (``uvmbus status`` uses it on textfiles; tests use it
to check what we emit).
"""

from __future__ import annotations

import bisect
import http.server
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError

__all__ = [
    "LATENCY_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricFamily",
    "MetricsServer",
    "Registry",
    "Sample",
    "TextfileWriter",
    "parse_text",
    "sim_collector",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: 10 µs … 5 s, roughly ×2.5 per step (I/O and per-burst latencies).
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Child:
    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self.value: float = 0


class Counter(_Child):
    """A monotonic total."""

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ConfigError("a counter only goes up")
        with self._lock:
            self.value += amount

    def set(self, total: float) -> None:
        """Mirror an external monotonic counter (a driver's statistic)."""
        with self._lock:
            self.value = total


class Gauge(_Child):
    """A value that goes up and down."""

    def set(self, value: float) -> None:
        with self._lock:
            self.value = value

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self.value -= amount


class Histogram(_Child):
    """Cumulative buckets (``le``), ``_sum`` and ``_count``."""

    def __init__(self, lock: threading.Lock, buckets: Sequence[float]):
        super().__init__(lock)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)      # last: +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value`` (a burst of equal latencies)."""
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self.counts[i] += count
            self.sum += value * count
            self.count += count

    def observe_many(self, values: Iterable[float]) -> None:
        vals = list(values)
        idx = [bisect.bisect_left(self.buckets, v) for v in vals]
        with self._lock:
            for i in idx:
                self.counts[i] += 1
            self.sum += sum(vals)
            self.count += len(vals)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(le, count ≤ le), ..., (+inf, count)]``."""
        out = []
        acc = 0
        with self._lock:
            for b, c in zip((*self.buckets, math.inf), self.counts, strict=True):
                acc += c
                out.append((b, acc))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None with no data)."""
        cum = self.cumulative()
        total = cum[-1][1]
        if not total:
            return None
        want = q * total
        for le, c in cum:
            if c >= want:
                return le
        return math.inf


_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class MetricFamily:
    """One metric name with its label names; :meth:`labels` returns (creates) a child."""

    def __init__(self, name: str, kind: str, help: str, labelnames: Sequence[str],
                 lock: threading.Lock, buckets: Sequence[float] | None = None):
        if not _NAME.match(name):
            raise ConfigError(f"bad metric name {name!r}")
        for ln in labelnames:
            if not _LABEL.match(ln) or ln.startswith("__") or (kind == "histogram" and ln == "le"):
                raise ConfigError(f"bad label name {ln!r} for {name}")
        if kind == "counter" and not name.endswith("_total"):
            raise ConfigError(f"counter {name} must end in _total")
        self.name = name
        self.kind = kind
        self.help = help
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets or LATENCY_BUCKETS))
        self._lock = lock
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: Any, **kv: Any) -> Any:
        if values and kv:
            raise ConfigError("pass label values by position or by name, not both")
        if kv:
            if set(kv) != set(self.labelnames):
                raise ConfigError(f"{self.name}: labels {sorted(kv)} != {sorted(self.labelnames)}")
            values = tuple(kv[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ConfigError(f"{self.name}: {len(self.labelnames)} label values needed")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    if self.kind == "histogram":
                        child = Histogram(self._lock, self.buckets)
                    else:
                        child = _KINDS[self.kind](self._lock)
                    self._children[key] = child
        return child

    def remove(self, *values: Any) -> None:
        with self._lock:
            self._children.pop(tuple(str(v) for v in values), None)

    def clear(self) -> None:
        with self._lock:
            self._children.clear()

    def children(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return sorted(self._children.items())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, child in self.children():
            if self.kind == "histogram":
                for le, c in child.cumulative():
                    lines.append(f"{self.name}_bucket{_labels_text(self.labelnames, key, ('le', _fmt(le)))} {c}")
                lab = _labels_text(self.labelnames, key)
                lines.append(f"{self.name}_sum{lab} {_fmt(child.sum)}")
                lines.append(f"{self.name}_count{lab} {child.count}")
            else:
                lines.append(f"{self.name}{_labels_text(self.labelnames, key)} {_fmt(child.value)}")
        return lines


class Registry:
    """A set of metric families rendered together."""

    def __init__(self, prefix: str = "uvmbus_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._families: dict[str, MetricFamily] = {}
        self._collectors: list[Callable[[], None]] = []
        self.collector_errors = 0

    def _family(self, name: str, kind: str, help: str, labels: Sequence[str],
                buckets: Sequence[float] | None = None) -> MetricFamily:
        full = name if name.startswith(self.prefix) else self.prefix + name
        fam = self._families.get(full)
        if fam is not None:
            if fam.kind != kind or fam.labelnames != tuple(labels):
                raise ConfigError(f"metric {full} already registered as {fam.kind}{list(fam.labelnames)}")
            return fam
        fam = MetricFamily(full, kind, help, labels, self._lock, buckets)
        self._families[full] = fam
        return fam

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> MetricFamily:
        return self._family(name, "counter", help, labels)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> MetricFamily:
        return self._family(name, "gauge", help, labels)

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] | None = None) -> MetricFamily:
        return self._family(name, "histogram", help, labels, buckets)

    def get(self, name: str) -> MetricFamily:
        return self._families[name if name.startswith(self.prefix) else self.prefix + name]

    def add_collector(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs before every :meth:`render` (copy driver statistics in)."""
        self._collectors.append(fn)

    def collect(self) -> None:
        for fn in self._collectors:
            try:
                fn()
            except Exception:  # a failing source must not break the scrape
                self.collector_errors += 1

    def render(self, *, collect: bool = True) -> str:
        if collect:
            self.collect()
        lines: list[str] = []
        for name in sorted(self._families):
            lines += self._families[name].render()
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """Plain values for JSON (``uvmbus status --json``): ``{name: [{labels, value}]}``;
        histograms give ``count``, ``sum``, ``p50``, ``p99`` (bucket upper bounds)."""
        out: dict[str, Any] = {}
        for name in sorted(self._families):
            fam = self._families[name]
            rows = []
            for key, child in fam.children():
                labels = dict(zip(fam.labelnames, key, strict=True))
                if fam.kind == "histogram":
                    rows.append({"labels": labels, "count": child.count, "sum": child.sum,
                                 "p50": child.quantile(0.5), "p99": child.quantile(0.99)})
                else:
                    rows.append({"labels": labels, "value": child.value})
            out[name] = rows
        return out


# ---- publishing ------------------------------------------------------------------------------

class MetricsServer:
    """``GET /metrics`` on ``host:port`` from a daemon thread (port 0: any free port)."""

    def __init__(self, registry: Registry, port: int, host: str = "127.0.0.1"):
        reg = registry

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                body = reg.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class TextfileWriter:
    """Writes the registry to ``path`` atomically (temporary file + rename), mode 0644."""

    def __init__(self, registry: Registry, path: str | os.PathLike[str]):
        self.registry = registry
        self.path = Path(path)
        self.writes = 0

    def write(self) -> None:
        text = self.registry.render()
        d = self.path.parent
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self.writes += 1

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# ---- reading ---------------------------------------------------------------------------------

@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class ParsedFamily:
    name: str
    kind: str = "untyped"
    help: str = ""
    samples: list[Sample] = field(default_factory=list)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(v: str) -> str:
    out = []
    i = 0
    while i < len(v):
        c = v[i]
        if c == "\\" and i + 1 < len(v):
            n = v[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(n, "\\" + n))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _parse_value(text: str) -> float:
    t = text.strip()
    if t in ("+Inf", "Inf"):
        return math.inf
    if t == "-Inf":
        return -math.inf
    return float(t)


def parse_text(text: str) -> dict[str, ParsedFamily]:
    """Parse the text exposition format; raises :class:`ConfigError` on a malformed line,
    a sample before its ``# TYPE``, or a histogram whose buckets are not cumulative."""
    fams: dict[str, ParsedFamily] = {}

    def family_of(sample: str) -> ParsedFamily:
        for suffix in ("_bucket", "_sum", "_count", ""):
            if suffix and not sample.endswith(suffix):
                continue
            base = sample[: len(sample) - len(suffix)] if suffix else sample
            f = fams.get(base)
            if f is not None and (not suffix or f.kind == "histogram"):
                return f
        raise ConfigError(f"sample {sample} has no # TYPE line before it")

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                f = fams.setdefault(parts[2], ParsedFamily(parts[2]))
                if parts[1] == "TYPE":
                    if len(parts) < 4 or parts[3] not in ("counter", "gauge", "histogram", "summary", "untyped"):
                        raise ConfigError(f"line {n}: bad TYPE: {line!r}")
                    if f.samples:
                        raise ConfigError(f"line {n}: TYPE after samples of {parts[2]}")
                    f.kind = parts[3]
                else:
                    f.help = _unescape(parts[3]) if len(parts) > 3 else ""
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ConfigError(f"line {n}: not a sample: {line!r}")
        labels: dict[str, str] = {}
        if m.group(3):
            body = m.group(3)
            pos = 0
            while pos < len(body):
                lm = _LABEL_PAIR.match(body, pos)
                if not lm:
                    raise ConfigError(f"line {n}: bad labels: {body!r}")
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
        try:
            value = _parse_value(m.group(4))
        except ValueError:
            raise ConfigError(f"line {n}: bad value {m.group(4)!r}") from None
        family_of(m.group(1)).samples.append(Sample(m.group(1), labels, value))
    for f in fams.values():
        if f.kind != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for s in f.samples:
            if s.name.endswith("_bucket"):
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(key, []).append((_parse_value(s.labels["le"]), s.value))
        for key, buckets in series.items():
            les = [b[0] for b in buckets]
            counts = [b[1] for b in buckets]
            if les != sorted(les) or les[-1] != math.inf or counts != sorted(counts):
                raise ConfigError(f"{f.name}{dict(key)}: buckets not cumulative / no +Inf")
    return fams


# ---- the simulator's signal counters ----------------------------------------------------------

def sim_collector(registry: Registry, root: str | os.PathLike[str],
                  devices: Iterable[str] | None = None) -> Callable[[], None] | None:
    """A collector exporting the simulated host's per-channel counters (needless signals,
    guest signals, interrupts) when ``root`` is a running simulator's; None otherwise.
    ``devices`` limits it to those device ids."""
    from uvmbus.sim.control import control_path

    if not control_path(root).exists():
        return None
    wanted = set(devices) if devices is not None else None
    keys = {
        "guest_signals": registry.counter("sim_guest_signals_total",
                                          "guest->host signals seen by the simulated host",
                                          ("device", "relid")),
        "needless_signals": registry.counter("sim_needless_signals_total",
                                             "guest->host signals the ring protocol did not call for "
                                             "(Hyper-V may throttle a guest for these)",
                                             ("device", "relid")),
        "interrupts": registry.counter("sim_interrupts_total",
                                       "host->guest interrupts sent by the simulated host",
                                       ("device", "relid")),
    }

    def collect() -> None:
        from uvmbus.sim.control import ControlClient

        with ControlClient(root, timeout=2.0) as c:
            stats = c.call("stats")["stats"]
        for d in stats.get("devices", []):
            dev = d.get("device_id", "?")
            if wanted is not None and dev not in wanted:
                continue
            for relid, ch in d.get("channels", {}).items():
                for k, fam in keys.items():
                    fam.labels(dev, str(relid)).set(int(ch.get(k, 0)))

    return collect

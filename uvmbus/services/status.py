"""``uvmbus status``: devices, bindings, running uvmbus services and their counters.

Sources, in order:

* the bus under the root (devices, drivers, uio nodes) and the persisted bindings
  (:mod:`uvmbus.services.persist`);
* daemons registered in the run directory (pidfile + control socket,
  :mod:`uvmbus.services.daemon`): their status, per-queue counters and metrics snapshot come
  from the control socket;
* every other process that looks like ours (psutil, by command line: ``uvmbus ...``,
  ``python -m uvmbus ...``, nbdkit running our plugin) and works on the same root (its
  ``--root``, else its ``UVMBUS_ROOT``, else "/"; the simulator named by the root's
  ``sim/state.json``; children of those): listed so a daemon whose socket is gone, or a
  simulator, still shows up.  Those of other roots (other simulators on the machine) are
  only counted, or listed with ``all_roots``;
* CPU (sampled over ``sample`` seconds) and RSS of each process via psutil;
* when the root is a simulator's, its signal totals (needless signals must stay 0).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from uvmbus.errors import UvmbusError
from uvmbus.services.daemon import call_control, find_services, run_dir_for

__all__ = ["collect_status", "format_status", "our_processes"]

_VERBS = {"bridge", "export", "sim", "demo"}


def _is_ours(cmdline: list[str]) -> str | None:
    """The kind of uvmbus process ``cmdline`` is ("net bridge", "sim", ...), or None."""
    if not cmdline:
        return None
    args = list(cmdline)
    exe = Path(args[0]).name
    if exe.startswith("python") and len(args) >= 3 and args[1] == "-m" and args[2] == "uvmbus":
        rest = args[3:]
    elif exe == "uvmbus" or (exe.startswith("python") and len(args) >= 2 and Path(args[1]).name == "uvmbus"):
        rest = args[1:] if exe == "uvmbus" else args[2:]
    elif exe == "nbdkit" and any(a.endswith("uvmbus/services/nbdplugin.py") for a in args):
        return "nbdkit (blk export)"
    else:
        return None
    words = [a for a in rest if not a.startswith("-")]
    if not words:
        return None
    if words[0] in ("net", "blk") and len(words) > 1 and words[1] in _VERBS:
        return f"{words[0]} {words[1]}"
    if words[0] in ("sim", "demo"):
        return words[0]
    return None


def _root_arg(cmdline: list[str]) -> str | None:
    """The value of ``--root`` in ``cmdline`` (the last one wins, as with argparse)."""
    root = None
    for i, a in enumerate(cmdline):
        if a == "--root" and i + 1 < len(cmdline):
            root = cmdline[i + 1]
        elif a.startswith("--root="):
            root = a[len("--root="):]
    return root


def _process_root(p: Any, kind: str) -> str | None:
    """The root a uvmbus process works on (resolved), or None when unknown (a simulator
    started without a root made its own directory; a process we may not inspect)."""
    import psutil

    root = _root_arg(p.info["cmdline"] or [])
    try:
        if root is None and kind != "nbdkit (blk export)":
            root = p.environ().get("UVMBUS_ROOT") or None
            if root is None and kind != "sim":
                root = "/"
        if root is None:
            return None
        return os.path.realpath(os.path.join(p.cwd(), root))
    except (psutil.Error, OSError):
        return os.path.realpath(root) if root is not None and os.path.isabs(root) else None


def our_processes() -> list[dict[str, Any]]:
    """uvmbus daemons, simulators and their nbdkit children on this machine (psutil); each
    with the ``root`` it works on (None: unknown)."""
    import psutil

    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "ppid", "create_time"]):
        try:
            kind = _is_ours(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if kind is None or p.info["pid"] == me:
            continue
        out.append({"pid": p.info["pid"], "ppid": p.info["ppid"], "kind": kind,
                    "cmdline": " ".join(p.info["cmdline"]), "started": p.info["create_time"],
                    "root": _process_root(p, kind)})
    return out


def _split_by_root(procs: list[dict[str, Any]], root: str | os.PathLike[str],
                   registered: set[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(processes of ``root``, processes of other roots)."""
    import json

    want = os.path.realpath(root)
    sim_pid = None
    try:
        sim_pid = int(json.loads((Path(root) / "sim" / "state.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mine = {p["pid"] for p in procs if p["root"] == want or p["pid"] == sim_pid}
    parents = mine | registered
    grew = True
    while grew:                      # children (an export's nbdkit) go with their parent
        new = {p["pid"] for p in procs if p["ppid"] in parents and p["pid"] not in parents}
        mine |= new
        parents |= new
        grew = bool(new)
    return [p for p in procs if p["pid"] in mine], [p for p in procs if p["pid"] not in mine]


def _resources(pids: list[int], sample: float) -> dict[int, dict[str, Any]]:
    import psutil

    procs: dict[int, Any] = {}
    for pid in set(pids):
        try:
            p = psutil.Process(pid)
            p.cpu_percent(None)
            procs[pid] = p
        except psutil.Error:
            continue
    if sample > 0 and procs:
        time.sleep(sample)
    res: dict[int, dict[str, Any]] = {}
    for pid, p in procs.items():
        try:
            with p.oneshot():
                mem = p.memory_info()
                times = p.cpu_times()
                res[pid] = {
                    "cpu_percent": round(p.cpu_percent(None), 1) if sample > 0 else None,
                    "cpu_seconds": round(times.user + times.system, 2),
                    "rss_bytes": int(mem.rss),
                    "threads": p.num_threads(),
                    "cpu_affinity": p.cpu_affinity() if hasattr(p, "cpu_affinity") else None,
                }
        except psutil.Error:
            continue
    return res


def collect_status(root: str | os.PathLike[str] = "/", *, run_dir: str | None = None,
                   sample: float = 0.2, all_roots: bool = False) -> dict[str, Any]:
    """Everything ``uvmbus status`` shows, as one JSON-ready dict.  uvmbus processes of
    other roots are counted (``other_roots``), and listed too with ``all_roots``."""
    from uvmbus.bus import Bus, device_holder
    from uvmbus.services.persist import persisted

    bus = Bus(root)
    out: dict[str, Any] = {"root": str(Path(root)), "time": time.time()}
    try:
        out["kernel"] = bus.kernel.release
    except Exception:       # a root without proc/sys/kernel/osrelease (a bare test tree)
        out["kernel"] = None
    pers = {r.get("DEVICE", ""): r for r in persisted(root)}
    devices = []
    for d in bus.devices():
        row = d.to_dict()
        rec = pers.get(d.device_id)
        row["persistent"] = None if rec is None else {"enabled": rec.get("ENABLED") == "1",
                                                      "force": rec.get("FORCE") == "1"}
        row["holder"] = device_holder(d)          # who has it open (its lock), None: free
        devices.append(row)
    out["devices"] = devices
    out["persisted_missing"] = [g for g in pers if g not in {d["device_id"] for d in devices}]

    rd = run_dir_for(root, run_dir)
    out["run_dir"] = str(rd)
    services = []
    registered: set[int] = set()
    for ref in find_services(rd):
        svc: dict[str, Any] = {"kind": ref.kind, "device": ref.device, "pid": ref.pid,
                               "alive": ref.alive(), "socket": str(ref.socket) if ref.socket else None}
        if ref.socket is not None and svc["alive"]:
            try:
                svc["status"] = call_control(ref.socket, "status", timeout=3.0)["status"]
            except UvmbusError as exc:
                svc["error"] = str(exc)
        elif not svc["alive"]:
            svc["error"] = "stale files: the process is gone"
        if ref.pid is not None:
            registered.add(ref.pid)
        services.append(svc)
    procs, foreign = _split_by_root([p for p in our_processes() if p["pid"] not in registered],
                                    root, registered)
    n_foreign = len(foreign)
    if not all_roots:
        foreign = []
    children = [p for p in procs if p["ppid"] in registered]          # e.g. the export's nbdkit
    others = [p for p in procs if p["ppid"] not in registered]
    pids = ([s["pid"] for s in services if s.get("alive") and s["pid"]] + [p["pid"] for p in procs]
            + [p["pid"] for p in foreign])
    res = _resources(pids, sample)
    for s in services:
        if s.get("pid") in res:
            s["process"] = res[s["pid"]]
        s["children"] = [dict(c, process=res.get(c["pid"])) for c in children if c["ppid"] == s.get("pid")]
    for p in [*others, *foreign]:
        p["process"] = res.get(p["pid"])
    out["services"] = services
    out["processes"] = others
    out["other_roots"] = {"processes": n_foreign}
    if all_roots:
        out["other_roots"]["list"] = foreign

    from uvmbus.sim.control import control_path

    if control_path(root).exists():
        try:
            from uvmbus.sim.control import ControlClient

            with ControlClient(root, timeout=3.0) as c:
                st = c.call("stats")["stats"]
            out["simulator"] = {"totals": st.get("totals", {})}
        except UvmbusError as exc:
            out["simulator"] = {"error": str(exc)}
    return out


# ---- text -----------------------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def _dur(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _proc_text(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    cpu = "-" if p.get("cpu_percent") is None else f"{p['cpu_percent']:.1f}%"
    aff = p.get("cpu_affinity")
    pin = f", cpus {','.join(map(str, aff))}" if aff and len(aff) < (os.cpu_count() or 1) else ""
    return f"cpu {cpu} ({p['cpu_seconds']:.1f} s), rss {_mib(p['rss_bytes'])}, {p['threads']} threads{pin}"


def _queue_lines(st: dict[str, Any]) -> list[str]:
    lines = []
    for q in st.get("queues", []):
        parts = [f"queue {q.get('queue', '?')}:"]
        for key, label in (("rx_packets", "rx"), ("tx_packets", "tx")):
            if key in q:
                b = q.get(key.replace("packets", "bytes"), 0)
                parts.append(f"{label} {q[key]} pkts/{b} B")
        for key in ("submitted", "completed", "inflight", "drops", "ring_full", "signals"):
            if key in q:
                parts.append(f"{key.replace('_', '-')} {q[key]}")
        lines.append(" ".join(parts))
    io = st.get("io")
    if io:
        lines.append("I/O: " + ", ".join(f"{k} {v}" for k, v in io.items()))
    return lines


def format_status(s: dict[str, Any]) -> str:
    out = [f"root {s['root']}" + (f", kernel {s['kernel']}" if s.get("kernel") else "")]
    out.append("")
    out.append("devices:")
    if not s["devices"]:
        out.append("  (no VMBus devices)")
    for d in s["devices"]:
        p = d.get("persistent")
        pers = "" if p is None else (" [persistent" + ("" if p["enabled"] else ", NOT enabled") + "]")
        extra = []
        if d.get("net"):
            extra.append("net " + ",".join(d["net"]))
        if d.get("block"):
            extra.append("block " + ",".join(d["block"]))
        out.append(f"  {d['device_id']}  {d['class']:<10} {d['driver'] or '-':<16} {d['uio'] or '-':<6}"
                   f"{pers}{'  ' + ' '.join(extra) if extra else ''}")
        if d.get("holder"):
            out.append(f"    in use by {d['holder']['holder'][:160]}")
    for g in s.get("persisted_missing", []):
        out.append(f"  {g}  (persisted binding, device not present)")
    out.append("")
    out.append(f"services ({s['run_dir']}):")
    if not s["services"]:
        out.append("  (none)")
    for svc in s["services"]:
        st = svc.get("status") or {}
        head = f"  {svc['kind']} {svc['device']}  pid {svc['pid']}"
        if st:
            head += f", up {_dur(st.get('uptime', 0))}, {'healthy' if st.get('healthy') else 'UNHEALTHY: ' + st.get('problem', '')}"
        out.append(head)
        if svc.get("error"):
            out.append(f"    error: {svc['error']}")
        if st.get("status"):
            out.append(f"    status: {st['status']}")
        if svc.get("process"):
            out.append(f"    {_proc_text(svc['process'])}")
        for c in svc.get("children", []):
            out.append(f"    child pid {c['pid']} {c['kind']}: {_proc_text(c.get('process'))}")
        for line in _queue_lines(st):
            out.append(f"    {line}")
        if st.get("metrics_url"):
            out.append(f"    metrics: {st['metrics_url']}")
    other = s.get("other_roots") or {}
    for title, procs, with_root in (("other uvmbus processes of this root", s.get("processes"), False),
                                    ("uvmbus processes of other roots", other.get("list"), True)):
        if not procs:
            continue
        out += ["", f"{title}:"]
        for p in procs:
            where = f" (root {p['root'] or 'unknown'})" if with_root else ""
            out.append(f"  pid {p['pid']} {p['kind']}{where}: {p['cmdline'][:120]}")
            if p.get("process"):
                out.append(f"    {_proc_text(p['process'])}")
    if not other.get("list") and other.get("processes"):
        n = other["processes"]
        out.append("")
        out.append(f"({n} uvmbus process{'es' if n > 1 else ''} of other roots: "
                   "`uvmbus status --all` lists them)")
    sim = s.get("simulator")
    if sim:
        out.append("")
        t = sim.get("totals")
        if t:
            out.append(f"simulator: guest signals {t.get('guest_signals', 0)} (needless "
                       f"{t.get('needless_signals', 0)}), interrupts {t.get('interrupts', 0)}, "
                       f"kernel oops {t.get('kernel_oops', 0)}")
        else:
            out.append(f"simulator: {sim.get('error')}")
    return "\n".join(out)

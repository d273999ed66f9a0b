"""`uvmbus sim`: run the simulated VMBus host; `uvmbus sim ctl ...`: talk to a running one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from uvmbus.services.cli import (
    add_json,
    add_record,
    add_root,
    int_range,
    number,
    open_recorder,
    seconds,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim", help="run the simulated VMBus host (Hyper-V + uio_hv_generic) under a root",
        description="Run a simulated VMBus host in the foreground until SIGTERM/SIGINT. "
                    "Prints a line starting with 'ready' once the devices are live. "
                    "Guest commands use the same root (--root or UVMBUS_ROOT).")
    p.add_argument("--root", default=os.environ.get("UVMBUS_ROOT") or None,
                   help="directory for the simulated sys/, dev/, proc/ (default: $UVMBUS_ROOT, "
                        "else a new directory under /dev/shm)")
    p.add_argument("--echo", type=int_range(0), default=None, metavar="N", help="echo devices "
                   "(default 1 when no other device is asked for)")
    p.add_argument("--nic", type=int_range(0), default=0, metavar="N", help="synthetic NICs (netvsc model)")
    p.add_argument("--nic-backend", default=None, metavar="B", help="frames of the --nic NICs: "
                   "loopback (default), sink, generator, none, tap:NAME[@NETNS]")
    p.add_argument("--disk", action="append", default=[], metavar="IMAGE[:OPT...]",
                   help="a SCSI disk backed by the raw image IMAGE (storvsc model; options "
                        ":size=SIZE creates a missing image sparse, :ro, :bs=512|4096, :lun=N, "
                        ":serial=TEXT, :nounmap, :maxxfer=SIZE, :pr (persistent reservations, "
                        "shared by every LUN on the same file), :odx (VPD 0x8F), :rsoc (answer "
                        "REPORT SUPPORTED OPERATION CODES), :nolbastatus, :rotation=N); repeatable")
    p.add_argument("--device", action="append", default=[], metavar="MODEL[:KEY=VAL,...]",
                   help="a device of any registered model; repeatable")
    p.add_argument("--load-model", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import MODULE (also from the current directory) or FILE.py, which "
                        "registers device models; repeatable")
    p.add_argument("--kernel", default="6.18", help="simulated guest kernel: 6.9, 6.10, 6.16, 6.18 "
                   "(any X.Y maps onto the same rules; default 6.18)")
    p.add_argument("--page-size", type=int, default=4096, choices=(4096, 16384, 65536),
                   help="simulated guest page size: ring header page and mmap unit")
    p.add_argument("--unmonitored", action="store_true", help="offer channels without monitor ids")
    p.add_argument("--unmonitored-subchannels", action="store_true",
                   help="offer sub-channels without monitor ids (as Azure may for NICs)")
    p.add_argument("--signal-grace", type=seconds(zero_ok=True), default=5.0,
                   help="seconds a guest signal the host could not rule out stays acceptable "
                        "(needless-signal accounting; default 5)")
    p.add_argument("--monitor-latency-us", type=number(zero_ok=True, unit="microseconds"), default=50.0,
                   help="monitor page scan interval (Hyper-V default 50)")
    p.add_argument("--monitor-idle-us", type=number(zero_ok=True, unit="microseconds"), default=2000.0,
                   help="scan interval once nothing moved for 20 ms (default 2000: an idle "
                        "simulator costs ~no CPU; 0: always scan every --monitor-latency-us)")
    p.add_argument("--subchannel-delay", type=seconds(zero_ok=True), default=0.2, metavar="SECONDS",
                   help="delay between a sub-channel offer and its ring file")
    p.add_argument("--guest-ram", default="256M", help="simulated guest RAM for GPA-direct (0: none)")
    p.add_argument("--host-spin-us", type=number(zero_ok=True, unit="microseconds"), default=20.0,
                   help="how long a host channel polls after its last packet before re-arming")
    p.add_argument("--bind", action="store_true",
                   help="bind every model device to uio_hv_generic at start (as new_id would)")
    p.add_argument("--no-ic", action="store_true",
                   help="do not offer the integration-component devices (heartbeat, kvp, ...)")
    p.add_argument("--quiet", action="store_true", help="less logging on stderr")
    add_record(p, side="host")
    p.add_argument("--replay", default=None, metavar="FILE.pcapng",
                   help="offer the devices of a recorded session and play its host side against "
                        "the guest; reports the first message where the guest diverges (exit "
                        "status 3) (docs/trace.md)")
    p.epilog = ("Stop it with Ctrl-C, SIGTERM or `uvmbus sim ctl --root ROOT stop`; it removes "
                "the files it created.")
    p.set_defaults(func=_run)
    csub = p.add_subparsers(dest="sim_command", metavar="ctl")
    c = csub.add_parser("ctl", help="control a running simulator",
                        description="Send a request to a running simulator's control socket.")
    add_root(c, must_exist=False)       # the control client says what is missing
    add_json(c)
    c.add_argument("request", choices=("ping", "stats", "devices", "kernel", "stop", "fault",
                                       "clear", "rescind", "reoffer", "subchannels", "link", "vf", "model", "ic"),
                   help="what to do")
    c.add_argument("args", nargs="*", help="fault: NAME [VALUE]; rescind/reoffer: DEVICE; "
                   "subchannels: DEVICE COUNT; link: DEVICE up|down; "
                   "vf: DEVICE add [SERIAL]|remove (the accelerated-networking VF of a netvsc "
                   "device: announce / withdraw it, as Azure host servicing does); "
                   "model: DEVICE OP [KEY=VALUE ...] (a device model's own operations); "
                   "ic: DEVICE OP [KEY=VALUE ...] (integration components, waits for the guest's "
                   "answer: see docs/ic.md)")
    c.add_argument("--device", default="*", help="device for fault/clear (GUID, prefix, model, *)")
    c.add_argument("--wait", type=seconds(zero_ok=True), default=15.0, metavar="SECONDS",
                   help="ic: how long to wait for the guest's answer (default 15)")
    c.add_argument("--reoffer-after", type=seconds(zero_ok=True), default=None, metavar="SECONDS",
                   help="rescind: offer the device again after this delay")
    c.set_defaults(func=_ctl)
    e = csub.add_parser(
        "exec", help="run an unmodified program (e.g. DPDK) against a running simulator",
        description="Run CMD in a private mount namespace in which the simulator's sys/ tree "
                    "stands at /sys and /dev/uioN behaves like the kernel's uio device (a "
                    "preload library). Needs root. Exit status: CMD's (128+N if killed by "
                    "signal N).")
    add_root(e, must_exist=False)       # run_exec says what is missing
    e.add_argument("--guest-ram", action="store_true",
                   help="put the program's DMA memory on the simulator's guest RAM (IOVA = "
                        "simulated GPA); for DPDK: EAL memory from -m, --no-huge and "
                        "--iova-mode=va are enforced by the library")
    e.add_argument("-v", "--verbose", action="store_true",
                   help="before --: print on stderr each mount made in the namespace (lines "
                        "'uvmbus sim exec: ...') and show tracebacks on errors; a -v after -- "
                        "is CMD's")
    e.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    e.set_defaults(func=_exec)


def _kv_args(items: list[str]) -> dict[str, Any]:
    from uvmbus.errors import ConfigError
    out: dict[str, Any] = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep:
            raise ConfigError(f"arguments are KEY=VALUE, not {kv!r}")
        out[key] = val
    return out


def _ctl_ic(args: argparse.Namespace) -> int:
    """`sim ctl ic DEVICE OP [KEY=VALUE...]`: run an IC host operation and wait for the guest."""
    import time

    from uvmbus.errors import ChannelTimeout, ConfigError
    from uvmbus.sim.control import ControlClient

    if len(args.args) < 2:
        raise ConfigError("ic needs DEVICE OP [KEY=VALUE ...], e.g. `ic shutdown shutdown action=reboot`")
    device, op = args.args[0], args.args[1]
    with ControlClient(args.root) as client:
        reply = client.call("model", device=device, op=op, args=_kv_args(args.args[2:]))
        results = reply.get("results") or {}
        if len(results) != 1:
            raise ConfigError(f"ic: {device!r} names {len(results)} devices; name exactly one")
        dev_id, res = next(iter(results.items()))
        if "ticket" in res:
            ticket = res["ticket"]
            deadline = time.monotonic() + args.wait
            while True:
                r = client.call("model", device=dev_id, op="result", args={"ticket": ticket})
                res = r["results"][dev_id]
                if res.get("done"):
                    break
                if time.monotonic() >= deadline:
                    raise ChannelTimeout(f"ic {op}: the guest did not answer within {args.wait:g} s "
                                         "(is `uvmbus ic run` serving this device?)")
                time.sleep(0.05)
    print(json.dumps(res, indent=None if args.json else 2))
    sys.stdout.flush()
    # a guest's failure status (or no answer) is exit status 1; the JSON above says which
    return 1 if res.get("done") and res.get("status") != 0 else 0


def _device_specs(args: argparse.Namespace) -> list[Any]:
    from uvmbus.sim.config import DeviceSpec
    from uvmbus.sim.models import model_for_option

    specs: list[DeviceSpec] = []
    if args.nic:
        cls = model_for_option("nic")
        nic_opts = {"backend": args.nic_backend} if getattr(args, "nic_backend", None) else {}
        specs += [DeviceSpec(cls.name, {**o, **nic_opts}) for o in cls.from_cli(args.nic)]
    if args.disk:
        cls = model_for_option("disk")
        specs += [DeviceSpec(cls.name, o) for o in cls.from_cli(args.disk)]
    for text in args.device:
        name, _, rest = text.partition(":")
        opts = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in rest.split(",") if kv)
        bind = opts.pop("bind", None)
        specs.append(DeviceSpec(name, opts, bind))
    if getattr(args, "replay", None):
        from uvmbus.sim.models.replay import device_specs
        from uvmbus.trace.pcapng import ReadStatus

        status = ReadStatus()
        specs += device_specs(args.replay, status)
        if status.truncated:      # replayed as far as it goes: the end of the session is missing
            print(f"uvmbus-sim: warning: {status.warning(args.replay)}; the replay ends where the "
                  "recording does", file=sys.stderr, flush=True)
    echo = args.echo if args.echo is not None else (0 if specs else 1)
    specs += [DeviceSpec("echo") for _ in range(echo)]
    return specs


def _model_modules(names: list[str]) -> list[str]:
    """``--load-model`` values as module names: FILE.py (or a path) is imported from its
    directory, and the current directory is searched too (as ``python -m`` does)."""
    from uvmbus.errors import ConfigError

    mods = []
    for name in names:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"--load-model {name}: no such file")
            sys.path.insert(0, str(path.resolve().parent))
            mods.append(path.stem)
        else:
            mods.append(name)
    if mods and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return mods


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "sim_command", None):
        return 2
    from uvmbus.sim import KernelMode, SimConfig, Simulator, prepare_root
    from uvmbus.sim.models import load_models
    from uvmbus.units import parse_size

    load_models(_model_modules(args.load_model))
    kernel = KernelMode.parse(args.kernel, args.page_size)
    specs = _device_specs(args)
    guest_ram = parse_size(args.guest_ram, what="guest RAM size")     # 0: no guest RAM
    root, owns = prepare_root(args.root)        # last: nothing is left behind by a bad option
    config = SimConfig(
        root=root, kernel=kernel, devices=specs, monitored=not args.unmonitored,
        monitored_subchannels=not (args.unmonitored or args.unmonitored_subchannels),
        monitor_latency_us=args.monitor_latency_us, monitor_idle_us=args.monitor_idle_us,
        subchannel_delay=args.subchannel_delay,
        signal_grace=args.signal_grace,
        guest_ram=guest_ram, host_spin_us=args.host_spin_us, bind_uio=args.bind,
        ic_devices=not args.no_ic, owns_root=owns, quiet=args.quiet,
    )
    config.record = open_recorder(args, side="host")

    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # stack dump for debugging hangs

    def ready(vm: Simulator) -> None:
        print("ready " + json.dumps(vm.ready_info()), flush=True)
        if not args.quiet:
            print(f"uvmbus-sim: ready under {root}: `export UVMBUS_ROOT={root}` (or pass --root "
                  f"{root}) to use it; stop with Ctrl-C or `uvmbus sim ctl --root {root} stop`",
                  file=sys.stderr, flush=True)

    rc = 1
    try:
        vm = Simulator(config)
        rc = vm.run(ready)
    finally:
        if config.record is not None:
            config.record.close(ok=rc == 0)     # a failed run never replaces an older trace
    if args.replay:
        rc = rc or _replay_report(vm)
    return rc


def _replay_report(vm: Any) -> int:
    """Summarise every replay device at exit: 0 complete, 3 diverged, 4 incomplete."""
    worst = 0
    for d in vm.devices:
        r = d.model.describe().get("replay")
        if r is None:
            continue
        line = f"uvmbus-sim: replay of {r['instance']}: {r['status']}, {r['matched']} guest messages matched"
        if r["divergence"]:
            dv = r["divergence"]
            line += (f"; first divergence at recorded message #{dv['message']} (sub-channel {dv['subchannel']})"
                     f"\n  expected: {dv['expected']}\n  got:      {dv['got']}")
            worst = 3
        elif r["status"] != "complete":
            worst = max(worst, 4)
        print(line, file=sys.stderr)
    return worst


def _exec(args: argparse.Namespace) -> int:
    from uvmbus.sim.execns import run_exec

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return run_exec(args.root, cmd, guest_ram=args.guest_ram, verbose=args.verbose)


def _ctl(args: argparse.Namespace) -> int:
    from uvmbus.errors import ConfigError
    from uvmbus.sim.control import ControlClient

    req: dict[str, Any]
    a = args.args
    if args.request in ("ping", "stats", "devices", "kernel", "stop"):
        req = {"cmd": args.request}
    elif args.request == "fault":
        if not a:
            raise ConfigError("fault needs a NAME (e.g. stall, drop_completions 3)")
        value: Any = True
        if len(a) > 1:
            try:
                value = json.loads(a[1])
            except ValueError:
                value = a[1]
        req = {"cmd": "fault", "fault": a[0], "value": value, "device": args.device}
    elif args.request == "clear":
        req = {"cmd": "clear_faults", "device": args.device}
    elif args.request in ("rescind", "reoffer"):
        if not a:
            raise ConfigError(f"{args.request} needs a DEVICE")
        req = {"cmd": args.request, "device": a[0]}
        if args.request == "rescind" and args.reoffer_after is not None:
            req["reoffer_after"] = args.reoffer_after
    elif args.request == "link":
        if len(a) != 2 or a[1] not in ("up", "down"):
            raise ConfigError("link needs DEVICE up|down")
        req = {"cmd": "model", "device": a[0], "op": "link", "args": {"up": a[1] == "up"}}
    elif args.request == "vf":
        if len(a) not in (2, 3) or a[1] not in ("add", "remove") or (len(a) == 3 and a[1] != "add"):
            raise ConfigError("vf needs DEVICE add [SERIAL] or DEVICE remove (e.g. `vf netvsc add`)")
        if len(a) == 3 and not a[2].isdigit():
            raise ConfigError(f"vf add: SERIAL is the VF's serial number, a decimal number "
                              f"(e.g. `vf {a[0]} add 7`), not {a[2]!r}")
        vargs: dict[str, Any] = {"action": a[1]}
        if len(a) == 3:
            vargs["serial"] = int(a[2])
        req = {"cmd": "model", "device": a[0], "op": "vf", "args": vargs}
    elif args.request == "ic":
        return _ctl_ic(args)
    elif args.request == "model":
        if len(a) < 2:
            raise ConfigError("model needs DEVICE OP [KEY=VALUE ...]")
        margs: dict[str, Any] = {}
        for kv in a[2:]:
            key, sep, val = kv.partition("=")
            if not sep:
                raise ConfigError(f"model arguments are KEY=VALUE, not {kv!r}")
            margs[key] = val
        req = {"cmd": "model", "device": a[0], "op": a[1], "args": margs}
    else:
        if len(a) != 2 or not a[1].isdigit():
            raise ConfigError("subchannels needs DEVICE COUNT (a number of sub-channels)")
        req = {"cmd": "offer_subchannels", "device": a[0], "count": int(a[1])}
    with ControlClient(args.root) as client:
        reply = client.call(req.pop("cmd"), **req)
    reply.pop("ok", None)
    if args.json:                   # always one JSON document, also for ping/stop/fault...
        print(json.dumps({"ok": True, **reply}, indent=2))
    elif args.request in ("model", "link", "vf"):
        # what was done, per device, even when the model has nothing more to say
        what = {"model": " ".join(a[1:2]), "link": f"link {a[1]}", "vf": f"vf {a[1]}"}[args.request]
        for dev, res in (reply.get("results") or {}).items():
            print("\n".join([f"{dev} ({what}):", *_human(res, "  ")]) if res else f"{dev}: {what} done")
    elif reply and args.request in ("ping", "stats", "devices", "kernel"):
        print("\n".join(_human(reply)))
    elif args.request == "stop":
        print("ok: the simulator is stopping")
    else:                           # what was done, and to which devices
        devs = reply.get("rescinded") or reply.get("reoffered") or reply.get("devices") or []
        what = {"fault": f"fault {' '.join(a[:2])} set", "clear": "faults cleared",
                "rescind": "rescinded" + (f" (re-offer in {args.reoffer_after:g} s)"
                                          if args.reoffer_after is not None else ""),
                "reoffer": "re-offered", "subchannels": f"{a[1] if len(a) > 1 else ''} sub-channel(s) offered",
                }.get(args.request, "done")
        print("\n".join(f"{d}: {what}" for d in devs if isinstance(d, str)) or f"ok: {what} (no device)")
    sys.stdout.flush()
    return 0


def _human(obj: Any, indent: str = "") -> list[str]:
    """A reply as indented ``key: value`` lines (``--json`` gives the JSON)."""
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{indent}{k}:")
                lines += _human(v, indent + "  ")
            else:
                lines.append(f"{indent}{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)):
                sub = _human(v, indent + "  ")
                lines.append(f"{indent}- {sub[0].strip()}" if sub else f"{indent}-")
                lines += sub[1:]
            else:
                lines.append(f"{indent}- {v}")
    else:
        lines.append(f"{indent}{obj}")
    return lines

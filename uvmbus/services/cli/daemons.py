"""The daemons on the command line: `uvmbus net bridge`, `uvmbus blk export`, and
`uvmbus units install`.

`net` and `blk` are command groups owned by their driver modules (cli/net.py, cli/blk.py);
this module runs after them in the registry and adds its sub-commands to their parsers
(or creates the group when the driver's module is not there).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from uvmbus.services.cli import (
    PORT,
    add_json,
    add_record,
    add_root,
    device_lock,
    int_range,
    recording,
    resolve_device,
    seconds,
)


def _group(sub: argparse._SubParsersAction, name: str, help: str, dest: str) -> argparse._SubParsersAction:
    """The sub-command action of group ``name`` (created if no module registered it)."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
        p = parser
        parser.set_defaults(func=lambda a: p.print_help() or 2)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=dest, metavar="COMMAND")


def _daemon_options(p: argparse.ArgumentParser) -> None:
    add_root(p)
    g = p.add_argument_group("service")
    g.add_argument("--run-dir", default=None,
                   help="pidfile and control socket directory (default: $UVMBUS_RUN_DIR, "
                        "systemd's $RUNTIME_DIRECTORY, or <root>/run/uvmbus)")
    g.add_argument("--metrics-port", type=PORT, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port)")
    g.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    g.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="write Prometheus metrics to PATH atomically (node_exporter textfile)")
    g.add_argument("--metrics-interval", type=seconds(), default=10.0, metavar="SECONDS",
                   help="textfile refresh period (default 10)")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text (journald-aware) or JSON lines")
    g.add_argument("--log-level", default="info", help="debug, info, warning, error")


def _reattach_option(p: argparse.ArgumentParser, meanwhile: str, default: float, watchdog: int) -> None:
    """--reattach-timeout; its default stays under the unit's WatchdogSec= (no watchdog ping
    while the device is gone)."""
    p.add_argument("--reattach-timeout", type=seconds(zero_ok=True), default=default, metavar="SECONDS",
                   help=f"after the device goes away (rescind, host loss, corrupt ring): report "
                        f"unhealthy, {meanwhile} and wait this long for a re-offer to reattach, "
                        f"else exit 1 so systemd restarts the service (default {default:g}, under "
                        f"the unit's {watchdog} s watchdog)")


def register(sub: argparse._SubParsersAction) -> None:
    net = _group(sub, "net", "synthetic NIC (netvsc)", "net")
    b = net.add_parser("bridge", help="daemon: connect the NIC to a TAP interface",
                       description="Run until SIGTERM: frames from the NIC go to the TAP, frames "
                                   "the kernel sends on the TAP go out of the NIC. Type=notify "
                                   "service (READY, STATUS, WATCHDOG, STOPPING on $NOTIFY_SOCKET).")
    b.add_argument("device", help="VMBus NIC (GUID, unique prefix, or 'netvsc')")
    b.add_argument("--tap", required=True, metavar="NAME", help="TAP interface to create")
    b.add_argument("--netns", default=None, metavar="NS",
                   help="move the TAP into network namespace NS (created if missing; needs "
                        "CAP_SYS_ADMIN: under systemd prefer NetworkNamespacePath=)")
    b.add_argument("--hook", default=None, metavar="MODULE:FUNCTION",
                   help="Python hook called with every burst: (direction, frames) -> frames | None")
    b.add_argument("--cpu", default=None, metavar="N[,M...]", help="pin the daemon to these CPUs")
    b.add_argument("--queues", type=int_range(1, 64), default=1, help="NIC queues (RX threads; default 1)")
    b.add_argument("--mtu", type=int_range(68, 9202), default=1500, help="MTU, 68..9202 (default 1500)")
    b.add_argument("--address", action="append", default=[], metavar="ADDR/PREFIX",
                   help="add this address to the TAP (repeatable)")
    b.add_argument("--burst", type=int_range(1, 1024), default=256,
                   help="frames per burst, 1..1024 (default 256)")
    b.add_argument("--no-lso", dest="lso", action="store_false",
                   help="no large sends: the TAP offers no TSO/checksum offload (IFF_VNET_HDR), the "
                        "kernel sends MTU-sized frames (default: large sends when the host "
                        "negotiated LSO and no --hook is given)")
    _reattach_option(b, "keep the TAP up (frames sent on it are dropped and counted; a NIC back "
                     "with another queue count, MTU or MAC is followed, the TAP changed in place)",
                     8.0, 10)
    _daemon_options(b)
    add_record(b)
    b.set_defaults(func=_bridge)

    blk = _group(sub, "blk", "synthetic SCSI disks (storvsc)", "blk_command")
    e = blk.add_parser("export", help="daemon: serve a LUN over NBD (nbdkit python plugin)",
                       description="Run until SIGTERM: nbdkit serves the LUN; the daemon owns the "
                                   "device and answers the plugin's requests. Type=notify service.")
    e.add_argument("device", help="VMBus SCSI controller (GUID, unique prefix, or 'storvsc')")
    e.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--socket", default=None, metavar="PATH",
                       help="NBD on this Unix socket (default: <run-dir>/blk-<GUID>.nbd)")
    where.add_argument("--port", type=int_range(1, 65535), default=None, metavar="P",
                       help="NBD on TCP port P")
    e.add_argument("--bind-address", default="127.0.0.1", metavar="ADDR",
                   help="address for --port (default 127.0.0.1; NBD has no authentication)")
    e.add_argument("--readonly", action="store_true", help="export read-only")
    _reattach_option(e, "answer requests with errors", 10.0, 15)
    e.add_argument("--subchannels", type=int_range(0, 64), default=0,
                   help="storvsc sub-channels (default 0)")
    e.add_argument("--nbdkit", default="nbdkit", metavar="PATH", help="nbdkit binary")
    e.add_argument("--nbdkit-arg", action="append", default=[], metavar="ARG",
                   help="extra nbdkit argument (repeatable), e.g. --nbdkit-arg=--filter=log")
    _daemon_options(e)
    add_record(e)
    e.set_defaults(func=_export)

    u = sub.add_parser("units", help="systemd units")
    usub = u.add_subparsers(dest="units_command", metavar="COMMAND")
    i = usub.add_parser("install", help="write uvmbus-bind@/net@/blk@.service and uvmbus-ic.service into "
                        "<root>/etc/systemd/system with ExecStart= pointing at this uvmbus")
    add_root(i, must_exist=False)
    i.add_argument("--exec", dest="exec_path", default=None, metavar="PATH",
                   help="uvmbus executable for ExecStart= (default: this one)")
    i.add_argument("--force", action="store_true",
                   help="write the units even if ExecStart= is under /home, /root or /tmp, "
                        "which the units' ProtectHome=/PrivateTmp= hide")
    add_json(i)
    i.set_defaults(func=_units_install)
    u.set_defaults(func=lambda a: u.print_help() or 2)


def _daemon(args: argparse.Namespace, kind: str) -> Any:
    from uvmbus.services.daemon import Daemon
    from uvmbus.services.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    return Daemon(kind, root=args.root, run_dir=args.run_dir, metrics_port=args.metrics_port,
                  metrics_host=args.metrics_host, metrics_file=args.metrics_file,
                  metrics_interval=args.metrics_interval)


def _bridge(args: argparse.Namespace) -> int:
    from uvmbus.errors import ConfigError
    from uvmbus.services.netbridge import BridgeOptions, run_bridge

    cpus = None
    if args.cpu:
        try:
            cpus = sorted({int(c) for c in args.cpu.split(",") if c.strip()})
        except ValueError:
            raise ConfigError(f"--cpu {args.cpu!r}: CPU numbers separated by commas") from None
    dev = resolve_device(args.root, args.device, "netvsc")
    opts = BridgeOptions(device=dev.device_id, tap=args.tap, root=args.root, netns=args.netns,
                         hook=args.hook, cpus=cpus, queues=args.queues, mtu=args.mtu,
                         addresses=list(args.address), burst=args.burst,
                         reattach_timeout=args.reattach_timeout, lso=args.lso)
    with device_lock(dev, what="start a bridge on it"), recording(args) as rec:
        opts.record = rec
        return run_bridge(opts, _daemon(args, "net"))


def _export(args: argparse.Namespace) -> int:
    from uvmbus.services.blkexport import ExportOptions, run_export
    from uvmbus.services.cli.blk import _nvme_target

    fn = _nvme_target(args)          # an NVMe controller (PCI address, vPCI GUID, "nvme")?
    dev = fn if fn is not None else resolve_device(args.root, args.device, "storvsc")
    opts = ExportOptions(device=dev.device_id, root=args.root, lun=args.lun, socket=args.socket,
                         port=args.port, bind_address=args.bind_address, readonly=args.readonly,
                         subchannels=args.subchannels, nbdkit=args.nbdkit,
                         nbdkit_args=list(args.nbdkit_arg), nvme=fn is not None,
                         reattach_timeout=args.reattach_timeout)
    with device_lock(dev, what="export it"), recording(args) as rec:
        opts.record = rec
        return run_export(opts, _daemon(args, "blk"))


def _units_install(args: argparse.Namespace) -> int:
    from uvmbus.services.persist import install_units

    written = install_units(args.root, exec_path=args.exec_path, force=args.force)
    if args.json:
        print(json.dumps({"written": [str(p) for p in written]}, indent=2))
        return 0
    for p in written:
        print(p)
    print("enable a device's binding with `uvmbus bind GUID --persist`; start a daemon with "
          "`systemctl enable --now uvmbus-net@GUID.service` (options in /etc/uvmbus/net-GUID.env)",
          file=sys.stderr)
    return 0

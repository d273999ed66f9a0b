"""`uvmbus ic run`: the integration-components daemon (heartbeat, shutdown, time sync, KVP,
file copy) over uio_hv_generic.  See docs/ic.md."""

from __future__ import annotations

import argparse

from uvmbus.services.cli import add_record, recording, seconds


def register(sub: argparse._SubParsersAction) -> None:
    from uvmbus.services.cli.daemons import _daemon_options, _reattach_option

    ic = sub.add_parser("ic", help="integration components (heartbeat, shutdown, time sync, KVP, fcopy)")
    isub = ic.add_subparsers(dest="ic_command", metavar="COMMAND")
    ic.set_defaults(func=lambda a: ic.print_help() or 2)
    r = isub.add_parser(
        "run", help="daemon: serve the integration components from userspace",
        description="Take the IC devices from hv_utils (binding them to uio_hv_generic), answer "
                    "the host until SIGTERM, then give them back. Type=notify service.")
    r.add_argument("--services", default="heartbeat,shutdown,timesync,kvp", metavar="LIST",
                   help="comma-separated: heartbeat, shutdown, timesync, kvp, fcopy "
                        "(default: all but fcopy)")
    r.add_argument("--fcopy-root", default=None, metavar="DIR",
                   help="fcopy: host copies land under DIR (the host's path is taken relative to it)")
    r.add_argument("--kvp-dir", default=None, metavar="DIR",
                   help="KVP pool files (hv_kvp_daemon format; default <root>/var/lib/hyperv)")
    r.add_argument("--shutdown-action", default="systemctl", metavar="ACTION",
                   help="systemctl (default: systemctl poweroff/reboot/hibernate), log (only log), "
                        "or command:CMD (runs CMD ACTION)")
    r.add_argument("--timesync", default="none", metavar="MODE",
                   help="none (report the offset), adjtimex (step on SYNC, slew otherwise; "
                        "CAP_SYS_TIME), or chrony:SOCKET (chronyd SOCK refclock)")
    r.add_argument("--no-bind", action="store_true",
                   help="do not rebind devices: serve only those already bound to uio_hv_generic")
    r.add_argument("--keep-bound", action="store_true",
                   help="at exit, leave the devices on uio_hv_generic instead of giving them back")
    r.add_argument("--bind-timeout", type=seconds(), default=10.0, metavar="SECONDS",
                   help="how long a bind/unbind may take (default 10)")
    _reattach_option(r, "keep serving the other services", 8.0, 10)
    _daemon_options(r)
    add_record(r, what="every packet of every IC channel served (requests and answers; KVP "
                       "values and fcopy data included, whatever --snaplen says)")
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from uvmbus.services.cli.daemons import _daemon
    from uvmbus.services.icdaemon import IcOptions, run_ic

    services = [s.strip() for s in args.services.split(",") if s.strip()]
    opts = IcOptions(root=args.root, services=services, fcopy_root=args.fcopy_root,
                     kvp_dir=args.kvp_dir, shutdown_action=args.shutdown_action,
                     timesync_apply=args.timesync, bind=not args.no_bind,
                     give_back=not args.keep_bound, bind_timeout=args.bind_timeout,
                     reattach_timeout=args.reattach_timeout)
    with recording(args) as rec:
        opts.record = rec
        return run_ic(opts, _daemon(args, "ic"))

"""`uvmbus demo`: the whole stack against an embedded simulated host (what `make demo` runs)."""

from __future__ import annotations

import argparse
import json
import sys

from uvmbus.services.cli import add_json, seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start a simulated host, drive a NIC and a disk, print figures",
                       description="Starts `uvmbus sim` in a temporary root with a NIC (loopback "
                                   "host) and a disk, binds both to uio_hv_generic, checks and "
                                   "measures traffic and I/O, prints the figures, cleans up. "
                                   "Exit status 0 only if every step worked.")
    p.add_argument("--seconds", type=seconds(), default=1.5,
                   help="time per measurement, > 0 (default 1.5)")
    p.add_argument("--kernel", default="6.18", help="simulated guest kernel (default 6.18)")
    p.add_argument("--time-limit", type=seconds(zero_ok=True), default=55.0,
                   help="abort if the demo takes longer (seconds; 0: no limit)")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    add_json(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from uvmbus.errors import UvmbusError
    from uvmbus.services.demo import DemoFailed, run_demo

    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        res = run_demo(seconds=args.seconds, say=say, keep=args.keep, time_limit=args.time_limit,
                       kernel=args.kernel)
    except (UvmbusError, OSError, TimeoutError) as exc:
        what = str(exc) if isinstance(exc, DemoFailed) else f"{type(exc).__name__}: {exc}"
        print(f"uvmbus demo: FAILED: {what}", file=sys.stderr)
        if args.verbose:
            raise
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        say(f"demo OK in {res['seconds']:.1f} s")
    return 0

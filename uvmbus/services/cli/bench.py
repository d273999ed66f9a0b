"""`uvmbus bench ring`: ring API cost against the native loop, measured in one run."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from uvmbus.services.cli import add_json, int_range, seconds

MAX_SIZE = 65536          # in-band payload bytes per packet (the ring holds 2 MiB)


def _sizes(text: str) -> list[int]:
    """argparse type for ``--sizes``: comma-separated payload sizes, 1..MAX_SIZE."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: payload sizes in bytes separated by commas, "
                                         "e.g. 64,1500") from None
    if not sizes or any(not 1 <= n <= MAX_SIZE for n in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be 1..{MAX_SIZE}")
    return sizes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="micro-benchmarks")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    r = bsub.add_parser("ring", help="in-band packets through one ring: Python burst API, "
                        "per-packet API, and the C loop as reference")
    r.add_argument("--sizes", type=_sizes, default=[64, 1500],
                   help=f"payload sizes in bytes, comma separated, 1..{MAX_SIZE} (default 64,1500)")
    r.add_argument("--seconds", type=seconds(), default=2.0,
                   help="time per variant and size (default 2)")
    r.add_argument("--burst", type=int_range(1, 4096), default=256,
                   help="packets per commit, 1..4096 (default 256)")
    add_json(r)
    r.set_defaults(func=_ring)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _ring(args: argparse.Namespace) -> int:
    from uvmbus.ring import bench

    if not args.json:       # the run takes sizes x 3 variants x --seconds: say so first
        print(f"ring benchmark: in-band packets, burst {args.burst}, {args.seconds:.1f} s per variant "
              f"(~{len(args.sizes) * 3 * args.seconds:.0f} s)", flush=True)
    results = bench.run(args.sizes, args.seconds, args.burst)
    by = {(r.variant, r.size): r for r in results}
    rows = []
    for r in results:
        ref = by[("c-loop", r.size)]
        d: dict[str, Any] = {**r.to_dict(), "ratio_to_c": round(r.mpps / ref.mpps, 4) if ref.mpps else None}
        rows.append(d)
    if args.json:
        print(json.dumps({"benchmark": "ring", "burst": args.burst, "python": platform.python_version(),
                          "machine": platform.machine(), "results": rows}, indent=2))
        return 0
    print(f"{'size':>6}  {'variant':<18} {'Mpps':>8} {'GB/s':>7} {'vs C loop':>10}")
    for d in rows:
        print(f"{d['size']:>6}  {d['variant']:<18} {d['mpps']:>8.2f} {d['gbytes_per_s']:>7.2f} "
              + (f"{d['ratio_to_c']:>9.1%}" if d["ratio_to_c"] is not None else f"{'-':>9}"))
    return 0

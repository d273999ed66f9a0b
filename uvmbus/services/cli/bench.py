"""`uvmbus bench ring`: ring API cost against the native loop, measured in one run."""

from __future__ import annotations

import argparse
import json
import platform

from uvmbus.services.cli import add_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="micro-benchmarks")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    r = bsub.add_parser("ring", help="in-band packets through one ring: Python burst API, "
                        "per-packet API, and the C loop as reference")
    r.add_argument("--sizes", default="64,1500", help="payload sizes in bytes (comma separated)")
    r.add_argument("--seconds", type=float, default=2.0, help="time per variant and size")
    r.add_argument("--burst", type=int, default=256, help="packets per commit")
    add_json(r)
    r.set_defaults(func=_ring)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _ring(args: argparse.Namespace) -> int:
    from uvmbus.ring import bench

    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = bench.run(sizes, args.seconds, args.burst)
    by = {(r.variant, r.size): r for r in results}
    rows = []
    for r in results:
        ref = by[("c-loop", r.size)]
        d = r.to_dict()
        d["ratio_to_c"] = round(r.mpps / ref.mpps, 4)
        rows.append(d)
    if args.json:
        print(json.dumps({"benchmark": "ring", "burst": args.burst, "python": platform.python_version(),
                          "machine": platform.machine(), "results": rows}, indent=2))
        return 0
    print(f"ring benchmark: in-band packets, burst {args.burst}, {args.seconds:.1f} s per variant")
    print(f"{'size':>6}  {'variant':<18} {'Mpps':>8} {'GB/s':>7} {'vs C loop':>10}")
    for d in rows:
        print(f"{d['size']:>6}  {d['variant']:<18} {d['mpps']:>8.2f} {d['gbytes_per_s']:>7.2f} "
              f"{d['ratio_to_c']:>9.1%}")
    return 0

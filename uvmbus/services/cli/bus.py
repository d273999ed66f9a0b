"""`uvmbus list`, `uvmbus bind`, `uvmbus unbind`: the bus layer on the command line."""

from __future__ import annotations

import argparse
import json

from uvmbus.services.cli import add_json, add_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list VMBus devices under the root")
    add_root(p)
    add_json(p)
    p.add_argument("--class", dest="cls", help="only devices of this class (e.g. netvsc, storvsc)")
    p.set_defaults(func=_list)

    b = sub.add_parser("bind", help="give a device to uio_hv_generic (userspace)")
    add_root(b)
    b.add_argument("device", help="instance GUID, unique prefix, or class name")
    b.add_argument("--force", action="store_true",
                   help="take the device even if the OS uses it (mounted disk, addressed NIC)")
    b.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the uio node")
    b.set_defaults(func=_bind)

    u = sub.add_parser("unbind", help="give a device back to its kernel driver")
    add_root(u)
    u.add_argument("device", help="instance GUID, unique prefix, or class name")
    u.add_argument("--timeout", type=float, default=10.0)
    u.set_defaults(func=_unbind)


def _list(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus

    bus = Bus(args.root)
    devs = bus.devices()
    if args.cls:
        devs = [d for d in devs if d.class_name == args.cls]
    rows = [d.to_dict() for d in devs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no VMBus devices under {bus.root}")
        return 0
    print(f"{'device_id':<38} {'class':<10} {'driver':<16} {'uio':<6} channels")
    for r in rows:
        chans = ",".join(str(c["relid"]) for c in r.get("channels", []))
        print(f"{r['device_id']:<38} {r['class']:<10} {r['driver'] or '-':<16} {r['uio'] or '-':<6} {chans}")
    return 0


def _bind(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus, bind_uio

    bus = Bus(args.root)
    dev = bind_uio(bus, args.device, force=args.force, timeout=args.timeout)
    print(f"{dev.device_id} bound to uio_hv_generic ({dev.uio})")
    return 0


def _unbind(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus, unbind_uio

    bus = Bus(args.root)
    dev = unbind_uio(bus, args.device, timeout=args.timeout)
    print(f"{dev.device_id} returned to {dev.driver or 'no driver'}")
    return 0

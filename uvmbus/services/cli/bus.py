"""`uvmbus list`, `status`, `bind`, `unbind`: the bus layer and the services on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from uvmbus.services.cli import add_json, add_root, device_lock, root_opt, seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list VMBus devices and PCI functions under the root")
    add_root(p)
    add_json(p)
    p.add_argument("--class", dest="cls", help="only devices of this class (e.g. netvsc, storvsc, "
                   "nvme)")
    p.add_argument("--pci", action="store_true", help="only PCI functions")
    p.add_argument("--vmbus", action="store_true", help="only VMBus devices")
    p.set_defaults(func=_list)

    s = sub.add_parser("status", help="devices, bindings, running uvmbus services, per-queue "
                       "counters, process CPU/RSS")
    add_root(s)
    add_json(s)
    s.add_argument("--run-dir", default=None,
                   help="where daemons keep pidfiles and control sockets "
                        "(default: $UVMBUS_RUN_DIR or <root>/run/uvmbus)")
    s.add_argument("--sample", type=seconds(zero_ok=True), default=0.2, metavar="SECONDS",
                   help="CPU usage sampling time (0: skip)")
    s.add_argument("--all", action="store_true", dest="all_roots",
                   help="also list the uvmbus processes of other roots (other simulators on "
                        "this machine); by default they are only counted")
    s.set_defaults(func=_status)

    b = sub.add_parser("bind", help="give a device to userspace: a VMBus device to uio_hv_generic, "
                       "a PCI function (address, or its vPCI GUID) to vfio-pci")
    add_root(b)
    add_json(b)
    b.add_argument("device", help="instance GUID, unique prefix, class name, or PCI address "
                   "(0000:00:04.0)")
    b.add_argument("--force", action="store_true",
                   help="take the device even if the OS uses it (mounted disk, addressed NIC)")
    b.add_argument("--timeout", type=seconds(), default=None,
                   help="seconds to wait for the uio node (default 10; 30 with --boot)")
    b.add_argument("--persist", action="store_true",
                   help="also bind it at every boot (uvmbus-bind@GUID.service + "
                        "<root>/etc/uvmbus/bind.d/GUID.conf)")
    b.add_argument("--boot", action="store_true",
                   help="as uvmbus-bind@.service runs it: options from the persisted record")
    b.set_defaults(func=_bind)

    u = sub.add_parser("unbind", help="give a device back to its kernel driver")
    add_root(u)
    add_json(u)
    u.add_argument("device", help="instance GUID, unique prefix, class name, or PCI address")
    u.add_argument("--timeout", type=seconds(), default=10.0,
                   help="seconds to wait for the kernel driver to take it (default 10)")
    u.add_argument("--persist", action="store_true",
                   help="also stop binding it at boot (removes what bind --persist wrote)")
    u.set_defaults(func=_unbind)


def _list(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus
    from uvmbus.vfio.pci import PciBus

    bus = Bus(args.root)
    devs = [] if args.pci else bus.devices()
    if args.cls:
        devs = [d for d in devs if d.class_name == args.cls]
    rows = [{"bus": "vmbus", **d.to_dict()} for d in devs]
    fns = [] if args.vmbus else PciBus(args.root).functions(cls=args.cls)
    pci_rows = [{"bus": "pci", **f.to_dict()} for f in fns]
    by_parent = {r["vmbus_parent"]: r["address"] for r in pci_rows if r["vmbus_parent"]}
    for r in rows:
        if r["device_id"] in by_parent:
            r["pci"] = by_parent[r["device_id"]]
    if args.json:
        print(json.dumps(rows + pci_rows, indent=2))
        return 0
    if args.cls and not rows and not pci_rows:
        print(f"no {args.cls} devices under {bus.root}: neither a VMBus device nor a PCI function "
              "of that class (`uvmbus list` shows every device)")
        return 0
    if pci_rows or args.pci:
        _print_vmbus(bus, rows, args)
        _print_pci(pci_rows, args)
        return 0
    return _print_vmbus(bus, rows, args)


def _print_pci(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not rows:
        print(f"no {args.cls + ' ' if args.cls else ''}PCI functions under {args.root}")
        return
    print(f"{'pci address':<14} {'vendor:dev':<10} {'class':<12} {'driver':<12} {'group':<8} "
          f"{'vmbus parent':<37} {'slot':<6} os")
    for r in rows:
        group = "-" if r["iommu_group"] is None else (
            f"noiommu-{r['iommu_group']}" if r["noiommu"] else str(r["iommu_group"]))
        used = " ".join([*r["net"], *r["block"]]) or "-"
        print(f"{r['address']:<14} {r['vendor']}:{r['device']:<5} {r['class_name']:<12} "
              f"{r['driver'] or '-':<12} {group:<8} {r['vmbus_parent'] or '-':<37} "
              f"{r.get('slot') or '-':<6} {used}")


def _print_vmbus(bus: Any, rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    if args.pci:
        return 0
    if not rows:
        if not bus.vmbus_path.is_dir():
            print(f"no VMBus devices under {bus.root} (no sys/bus/vmbus: not a Hyper-V guest? "
                  "start `uvmbus sim` and pass its root with --root or UVMBUS_ROOT)")
        else:
            print(f"no {args.cls + ' ' if args.cls else ''}VMBus devices under {bus.root}")
        return 0
    print(f"{'device_id':<38} {'class':<10} {'driver':<16} {'uio':<6} {'relids':<9} os")
    for r in rows:
        chans = ",".join(str(c["relid"]) for c in r.get("channels", []))
        used = " ".join([*r.get("net", []), *r.get("block", [])]                # ifname / sdX disks
                        + ([f"pci {r['pci']}"] if r.get("pci") else [])) or "-"
        print(f"{r['device_id']:<38} {r['class']:<10} {r['driver'] or '-':<16} {r['uio'] or '-':<6} "
              f"{chans:<9} {used}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from uvmbus.services.status import collect_status, format_status

    st = collect_status(args.root, run_dir=args.run_dir, sample=max(0.0, args.sample),
                        all_roots=args.all_roots)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
    return 0


def _bind(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus, bind_uio
    from uvmbus.errors import ConfigError, NotFound
    from uvmbus.services.persist import persist_binding, read_record

    bus = Bus(args.root)
    force = args.force
    timeout = args.timeout if args.timeout is not None else (30.0 if args.boot else 10.0)
    pci = _pci_target(args.root, args.device)
    if pci is not None and not args.boot:
        return _bind_pci(args, pci, force, timeout)
    if args.boot:
        if args.persist:
            raise ConfigError("--boot and --persist do not go together")
        rec = read_record(args.root, args.device)
        if rec is None:
            raise NotFound(f"no persisted binding for {args.device} (etc/uvmbus/bind.d/"
                           f"{args.device}.conf under {args.root}); `uvmbus bind {args.device} "
                           f"--persist{root_opt(args.root)}` creates it")
        force = force or rec.get("FORCE") == "1"
        if rec.get("CLASS") == "pci":
            from uvmbus.vfio import PciBus, bind_vfio

            fn = bind_vfio(PciBus(args.root), args.device, force=force, timeout=timeout)
            _report(args, f"{fn.name} (vPCI {args.device}) bound to vfio-pci",
                    {"device_id": args.device, "pci": fn.name, "driver": "vfio-pci"})
            return 0
    dev = bind_uio(bus, args.device, force=force, timeout=timeout)
    out: dict[str, object] = {"device_id": dev.device_id, "class": dev.class_name,
                              "driver": dev.driver, "uio": dev.uio, "persistent": None}
    if not args.json:
        print(f"{dev.device_id} bound to uio_hv_generic ({dev.uio})")
    if args.persist:
        res = persist_binding(args.root, dev.device_id, class_name=dev.class_name, force=args.force)
        how = "systemctl enable" if res.systemctl else f"{res.wants} -> {res.unit.name}"
        out["persistent"] = {"record": str(res.record), "unit": str(res.unit), "systemctl": bool(res.systemctl)}
        if not args.json:
            print(f"persistent: {res.record} ({how}); `uvmbus unbind {dev.device_id} "
                  f"--persist{root_opt(args.root)}` undoes it")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _pci_target(root: str, ref: str) -> Any:
    """The PCI function ``ref`` names (a PCI address, or a VMBus vPCI device's GUID), else None."""
    from uvmbus.bus import Bus
    from uvmbus.vfio.pci import PciBus, normalize_bdf

    pbus = PciBus(root)
    if normalize_bdf(ref) is not None:
        return pbus.function(ref)
    try:
        dev = Bus(root).device(ref)
    except Exception:       # not a VMBus device (or no VMBus here): a PCI class name?
        return pbus.function(ref) if ref == "nvme" else None
    if dev.class_name != "pci":
        return None
    return pbus.function(dev.device_id)


def _bind_pci(args: argparse.Namespace, fn: Any, force: bool, timeout: float) -> int:
    from uvmbus.errors import ConfigError
    from uvmbus.services.persist import persist_binding
    from uvmbus.vfio import PciBus, bind_vfio

    if args.persist and not fn.vmbus_parent:
        raise ConfigError(f"--persist for a PCI function needs a Hyper-V vPCI device (its VMBus "
                          f"GUID names it across reboots); {fn.name} has no VMBus parent. Use "
                          "driverctl (`driverctl set-override ADDRESS vfio-pci`) on this machine")
    fn = bind_vfio(PciBus(args.root), fn, force=force, timeout=timeout)
    group = fn.vfio_group_path
    out: dict[str, object] = {"pci": fn.name, "driver": "vfio-pci", "group": str(group),
                              "device_id": fn.vmbus_parent, "persistent": None}
    text = [f"{fn.name} bound to vfio-pci (group {group})"]
    if args.persist:
        res = persist_binding(args.root, fn.vmbus_parent, class_name="pci", force=args.force)
        out["persistent"] = {"record": str(res.record)}
        text.append(f"persistent: {res.record}; `uvmbus unbind {fn.vmbus_parent} "
                    f"--persist{root_opt(args.root)}` undoes it")
    _report(args, "\n".join(text), out)
    return 0


def _report(args: argparse.Namespace, text: str, data: dict[str, object]) -> None:
    """``text`` for people, or ``data`` as JSON with ``--json``."""
    print(json.dumps(data, indent=2) if args.json else text)


def _unbind(args: argparse.Namespace) -> int:
    from uvmbus.bus import Bus, unbind_uio
    from uvmbus.errors import NotFound
    from uvmbus.services.persist import read_record, unpersist_binding

    pci = _pci_target(args.root, args.device)
    if pci is not None:
        from uvmbus.vfio import PciBus, unbind_vfio

        with device_lock(pci, what="unbind it"):
            fn = unbind_vfio(PciBus(args.root), pci, timeout=args.timeout)
        text = f"{fn.name} returned to {fn.driver or 'no driver'}"
        if args.persist and fn.vmbus_parent:
            unpersist_binding(args.root, fn.vmbus_parent)
            text += "\nno longer bound at boot"
        _report(args, text, {"pci": fn.name, "driver": fn.driver, "device_id": fn.vmbus_parent,
                             "persist_removed": bool(args.persist and fn.vmbus_parent)})
        return 0
    bus = Bus(args.root)
    try:
        dev = bus.device(args.device)
    except NotFound:
        if args.persist and read_record(args.root, args.device) is not None:
            res = unpersist_binding(args.root, args.device)     # the device is gone: forget it
            if args.json:
                print(json.dumps({"device_id": args.device, "present": False,
                                  "removed": [str(p) for p in res.removed]}, indent=2))
            else:
                print(f"{args.device} is not present; persisted binding removed "
                      f"({', '.join(str(p) for p in res.removed)})")
            return 0
        raise
    with device_lock(dev, what="unbind it"):
        dev = unbind_uio(bus, dev, timeout=args.timeout)
    out: dict[str, object] = {"device_id": dev.device_id, "present": True, "driver": dev.driver,
                              "removed": None, "bound_at_boot": False}
    if not args.json:
        print(f"{dev.device_id} returned to {dev.driver or 'no driver'}")
    if args.persist:
        res = unpersist_binding(args.root, dev.device_id)
        out["removed"] = [str(p) for p in res.removed]
        if not args.json:
            gone = ", ".join(str(p) for p in res.removed) or "nothing was persisted"
            print(f"no longer bound at boot (removed: {gone})")
    elif read_record(args.root, dev.device_id) is not None:
        out["bound_at_boot"] = True
        print(f"note: {dev.device_id} is still bound to uio_hv_generic at every boot; "
              "add --persist to stop that", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0

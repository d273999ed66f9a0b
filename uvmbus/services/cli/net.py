"""`uvmbus net info|capture|bench`: the synthetic NIC from the command line (netvsc driver).

Each command brings the NIC up itself (the device must be bound to uio_hv_generic and not in
use by another process: the commands hold a lock on the device while they run, see
``device_lock``) and tears it down cleanly at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from uvmbus.errors import ConfigError, UvmbusError
from uvmbus.services.cli import (
    add_json,
    add_record,
    add_root,
    device_lock,
    int_range,
    output_file,
    recording,
    resolve_device,
    seconds,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("net", help="synthetic NIC (netvsc): info, packet capture, benchmark, "
                       "TAP bridge daemon")
    nsub = p.add_subparsers(dest="net", metavar="WHAT")

    i = nsub.add_parser("info", help="bring the NIC up and show what it negotiated")
    i.add_argument("device", help="device GUID, unique prefix, or 'netvsc'")
    i.add_argument("--queues", type=int_range(1, 64), default=1, help="queues to ask for (default 1)")
    i.add_argument("--stats", action="store_true",
                   help="also ask the host for its counters (OID_GEN_XMIT_OK, RCV_OK, ...) and show "
                        "the driver's own (frames, drops, RSC joins, host errors)")
    i.add_argument("--rsc", action="store_true",
                   help="ask for receive segment coalescing (open(..., rsc=True)) and show whether "
                        "the host agreed")
    _add_timeout(i)
    add_root(i)
    add_json(i)
    add_record(i)
    i.set_defaults(func=_info)

    c = nsub.add_parser("capture", help="write received frames to a pcap file")
    c.add_argument("device", help="device GUID, unique prefix, or 'netvsc'")
    c.add_argument("-w", "--write", required=True, metavar="FILE.pcap",
                   help="output file, replaced only when the capture succeeds ('-': stdout)")
    c.add_argument("-c", "--count", type=int_range(0), default=0,
                   help="stop after COUNT frames (0: until ^C)")
    c.add_argument("--seconds", type=seconds(zero_ok=True), default=0.0,
                   help="stop after this long (0: no limit)")
    c.add_argument("--queues", type=int_range(1, 64), default=1, help="queues to receive on (default 1)")
    c.add_argument("--promiscuous", action="store_true", help="packet filter PROMISCUOUS")
    _add_timeout(c)
    add_root(c)
    add_record(c)
    c.set_defaults(func=_capture)

    b = nsub.add_parser("bench", help="frames/s through the data path, with the ring's C loop "
                        "as reference")
    b.add_argument("device", help="device GUID, unique prefix, or 'netvsc'")
    b.add_argument("--mode", choices=("rx", "tx", "fwd"), required=True,
                   help="rx: receive, tx: send, fwd: receive and send back out")
    b.add_argument("--size", type=int_range(60, 9014), default=64,
                   help="frame size in bytes, 60..9014 (default 64)")
    b.add_argument("--seconds", type=seconds(), default=5.0, help="measured time (default 5)")
    b.add_argument("--queues", type=int_range(1, 64), default=1, help="queues, one thread each (default 1)")
    b.add_argument("--burst", type=int_range(1, 1024), default=256,
                   help="frames per call, 1..1024 (default 256)")
    b.add_argument("--flows", type=int_range(1), default=64,
                   help="flows of the simulator's generator (default 64)")
    b.add_argument("--proto", choices=("udp", "tcp"), default="udp",
                   help="what the simulator's generator sends (rx, fwd): UDP datagrams or "
                        "in-order TCP segments per flow (default udp)")
    b.add_argument("--copy", action="store_true",
                   help="rx: receive copied bursts (rx_burst(copy=True)) instead of zero-copy ones")
    b.add_argument("--rsc", choices=("off", "on", "both"), default="off",
                   help="receive segment coalescing (--mode rx --proto tcp only): off, on, or both "
                        "= the same benchmark without and then with RSC, in one run (default off)")
    _add_timeout(b)
    add_root(b)
    add_json(b)
    add_record(b)
    b.set_defaults(func=_bench)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _add_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=seconds(), default=10.0,
                   help="seconds to wait for each answer of the host while bringing the NIC up "
                        "and down, and for a simulator's endpoint to open (default 10)")


def _info(args: argparse.Namespace) -> int:
    import uvmbus.netvsc as nv

    dev = resolve_device(args.root, args.device, "netvsc")
    with device_lock(dev), recording(args) as rec, \
            nv.open(dev.device_id, args.root, queues=args.queues, timeout=args.timeout, record=rec,
                    rsc=args.rsc) as nic:
        info = nic.info().to_dict()
        if args.stats:
            info["host_stats"] = nic.host_stats()
            info["guest_stats"] = nic.stats()["total"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    speed = info["link_speed_bps"]
    rows: list[tuple[str, Any]] = [
        ("device", info["device_id"]), ("mac", info["mac"]), ("mtu", info["mtu"]),
        ("link", f"{'up' if info['link_up'] else 'down'}" + (f", {speed / 1e9:g} Gbit/s" if speed else "")),
        ("queues", f"{info['queues']} (asked {info['requested_queues']}, host offers "
                   f"{info['rss_queues_offered']})"),
        ("NVSP / NDIS", f"{info['nvsp_version']} / {info['ndis_version']}"),
        ("receive buffer", f"{info['recv_buffer'] >> 20} MiB: {info['sub_allocs']} x {info['sub_alloc_size']} B"),
        ("send buffer", f"{info['send_buffer'] >> 20} MiB: {info['sections']} x {info['section_size']} B"),
        ("batching", f"{info['max_pkt_per_msg']} frames per message, {info['pkt_alignment']}-byte alignment"),
        ("offloads", ", ".join(k for k, v in info["offloads"].items() if v is True) or "none"),
        ("LSO", _lso_text(info["lso"])),
        ("GPA direct", "yes" if info["gpa_direct"] else "no (copy only)"),
    ]
    if info["send_table"]:
        rows.append(("send table", " ".join(map(str, info["send_table"]))))
    if info["permanent_mac"] and info["permanent_mac"] != info["mac"]:
        rows.append(("permanent mac", info["permanent_mac"]))
    rows.append(("packet filter", f"{info['packet_filter']:#x} ({', '.join(info['packet_filter_names']) or 'none'})"))
    rows.append(("VF", _vf_text(info["vf"])))
    rows.append(("RSC", "on" if info["rsc"] else
                 ("off (the host offers it: --rsc / open(..., rsc=True))" if info["offloads"].get("rsc")
                  else "off (the host does not offer it)")))
    gs = info.get("guest_stats")
    if gs is not None:
        keys = ("rx_packets", "rx_bytes", "rx_drops", "tx_packets", "tx_drops", "host_errors",
                "rx_rsc_frames", "rx_rsc_frags", "rx_rsc_errors")
        rows.append(("driver counters", ", ".join(f"{k} {gs[k]}" for k in keys if k in gs)))
    hs = info.get("host_stats")
    if hs is not None:
        answered = {k: v for k, v in hs.items() if v is not None}
        rows.append(("host counters", ", ".join(f"{k} {v}" for k, v in answered.items()) or "none answered"))
        missing = [k for k, v in hs.items() if v is None]
        if missing:
            rows.append(("not answered", ", ".join(missing)))
    for k, v in rows:
        print(f"{k:>15}: {v}")
    return 0


def _lso_text(lso: dict[str, Any]) -> str:
    """The large-send row of `net info` (docs/netvsc.md "Large send offload")."""
    parts = [f"{v} up to {lso[k]} B" for k, v in (("ipv4_max", "IPv4"), ("ipv6_max", "IPv6")) if lso.get(k)]
    if not parts:
        return "off (not offered by the host, or not enabled)"
    return ", ".join(parts) + f", at least {lso.get('min_segments', 0)} segments"


def _vf_text(vf: dict[str, Any]) -> str:
    """The accelerated-networking VF row of `net info` (docs/netvsc.md)."""
    if not vf.get("supported"):
        return "none (SR-IOV not advertised: NVSP < 5)"
    if not vf.get("allocated"):
        return "none announced by the host"
    pci = ", ".join(vf.get("pci") or []) or "no matching PCI function (yet)"
    return f"serial {vf['serial']}, PCI {pci}; data path {vf['data_path']}"


def _capture(args: argparse.Namespace) -> int:
    import uvmbus.netvsc as nv
    from uvmbus.netvsc.pcap import PcapWriter

    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    dev = resolve_device(args.root, args.device, "netvsc")
    old = signal.signal(signal.SIGINT, on_signal)
    n = 0
    try:
        if args.write == "-" and sys.stdout.isatty():
            raise ConfigError("refusing to write a pcap to a terminal: pass -w FILE or pipe it "
                              "(`-w - | tshark -r -`)")
        with device_lock(dev), output_file(args.write, what="pcap") as f, recording(args) as rec, \
                nv.open(dev.device_id, args.root, queues=args.queues, timeout=args.timeout, record=rec) as nic:
            if args.promiscuous:
                nic.set_promiscuous(True)
            w = PcapWriter(f)
            deadline = time.monotonic() + args.seconds if args.seconds else None
            while not stop and (not args.count or n < args.count):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                for q in range(nic.num_queues):
                    b = nic.rx_burst(q, 256, timeout=0.05)
                    for k in range(len(b)):
                        if args.count and n >= args.count:
                            break
                        w.write(b[k], vlan=b.meta(k).vlan)
                        n += 1
                w.flush()
    finally:
        signal.signal(signal.SIGINT, old)
    print(f"{n} frames written to {'stdout' if args.write == '-' else args.write}", file=sys.stderr)
    if n == 0:
        hint = _loopback_hint(args.root, dev.device_id)
        if hint:
            print(hint, file=sys.stderr)
    return 0


def _loopback_hint(root: str, device_id: str) -> str | None:
    """Why a capture on a simulated NIC saw nothing: its loopback backend only returns what
    the guest itself sends."""
    from uvmbus.netvsc.bench import sim_nic_backend
    from uvmbus.sim.control import ControlClient, control_path

    if not control_path(root).exists():
        return None
    try:
        with ControlClient(root, timeout=3.0) as c:
            backend = sim_nic_backend(c, device_id)
    except (UvmbusError, OSError):
        return None
    if backend != "loopback":
        return None
    return (f"note: no frames: this simulated NIC has the loopback backend, which only returns "
            f"the frames the guest itself sends. For traffic to capture, switch it to the "
            f"generator (`uvmbus sim ctl --root {root} model {device_id} backend "
            f"backend=generator`) or to a TAP (`backend=tap:NAME`), or start the simulator "
            f"with --nic-backend generator")


def _bench(args: argparse.Namespace) -> int:
    from uvmbus.netvsc.bench import run_bench

    if args.proto == "tcp" and args.mode == "tx":
        raise ConfigError("--proto tcp: --mode tx sends the driver's own UDP frames (the simulator's "
                          "generator, which --proto sets, feeds --mode rx and fwd)")
    if args.copy and args.mode != "rx":
        raise ConfigError(f"--copy: --mode {args.mode} forwards or sends from the receive buffer "
                          f"(zero-copy); copied bursts are measured with --mode rx")
    if args.rsc != "off" and args.mode == "rx" and args.proto != "tcp":  # other modes: run_bench says
        raise ConfigError(f"--rsc {args.rsc}: RSC coalesces TCP segments, and the generator sends "
                          f"{args.proto.upper()}: add --proto tcp")
    dev = resolve_device(args.root, args.device, "netvsc")
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.rsc]
    results = []
    with device_lock(dev), recording(args) as rec:
        for rsc in variants:
            results.append(run_bench(dev.device_id, args.root, mode=args.mode, size=args.size,
                                     seconds=args.seconds, queues=args.queues, burst=args.burst,
                                     flows=args.flows, timeout=args.timeout, record=rec,
                                     proto=args.proto, rsc=rsc, copy=args.copy))
            if results[-1].error:
                break
    if args.json:
        if len(results) == 1:
            print(json.dumps(results[0].to_dict(), indent=2))
        else:
            off, on = results[0], results[-1]
            print(json.dumps({"runs": [r.to_dict() for r in results],
                              "rsc_payload_ratio": round(on.payload_bytes * off.seconds /
                                                         (off.payload_bytes * on.seconds), 3)
                              if len(results) == 2 and off.payload_bytes and on.seconds else None},
                             indent=2))
    bad = next((r for r in results if r.error), None)
    if bad is not None:  # never a success over a dead channel (the figures include dead time)
        print(f"uvmbus net bench: {bad.error}; the figures are not valid (reopen the device)",
              file=sys.stderr)
        return 1
    if args.json:
        return 0
    for r in results:
        _print_bench(r)
    if len(results) == 2 and results[0].payload_bytes and results[1].seconds:
        off, on = results
        ratio = on.payload_bytes * off.seconds / (off.payload_bytes * on.seconds)
        print(f"RSC on / off (TCP payload per second, same run): {ratio:.2f}x")
    return 0


def _print_bench(r: Any) -> None:
    extra = f", {r.proto.upper()}" + (", RSC on" if r.rsc else ", RSC off") if r.proto == "tcp" else ""
    extra += ", copied bursts" if r.copy else ""
    print(f"netvsc {r.mode}: {r.size}-byte frames{extra}, {r.queues} queue(s), burst {r.burst}, {r.seconds:.1f} s")
    print(f"  {r.mpps:8.3f} Mpps  {r.gbits:8.2f} Gbit/s   ({r.frames} frames; per queue {r.per_queue})")
    if r.proto == "tcp" and r.mode == "rx":
        print(f"  TCP: {r.segments / r.seconds / 1e6:8.3f} M segments/s  "
              f"{r.payload_bytes * 8 / r.seconds / 1e9:8.2f} Gbit/s payload  "
              f"({r.segments} segments in {r.frames} frames, {r.segments / max(r.frames, 1):.1f} per frame)")
    if r.ring_c_loop_mpps:
        print(f"  ring C loop (same run, {r.size}-byte in-band packets): {r.ring_c_loop_mpps:.2f} Mpps "
              f"{r.ring_c_loop_gbits:.2f} Gbit/s -> {r.mpps / r.ring_c_loop_mpps:.1%} of it")
    g = r.guest
    print(f"  guest: drops {g['drops']} ring-full {g['tx_ring_full']} no-section {g['tx_no_section']} "
          f"host errors {g['host_errors']} signals {g['signals']}"
          + (f" rsc frames {g['rx_rsc_frames']} fragments {g['rx_rsc_frags']}" if r.rsc else ""))

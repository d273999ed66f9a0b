"""`uvmbus trace`: show, diff, dissector, wireshark (docs/trace.md)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from uvmbus.services.cli import add_json, int_range, seconds

if TYPE_CHECKING:
    from uvmbus.trace.pcapng import ReadStatus


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="VMBus traces (pcapng): show, diff, Wireshark dissector",
                       description="Work with traces recorded by --record (guest) or "
                                   "`uvmbus sim --record` (host). See docs/trace.md.")
    tsub = p.add_subparsers(dest="trace_command", metavar="COMMAND")

    s = tsub.add_parser("show", help="decode a trace (no Wireshark needed)")
    s.add_argument("file", help="trace file (.pcapng)")
    s.add_argument("--events", action="store_true", help="include host events (signals, interrupts, ...)")
    add_json(s)
    s.set_defaults(func=_show)

    d = tsub.add_parser("diff", help="compare two sessions message by message",
                        description="Compare the message sequences of two traces, ignoring "
                                    "timestamps, relids, transaction/request ids and GPADL handles. "
                                    "Exit status 0: same, 1: different, 2: a trace is truncated "
                                    "(see --allow-truncated).")
    d.add_argument("a", help="first trace")
    d.add_argument("b", help="second trace")
    d.add_argument("--side", choices=("guest", "host"), default=None,
                   help="compare only what this side recorded (default: everything)")
    d.add_argument("--events", action="store_true", help="compare events too")
    d.add_argument("--allow-truncated", action="store_true",
                   help="compare a trace that is cut off (recorder killed mid-write) as far as it goes "
                        "(default: refuse, exit status 2)")
    add_json(d)
    d.set_defaults(func=_diff)

    b = tsub.add_parser("bench", help="recording cost per packet (the ring C loop without/with a recorder)")
    b.add_argument("--size", type=int_range(1, 65536), default=64, help="payload bytes per packet (default 64)")
    b.add_argument("--seconds", type=seconds(), default=1.0, help="time per run (default 1)")
    b.add_argument("--burst", type=int_range(1, 4096), default=32, help="packets per commit (default 32)")
    b.add_argument("--rounds", type=int_range(1, 100), default=3, help="alternations, medians reported (default 3)")
    b.add_argument("--dir", default="/dev/shm", help="where the trace goes (default /dev/shm)")
    add_json(b)
    b.set_defaults(func=_bench)

    x = tsub.add_parser("dissector", help="print the path of the Wireshark Lua dissector")
    x.set_defaults(func=_dissector)

    w = tsub.add_parser("wireshark", help="open a trace in Wireshark with the dissector loaded")
    w.add_argument("file", help="trace file (.pcapng)")
    w.add_argument("--tshark", action="store_true", help="print it with tshark instead (no GUI)")
    w.set_defaults(func=_wireshark)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _read(path: str) -> tuple[list[Any], ReadStatus]:
    """Decode a trace; a cut-off file is read as far as it goes, with a warning on stderr."""
    from uvmbus.trace.decode import decode_file
    from uvmbus.trace.pcapng import ReadStatus

    status = ReadStatus()
    msgs = decode_file(path, status)
    if status.truncated:
        print(f"uvmbus: warning: {status.warning(path)}", file=sys.stderr)
    return msgs, status


def _truncation(path: str, status: ReadStatus) -> dict[str, Any]:
    return {"file": path, "truncated": status.truncated, "truncated_at": status.truncated_at, "size": status.size}


def _show(args: argparse.Namespace) -> int:
    from uvmbus.trace.decode import messages_text

    msgs, status = _read(args.file)
    msgs = [m for m in msgs if args.events or m.kind == "packet"]
    if args.json:
        print(json.dumps({**_truncation(args.file, status), "messages": [m.to_dict() for m in msgs]},
                         indent=1))
        return 0
    try:
        for line in messages_text(msgs):
            print(line)
    except BrokenPipeError:
        sys.stderr.close()
    return 0


def _diff(args: argparse.Namespace) -> int:
    from uvmbus.trace.diff import diff

    a, sa = _read(args.a)
    b, sb = _read(args.b)
    cut = [name for name, st in ((args.a, sa), (args.b, sb)) if st.truncated]
    if cut and not args.allow_truncated:
        msg = (f"{' and '.join(cut)} {'is' if len(cut) == 1 else 'are'} truncated: a comparison would "
               "report the missing tail as differences; pass --allow-truncated to compare what is there")
        if args.json:
            print(json.dumps({"same": None, "truncated": True, "left_trace": _truncation(args.a, sa),
                              "right_trace": _truncation(args.b, sb), "error": msg}, indent=1))
        print(f"uvmbus: error: {msg}", file=sys.stderr)
        return 2
    r = diff(a, b, events=args.events, side=args.side)
    if args.json:
        print(json.dumps({**r.to_dict(), "truncated": bool(cut),
                          "left_trace": _truncation(args.a, sa), "right_trace": _truncation(args.b, sb)}, indent=1))
    else:
        width = shutil.get_terminal_size((160, 20)).columns
        for line in r.lines(width):
            print(line)
        if cut:
            print(f"(compared as far as {' and '.join(cut)} go{'es' if len(cut) == 1 else ''}: truncated)")
    return 0 if r.same else 1


def _bench(args: argparse.Namespace) -> int:
    from uvmbus.trace.bench import recorder_cost

    r = recorder_cost(args.size, args.seconds, args.burst, args.rounds, args.dir)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"ring C loop, {r['size']}-byte in-band packets, burst {r['burst']}, median of {r['rounds']}:")
    print(f"  without recorder {r['mpps_without']:8.2f} Mpps   {r['all_without']}")
    print(f"  with recorder    {r['mpps_with']:8.2f} Mpps   {r['all_with']}")
    print(f"  recording adds {r['ns_per_packet_added']} ns per packet ({r['bytes_per_record']} bytes of trace each)")
    return 0


def _dissector(args: argparse.Namespace) -> int:
    from uvmbus.trace.wireshark import dissector_path

    print(dissector_path())
    return 0


def _wireshark(args: argparse.Namespace) -> int:
    from uvmbus.errors import NotFound
    from uvmbus.trace.wireshark import dissector_path

    prog = "tshark" if args.tshark else "wireshark"
    exe = shutil.which(prog)
    if exe is None:
        raise NotFound(f"{prog} is not installed (Debian: apt-get install {prog}); "
                       f"or load {dissector_path()} with -X lua_script:PATH yourself")
    if not os.path.exists(args.file):
        raise NotFound(f"{args.file} does not exist")
    argv = [exe, "-X", f"lua_script:{dissector_path()}", "-r", args.file]
    if args.tshark:
        argv += ["-V"]
    os.execv(exe, argv)
    return 0   # not reached

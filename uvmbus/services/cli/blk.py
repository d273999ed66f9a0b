"""`uvmbus blk`: the storvsc driver from the command line.

* ``blk info DEVICE [--json]``: protocol, channels, LUNs (size, block size, VPD);
* ``blk read DEVICE [--lun N] [--offset B] [--length B] [-o FILE]``: dd-like copy out
  (stdout without -o), progress bar on a terminal;
* ``blk write DEVICE [--lun N] [--offset B] -i FILE [--fua]``: dd-like copy in;
* ``blk bench DEVICE --pattern P --bs B --qd N --seconds S [--json]``: IOPS and MB/s, with a
  C pread loop over the same backing file as reference in the same run.

DEVICE is a VMBus instance GUID, a unique prefix, or ``storvsc`` when there is one SCSI
controller; it must be bound to uio_hv_generic (``uvmbus bind``).  An NVMe controller (the
userspace NVMe driver over VFIO) is named by its PCI address (``0000:00:04.0``), its vPCI
GUID, or ``nvme`` when there is one, bound to vfio-pci (``uvmbus bind``); ``--lun N`` then
picks the N-th active namespace (0: the first) and ``--subchannels N`` asks for N+1 I/O
queue pairs.  Both drivers give the same block interface (uvmbus.block).  Each command holds a lock
on the device while it runs (``device_lock``): a second one fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

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
from uvmbus.units import parse_size

CHUNK = 4 * 1024 * 1024


def parse_bytes(text: str) -> int:
    """argparse type for byte counts (``4096``, ``4K``, ``1M``)."""
    try:
        return parse_size(text, what="byte count")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("blk", help="block devices (storvsc SCSI disks, NVMe over VFIO): info, read, write, bench, "
                       "lba-status, pr (persistent reservations), NBD export daemon")
    bsub = p.add_subparsers(dest="blk_command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, scsi_only: bool = False) -> None:
        sp.add_argument("device", help=(
            "storvsc VMBus device (GUID, unique prefix, or 'storvsc'): a SCSI command, not for NVMe"
            if scsi_only else "VMBus device (GUID, unique prefix, or 'storvsc'), or an NVMe "
            "controller on vfio-pci (PCI address, vPCI GUID, or 'nvme')"))
        add_root(sp)
        sp.add_argument("--subchannels", type=int_range(0, 64), default=0,
                        help="sub-channels to request (default 0: one channel)")
        sp.add_argument("--timeout", type=seconds(), default=30.0,
                        help="per-command timeout in seconds, also the wait for a simulator's "
                             "endpoint to open (default 30)")
        sp.add_argument("--spin-us", type=int_range(0), default=0,
                        help="poll for completions this long before sleeping (default 0)")
        add_record(sp)

    i = bsub.add_parser("info", help="controller and LUNs")
    common(i)
    add_json(i)
    i.set_defaults(func=_info)

    r = bsub.add_parser("read", help="copy from a LUN (dd-like)")
    common(r)
    r.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    r.add_argument("--offset", type=parse_bytes, default=0, help="byte offset (block aligned; K/M/G)")
    r.add_argument("--length", type=parse_bytes, default=None,
                   help="bytes (block aligned; K/M/G; default: to the end)")
    r.add_argument("-o", "--output", default=None,
                   help="output file, replaced only when the read succeeds (default or '-': "
                        "stdout, which must not be a terminal)")
    r.set_defaults(func=_read)

    w = bsub.add_parser("write", help="copy into a LUN (dd-like)")
    common(w)
    w.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    w.add_argument("--offset", type=parse_bytes, default=0, help="byte offset (block aligned; K/M/G)")
    w.add_argument("-i", "--input", required=True, help="input file ('-' for stdin)")
    w.add_argument("--fua", action="store_true", help="force unit access on every write")
    w.add_argument("--pad", action="store_true",
                   help="zero-pad the last partial block (else its size must be block aligned)")
    w.set_defaults(func=_write)

    b = bsub.add_parser("bench", help="IOPS / MB/s at a queue depth, with a C pread reference",
                        description="Measure the driver at a queue depth, then a C pread loop over "
                                    "the LUN's backing file as reference. The write patterns "
                                    "OVERWRITE the LUN's data.")
    common(b)
    b.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    b.add_argument("--pattern", choices=("randread", "randwrite", "seqread", "seqwrite"),
                   default="randread", help="default randread; the write patterns overwrite the LUN")
    b.add_argument("--bs", type=parse_bytes, default=4096, help="I/O size (default 4K)")
    b.add_argument("--qd", type=int_range(1), default=32, help="queue depth (default 32)")
    b.add_argument("--seconds", type=seconds(), default=5.0, help="measured time (default 5)")
    b.add_argument("--channels", type=int_range(1, 65), default=1,
                   help="spread the batch over N channels (storvsc: the primary and N-1 "
                        "sub-channels, requested as needed; default 1)")
    b.add_argument("--reference", default=None, metavar="FILE",
                   help="file for the pread reference (default: the LUN's image when the root "
                        "is a simulator's; none otherwise)")
    b.add_argument("--no-reference", action="store_true", help="skip the pread reference")
    add_json(b)
    b.set_defaults(func=_bench)

    ls = bsub.add_parser("lba-status", help="mapped / deallocated ranges of a LUN (GET LBA STATUS)")
    common(ls, scsi_only=True)
    ls.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    ls.add_argument("--offset", type=parse_bytes, default=0, help="byte offset (block aligned; K/M/G)")
    ls.add_argument("--length", type=parse_bytes, default=None,
                    help="bytes from the offset (default: to the end of the LUN)")
    add_json(ls)
    ls.set_defaults(func=_lba_status)

    pr = bsub.add_parser(
        "pr", help="SCSI-3 persistent reservations of a LUN: read, register, reserve, release, "
        "preempt, clear", description="Persistent reservations (PERSISTENT RESERVE IN/OUT). The "
        "initiator is the controller this command opens: every `uvmbus blk pr` on the same device "
        "speaks for the same initiator. Keys are numbers (0x... for hex). Types: we "
        "(write-exclusive), ea (exclusive-access), we-ro, ea-ro (registrants only), we-ar, ea-ar "
        "(all registrants).")
    common(pr, scsi_only=True)
    pr.add_argument("action", choices=("read", "register", "reserve", "release", "preempt", "clear"),
                    help="read: keys, reservation and supported types; the others change them")
    pr.add_argument("--lun", type=int_range(0, 255), default=0, help="LUN (default 0)")
    pr.add_argument("--key", type=_pr_key, default=None,
                    help="this initiator's registered key (register: the new key; 0 with --old-key "
                         "unregisters)")
    pr.add_argument("--old-key", type=_pr_key, default=0,
                    help="register: the key registered now (0: none yet)")
    pr.add_argument("--ignore-existing", action="store_true",
                    help="register: REGISTER AND IGNORE EXISTING KEY (no --old-key needed)")
    pr.add_argument("--type", default=None, help="reserve/release/preempt: reservation type")
    pr.add_argument("--victim", type=_pr_key, default=None,
                    help="preempt: the key whose registrations (and reservation) are removed")
    pr.add_argument("--abort", action="store_true", help="preempt: PREEMPT AND ABORT")
    add_json(pr)
    pr.set_defaults(func=_pr)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _lba_status(args: argparse.Namespace) -> int:
    with _open(args) as hba:
        disk = hba.disk(args.lun)
        if not hasattr(disk, "lba_status"):
            raise ConfigError(f"{args.device}: GET LBA STATUS is a SCSI (storvsc) command")
        bs = disk.block_size
        if args.offset % bs or (args.length is not None and args.length % bs):
            raise ConfigError(f"--offset and --length must be multiples of the {bs}-byte block size")
        end = disk.size if args.length is None else args.offset + args.length
        if args.length == 0 or not args.offset < end <= disk.size:
            raise ConfigError(f"--offset {args.offset} --length "
                              f"{'(to the end)' if args.length is None else args.length}: give a "
                              f"non-empty byte range inside LUN {args.lun} ({disk.size} bytes)")
        runs = disk.lba_status(args.offset // bs, None if args.length is None else args.length // bs)
    rows = [{"lba": r.lba, "blocks": r.count, "offset": r.lba * bs, "length": r.count * bs,
             "state": r.state} for r in runs]
    mapped = sum(r["length"] for r in rows if r["state"] == "mapped")
    total = sum(r["length"] for r in rows)
    if args.json:
        print(json.dumps({"lun": args.lun, "block_size": bs, "mapped_bytes": mapped,
                          "total_bytes": total, "ranges": rows}, indent=2))
        return 0
    for r in rows:
        print(f"  {r['offset']:>14} +{r['length']:<14} {r['state']}")
    print(f"LUN {args.lun}: {mapped} of {total} bytes mapped "
          f"({sum(r['state'] == 'mapped' for r in rows)} mapped range(s) of {len(rows)})")
    return 0


def _pr_key(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 42 or 0x2a)") from None
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a reservation key is 0..2**64-1")
    return v


def _pr(args: argparse.Namespace) -> int:
    from uvmbus.storvsc import scsi

    act = args.action
    if act in ("reserve", "release", "preempt") and args.type is None:
        raise ConfigError(f"blk pr {act} needs --type (we, ea, we-ro, ea-ro, we-ar, ea-ar)")
    if act == "preempt" and args.victim is None:
        raise ConfigError("blk pr preempt needs --victim KEY (the key to remove)")
    if act in ("reserve", "release", "preempt", "clear") and not args.key:
        raise ConfigError(f"blk pr {act} needs --key: this initiator's registered key")
    if act == "register" and args.key is None:  # key 0 from an unregistered initiator: a no-op
        raise ConfigError("blk pr register needs --key K: the key to register (--key 0 --old-key K "
                          "unregisters K)")
    ptype = scsi.pr_type(args.type) if args.type is not None else None
    with _open(args) as hba:
        disk = hba.disk(args.lun)
        if not hasattr(disk, "pr_read_keys"):
            raise ConfigError(f"{args.device}: persistent reservations are a SCSI (storvsc) feature")
        if act == "register":
            disk.pr_register(args.old_key, args.key, ignore=args.ignore_existing)
        elif act == "reserve":
            disk.pr_reserve(args.key, ptype)
        elif act == "release":
            disk.pr_release(args.key, ptype)
        elif act == "preempt":
            disk.pr_preempt(args.key, args.victim, ptype, abort=args.abort)
        elif act == "clear":
            disk.pr_clear(args.key)
        status = disk.pr_status()
    status["lun"] = args.lun
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    res = status["reservation"]
    print(f"LUN {args.lun}: generation {status['generation']}, registered keys: "
          f"{', '.join(status['keys']) or 'none'}; reservation: "
          + (f"{res['type']} held with key {res['key']}" if res else "none"))
    if status["types"] is not None:
        print(f"  supported types: {', '.join(status['types'])}")
    return 0


def _nvme_target(args: argparse.Namespace) -> Any:
    """The PCI function when DEVICE names an NVMe controller (address, vPCI GUID, ``nvme``)."""
    from uvmbus.services.cli.bus import _pci_target

    fn = _pci_target(args.root, args.device)
    if fn is not None and fn.class_name != "nvme":
        raise ConfigError(f"{fn.name} is a {fn.class_name} PCI function, not an NVMe controller")
    return fn


@contextlib.contextmanager
def _open(args: argparse.Namespace, scan: bool = True) -> Iterator[Any]:
    """The controller, opened under the device lock (a second command fails at once)."""
    import uvmbus.storvsc as storvsc

    fn = _nvme_target(args)
    if fn is not None:
        from uvmbus.nvme import Controller

        with device_lock(fn), Controller(fn, io_queues=args.subchannels + 1, timeout=args.timeout,
                                         spin_us=args.spin_us) as ctl:
            yield ctl
        return

    dev = resolve_device(args.root, args.device, "storvsc")
    with device_lock(dev), recording(args) as rec, \
            storvsc.open(dev.device_id, args.root, subchannels=args.subchannels, timeout=args.timeout,
                         spin_us=args.spin_us, scan=scan, record=rec) as hba:
        yield hba


# ---- info ----------------------------------------------------------------------------------

def _info(args: argparse.Namespace) -> int:
    with _open(args) as hba:
        info = hba.info().to_dict()
        info["luns"] = [d.describe() for d in hba.luns]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if "model" in info:         # NVMe
        print(f"NVMe controller {info['address']}: {info['model']} (serial {info['serial']}, "
              f"firmware {info['firmware']}), NVMe {info['version']}, {info['io_queues']} I/O "
              f"queue(s) x {info['queue_depth']}, max transfer {info['max_transfer_bytes']} "
              f"bytes, IOMMU: {info['iommu']}, interrupts: {info['interrupts']}"
              + (f", vPCI {info['vmbus_parent']}" if info["vmbus_parent"] else ""))
    else:
        _print_storvsc_info(info)
    for d in info["luns"]:
        extra = []
        if d.get("read_only"):
            extra.append("READ-ONLY (write protected)")
        if d["serial"]:
            extra.append(f"serial {d['serial']}")
        if d["unmap"]:
            extra.append("unmap")
        prov = d.get("provisioning")
        if prov:
            extra.append(f"{prov['type']} provisioned" + (", unmapped reads zero" if prov["lbprz"] else ""))
        if d["rotation_rate"] == 1:
            extra.append("non-rotating")
        elif d["rotation_rate"]:
            extra.append(f"{d['rotation_rate']} rpm")
        vwc = d.get("volatile_write_cache")
        if vwc is not None:
            extra.append(f"write cache {'on' if vwc else 'off'}")
        if d.get("optimal_transfer"):
            extra.append(f"optimal transfer {d['optimal_transfer']} bytes")
        if d.get("third_party_copy"):
            t = d["third_party_copy"]
            extra.append(f"ODX (third-party copy, {t['max_token_transfer_blocks']} blocks/token)")
        print(f"  {'namespace' if 'nsid' in d else 'LUN'} {d['lun']}: {d['size']} bytes "
              f"({d['blocks']} x {d['block_size']}), {d['vendor']} {d['product']} {d['revision']}"
              + (f", {', '.join(extra)}" if extra else ""))
    return 0


def _print_storvsc_info(info: dict[str, Any]) -> None:
    print(f"controller {info['device_id']}: protocol {info['protocol']}, {info['channels']} "
          f"channel(s) (host max {info['max_channels']}), max transfer "
          f"{info['max_transfer_bytes']} bytes, queue depth {info['queue_depth']}/channel, "
          f"DMA memory: {info['dma']}")


# ---- progress ----------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr, only when it is a terminal."""

    def __init__(self, total: int, what: str) -> None:
        self.total = total          # 0: unknown (a pipe): bytes and rate only
        self.what = what
        self.on = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e6
        if self.total > 0:
            frac = min(done / self.total, 1.0)
            width = 30
            bar = "#" * int(frac * width)
            sys.stderr.write(f"\r{self.what} [{bar:<{width}}] {frac:6.1%} {done >> 20} MiB "
                             f"{rate:8.1f} MB/s")
        else:
            sys.stderr.write(f"\r{self.what}: {done >> 20} MiB {rate:8.1f} MB/s")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ---- read / write ---------------------------------------------------------------------------------

def _read(args: argparse.Namespace) -> int:
    if args.output in (None, "-") and sys.stdout.isatty():
        raise ConfigError("refusing to write disk data to a terminal: pass -o FILE or redirect "
                          "stdout (`> FILE`, `| ...`)")
    with _open(args) as hba:
        disk = hba.disk(args.lun)
        length = disk.size - args.offset if args.length is None else args.length
        if length < 0:
            raise ConfigError(f"--offset {args.offset} is beyond the end of LUN {args.lun} "
                              f"({disk.size} bytes)")
        prog = Progress(length, f"read LUN {args.lun}")
        with output_file(args.output, what="output") as out:     # a failed read keeps the old file
            done = 0
            while done < length:
                n = min(CHUNK, length - done)
                out.write(disk.read(args.offset + done, n))
                done += n
                prog.update(done)
            prog.update(done, final=True)
    if args.output and args.output != "-":
        print(f"read {length} bytes from LUN {args.lun} at offset {args.offset} into {args.output}",
              file=sys.stderr)
    return 0


def _write(args: argparse.Namespace) -> int:
    src: BinaryIO = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    try:
        st = os.fstat(src.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{args.input} is a directory, not a file to copy")
        total = st.st_size if stat.S_ISREG(st.st_mode) else 0     # 0: unknown (pipe, device)
        with _open(args) as hba:
            disk = hba.disk(args.lun)
            bs = disk.block_size
            if total and total % bs and not args.pad:
                raise ConfigError(f"{args.input} has {total} bytes, not a multiple of the "
                                  f"{bs}-byte block size; pass --pad to zero-pad the last block")
            padded = -(-total // bs) * bs
            if args.offset % bs:
                raise ConfigError(f"--offset {args.offset} is not a multiple of the {bs}-byte "
                                  f"block size of LUN {args.lun}")
            if args.offset + padded > disk.size:
                raise ConfigError(f"{args.input} ({total} bytes) does not fit at offset "
                                  f"{args.offset} of LUN {args.lun} ({disk.size} bytes); nothing "
                                  "was written")
            prog = Progress(total, f"write LUN {args.lun}")
            done = 0
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                if len(data) % bs:
                    if not args.pad:
                        raise ConfigError(f"input ended with a partial block of {len(data) % bs} "
                                          "bytes; pass --pad to zero-pad it")
                    data += bytes(bs - len(data) % bs)
                disk.write(args.offset + done, data, fua=args.fua)
                done += len(data)
                prog.update(done)
            prog.update(done, final=True)
            disk.flush()
    finally:
        if args.input != "-":
            src.close()
    print(f"wrote {done} bytes to LUN {args.lun} at offset {args.offset}", file=sys.stderr)
    return 0


# ---- bench ----------------------------------------------------------------------------------------

def _sim_image(args: argparse.Namespace, lun: int) -> str | None:
    """The backing image of ``lun`` when the root is a running simulator's."""
    from pathlib import Path

    if not (Path(args.root) / "sim" / "control.sock").exists():
        return None
    try:
        from uvmbus.sim.control import ControlClient

        with ControlClient(args.root) as c:
            reply = c.call("model", device=args.device, op="luns")
        for res in reply.get("results", {}).values():
            info = res.get("luns", {}).get(str(lun))
            if info:
                return str(info["image"])
    except Exception:       # no simulator answering: no reference
        return None
    return None


def _sim_signals(args: argparse.Namespace) -> dict[str, int] | None:
    from pathlib import Path

    if not (Path(args.root) / "sim" / "control.sock").exists():
        return None
    try:
        from uvmbus.sim.control import ControlClient

        with ControlClient(args.root) as c:
            st = c.call("stats")["stats"]
        t = st["totals"]
        out = {k: int(t.get(k, 0)) for k in ("guest_signals", "needless_signals", "interrupts")}
        # host worker wake-ups (sleeps ended), summed over the device's channels
        out["host_wakeups"] = sum(int(c.get("wakeups", 0)) for d in st.get("devices", [])
                                  for c in d.get("channels", {}).values())
        return out
    except Exception:
        return None


def _bench(args: argparse.Namespace) -> int:
    from uvmbus.block.bench import pread_reference, run_disk

    if args.qd < 1:
        raise ConfigError("--qd must be at least 1")
    if args.channels > 1:
        args.subchannels = max(args.subchannels, args.channels - 1)
    sig_before = _sim_signals(args)
    try:
        with _open(args) as hba:
            disk = hba.disk(args.lun)
            if args.channels > hba.channels:
                raise ConfigError(f"--channels {args.channels}: the host gave {hba.channels} "
                                  f"channel(s) (its maximum sub-channel count limits it): use "
                                  f"--channels {hba.channels} or fewer")
            waits0 = hba.stats().get("counters", {}).get("waits", 0)
            res = run_disk(disk, args.pattern, args.bs, args.qd, args.seconds,
                           channels=args.channels)
            channels = args.channels
            drv_stats = hba.stats()
    except UvmbusError as exc:
        if args.json:       # scripts get the reason in the JSON too, and a failing exit status
            print(json.dumps({"benchmark": "blk", "device": args.device, "lun": args.lun,
                              "error": f"{type(exc).__name__}: {exc}"}, indent=2))
        raise
    sig_after = _sim_signals(args)
    ref_path = None if args.no_reference else (args.reference or _sim_image(args, args.lun))
    ref = pread_reference(ref_path, args.pattern, args.bs, args.seconds) if ref_path else None
    out: dict[str, Any] = {"benchmark": "blk", "device": args.device, "lun": args.lun,
                           "channels": channels, **res.to_dict(),
                           "guest_signals": drv_stats["signals"]}
    if "waits" in drv_stats.get("counters", {}):
        # the driver's sleeps in its wait loop during the run (warm-up and drain included):
        # how often the guest had nothing to reap
        out["guest_waits"] = drv_stats["counters"]["waits"] - waits0
    if sig_before and sig_after:
        out["host_stats"] = {k: sig_after[k] - sig_before[k] for k in sig_after}
    if ref is not None:
        out["reference"] = {"kind": "C pread loop, synchronous", "file": ref_path, **ref.to_dict()}
        out["ratio_to_reference"] = round(res.iops / ref.iops, 3) if ref.iops else None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"blk bench {args.pattern} bs={args.bs} qd={args.qd} LUN {args.lun}, {channels} channel(s), "
          f"{res.seconds:.2f} s")
    print(f"  driver:    {res.iops:12,.0f} IOPS {res.mb_per_s:10,.1f} MB/s  "
          f"(mean latency {res.latency_us:.1f} us)")
    if ref is not None:
        print(f"  reference: {ref.iops:12,.0f} IOPS {ref.mb_per_s:10,.1f} MB/s  "
              f"(C pread loop over {ref_path}, QD1)")
    if "host_stats" in out:
        hs = out["host_stats"]
        print(f"  signals:   {hs['guest_signals']} guest->host ({hs['needless_signals']} needless), "
              f"{hs['interrupts']} host->guest interrupts")
        if "guest_waits" in out:
            print(f"  sleeps:    {out['guest_waits']} guest waits, {hs['host_wakeups']} host wake-ups")
    return 0

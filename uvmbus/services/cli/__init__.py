"""The `uvmbus` command line: one entry point, one module per command group.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)`` which adds
its subcommands and sets ``func`` on them.  Common options: ``--root`` (or the
``UVMBUS_ROOT`` environment variable; "/" on a real guest, the simulator's
root otherwise) and ``--json`` where the output is data.

Exit status: 0 on success, 1 when the command failed (one ``uvmbus: error: ...`` line on
stderr; ``-v`` adds the traceback), 2 for a usage error (argparse), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, NotFound, UvmbusError

COMMAND_MODULES = [
    "uvmbus.services.cli.bus",
    "uvmbus.services.cli.bench",
    "uvmbus.services.cli.sim",
    "uvmbus.services.cli.net",
    "uvmbus.services.cli.blk",
    "uvmbus.services.cli.demo",
    "uvmbus.services.cli.daemons",      # after net/blk: adds `net bridge`, `blk export`, `units`
    "uvmbus.services.cli.ic",
    "uvmbus.services.cli.trace",
]


def default_root() -> str:
    return os.environ.get("UVMBUS_ROOT", "/")


def add_root(p: argparse.ArgumentParser, *, must_exist: bool = True) -> None:
    """``--root``; with ``must_exist`` the command fails early when the directory is missing."""
    p.add_argument("--root", default=default_root(),
                   help="filesystem root holding sys/ and dev/ (default: $UVMBUS_ROOT or /)")
    p.set_defaults(root_must_exist=must_exist)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_record(p: argparse.ArgumentParser, *, side: str = "guest", what: str | None = None) -> None:
    """``--record FILE.pcapng`` and its options (docs/trace.md); ``what`` is recorded."""
    from uvmbus.trace.recorder import DEFAULT_SNAPLEN

    if what is None:
        what = "every VMBus packet the host side sees, plus signals, interrupts, masks and faults" \
            if side == "host" else "every VMBus packet of every channel of the device"
    g = p.add_argument_group("recording (docs/trace.md)")
    g.add_argument("--record", default=None, metavar="FILE.pcapng", help=f"record {what} to a pcapng trace")
    g.add_argument("--snaplen", type=int_range(0, 65535), default=DEFAULT_SNAPLEN, metavar="BYTES",
                   help=f"bytes kept of each buffer a packet points at (RNDIS messages, frames; "
                        f"default {DEFAULT_SNAPLEN}, 0: none)")
    g.add_argument("--no-payload", action="store_true",
                   help="never record frame contents (RNDIS headers and control messages only)")
    g.add_argument("--rotate", default=None, metavar="SIZE",
                   help="start a new file (FILE.1.pcapng, ...) when one reaches SIZE (e.g. 100M)")


def open_recorder(args: argparse.Namespace, *, side: str = "guest") -> Any:
    """The recorder ``--record`` asks for, or None."""
    if not getattr(args, "record", None):
        return None
    from uvmbus.trace import Recorder
    from uvmbus.units import parse_size

    rotate = parse_size(args.rotate, what="--rotate size") if args.rotate else 0
    return Recorder(args.record, side=side, snaplen=args.snaplen, no_payload=args.no_payload,
                    rotate_bytes=rotate, comment=" ".join(sys.argv))


@contextlib.contextmanager
def recording(args: argparse.Namespace, *, side: str = "guest") -> Iterator[Any]:
    """``with recording(args) as rec:`` — the ``--record`` recorder (or None), closed at the end."""
    rec = open_recorder(args, side=side)
    ok = False
    try:
        yield rec
        ok = True
    finally:
        if rec is not None:
            rec.close(ok=ok)
            if not getattr(args, "json", False):
                print(f"trace: {rec.stats()['records']} records in {', '.join(map(str, rec.files))}",
                      file=sys.stderr)


# ---- argparse types: bad numbers are usage errors, not tracebacks -------------------------------

def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if hi is None:
                raise argparse.ArgumentTypeError(f"{v}: must be >= {lo}")
            raise argparse.ArgumentTypeError(f"{v}: must be {lo}..{hi}")
        return v

    parse.__name__ = "integer"
    return parse


def number(*, zero_ok: bool = False, unit: str = "seconds") -> Callable[[str], float]:
    """argparse type: a finite number > 0 (or >= 0 with ``zero_ok``) of ``unit``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not (v >= 0 if zero_ok else v > 0) or v == float("inf"):     # NaN fails both
            raise argparse.ArgumentTypeError(f"{text}: must be {'>= 0' if zero_ok else '> 0'} {unit}")
        return v

    parse.__name__ = unit
    return parse


def seconds(*, zero_ok: bool = False) -> Callable[[str], float]:
    """argparse type: a duration in seconds, > 0 (or >= 0 with ``zero_ok``)."""
    return number(zero_ok=zero_ok, unit="seconds")


PORT = int_range(0, 65535)


# ---- devices -------------------------------------------------------------------------------------

def root_opt(root: str | os.PathLike[str] | None) -> str:
    """`` --root ROOT`` for a command in a hint, empty for the real root ``/``."""
    if root is None or os.path.abspath(root) == "/":
        return ""
    return f" --root {root}"


def _no_vmbus_hint(root: str) -> str:
    return (f"no VMBus under {root} (no sys/bus/vmbus): on a Hyper-V/Azure guest use --root /; "
            "otherwise start `uvmbus sim` and pass the root its `ready` line names "
            "(--root or UVMBUS_ROOT)")


def resolve_device(root: str, ref: str, cls: str) -> Any:
    """The VMBus device ``ref`` (GUID, unique prefix or class name) under ``root``, which
    must be of class ``cls`` (netvsc, storvsc): a wrong class fails at once with a clear
    message instead of a protocol timeout."""
    from uvmbus.bus import Bus

    bus = Bus(root)
    if not bus.vmbus_path.is_dir():
        raise NotFound(_no_vmbus_hint(root))
    dev = bus.device(ref)
    if dev.class_name != cls:
        raise ConfigError(f"{dev.device_id} is a {dev.class_name} device, not {cls}: pick a "
                          f"{cls} device (`uvmbus list --class {cls} --root {root}`)")
    return dev


@contextlib.contextmanager
def device_lock(dev: Any, *, what: str | None = None) -> Iterator[None]:
    """Hold the device's lock (:mod:`uvmbus.bus.lock`) for the whole command, so that a second
    uvmbus command, daemon or script cannot open the same channel and break this one's
    session; the second one fails at once saying who has the device.  The driver opens the
    command makes nest inside this hold."""
    from uvmbus.bus import hold_device

    with hold_device(dev, what=what):
        yield


def _check_simulator_alive(root: str) -> None:
    """A root a simulator made but that simulator is gone (SIGKILL, a crash): its devices are
    files nobody serves; say so instead of listing them as live or timing out on them."""
    state = Path(root) / "sim" / "state.json"
    if os.path.abspath(root) == "/" or not state.is_file():
        return
    import json

    try:
        pid = int(json.loads(state.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        os.kill(pid, 0)
        return
    except PermissionError:
        return
    except ProcessLookupError:
        pass
    # The pid may belong to another PID namespace (the simulator on the host, this command in a
    # container, as in tests/test_units_systemd.py): a simulator is alive if its control socket
    # accepts a connection.
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(Path(root) / "sim" / "control.sock"))
            return
        except OSError:
            pass
    raise NotFound(f"{root} is the root of a simulator that is no longer running (pid {pid} is "
                   f"gone: killed?): its devices are stale files. Start one again with `uvmbus sim "
                   f"--root {root} ...` (it clears them), or remove the directory")


# ---- output files ----------------------------------------------------------------------------------

@contextlib.contextmanager
def output_file(path: str | None, *, what: str = "output") -> Iterator[Any]:
    """A binary file to write a command's output to, which a failed command cannot destroy:
    the data goes to a temporary file in the same directory, renamed over ``path`` only when
    the block ends without an exception (Ctrl-C included: the old file stays).  ``-`` (or
    None) means stdout.  An existing file's permissions are kept.  A symlink is followed (the
    file it names is replaced, the link stays); what is not a regular file — a device such as
    /dev/null, a FIFO — is written in place, never replaced."""
    if path is None or path == "-":
        out = sys.stdout.buffer
        try:
            yield out
        finally:
            with contextlib.suppress(OSError, ValueError):
                out.flush()
        return
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise ConfigError(f"{path} is a directory: name the {what} file to write")
    parent = target.parent
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(target, "wb") as f:           # a device or FIFO: written in place
            yield f
        return
    mode = stat.S_IMODE(st.st_mode) if st is not None else None
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- parser and entry point ------------------------------------------------------------------

def _add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after any sub-command too (``uvmbus blk read ... -v``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                if not any("-v" in a.option_strings for a in sp._actions):
                    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help="show tracebacks on errors")
                _add_verbose_everywhere(sp)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("uvmbus")
    except Exception:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvmbus", description="Userspace VMBus drivers for Hyper-V/Azure guests",
                                     epilog="Exit status: 0 ok, 1 failed, 2 usage error, 130 interrupted. "
                                            "Docs: README.md and docs/*.md.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"uvmbus {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue          # command group not built yet
            raise
        mod.register(sub)
    _add_verbose_everywhere(parser)
    return parser


def _os_error_text(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    what = exc.strerror or str(exc)
    return f"{': '.join(names)}: {what}" if names else what


def _stdout_gone() -> bool:
    """True if stdout's reader has gone (a pipe whose read end was closed polls POLLERR);
    stdout is then pointed at /dev/null so that the interpreter's final flush stays quiet."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, 0)
        if not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0)):
            return False
    except (OSError, ValueError):
        return False
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    try:
        root = getattr(args, "root", None)
        if root and getattr(args, "root_must_exist", False) and not os.path.isdir(root):
            given = any(a == "--root" or a.startswith("--root=")
                        for a in (sys.argv[1:] if argv is None else argv))
            raise NotFound(f"{'--root ' if given else 'UVMBUS_ROOT='}{root}: no such directory; "
                           "pass / on a guest or the root of a running `uvmbus sim` (its "
                           "`ready` line names it)")
        if root and getattr(args, "root_must_exist", False):
            _check_simulator_alive(root)
        rc = args.func(args)
    except UvmbusError as exc:
        if verbose:
            raise
        print(f"uvmbus: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return 141              # the reader went away (`uvmbus list | head -1`): 128 + SIGPIPE
        if verbose:
            raise
        print(f"uvmbus: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("uvmbus: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)

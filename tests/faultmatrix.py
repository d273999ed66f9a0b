"""The fault matrix: every fault the simulator offers (uvmbus/sim/faults.py, plus rescind with
a re-offer) against the netvsc driver, the storvsc driver, the blk export daemon and (as
root, with /dev/net/tun) the net bridge daemon.

For each cell: the component works (a probe: loopback frames for netvsc, a 4 KiB read for
storvsc, a read through NBD for the export, a frame sent on the bridge's TAP that comes
back through the simulator's loopback); the fault is set; probes run for a window; the
fault is cleared; the component must work again (the drivers may reopen the device — a dead
channel must be reopened; the daemon must recover by itself).  The outcome of a cell:

- ``no effect``: every probe succeeded;
- ``recovered``: probes failed or stalled during the fault and worked again after it by
  themselves;
- ``error: NAME``: a uvmbus error naming the cause (RingCorrupt, ChannelTimeout, ...), then the
  component worked again after reopening;
- ``FAIL ...``: a hang (a probe past its bound), an exception outside uvmbus.errors, or no
  recovery.  tests/test_fault_matrix.py asserts there is none.

``python tests/faultmatrix.py [--markdown FILE]`` prints the table (``make fault-matrix``
writes it into docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from simhelpers import SimProcess, run_sim  # noqa: E402

from uvmbus.errors import UvmbusError  # noqa: E402

#: fault name -> value (the simulator's faults, one representative setting each)
FAULTS: dict[str, Any] = {
    "stall": 1.5, "slow_us": 3000, "drop_completions": 1, "dup_completions": 2, "drop_packets": 1,
    "corrupt_descriptor": 1, "corrupt_index rx": "rx", "corrupt_index tx": "tx",
    "no_interrupts": True, "spurious_interrupt": 8, "ignore_rx_mask": True,
    "rescind + re-offer": None,
}
PROBE_BOUND = 15.0          # one probe may take this long before it counts as a hang
DAEMON_PROBE_BOUND = 45.0   # ... through the export: a lost command costs its 30 s timeout
WINDOW = 1.0                # probes under the fault


class _Driver:
    """Common part of the in-process driver components."""
    name = ""

    def __init__(self, sim: SimProcess, dev: str):
        self.sim, self.dev, self.obj = sim, dev, None

    def open(self) -> None: ...
    def probe(self) -> None: ...

    def close(self) -> None:
        obj, self.obj = self.obj, None
        if obj is not None:
            try:
                obj.close()
            except Exception:                   # closing a dead device may fail any way
                pass

    def reopen(self) -> None:
        self.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                self.open()
                return
            except UvmbusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


class NetvscDriver(_Driver):
    name = "netvsc driver"

    def open(self) -> None:
        from uvmbus.netvsc.nic import Nic

        self.obj = Nic(self.dev, self.sim.root, timeout=3.0)

    def probe(self) -> None:
        from uvmbus.netvsc.bench import bench_frame

        frames = [bench_frame(128, i) for i in range(8)]
        nic = self.obj
        assert nic is not None
        sent = nic.tx_burst(frames, timeout=2.0)
        got, deadline = 0, time.monotonic() + 3.0
        while got < sent and time.monotonic() < deadline:
            got += len(nic.rx_burst(max_frames=64, timeout=0.2))
        if sent < len(frames) or got < sent:
            raise TimeoutError(f"loopback: {sent}/8 frames sent, {got} came back")


class StorvscDriver(_Driver):
    name = "storvsc driver"

    def open(self) -> None:
        import uvmbus.storvsc as storvsc

        self.obj = storvsc.open(self.dev, self.sim.root, subchannels=0, timeout=2.0)
        self.obj.reset_timeout = 1.0
        self.disk = self.obj.disk(0)

    def probe(self) -> None:
        assert len(self.disk.read(0, 4096)) == 4096


class _DaemonComp:
    """Common part of the daemon components: the daemon must recover by itself; a restart is
    what systemd does after it gave up."""
    name = ""

    def __init__(self, sim: SimProcess, dev: str, tmp: Path):
        self.sim, self.dev, self.tmp = sim, dev, tmp
        self.proc: subprocess.Popen[str] | None = None
        self.log: Any = None

    def open(self) -> None: ...

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise ChildProcessError(f"{self.name} exited ({None if self.proc is None else self.proc.returncode})")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()

    def reopen(self) -> None:
        self.close()
        self.open()


class NetBridge(_DaemonComp):
    """`uvmbus net bridge` as a daemon on a TAP in this namespace; a probe sends frames into
    the TAP (AF_PACKET) and waits for them to come back through the simulator's loopback."""
    name = "net bridge"

    def __init__(self, sim: SimProcess, dev: str, tmp: Path):
        super().__init__(sim, dev, tmp)
        self.tap = f"uvbfm{os.getpid() % 100000}{os.urandom(1).hex()}"
        self.sock: socket.socket | None = None
        self.seq = 0

    def open(self) -> None:
        self.log = open(self.tmp / "bridge.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvmbus", "net", "bridge", self.dev,
                                      "--root", str(self.sim.root), "--tap", self.tap,
                                      "--reattach-timeout", "20"],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        addr = Path("/sys/class/net") / self.tap / "address"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"net bridge did not start: {(self.tmp / 'bridge.log').read_text()[-2000:]}")
            if addr.exists() and _bounded(self._try_open, PROBE_BOUND) is None:
                return
            time.sleep(0.2)

    def _try_open(self) -> None:
        if self.sock is None:
            mac = bytes.fromhex((Path("/sys/class/net") / self.tap / "address").read_text().strip().replace(":", ""))
            self.frame_head = mac + mac + b"\x08\x00"
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind((self.tap, 0))
            self.sock = s
        self.probe()

    def probe(self) -> None:
        from uvmbus.netvsc.bench import bench_frame

        self.alive()
        assert self.sock is not None
        self.seq += 1
        nonce = b"uvbfm" + self.seq.to_bytes(8, "big") + os.urandom(4)
        frame = self.frame_head + bench_frame(128)[14:100] + nonce + bytes(14)
        self.sock.send(frame)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, where = self.sock.recvfrom(65536)
            except TimeoutError:
                break
            if where[2] != socket.PACKET_OUTGOING and nonce in data:
                return
        raise TimeoutError("a frame sent on the TAP did not come back through the bridge")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        super().close()


class BlkExport(_DaemonComp):
    """`uvmbus blk export` as a daemon; probes read through NBD with qemu-io."""
    name = "blk export"

    def __init__(self, sim: SimProcess, dev: str, tmp: Path):
        super().__init__(sim, dev, tmp)
        self.nbd = tmp / "fm.nbd"

    def open(self) -> None:
        self.nbd.unlink(missing_ok=True)
        self.log = open(self.tmp / "export.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvmbus", "blk", "export", self.dev,
                                      "--root", str(self.sim.root), "--socket", str(self.nbd),
                                      "--reattach-timeout", "20"],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not self.nbd.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"blk export did not start: {(self.tmp / 'export.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def probe(self) -> None:
        self.alive()
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4096", f"nbd+unix:///?socket={self.nbd}"],
                           capture_output=True, text=True, timeout=DAEMON_PROBE_BOUND)
        if p.returncode or "error" in (p.stdout + p.stderr).lower():
            raise OSError(f"NBD read failed: {(p.stdout + p.stderr).strip()[-200:]}")


def _bounded(fn: Callable[[], None], bound: float = PROBE_BOUND) -> BaseException | None | str:
    """Run a probe with a bound: its exception, None (ok), or "hang"."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    return out[0] if out else "hang"


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def run_cell(comp: Any, sim: SimProcess, fault: str) -> dict[str, Any]:
    bound = PROBE_BOUND if isinstance(comp, _Driver) else DAEMON_PROBE_BOUND
    probe = lambda: _bounded(comp.probe, bound)       # noqa: E731
    first = probe()
    if first is not None:                   # the previous cell left it broken: reopen
        comp.reopen()
    errors: list[str] = []
    hang = False
    t0 = time.monotonic()
    t_err = None
    if fault == "rescind + re-offer":
        sim.rescind(comp.dev, reoffer_after=1.0)
    else:
        sim.fault(fault.split()[0], FAULTS[fault], device=comp.dev)
    end = time.monotonic() + WINDOW
    while time.monotonic() < end:
        r = probe()
        if r is not None and t_err is None:
            t_err = time.monotonic() - t0
        if r == "hang":
            hang = True
            break
        if r is not None:
            errors.append(f"{_name(r)}: {r}")           # type: ignore[arg-type]
            if not isinstance(r, (UvmbusError, TimeoutError, OSError, ChildProcessError)):
                break
            if isinstance(comp, _Driver) and isinstance(r, UvmbusError):
                break                       # a driver error ends its session: reopen below
    sim.clear_faults(comp.dev)
    if fault == "rescind + re-offer":
        time.sleep(1.5)
    recovered_by_itself = False
    deadline = time.monotonic() + 20
    while not hang and time.monotonic() < deadline:
        r = probe()
        if r is None:
            recovered_by_itself = True
            break
        # the fault took effect after the window, or the driver names it only now (a probe
        # that raced the fault's arming timed out first; the next one sees the broken ring)
        if r != "hang" and (not errors or isinstance(r, UvmbusError)):
            errors.append(f"{_name(r)}: {r}")           # type: ignore[arg-type]
        if isinstance(comp, _Driver):
            break
        time.sleep(0.5)
    reopened = False
    if not recovered_by_itself and not hang and isinstance(comp, _Driver):
        try:
            comp.reopen()
            reopened = probe() is None
        except Exception as exc:
            errors.append(f"reopen: {_name(exc)}: {exc}")
    took = time.monotonic() - t0
    if hang:
        outcome = "FAIL: a probe hung"
    elif errors and any(not re.match(r"^\w+(Error|Corrupt|Timeout|Revoked|Gone|Lost)\b", e) for e in errors):
        outcome = f"FAIL: unexpected {errors[0][:120]}"
    elif not errors and recovered_by_itself:
        outcome = "no effect"
    elif recovered_by_itself:
        outcome = "recovered"
    elif reopened:
        # name the driver's own error (a probe's TimeoutError may come before it)
        named = [e for e in errors if not e.startswith(("TimeoutError", "OSError"))] or errors
        outcome = f"error: {named[0].split(':')[0]}" if named else "reopened"
    else:
        outcome = "FAIL: no recovery"
    return {"component": comp.name, "fault": fault, "outcome": outcome, "seconds": round(took, 1),
            "error_after": None if t_err is None else round(t_err, 2),
            "first_error": errors[0][:200] if errors else ""}


def run_matrix(tmp: Path, components: tuple[str, ...] = ("netvsc", "storvsc", "blk", "bridge"),
               faults: tuple[str, ...] = tuple(FAULTS)) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    image = tmp / "fm.img"
    image.write_bytes(os.urandom(4 << 20))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--nic", "1", "--disk", str(image), "--bind") as sim:
        made: list[Any] = []
        if "netvsc" in components:
            made.append(NetvscDriver(sim, sim.device("netvsc")["device_id"]))
        if "storvsc" in components:
            made.append(StorvscDriver(sim, sim.device("storvsc")["device_id"]))
        if "blk" in components and shutil.which("qemu-io") and shutil.which("nbdkit"):
            made.append(BlkExport(sim, sim.device("storvsc")["device_id"], tmp))
        if "bridge" in components and os.geteuid() == 0 and os.path.exists("/dev/net/tun"):
            made.append(NetBridge(sim, sim.device("netvsc")["device_id"], tmp))
        for comp in made:
            comp.open()
            try:
                for fault in faults:
                    rows.append(run_cell(comp, sim, fault))
                    print(f"fault matrix: {rows[-1]}", file=sys.stderr, flush=True)
            finally:
                comp.close()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    comps = list(dict.fromkeys(r["component"] for r in rows))
    faults = list(dict.fromkeys(r["fault"] for r in rows))
    def text(r: dict[str, Any]) -> str:
        when = f"after {r['error_after']} s; " if r["error_after"] is not None else ""
        return f"{r['outcome']} ({when}cell {r['seconds']} s)"

    cell = {(r["component"], r["fault"]): text(r) for r in rows}
    out = ["| fault | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
    for f in faults:
        out.append(f"| `{f}` | " + " | ".join(cell.get((c, f), "–") for c in comps) + " |")
    return "\n".join(out) + "\n"


BEGIN = "<!-- fault-matrix:begin (make fault-matrix) -->"
END = "<!-- fault-matrix:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", metavar="FILE", help="replace the table between the fault-matrix "
                    "markers of FILE (docs/reliability.md)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uvb-fm-") as tmp:
        rows = run_matrix(Path(tmp))
    table = markdown(rows)
    print(table)
    if args.markdown:
        doc = Path(args.markdown)
        text = doc.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        new = text[:a] + "\n" + table + text[b:]
        tmpf = doc.with_suffix(".tmp")
        tmpf.write_text(new)
        tmpf.replace(doc)                   # atomic: a failed run leaves the doc alone
    return 1 if any(r["outcome"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

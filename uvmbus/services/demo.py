"""``uvmbus demo`` (what ``make demo`` runs): the whole stack against a simulated host.

1. start ``uvmbus sim`` as a subprocess in a temporary root, with one synthetic NIC
   (loopback backend: the host sends every frame back) and one SCSI disk (a sparse image);
2. bind both to uio_hv_generic through the bus layer (with its safety check: the simulated
   NIC and disk are named so that they cannot be mistaken for the machine's own);
3. NIC: bring it up, send frames of every size and check they come back byte for byte, then
   measure frames/s and bits/s with minimum-size and full-size frames;
4. disk: write random data (FUA on the last piece, then SYNCHRONIZE CACHE), read it back,
   compare with what was written *and* with the image file itself, then measure 4 KiB random
   reads and 256 KiB sequential reads (IOPS, MB/s);
5. print the simulated host's signal counters (needless guest→host signals get a real
   guest throttled by Hyper-V: they must stay 0), stop the simulator, remove everything.

Any failure raises; the CLI prints it and exits 1.  A watchdog alarm aborts a hung demo.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uvmbus.errors import SimulatorError, UvmbusError

__all__ = ["DemoFailed", "EmbeddedSim", "run_demo"]

READY_TIMEOUT = 30.0


class DemoFailed(UvmbusError):
    """A demo step did not do what it should."""


class EmbeddedSim:
    """``python -m uvmbus sim`` as a child process (stdout: the ready line; stderr kept)."""

    def __init__(self, root: Path, args: list[str]):
        self.root = root
        cmd = [sys.executable, "-m", "uvmbus", "sim", "--root", str(root), "--quiet", *args]
        env = dict(os.environ)
        env.pop("UVMBUS_ROOT", None)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._err: list[bytes] = []
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        self.ready = self._wait_ready()
        self.devices: list[dict[str, Any]] = self.ready["devices"]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)
            del self._err[:-200]

    @property
    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def _wait_ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"ready "):
                        return dict(json.loads(line[6:]))
            elif self.proc.poll() is not None:
                break
        self.kill()
        raise SimulatorError(f"the simulator did not become ready (exit status {self.proc.returncode}):"
                             f" {' '.join(self.cmd)}\n{self.stderr}")

    def device(self, model: str) -> str:
        for d in self.devices:
            if d["model"] == model:
                return str(d["device_id"])
        raise SimulatorError(f"the simulator offers no {model} device: {self.devices}")

    def stats(self) -> dict[str, Any]:
        from uvmbus.sim.control import ControlClient

        with ControlClient(self.root, timeout=5.0) as c:
            return dict(c.call("stats")["stats"])

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SimulatorError(f"the simulator did not exit within {timeout:g} s of SIGTERM\n"
                                 f"{self.stderr}") from None
        self._t.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(*_: Any) -> None:
        raise TimeoutError(f"the demo did not finish within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- NIC ---------------------------------------------------------------------------------------------

def _frame(dst: bytes, src: bytes, size: int, seq: int) -> bytes:
    """An Ethernet frame (local experimental EtherType 0x88B5) with a sequence number."""
    body = seq.to_bytes(4, "big") + bytes((seq * 7 + k) & 0xFF for k in range(size - 18))
    return dst + src + b"\x88\xb5" + body


def _nic_phase(device: str, root: str, seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    import uvmbus.netvsc as nv
    from uvmbus.netvsc import TxBatch

    out: dict[str, Any] = {"device_id": device}
    with nv.open(device, root, queues=1) as nic:
        info = nic.info()
        out.update(mac=nic.mac, mtu=nic.mtu, nvsp=info.nvsp_version, ndis=info.ndis_version,
                   link_up=bool(nic.link_up))
        say(f"NIC {device}: MAC {nic.mac}, MTU {nic.mtu}, NVSP {info.nvsp_version} / NDIS "
            f"{info.ndis_version}, {nic.num_queues} queue, link {'up' if nic.link_up else 'down'}")
        mac = bytes.fromhex(nic.mac.replace(":", ""))
        peer = b"\x02\x00\x5e\x00\x00\x01"
        # 1. integrity: every size class, compared byte for byte
        sent = [_frame(mac, peer, size, i) for i, size in
                enumerate([60, 61, 64, 100, 128, 255, 256, 512, 777, 1000, 1024, 1400, 1500, nic.mtu + 14])]
        if nic.tx_burst(sent, timeout=5.0) != len(sent):
            raise DemoFailed("the NIC did not take the verification frames")
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            b = nic.rx_burst(0, 256, timeout=0.1)
            got += [bytes(f) for f in b if bytes(f[12:14]) == b"\x88\xb5"]
        if sorted(got) != sorted(sent):
            raise DemoFailed(f"loopback: {len(got)} of {len(sent)} frames came back"
                             + (", some altered" if len(got) == len(sent) else ""))
        say(f"  verify: {len(sent)} frames of 60..{nic.mtu + 14} bytes sent and received back "
            "intact (loopback host)")
        # 2. throughput: send a burst, receive what comes back, repeat
        for size in (60, nic.mtu + 14):
            batch = TxBatch([_frame(mac, peer, size, i) for i in range(256)])
            rx_frames = tx_frames = 0
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                tx_frames += nic.tx_burst(batch, timeout=0.001)
                rx_frames += len(nic.rx_burst(0, 1024, timeout=0.001, copy=False))
            drain_end = time.monotonic() + 2.0
            while rx_frames < tx_frames and time.monotonic() < drain_end:
                rx_frames += len(nic.rx_burst(0, 1024, timeout=0.01, copy=False))
            el = time.perf_counter() - t0
            if rx_frames == 0:
                raise DemoFailed(f"no {size}-byte frames came back from the loopback host")
            mpps = rx_frames / el / 1e6
            gbit = rx_frames * size * 8 / el / 1e9
            out[f"frames_{size}"] = {"size": size, "seconds": round(el, 3), "tx_frames": tx_frames,
                                     "rx_frames": rx_frames, "mpps": round(mpps, 4),
                                     "gbit_per_s": round(gbit, 3)}
            say(f"  {size:>5}-byte frames: {mpps:7.3f} Mpps {gbit:7.2f} Gbit/s  "
                f"({rx_frames} frames round trip in {el:.1f} s)")
        st = nic.stats()["total"]
        out["driver"] = {k: st[k] for k in ("rx_packets", "tx_packets", "drops", "ring_full", "signals")}
    return out


# ---- disk ---------------------------------------------------------------------------------------------

def _disk_phase(device: str, root: str, image: Path, seconds: float,
                say: Callable[[str], None]) -> dict[str, Any]:
    import uvmbus.storvsc as storvsc
    from uvmbus.block.bench import run_disk

    out: dict[str, Any] = {"device_id": device}
    with storvsc.open(device, root, subchannels=0) as hba:
        disk = hba.disk(0)
        info = hba.info().to_dict()
        out.update(size=disk.size, block_size=disk.block_size, protocol=info["protocol"],
                   channels=info["channels"])
        say(f"disk {device}: LUN 0, {disk.size >> 20} MiB ({disk.blocks} x {disk.block_size} B), "
            f"protocol {info['protocol']}, {info['channels']} channel")
        n = min(8 << 20, disk.size // 2)
        off = min(1 << 20, disk.size - n)
        off -= off % disk.block_size
        data = os.urandom(n)
        half = n // 2 - (n // 2) % disk.block_size
        disk.write(off, data[:half])
        disk.write(off + half, data[half:], fua=True)
        disk.flush()
        back = disk.read(off, n)
        if back != data:
            bad = next(i for i in range(n) if back[i] != data[i])
            raise DemoFailed(f"read back differs from what was written at byte {off + bad}")
        with open(image, "rb") as f:
            f.seek(off)
            if f.read(n) != data:
                raise DemoFailed(f"the image file {image} does not hold what was written")
        say(f"  write/verify: {n >> 20} MiB written (FUA + SYNCHRONIZE CACHE), read back identical, "
            "the host's image file matches")
        out["verified_bytes"] = n
        for name, pattern, bs, qd in (("randread_4k", "randread", 4096, 32),
                                      ("seqread_256k", "seqread", 256 << 10, 4)):
            bs = max(bs, disk.block_size)
            bs = min(bs, hba.max_transfer) if bs > hba.max_transfer else bs
            r = run_disk(disk, pattern, bs, qd, seconds, warmup=0.1)
            out[name] = {"bs": bs, "qd": qd, "iops": round(r.iops, 1), "mb_per_s": round(r.mb_per_s, 2),
                         "latency_us": round(r.latency_us, 1)}
            label = f"{bs >> 10} KiB {'random' if pattern.startswith('rand') else 'sequential'} read QD{qd}"
            say(f"  {label:<28} {r.iops:10,.0f} IOPS {r.mb_per_s:9,.1f} MB/s  "
                f"(mean latency {r.latency_us:.0f} us)")
    return out


# ---- the demo -----------------------------------------------------------------------------------------

def run_demo(*, seconds: float = 1.5, say: Callable[[str], None] = print, keep: bool = False,
             time_limit: float = 55.0, kernel: str = "6.18") -> dict[str, Any]:
    """Run the demo; returns the figures.  Raises on any failure (after cleaning up)."""
    from uvmbus.bus import Bus, bind_uio

    t_start = time.monotonic()
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="uvb-demo-", dir=shm if shm.is_dir() else None))
    image_dir = Path(tempfile.mkdtemp(prefix="uvb-demo-img-"))
    image = image_dir / "disk0.img"
    root = base / "r"
    result: dict[str, Any] = {"root": str(root)}
    sim: EmbeddedSim | None = None
    try:
        with _alarm(time_limit):
            with open(image, "wb") as f:
                f.truncate(32 << 20)
            sim = EmbeddedSim(root, ["--kernel", kernel, "--nic", "1", "--nic-backend", "loopback",
                                     "--disk", str(image), "--echo", "0", "--no-ic"])
            result["kernel"] = sim.ready.get("release")
            say(f"simulated Hyper-V host (guest kernel {sim.ready.get('release')}) under {root}")
            nic_id, disk_id = sim.device("netvsc"), sim.device("storvsc")
            bus = Bus(root)
            for dev in (nic_id, disk_id):
                d = bind_uio(bus, dev, timeout=10.0)
                say(f"  bound {d.device_id} ({d.class_name}) to uio_hv_generic ({d.uio})")
            result["nic"] = _nic_phase(nic_id, str(root), seconds, say)
            result["disk"] = _disk_phase(disk_id, str(root), image, seconds, say)
            st = sim.stats()
            t = st.get("totals", {})
            result["signals"] = {k: int(t.get(k, 0)) for k in
                                 ("guest_signals", "needless_signals", "interrupts", "kernel_oops")}
            s = result["signals"]
            say(f"host signals: {s['guest_signals']} guest->host ({s['needless_signals']} needless), "
                f"{s['interrupts']} host->guest interrupts, {s['kernel_oops']} kernel oops")
            if s["kernel_oops"]:
                raise DemoFailed(f"the simulated guest kernel oopsed {s['kernel_oops']} time(s)")
            rc = sim.stop()
            sim_err = sim.stderr
            sim = None
            if rc != 0:
                raise DemoFailed(f"the simulator exited with status {rc}:\n{sim_err}")
    except BaseException as exc:
        if sim is not None and isinstance(exc, (UvmbusError, OSError, TimeoutError)):
            tail = "\n".join(sim.stderr.strip().splitlines()[-15:])
            if tail:
                raise DemoFailed(f"{type(exc).__name__}: {exc}\n--- simulator log (last lines) "
                                 f"---\n{tail}") from exc
        raise
    finally:
        if sim is not None:
            try:
                sim.stop(10.0)
            except SimulatorError:
                pass
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(image_dir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t_start, 2)
    return result

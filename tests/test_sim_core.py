"""The guest core (bus, uio, ring, channel layers) against the simulated host, in two processes.

For every kernel mode × page size × monitored/non-monitored: list devices, bind, open, echo
packets both ways, close and reopen, get a late sub-channel, unbind/rebind, rescind (guest
sees ChannelRevoked) and re-offer — and the simulator must count zero needless guest signals
and no guest-kernel oops.  Expected sizes come from uio_vmbus.md §1.3/§1.5, written out here
independently of both the simulator and the guest code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.bus import Bus
from uvmbus.channel import Channel, ChannelDevice, open_device
from uvmbus.errors import BusError, ChannelRevoked, KernelUnsupported, NotFound
from uvmbus.ring import PKT_COMP, PKT_INBAND
from uvmbus.sim.models.echo import ECHO_CLASS_ID, OP_OFFER_SUBCHANNELS, OP_SEND, control_message

KERNELS = ("6.9", "6.10", "6.16", "6.18")
MODES = [(k, ps, mon) for k in KERNELS for ps in (4096, 65536) for mon in (True, False)]
#: combinations that move the full 100k packets each way; the others move fewer
FULL = {("6.18", 4096, True), ("6.10", 65536, False)}
MiB = 1024 * 1024


def expected_sizes(kernel: str, ps: int) -> dict[str, int | bool]:
    """uio_vmbus.md §1.3/§1.5 for a class the kernel does not know (pref 0x11000)."""
    v = tuple(int(x) for x in kernel.split("."))
    if v < (6, 10):
        primary, sub, ring_file = 512 * ps, 512 * ps, 2 * 512 * ps
    elif v < (6, 16):
        primary, sub, ring_file = 0x11000, 2 * MiB, 4 * MiB
    else:
        primary = -(-(ps + 0x11000) // ps) * ps
        sub, ring_file = 2 * MiB, 2 * primary
    return {"primary": primary, "sub": sub, "primary_ring_file": ring_file,
            "int_map": 4096 if v >= (6, 16) else ps, "buffer_maps": v < (6, 14)}


def payload(i: int, size: int = 64) -> bytes:
    return i.to_bytes(8, "little") + bytes((i + k) & 0xFF for k in range(size - 8))


def echo_roundtrip(ch: Channel, n: int, *, size: int = 64, window: int = 128) -> None:
    """Send ``n`` in-band packets and check every echo (same id, same payload, in order)."""
    sent = got = 0
    while got < n:
        while sent < n and sent - got < window and ch.tx.put(payload(sent, size), trans_id=sent):
            sent += 1
        ch.flush()
        pkts = ch.recv(timeout=20)
        assert pkts, f"no echo within 20 s after {got}/{n} packets"
        for p in pkts:
            assert p.type == PKT_INBAND and p.trans_id == got, (p.type, p.trans_id, got)
            assert bytes(p.payload[:size]) == payload(got, size)
            got += 1


def host_burst(ch: Channel, n: int, size: int = 200) -> None:
    """Ask the echo host to send ``n`` packets (more than the RX ring holds: the host must
    block on pending_send_sz and resume on our signal)."""
    done = ch.request(control_message(OP_SEND, n, size), timeout=60)
    assert done.type == PKT_COMP and bytes(done.payload[:8]) == (0).to_bytes(4, "little") + n.to_bytes(4, "little")
    got = ch.poll()
    assert len(got) == n
    for i, p in enumerate(got):
        assert p.type == PKT_INBAND and p.trans_id == i and int.from_bytes(p.payload[:4], "little") == i


def poll_until(ch: Channel, count: int, timeout: float = 20.0) -> list:
    """Receive without arming the RX interrupt (sub-channels on kernels < 6.16 must stay
    masked: an interrupt there oopses the guest kernel)."""
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        out += ch.poll()
        assert time.monotonic() < deadline, f"only {len(out)}/{count} packets within {timeout} s"
        time.sleep(0.0005)
    return out


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def check_clean(sim: SimProcess) -> None:
    t = sim.totals()
    assert t.get("needless_signals", 0) == 0, sim.needless_report() + "\n" + sim.stderr
    assert t.get("kernel_oops", 0) == 0, sim.stats()
    assert t.get("model_errors", 0) == 0, sim.stderr


def open_subchannel(cd: ChannelDevice, kernel: str, monitored: bool) -> Channel | None:
    """Request one sub-channel from the echo VSP and wait for its ring file."""
    done = cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 1), timeout=20)
    assert done.type == PKT_COMP and int.from_bytes(done.payload[4:8], "little") == 1
    if not monitored and tuple(int(x) for x in kernel.split(".")) < (6, 16):
        # a non-monitored sub-channel cannot be signalled individually before 6.16
        with pytest.raises(KernelUnsupported):
            cd.open_subchannels(1, timeout=20)
        return None
    (sub,) = cd.open_subchannels(1, timeout=20)
    return sub


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kernel,page_size,monitored", MODES,
                         ids=[f"{k}-{ps // 1024}k-{'mon' if m else 'unmon'}" for k, ps, m in MODES])
def test_guest_core_against_simulator(kernel: str, page_size: int, monitored: bool) -> None:
    full = (kernel, page_size, monitored) in FULL
    n = 100_000 if full else 3000
    args = ["--kernel", kernel, "--page-size", str(page_size), "--subchannel-delay", "0.3"]
    if not monitored:
        args.append("--unmonitored")
    exp = expected_sizes(kernel, page_size)
    with run_sim("", *args) as sim:
        bus = Bus(sim.root)
        # -- listing ------------------------------------------------------------------
        assert bus.kernel.version[:2] == tuple(int(x) for x in kernel.split("."))
        devs = {d.device_id: d for d in bus.devices()}
        echo_id = sim.device("echo")["device_id"]
        dev = devs[echo_id]
        assert dev.class_id == ECHO_CLASS_ID and dev.driver is None and dev.uio is None
        assert (dev.monitor_id is not None) == monitored
        ics = [d for d in devs.values() if d.driver == "hv_utils"]
        assert len(ics) == 4 and all(d.monitor_id is None for d in ics)

        # -- binding ------------------------------------------------------------------
        if not monitored and kernel == "6.9":
            with pytest.raises(BusError, match="did not bind"):
                sim.bind(echo_id, timeout=1.0)
            assert dev.driver is None
            check_clean(sim)
            return
        sim.bind(echo_id)
        assert dev.driver == "uio_hv_generic" and dev.uio is not None
        maps = {m.index: m for m in dev.maps()}
        assert maps[0].name == "txrx_rings" and maps[0].size == 2 * exp["primary"]
        assert maps[1].size == exp["int_map"] and maps[2].size == exp["int_map"]
        assert (3 in maps and 4 in maps) == exp["buffer_maps"]
        if exp["buffer_maps"]:
            assert maps[3].name.startswith("recv:") and maps[4].name.startswith("send:")
            assert maps[3].size == 31 * MiB and maps[4].size == 16 * MiB
            assert maps[4].gpadl == maps[3].gpadl + 1 and maps[3].gpadl >= 0xE1E10

        # -- open, traffic, close, reopen ---------------------------------------------
        for round_ in range(2):
            with open_device(echo_id, sim.root) as cd:
                ring = os.path.join(dev.path, "channels", str(dev.relid), "ring")
                assert os.stat(ring).st_size == exp["primary_ring_file"]
                ch = cd.primary
                echo_roundtrip(ch, n if round_ == 0 else 500)
                host_burst(ch, n if round_ == 0 else 2000)
                r = ch.request(b"request-response", timeout=20)
                assert r.type == PKT_COMP and ch.poll()[0].trans_id == r.trans_id
                if round_ == 0:
                    sub = open_subchannel(cd, kernel, monitored)
                    if sub is not None:
                        assert sub.rx.ring_bytes == exp["sub"] and sub.subchannel_id == 1
                        for i in range(50):
                            sub.send(payload(i), trans_id=i)
                        got = poll_until(sub, 50)
                        assert [p.trans_id for p in got] == list(range(50))
            # the simulator sees the close asynchronously (a real close is synchronous); the
            # primary's ring stays (uio_hv_generic made it at probe) but is no longer the ring:
            # its mmap fails on a real kernel, here it is the closed stand-in
            closed = sim.root / "sim/rings" / f"{dev.relid}.closed"
            wait_until(lambda r=ring, c=closed: c.exists() and os.stat(r).st_ino == os.stat(c).st_ino,
                       "the primary's ring must stop being the ring at close")
            assert os.stat(ring).st_size == exp["primary_ring_file"]
        wait_until(lambda: sim.device_stats(echo_id)["connections"] == 0, "close not seen")
        st = sim.device_stats(echo_id)
        assert st["opens"] == 2 and st["connections"] == 0
        subs = [c for c in st["channels"].values() if c["subchannel_id"]]
        assert all(not c["open"] for c in subs)
        assert not [d for d in os.listdir(os.path.join(dev.path, "channels")) if d != str(dev.relid)], \
            "sub-channels are rescinded when the device closes"

        # -- unbind / rebind ----------------------------------------------------------
        sim.unbind(echo_id)
        assert dev.driver is None and dev.uio is None
        sim.bind(echo_id)
        assert dev.driver == "uio_hv_generic"

        # -- rescind and re-offer -----------------------------------------------------
        cd = open_device(echo_id, sim.root)
        try:
            echo_roundtrip(cd.primary, 100)
            old_relid = dev.relid
            sim.rescind(echo_id, reoffer_after=0.2)
            with pytest.raises(ChannelRevoked):
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    cd.primary.recv(timeout=1)
        finally:
            cd.close()
        deadline = time.monotonic() + 20
        while not (dev.path.exists() and dev.driver == "uio_hv_generic" and dev.uio):
            assert time.monotonic() < deadline, "device was not re-offered and re-bound"
            time.sleep(0.02)
        assert dev.relid != old_relid
        with open_device(echo_id, sim.root) as cd:
            echo_roundtrip(cd.primary, 200)
        check_clean(sim)


@pytest.mark.timeout(60)
def test_subchannel_ring_appears_late() -> None:
    """§1.8: the sub-channel directory comes first, its ring file later (no uevent)."""
    with run_sim("", "--kernel", "6.18", "--subchannel-delay", "1.5") as sim:
        echo_id = sim.device("echo")["device_id"]
        sim.bind(echo_id)
        with open_device(echo_id, sim.root) as cd:
            done = cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 2), timeout=10)
            assert done.type == PKT_COMP
            dev = Bus(sim.root).device(echo_id)
            deadline = time.monotonic() + 10
            while len([c for c in dev.channels() if c.subchannel_id]) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            late = [c for c in dev.channels() if c.subchannel_id]
            assert len(late) == 2 and all(c.ring_path is None for c in late)
            with pytest.raises(NotFound):
                cd.open_subchannels(2, timeout=0.05)
            subs = cd.open_subchannels(2, timeout=20)
            assert [s.subchannel_id for s in subs] == [1, 2]
            for s in subs:
                r = s.request(b"on a sub-channel", timeout=10)
                assert r.type == PKT_COMP
        check_clean(sim)


@pytest.mark.timeout(60)
def test_unmasked_subchannel_interrupt_oopses_old_kernels() -> None:
    """Before 6.16 an interrupt on a sub-channel crashes uio_hv_generic's handler: the
    simulator counts it as a guest kernel oops instead of delivering it."""
    with run_sim("", "--kernel", "6.10", "--subchannel-delay", "0.1") as sim:
        echo_id = sim.device("echo")["device_id"]
        sim.bind(echo_id)
        with open_device(echo_id, sim.root) as cd:
            cd.primary.request(control_message(OP_OFFER_SUBCHANNELS, 1), timeout=10)
            (sub,) = cd.open_subchannels(1, timeout=10)
            sub.rx.arm()                       # unmask the sub-channel RX ring
            sub.send(b"x" * 16, trans_id=1)   # the echo arrives with the mask clear
            poll_until(sub, 1)
        t = sim.totals()
        assert t["kernel_oops"] >= 1


def test_close_then_immediate_reopen_gets_a_fresh_channel() -> None:
    """close() returns after the channel is torn down (as on a real uio fd), so an immediate
    reopen opens a new channel: indices reset, nothing left over from the old session."""
    with run_sim("", "--kernel", "6.18") as sim:
        echo = sim.device("echo")["device_id"]
        sim.bind(echo)
        for round_ in range(5):
            with open_device(echo, sim.root) as cd:
                ch = cd.primary
                assert ch.rx.control()["write_index"] == 0 and ch.tx.control()["write_index"] == 0
                assert ch.poll() == [], f"round {round_}: stale packets from the last session"
                # leave unread packets behind: the host echoes these after we close
                for i in range(8):
                    ch.send(b"left behind %d" % i, trans_id=i)
        opens = sim.device_stats(echo)["opens"]
        assert opens == 5, opens
        check_clean(sim)

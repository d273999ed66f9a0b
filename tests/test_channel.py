"""Channel layer: send/request/recv over a ring pair, signalling decisions turned
into real signals, waiting with the arm/mask pattern, errors."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time

import pytest

from uvmbus.channel import Channel, DeviceWaiter, PollingWaiter
from uvmbus.errors import ChannelRevoked, ChannelTimeout, RingCorrupt, WouldBlock
from uvmbus.native import buffer_pointer, ffi, lib, release
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, PKT_COMP, PKT_INBAND, RingPair

RING = 4096 + 16384  # per direction: one header page + 16 KiB data


@pytest.fixture
def rings():
    mm = mmap.mmap(-1, 2 * RING)
    RingPair.init_memory(mm, RING)
    guest = RingPair.attach(mm, RING, 4096, role="guest")
    host = RingPair.attach(mm, RING, 4096, role="host")
    yield mm, guest, host
    guest.close()
    host.close()
    mm.close()


def host_echo_once(host: RingPair) -> int:
    """Echo every packet the host sees; completion-requested ones get a completion."""
    n = 0
    for p in host.inp.read():
        payload = bytes(p.payload)
        if p.flags & FLAG_COMPLETION_REQUESTED:
            host.out.put(payload, trans_id=p.trans_id, type=PKT_COMP)
        else:
            host.out.put(payload, trans_id=p.trans_id)
        n += 1
    host.inp.commit()
    host.out.commit()
    return n


def test_send_and_recv(rings):
    _, guest, host = rings
    ch = Channel(guest, relid=5)
    ch.send(b"ping", trans_id=7)
    assert host_echo_once(host) == 1
    got = ch.recv(timeout=1)
    assert len(got) == 1 and bytes(got[0].payload[:4]) == b"ping" and got[0].trans_id == 7
    assert got[0].type == PKT_INBAND
    s = ch.stats()
    assert s["tx_packets"] == 1 and s["rx_packets"] == 1


def test_request_matches_transaction_and_keeps_others_in_order(rings):
    _, guest, host = rings
    ch = Channel(guest, relid=5)
    # unsolicited packets from the host arrive before the completion
    host.out.put(b"unsolicited-1", trans_id=0)
    host.out.put(b"unsolicited-2", trans_id=0)
    host.out.commit()
    done = threading.Event()

    def host_thread():
        while not done.is_set():
            if host.inp.avail:
                for p in host.inp.read():
                    host.out.put(b"answer:" + bytes(p.payload[:3]), trans_id=p.trans_id, type=PKT_COMP)
                host.inp.commit()
                host.out.commit()
            time.sleep(0.001)

    t = threading.Thread(target=host_thread, daemon=True)
    t.start()
    try:
        reply = ch.request(b"abc", timeout=5)
        assert bytes(reply.payload[:10]) == b"answer:abc"
        assert reply.type == PKT_COMP
        rest = ch.poll()
        assert [bytes(p.payload[:13]) for p in rest] == [b"unsolicited-1", b"unsolicited-2"]
    finally:
        done.set()
        t.join()


def test_request_times_out(rings):
    _, guest, _host = rings
    ch = Channel(guest, relid=5)
    with pytest.raises(ChannelTimeout, match="completion of transaction"):
        ch.request(b"x", timeout=0.05)


def test_send_blocks_then_would_block_when_host_never_consumes(rings):
    _, guest, _host = rings
    ch = Channel(guest, relid=5)
    payload = bytes(1000)
    sent = 0
    with pytest.raises(WouldBlock, match="no ring space"):
        for _ in range(100):
            ch.send(payload, timeout=0.05)
            sent += 1
    assert 0 < sent < 20
    # the writer asked the host to signal when space frees (pending_send_sz) and cleared it on timeout
    assert guest.out.control()["pending_send_sz"] == 0


def test_send_waits_for_space_and_host_is_told_to_signal(rings):
    """A full TX ring makes the guest set pending_send_sz; the host's read commit then
    answers "signal the guest" exactly when free space crosses it."""
    _, guest, host = rings
    ch = Channel(guest, relid=5)
    payload = bytes(1500)
    while guest.out.put(payload):
        pass
    guest.out.commit()
    host_signals = []

    def host_thread():
        time.sleep(0.05)
        while True:
            b = host.inp.read(1)
            if not b.count:
                break
            host_signals.append(host.inp.commit())

    t = threading.Thread(target=host_thread)
    t.start()
    ch.send(payload, timeout=5)      # waits for space
    t.join()
    assert True in host_signals, "host never saw the pending_send_sz crossing"
    assert host_signals.count(True) == 1


def test_monitored_signal_sets_monitor_bit_only_on_transition(rings):
    _, guest, host = rings
    page = bytearray(4096)
    pp = buffer_pointer(page)
    sig = ffi.new("struct uvb_signal *")
    sig.monitor_page = pp
    sig.monitor_id = 37
    sig.fd = -1
    ch = Channel(guest, relid=5, monitor_id=37, signal=sig)
    pending = lambda: struct.unpack_from("<I", page, 8 + 8 * (37 // 32))[0]  # noqa: E731
    ch.send(b"a")
    assert pending() == 1 << (37 % 32)
    struct.pack_into("<I", page, 8 + 8, 0)
    ch.send(b"b")                     # ring not empty: no signal
    assert pending() == 0
    assert ch.stats()["signals"] == 1
    host.inp.read()
    host.inp.commit()
    ch.send(b"c")                     # empty -> non-empty again
    assert pending() == 1 << 5
    # host masked its incoming ring (draining): no signal even on a transition
    host.inp.read()
    host.inp.commit()
    host.inp.mask()
    struct.pack_into("<I", page, 16, 0)
    ch.send(b"d")
    assert pending() == 0
    ch.close()
    release(pp)


def test_unmonitored_signal_writes_endpoint_and_int_page(rings):
    _, guest, host = rings
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    intpage = bytearray(2048)
    ip = buffer_pointer(intpage)
    sig = ffi.new("struct uvb_signal *")
    sig.relid = 40
    sig.fd = a.fileno()
    sig.fd_is_socket = 1
    sig.int_page_send = ip
    ch = Channel(guest, relid=40, signal=sig)
    ch.send(b"x")
    b.settimeout(1)
    assert struct.unpack("<I", b.recv(16))[0] == 1
    assert struct.unpack_from("<I", intpage, 4)[0] == 1 << (40 - 32)
    ch.send(b"y")                      # not a transition
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(16)
    # peer gone: signalling reports a revoked channel
    host.inp.read()
    host.inp.commit()
    b.close()
    with pytest.raises(ChannelRevoked):
        ch.send(b"z")
    a.close()
    release(ip)


def test_corrupt_ring_kills_channel_with_clear_error(rings):
    mm, guest, host = rings
    ch = Channel(guest, relid=5)
    host.out.put(b"hello")
    host.out.commit()
    # corrupt the descriptor's offset8 in the guest's RX data area
    struct.pack_into("<H", mm, RING + 4096 + 2, 1)
    with pytest.raises(RingCorrupt, match="offset8 1"):
        ch.poll()
    assert ch.dead
    with pytest.raises(RingCorrupt):
        ch.poll()


def test_corrupt_write_index_is_detected(rings):
    mm, guest, _host = rings
    ch = Channel(guest, relid=5)
    struct.pack_into("<I", mm, RING, 0x12345)  # RX write_index: not aligned, out of range
    with pytest.raises(RingCorrupt, match="write_index"):
        ch.poll()


class FakeEndpoint:
    """Counts interrupts; lets a test raise them from another thread."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.count = 0
        self.masks_at_sleep: list[int] = []
        self.on_sleep = None

    def wait(self, timeout):
        if self.on_sleep:
            self.on_sleep()
        import select
        r, _, _ = select.select([self.r], [], [], timeout)
        if not r:
            return None
        os.read(self.r, 64)
        self.count += 1
        return self.count

    def interrupt(self) -> None:
        os.write(self.w, b"x")

    def fileno(self) -> int:
        return self.r


def test_device_waiter_unmasks_before_sleep_and_masks_after(rings):
    _, guest, host = rings
    ep = FakeEndpoint()
    waiter = DeviceWaiter(ep)  # type: ignore[arg-type]
    ch = Channel(guest, relid=5, waiter=waiter)
    assert guest.inp.masked                 # explicit state at start
    seen = []
    ep.on_sleep = lambda: seen.append(guest.inp.masked)
    assert ch.wait(timeout=0.02) is False   # timeout
    assert seen == [False]                  # unmasked while sleeping
    assert guest.inp.masked                 # masked again after
    # data arriving before the sleep is found by the re-check: no sleep at all
    host.out.put(b"data")
    host.out.commit()
    seen.clear()
    assert waiter.wait([ch], timeout=1) is True
    assert seen == []
    ch.poll()

    # an interrupt raised while sleeping wakes the waiter
    def later():
        time.sleep(0.05)
        host.out.put(b"late")
        if host.out.commit():           # guest RX unmasked and empty -> signal
            ep.interrupt()

    t = threading.Thread(target=later)
    t.start()
    assert waiter.wait([ch], timeout=5) is True
    t.join()
    assert [bytes(p.payload[:4]) for p in ch.poll()] == [b"late"]


def test_kernel_that_masks_in_its_isr_does_not_lose_wakeups(rings):
    """Pre-6.18 kernels set interrupt_mask=1 when they deliver an interrupt. The
    waiter must unmask again before every sleep, so a later packet still interrupts."""
    _, guest, host = rings
    ep = FakeEndpoint()
    waiter = DeviceWaiter(ep)  # type: ignore[arg-type]
    ch = Channel(guest, relid=5, waiter=waiter)
    for i in range(3):
        def later(i=i):
            time.sleep(0.02)
            host.out.put(b"p%d" % i)
            if host.out.commit():
                guest.inp.mask()         # the "kernel ISR" masks ...
                ep.interrupt()           # ... then bumps the event counter
        t = threading.Thread(target=later)
        t.start()
        assert waiter.wait([ch], timeout=5), f"lost wake-up {i}"
        t.join()
        assert len(ch.poll()) == 1


def test_polling_waiter_and_fileno(rings):
    _, guest, _host = rings
    ch = Channel(guest, relid=5, waiter=PollingWaiter())
    assert ch.wait(timeout=0.01) is False
    with pytest.raises(Exception, match="no interrupt source"):
        ch.fileno()
    ep = FakeEndpoint()
    ch2 = Channel(guest, relid=5, waiter=DeviceWaiter(ep))  # type: ignore[arg-type]
    assert ch2.fileno() == ep.r


def test_gpa_direct_send_reaches_host_with_ranges(rings):
    _, guest, host = rings
    ch = Channel(guest, relid=5)
    ch.send_gpa_direct([(8192, 100, [0x1000, 0x1001, 0x1002])], b"srb", trans_id=9)
    pkt = host.inp.read()[0]
    assert pkt.type == lib.VMBUS_PKT_GPA_DIRECT and pkt.trans_id == 9
    reserved, count, byte_count, byte_offset = struct.unpack_from("<IIII", pkt.header, 0)
    assert (count, byte_count, byte_offset) == (1, 8192, 100)
    assert struct.unpack_from("<3Q", pkt.header, 16) == (0x1000, 0x1001, 0x1002)
    assert bytes(pkt.payload[:3]) == b"srb"

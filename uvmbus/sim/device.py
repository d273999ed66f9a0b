"""One simulated VMBus device: offer, binding, uio probe, channel open/close, sub-channels.

A :class:`SimDevice` is what a device model sees as ``self.device``.  Its public methods for
models are :meth:`offer_subchannels`, :meth:`buffer`, :attr:`guest_ram`, :meth:`rescind` and
:meth:`log`; everything else is called by the simulator's event loop (one thread), which
owns all state changes.  Channel workers only touch their own rings and call
:meth:`offer_subchannels` / :meth:`rescind`, which hand the work to the event loop.

Lifecycle, as uio_hv_generic (uio_vmbus.md §1.2, §1.8, §1.10):

* probe (bind to uio_hv_generic): ring memory allocated (zeroed), NIC buffers GPADL'd,
  ``uio/uioN`` + maps + ``dev/uioN`` created; the channel is NOT opened;
* first connection: channel open (hv_ringbuffer_init, ``ring`` file visible, host worker);
* sub-channel offers: ``channels/<relid>/`` at once; if the device is open, the sub-channel
  is opened and its ``ring`` appears ``--subchannel-delay`` later;
* last close: every sub-channel closed and rescinded, the primary closed, model reset;
* rescind: the endpoint sends the rescind event, the device leaves the bus.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvmbus.native import ffi, lib
from uvmbus.sim.channel import HostChannel
from uvmbus.sim.endpoint import Connection, EndpointServer
from uvmbus.sim.faults import Faults
from uvmbus.sim.kernel import FIRST_GPADL, RECV_BUFFER_SIZE, SEND_BUFFER_SIZE
from uvmbus.sim.memory import GpadlBuffer, RingMemory, SharedMemfd
from uvmbus.sim.models.base import DeviceModel

if TYPE_CHECKING:
    from uvmbus.dma.sim import GuestRam
    from uvmbus.sim.hostapi import HostVm

__all__ = ["GpadlBuffer", "SimDevice"]

UIO_DRIVER = "uio_hv_generic"


def ring_debug_info(ring: Any) -> dict[str, str]:
    """hv_ringbuffer_get_debuginfo of one direction, as the device attributes print it; no
    ring (channel not open): the kernel's read fails (-EINVAL), the simulator's file is empty."""
    if ring is None:
        return {k: "" for k in ("intr_mask", "read_index", "write_index", "read_bytes_avail",
                                "write_bytes_avail")}
    c = ring.control()
    size = ring.data_size
    to_read = (c["write_index"] - c["read_index"]) % size
    return {"intr_mask": f"{c['interrupt_mask']}\n", "read_index": f"{c['read_index']}\n",
            "write_index": f"{c['write_index']}\n", "read_bytes_avail": f"{to_read}\n",
            "write_bytes_avail": f"{size - to_read}\n"}


def vmalloc_address(gpadl: int) -> int:
    """A kernel virtual address in x86-64's vmalloc area (0xffffc90000000000, 32 TiB) for a
    NIC buffer: uio_hv_generic publishes the vzalloc() address as the map's ``addr``."""
    return 0xFFFFC90000000000 + ((gpadl - FIRST_GPADL) % (1 << 19)) * (64 << 20)


@dataclass
class SubchannelOffer:
    relid: int
    subchannel_id: int
    monitor_id: int | None


class SimDevice:
    """A device offered on the simulated bus (see the module docstring)."""

    def __init__(self, vm: HostVm, model_cls: type[DeviceModel], options: dict[str, Any],
                 device_id: str):
        self.vm = vm
        self.config = vm.config
        self.kernel = vm.kernel
        self.device_id = device_id
        opts = dict(options)
        self.class_id: str = str(opts.pop("class_id", model_cls.class_id))
        self.kind: str = str(opts.pop("kind", model_cls.name))
        self.model_cls = model_cls
        self.monitored = self.config.monitored if model_cls.monitored is None else model_cls.monitored
        self.is_nic = model_cls.is_nic
        self.faults = Faults()
        self.notify: Any = ffi.new("struct uvb_host_notify *")
        self._lock = threading.Lock()
        #: irqcontrol writes still to come whose int-page bits an earlier write already found
        self._overlapped_writes = 0
        #: relid -> when an irqcontrol write last found its int-page bit (monotonic seconds)
        self._bit_found_at: dict[int, float] = {}
        # bus state
        self.present = False
        self.relid: int | None = None
        self.monitor_id: int | None = None
        self.driver: str | None = None
        self.driver_override: str | None = None
        # uio state
        self.uio_index: int | None = None
        self.server: EndpointServer | None = None
        self.ring_mem: RingMemory | None = None
        self.buffers: dict[str, GpadlBuffer] = {}
        self.connections: list[Connection] = []
        self.channels: dict[int, HostChannel] = {}
        self.subchannels: dict[int, SubchannelOffer] = {}
        self.history: dict[int, dict[str, Any]] = {}
        self.opens = 0
        self.kernel_owned_gpadls: list[int] = []
        self._generation = 0          # bumps at every close: cancels stale delayed work
        self.model: DeviceModel = model_cls(self, **opts)

    # ==== API for device models ===========================================================
    @property
    def guest_ram(self) -> GuestRam | None:
        """Host view of guest RAM (PFN-addressed, bounds-checked), or None without one."""
        return self.vm.guest_ram

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def primary(self) -> HostChannel | None:
        return self.channels.get(self.relid) if self.relid is not None else None

    def buffer(self, kind: str) -> GpadlBuffer | None:
        """The receive (``"recv"``) or send (``"send"``) buffer, if this kernel gives the
        device one (maps 3/4)."""
        return self.buffers.get(kind)

    def offer_subchannels(self, count: int) -> int:
        """Offer ``count`` sub-channels (asynchronously, like Hyper-V).  Returns ``count``."""
        self.vm.call_soon(self._offer_subchannels, count)
        return count

    def rescind(self, reoffer_after: float | None = None) -> None:
        """Rescind the device (from a model or a fault), optionally re-offering it later."""
        self.vm.call_soon(self.vm.rescind, self, reoffer_after)

    def log(self, message: str, *, debug: bool = False) -> None:
        self.vm.log(f"{self.kind} {self.device_id[:8]}: {message}", debug=debug)

    # ==== offer / rescind (event loop) ====================================================
    def offered(self, relid: int, monitor_id: int | None) -> None:
        self.present = True
        self.relid = relid
        self.monitor_id = monitor_id
        self.vm.tree.add_device(self.device_id, self.class_id, relid, monitor_id)
        self.vm.tree.add_channel(self.device_id, relid, 0, monitor_id)
        self.vm.watch_device(self)

    def rescinded(self) -> None:
        """Tell every open endpoint, close everything, leave the bus."""
        for conn in list(self.connections):
            conn.rescind()
        if self.driver:
            self.unbind()
        for relid in list(self.subchannels):
            self._forget_subchannel(relid)
        self.vm.tree.remove_device(self.device_id)
        self.present = False
        # the kernel frees the struct hv_device (vmbus_device_unregister), and with it its
        # driver_override: a re-offer is a new device with none (its sysfs file reads empty)
        self.driver_override = None

    # ==== binding (event loop) ============================================================
    def bind(self, driver: str) -> bool:
        """Attach to ``driver``; False if the probe failed (device stays unbound)."""
        if driver == UIO_DRIVER:
            if not self._probe_uio():
                return False
        else:
            self._kernel_attach(driver)
        self.vm.tree.set_driver(self.device_id, None, driver)
        self.driver = driver
        return True

    def unbind(self) -> None:
        old = self.driver
        if old is None:
            return
        if old == UIO_DRIVER:
            self._remove_uio()
        else:
            self._kernel_detach()
        self.vm.tree.set_driver(self.device_id, old, None)
        self.driver = None

    def _kernel_attach(self, driver: str) -> None:
        """A kernel driver took the device: it opens the channel (one ring GPADL) and creates
        its OS-side children.  The simulator does not run kernel drivers' traffic."""
        self.kernel_owned_gpadls = [self.vm.next_gpadl()]
        if driver == "hv_netvsc":
            self.kernel_owned_gpadls += [self.vm.next_gpadl(), self.vm.next_gpadl()]
            ifname, mac = self.vm.alloc_ifname(self)
            self.vm.tree.add_net(self.device_id, ifname, mac)
        elif driver == "hv_storvsc":
            host = self.vm.alloc_scsi_host(self)
            disks: list[Any] = getattr(self.model, "disks", lambda: [])()
            self.vm.tree.add_disks(self.device_id, host, disks)

    def _kernel_detach(self) -> None:
        self.vm.tree.remove_net(self.device_id)
        self.vm.tree.remove_disks(self.device_id)
        self.kernel_owned_gpadls = []

    def _probe_uio(self) -> bool:
        k = self.kernel
        if self.monitor_id is None and not k.accepts_unmonitored:
            self.log(f"uio_hv_generic probe failed with error -95: vmbus channel requires hypercall "
                     f"(kernel {k.name} refuses channels without a monitor id before 6.10)")
            return False
        assert self.relid is not None
        ring_bytes = k.primary_ring_bytes(self.class_id)
        self.ring_mem = RingMemory(self.vm.tree.ring_backing(self.relid), ring_bytes,
                                   k.ring_file_bytes(ring_bytes), k.page_size)
        maps: list[tuple[str, int, int]] = [
            ("txrx_rings", 2 * ring_bytes, 0xF8000000 + self.relid * 0x1000000),
            ("int_page", k.int_map_size, 0xF7000000),
            ("monitor_page", k.int_map_size, 0xF7100000),
        ]
        if k.has_buffer_maps(self.class_id):
            for kind, size in (("recv", RECV_BUFFER_SIZE), ("send", SEND_BUFFER_SIZE)):
                buf = GpadlBuffer(kind, self.vm.next_gpadl(), SharedMemfd(f"{self.relid}-{kind}", size))
                ram = self.vm.guest_ram
                if ram is not None:
                    # uio_hv_generic vzalloc()s the buffers: ordinary guest pages with GPAs
                    # (a guest may point GPA-direct ranges into them, as DPDK's
                    # rx_extmbuf_enable does); their memory is a guest-RAM segment
                    buf.pfn = ram.add_segment(buf.mem.fd, size)
                self.buffers[kind] = buf
                maps.append((buf.map_name, size, vmalloc_address(buf.gpadl)))
        self.uio_index = self.vm.alloc_uio(self)
        self.server = EndpointServer(self.vm.tree.uio_dev(self.uio_index))
        self.vm.add_endpoint(self)
        self.vm.tree.add_uio(self.device_id, self.uio_index, maps)
        # uio_hv_generic makes the primary's ring visible at probe (hv_create_ring_sysfs);
        # its mmap fails with ENODEV until the channel is open (hv_uio_ring_mmap)
        self.vm.tree.show_ring(self.device_id, self.relid, is_open=False,
                               size=k.ring_file_bytes(ring_bytes))
        return True

    def map_fds(self) -> list[tuple[int, int, int, int | None]]:
        """(index, size, fd, GPA or None) of every uio map, for the endpoint hello."""
        assert self.ring_mem is not None
        k = self.kernel
        out: list[tuple[int, int, int, int | None]] = [
            (0, 2 * self.ring_mem.ring_bytes, self.ring_mem.fd, None),
            (1, k.int_map_size, self.vm.int_page.fd, None),
            (2, k.int_map_size, self.vm.monitor_page.fd, None)]
        for i, kind in enumerate(("recv", "send"), start=3):
            if kind in self.buffers:
                b = self.buffers[kind]
                out.append((i, b.size, b.mem.fd, None if b.pfn is None else b.pfn << 12))
        return out

    def _remove_uio(self) -> None:
        for conn in list(self.connections):
            conn.rescind()          # a real unbind makes every read/write return EIO
            self.connection_closed(conn)
        if self.server is not None:
            self.vm.remove_endpoint(self)
            self.server.close()
            self.server = None
        if self.relid is not None:
            self.vm.tree.hide_ring(self.device_id, self.relid)
        if self.uio_index is not None:
            self.vm.tree.remove_uio(self.device_id, self.uio_index)
            self.vm.free_uio(self.uio_index)
            self.uio_index = None
        if self.ring_mem is not None:
            self.ring_mem.close()
            self.ring_mem = None
        for b in self.buffers.values():
            if b.pfn is not None and self.vm.guest_ram is not None:
                self.vm.guest_ram.remove_segment(b.pfn)
            b.mem.close()
        self.buffers = {}

    # ==== endpoint connections (event loop) ================================================
    def connection_opened(self, conn: Connection) -> None:
        if not self.connections:
            self._open_channel()
        self.connections.append(conn)
        self._update_notify()
        try:
            conn.send_hello(self.page_size, self.map_fds())
        except OSError:
            self.connection_closed(conn)

    def connection_closed(self, conn: Connection, *, ack: bool = False) -> None:
        """The guest closed one "file"; the last close closes the channel. With ``ack`` the
        guest asked and waits: answer after the teardown."""
        if conn in self.connections:
            self.connections.remove(conn)
            self._update_notify()
            self.vm.forget_connection(conn)
            if not self.connections:
                self._close_channel()
            if ack:
                conn.ack_close()
            conn.close()

    def _update_notify(self) -> None:
        fds = [c.eventfd for c in self.connections][: lib.UVB_HOST_MAX_NOTIFY]
        lib.uvb_host_notify_set(self.notify, ffi.new("int32_t[]", fds or [0]), len(fds))

    def messages(self, conn: Connection, msgs: list[bytes]) -> bool:
        """Handle the guest's messages; True when one of them closed the connection."""
        from uvmbus.sim.endpoint import irqcontrol_value, is_close_request
        for m in msgs:
            v = irqcontrol_value(m)
            if v is not None:
                self.irqcontrol(v)
            elif is_close_request(m):
                self.connection_closed(conn, ack=True)
                return True
            else:
                self.vm.counters["bad_endpoint_messages"] += 1
        return False

    # ==== channels (event loop) ============================================================
    def _open_channel(self) -> None:
        assert self.ring_mem is not None and self.relid is not None
        self.opens += 1
        mem = self.ring_mem
        mem.ringbuffer_init()
        self.vm.next_gpadl()                      # the ring GPADL of vmbus_connect_ring
        if self.kernel.kernel_sets_mask:
            lib.uvb_ring_store(mem.rx_header, 2, 1)
        ch = HostChannel(self, self.relid, 0, self.monitor_id, mem)
        self._start_channel(ch)
        self.vm.tree.show_ring(self.device_id, self.relid)
        self.refresh_attrs()

    def _start_channel(self, ch: HostChannel) -> None:
        with self._lock:
            self.channels[ch.relid] = ch
        if ch.monitor_id is not None:
            self.vm.monitor.watch(ch.monitor_id, ch)
        ch.start()

    def _stop_channel(self, ch: HostChannel) -> None:
        if ch.monitor_id is not None:
            self.vm.monitor.unwatch(ch.monitor_id)
        ch.stop()
        with self._lock:
            self.channels.pop(ch.relid, None)
        self._archive(ch)
        ch.close()

    def _archive(self, ch: HostChannel) -> None:
        snap = ch.snapshot()
        old = self.history.get(ch.relid)
        if old:
            for k, v in snap.items():
                if isinstance(v, int) and k not in ("relid", "subchannel_id", "monitor_id"):
                    snap[k] = v + int(old.get(k, 0))
        snap["open"] = False
        self.history[ch.relid] = snap

    def _close_channel(self) -> None:
        """Last close: sub-channels closed and rescinded, primary closed, VSP state reset."""
        self._generation += 1
        for relid in [r for r in self.channels if r != self.relid]:
            self._stop_channel(self.channels[relid])
        for relid in list(self.subchannels):
            self._forget_subchannel(relid)
        primary = self.primary
        if primary is not None:
            self._stop_channel(primary)
        if self.relid is not None and self.ring_mem is not None:
            self.vm.tree.show_ring(self.device_id, self.relid, is_open=False,
                                   size=self.kernel.ring_file_bytes(self.ring_mem.ring_bytes))
        self.refresh_attrs()
        try:
            self.model.reset()
        except Exception as exc:  # pragma: no cover - model bug
            self.log(f"model reset failed: {exc!r}")

    def _offer_subchannels(self, count: int) -> None:
        if not self.present:
            return
        used = {o.subchannel_id for o in self.subchannels.values()}
        for _ in range(count):
            subid = next(i for i in range(1, 1 << 16) if i not in used)
            used.add(subid)
            relid = self.vm.alloc_relid()
            mon = self.vm.alloc_monitor_id() if (self.monitored and self.config.monitored_subchannels) else None
            self.subchannels[relid] = SubchannelOffer(relid, subid, mon)
            self.vm.tree.add_channel(self.device_id, relid, subid, mon)
            if self.connections:        # uio opens offers only while the device is open
                self.vm.later(self.config.subchannel_delay, self._open_subchannel, relid, self._generation)

    def _open_subchannel(self, relid: int, generation: int) -> None:
        offer = self.subchannels.get(relid)
        if offer is None or generation != self._generation or not self.connections:
            return
        k = self.kernel
        ring_bytes = k.subchannel_ring_bytes()
        mem = RingMemory(self.vm.tree.ring_backing(relid), ring_bytes, k.ring_file_bytes(ring_bytes),
                         k.page_size)
        mem.ringbuffer_init()
        self.vm.next_gpadl()
        if k.kernel_sets_mask:
            lib.uvb_ring_store(mem.rx_header, 2, 1)
        ch = HostChannel(self, relid, offer.subchannel_id, offer.monitor_id, mem)
        self._start_channel(ch)
        self.vm.tree.show_ring(self.device_id, relid)

    def _forget_subchannel(self, relid: int) -> None:
        ch = self.channels.get(relid)
        if ch is not None:
            self._stop_channel(ch)
            ch.mem.close()
        offer = self.subchannels.pop(relid, None)
        if offer is not None and offer.monitor_id is not None:
            self.vm.free_monitor_id(offer.monitor_id)
        self.vm.tree.remove_channel(self.device_id, relid)

    # ==== irqcontrol (event loop) ===========================================================
    def irqcontrol(self, value: int) -> None:
        """The 4-byte write to /dev/uioN (§1.6 table)."""
        k = self.kernel
        self.vm.counters["irqcontrol_writes"] += 1
        primary = self.primary
        if primary is not None:
            primary.trace_event(lib.UVB_TRACE_EV_IRQCONTROL, value)
        chans = [primary] if primary is not None else []
        if k.irqcontrol_all_channels:
            chans += [c for r, c in self.channels.items() if r != self.relid]
        for ch in chans:
            lib.uvb_ring_store(ch.mem.rx_header, 2, 0 if value else 1)
        if not value or not k.irqcontrol_signals:
            return
        targets = [ch for ch in chans if ch.monitor_id is None]
        send_half = self.vm.int_page.ptr + lib.HV_INT_PAGE_SEND_OFFSET
        attributed = {ch.relid for ch in targets if lib.uvb_intpage_test_clear(send_half, ch.relid)}
        if not attributed and self._overlapped_writes > 0:
            # Several guest threads each set their channel's int-page bit and wrote 1; the
            # first write we processed found all their bits. This write is one of the others:
            # its intent was already delivered, so everything it causes is collateral.
            self._overlapped_writes -= 1
            for ch in targets:
                ch.guest_signal(collateral=True)
            return
        now = time.monotonic()
        if not attributed:
            repeat = self._coalesced_repeat(targets, now)
            if repeat is not None:
                self.vm.counters["irqcontrol_repeats"] += 1
                for ch in targets:
                    ch.guest_signal(collateral=ch is not repeat)
                return
        for relid in attributed:
            self._bit_found_at[relid] = now
        self._overlapped_writes += max(0, len(attributed) - 1)
        for ch in targets:
            ch.guest_signal(collateral=bool(attributed) and ch.relid not in attributed)

    def _coalesced_repeat(self, targets: list[HostChannel], now: float) -> HostChannel | None:
        """The channel a write that found no int-page bit most likely repeated, or None.

        An int-page bit is a flag, not a count: the kernel's ``vmbus_send_interrupt`` sets it
        (``sync_set_bit``) and a host scan clears every set bit and signals each channel once
        (OpenVMM ``ChannelBitmap::handle_shared_interrupt``).  A guest that signals one channel
        twice before the host handles its first write sets the bit twice; the first write
        finds it, the second finds none — yet it was meant for that channel, not for all of
        them.  So a bit-less write within the signal grace of a write that found a channel's
        bit counts as a repeat for that channel (one with an unused entitlement if several
        qualify, else the one found last); its signals to the others are collateral.  A
        bit-less write with no such recent bit is still a signal to every channel."""
        recent = [ch for ch in targets
                  if now - self._bit_found_at.get(ch.relid, float("-inf")) <= ch.signal_grace]
        if not recent:
            return None
        entitled = [ch for ch in recent if ch.has_signal_credit()]
        pool = entitled or recent
        return max(pool, key=lambda ch: self._bit_found_at[ch.relid])

    # ==== live sysfs attributes (event loop) ================================================
    def refresh_attrs(self) -> None:
        """Rewrite the attributes sysfs computes at each read (drivers/hv/vmbus_drv.c): state,
        channel_vp_mapping, the primary's ring debug info, the monitor fields, and per channel
        the masks, bytes available and the interrupt/event counts."""
        if not self.present or self.relid is None:
            return
        tree = self.vm.tree
        d = tree.device_dir(self.device_id)
        with self._lock:
            chans = dict(self.channels)
        primary = chans.get(self.relid)
        vals: dict[str, str] = {
            # enum vmbus_channel_state: CHANNEL_OPEN_STATE (2) offered/closed, OPENED (3) open
            "state": "3\n" if primary is not None else "2\n",
            "channel_vp_mapping": "".join(f"{r}:0\n" for r in [self.relid, *sorted(self.subchannels)]),
        }
        for side, ring in (("out", primary.tx if primary else None), ("in", primary.rx if primary else None)):
            info = ring_debug_info(ring)
            for k, v in info.items():
                vals[f"{side}_{k}"] = v
        if self.monitor_id is not None:
            page = ffi.cast("struct hv_monitor_page *", self.vm.monitor_page.ptr)
            g, o = divmod(self.monitor_id, 32)
            vals["client_monitor_pending"] = f"{int(page.trigger_group[g].pending)}\n"
            vals["client_monitor_latency"] = f"{int(page.latency[g][o])}\n"
            vals["client_monitor_conn_id"] = f"{int(page.parameter[g][o].connection_id)}\n"
        tree.set_attrs(d, vals)
        if primary is None:
            tree.set_attrs(d / "channels" / str(self.relid),
                           dict.fromkeys(("out_mask", "in_mask", "read_avail", "write_avail"), ""))
        for relid, ch in chans.items():
            c = d / "channels" / str(relid)
            tx, rx = ch.tx.control(), ch.rx.control()
            cvals = {
                "out_mask": f"{tx['interrupt_mask']}\n", "in_mask": f"{rx['interrupt_mask']}\n",
                "read_avail": f"{(rx['write_index'] - rx['read_index']) % ch.rx.data_size}\n",
                "write_avail": f"{ch.tx.data_size - (tx['write_index'] - tx['read_index']) % ch.tx.data_size}\n",
                "interrupts": f"{ch.stats['interrupts']}\n", "events": f"{ch.stats['guest_signals']}\n",
            }
            if ch.monitor_id is not None:
                pg = ffi.cast("struct hv_monitor_page *", self.vm.monitor_page.ptr)
                g, o = divmod(ch.monitor_id, 32)
                cvals["pending"] = f"{int(pg.trigger_group[g].pending)}\n"
                cvals["latency"] = f"{int(pg.latency[g][o])}\n"
            tree.set_attrs(c, cvals)

    # ==== faults and stats ==================================================================
    def poke_channels(self) -> None:
        with self._lock:
            chans = list(self.channels.values())
        for ch in chans:
            ch.poke()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            live = {r: c.snapshot() for r, c in self.channels.items()}
        chans: dict[str, Any] = {}
        for relid in sorted(set(self.history) | set(live)):
            s = dict(self.history.get(relid, {}))
            if relid in live:
                cur = live[relid]
                for k, v in cur.items():
                    if isinstance(v, int) and isinstance(s.get(k), int) and k not in (
                            "relid", "subchannel_id", "monitor_id"):
                        cur[k] = v + s[k]
                s = cur
                s["open"] = True
            chans[str(relid)] = s
        keys = ("guest_signals", "needed_signals", "needless_signals", "collateral_signals",
                "interrupts", "kernel_oops", "packets_from_guest", "packets_to_guest", "model_errors")
        totals: dict[str, int] = dict.fromkeys(keys, 0)
        for s in chans.values():
            for key in ("guest_signals", "needed_signals", "needless_signals", "collateral_signals",
                        "interrupts", "kernel_oops", "packets_from_guest", "packets_to_guest",
                        "model_errors"):
                totals[key] = totals.get(key, 0) + int(s.get(key, 0))
        return {
            "device_id": self.device_id, "class_id": self.class_id, "model": self.kind,
            "present": self.present, "relid": self.relid, "monitor_id": self.monitor_id,
            "driver": self.driver, "uio": None if self.uio_index is None else f"uio{self.uio_index}",
            "connections": len(self.connections), "opens": self.opens,
            "faults": self.faults.active(), "channels": chans, "totals": totals,
            **self.model.describe(),
        }

    def describe(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "model": self.kind, "class_id": self.class_id,
                "relid": self.relid, "monitor_id": self.monitor_id, "driver": self.driver}

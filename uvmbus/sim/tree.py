"""The sysfs/dev/proc files of the simulated VM under ``--root``.

Layout (paths relative to the root), identical to a real guest's (uio_vmbus.md §1.1, §1.3,
§1.8, §1.9; drivers/hv/vmbus_drv.c for the attributes)::

    sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/<guid>/   the device (Gen2 path)
        {class_id,device_id,id,state,monitor_id?,driver_override,modalias,vendor,numa_node,
        uevent,channel_vp_mapping,{server,client}_monitor_{pending,latency,conn_id}?,
        {out,in}_{intr_mask,read_index,write_index,read_bytes_avail,write_bytes_avail},
        subsystem -> sys/bus/vmbus, driver -> sys/bus/vmbus/drivers/<drv>, uio/uioN/,
        channels/<relid>/{subchannel_id,cpu,monitor_id?,pending?,latency?,out_mask,in_mask,
        read_avail,write_avail,interrupts,events,intr_in_full,intr_out_empty,out_full_first,
        out_full_total,ring?}, net/<ifname>/, host<H>/target<H>:0:0/<H>:0:0:<L>/block/<disk>/}
    sys/bus/vmbus/devices/<guid> -> ../../../devices/.../VMBUS:00/<guid>
    sys/bus/vmbus/drivers/<drv>/{new_id,bind,unbind,module -> sys/module/<drv>,<guid> -> the device}
    sys/bus/vmbus/{drivers_probe,drivers_autoprobe}
    sys/class/uio/uioN -> the device's uio/uioN
    sys/class/net/<ifname>, sys/class/block/<disk>   (links into the device)
    dev/uioN                       the endpoint socket (uvmbus.sim.endpoint)
    proc/sys/kernel/osrelease
    sim/                           private: control socket, ring backing files, guest RAM

Attribute files are replaced atomically (write a hidden temporary, rename), so a reader never
sees half a value and the binding watcher never mistakes the simulator's own writes for the
guest's (it only reacts to IN_CLOSE_WRITE on the real names).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CHANNEL_COUNTERS", "DRIVERS", "RING_ATTRS", "Tree", "VMBUS_PARENT"]

#: drivers whose directories exist (the guest writes their new_id/bind/unbind)
DRIVERS = ("uio_hv_generic", "hv_netvsc", "hv_storvsc", "hv_utils")
UIO_VERSION = "0.02.1"
#: device-level ring attributes, per direction (``out_…`` guest→host, ``in_…`` host→guest)
RING_ATTRS = ("intr_mask", "read_index", "write_index", "read_bytes_avail", "write_bytes_avail")
#: per-channel counters the kernel's own ring code keeps (userspace bypasses it: they stay 0)
#: plus ``interrupts``/``events`` (refreshed from the host's counts)
CHANNEL_COUNTERS = ("interrupts", "events", "intr_in_full", "intr_out_empty", "out_full_first",
                    "out_full_total")


#: where Hyper-V Gen2 guests have their VMBus devices (the ACPI VMBus device's children)
VMBUS_PARENT = "sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00"


class Tree:
    """Creates and removes the simulated files; knows nothing about behaviour."""

    def __init__(self, root: Path):
        self.root = root
        self.vmbus = root / "sys/bus/vmbus"
        self.devices = self.vmbus / "devices"
        self.parent = root / VMBUS_PARENT
        self.modules = root / "sys/module"
        self.drivers = self.vmbus / "drivers"
        self.uio_class = root / "sys/class/uio"
        self.net_class = root / "sys/class/net"
        self.block_class = root / "sys/class/block"
        self.dev = root / "dev"
        self.sim = root / "sim"
        self.rings = self.sim / "rings"

    # -- primitives --------------------------------------------------------------------
    @staticmethod
    def write(path: Path, text: str, mode: int = 0o644) -> None:
        """Replace ``path`` atomically with ``text``."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    @staticmethod
    def rel(target: Path, link_dir: Path) -> str:
        return os.path.relpath(target, link_dir)

    @staticmethod
    def link(target: str, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.symlink(target, path)

    @staticmethod
    def unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def rmtree(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # -- the VM ------------------------------------------------------------------------
    def create_base(self, release: str) -> None:
        for d in (self.devices, self.parent, self.modules, self.uio_class, self.net_class,
                  self.block_class, self.dev, self.rings, self.root / "proc/sys/kernel"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sim, 0o700)
        for drv in DRIVERS:
            self.add_driver(drv)
        self.write(self.vmbus / "drivers_probe", "", 0o200)
        self.write(self.vmbus / "drivers_autoprobe", "1\n", 0o644)
        self.write(self.root / "proc/sys/kernel/osrelease", release + "\n")

    def add_driver(self, name: str) -> None:
        d = self.drivers / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("new_id", "remove_id", "bind", "unbind"):
            if not (d / f).exists():
                self.write(d / f, "", 0o200)
        (self.modules / name).mkdir(parents=True, exist_ok=True)
        self.link(self.rel(self.modules / name, d), d / "module")

    def remove_all(self, owns_root: bool) -> None:
        """Remove everything the simulator created (the root too if it made it)."""
        if owns_root:
            self.rmtree(self.root)
            return
        for name in ("sys", "dev", "proc", "sim"):
            self.rmtree(self.root / name)

    # -- devices -----------------------------------------------------------------------
    def device_dir(self, guid: str) -> Path:
        """``sys/bus/vmbus/devices/<guid>`` (a symlink to :meth:`real_dir`, as on a kernel)."""
        return self.devices / guid

    def real_dir(self, guid: str) -> Path:
        return self.parent / guid

    def add_device(self, guid: str, class_id: str, relid: int, monitor_id: int | None) -> Path:
        """The device directory appears with its attributes at once (built in ``sim/``)."""
        d = self.sim / f"staging-{guid}"
        self.rmtree(d)
        (d / "channels").mkdir(parents=True)
        self.write(d / "class_id", f"{{{class_id}}}\n", 0o444)
        self.write(d / "device_id", f"{{{guid}}}\n", 0o444)
        self.write(d / "id", f"{relid}\n", 0o444)
        if monitor_id is not None:
            self.write(d / "monitor_id", f"{monitor_id}\n", 0o444)
        self.write(d / "driver_override", "(null)\n", 0o644)
        self.write(d / "modalias", f"vmbus:{uuid.UUID(class_id).bytes_le.hex()}\n", 0o444)
        self.write(d / "vendor", "0x1414\n", 0o444)
        self.write(d / "numa_node", "0\n", 0o444)
        self.write(d / "state", "2\n", 0o444)            # CHANNEL_OPEN_STATE: offered, not open
        self.write(d / "channel_vp_mapping", f"{relid}:0\n", 0o444)
        self.write(d / "uevent", f"MODALIAS=vmbus:{uuid.UUID(class_id).bytes_le.hex()}\n", 0o644)
        for side in ("server", "client"):
            if monitor_id is not None:
                for what in ("pending", "latency", "conn_id"):
                    self.write(d / f"{side}_monitor_{what}", "0\n", 0o444)
        for ring in ("out", "in"):
            for what in RING_ATTRS:
                self.write(d / f"{ring}_{what}", "", 0o444)  # no ring yet: the kernel's read fails
        real = self.real_dir(guid)
        self.link(self.rel(self.vmbus, real), d / "subsystem")
        os.rename(d, real)
        self.link(self.rel(real, self.devices), self.device_dir(guid))
        return self.device_dir(guid)

    def remove_device(self, guid: str) -> None:
        self.unlink(self.device_dir(guid))
        self.rmtree(self.real_dir(guid))

    # -- PCI functions behind pci-hyperv (a NIC's accelerated-networking VF) -----------------
    def add_vpci_function(self, vpci: str, bdf: str, *, slot: str, vendor: int, device: int,
                          cls: int, ifname: str | None = None, mac: str | None = None) -> None:
        """A PCI function as pci-hyperv lays it out: below the vPCI VMBus device's directory
        (``<vpci>/pci<domain>:00/<bdf>``), linked from ``sys/bus/pci/devices``, in the slot
        named ``slot`` (pci-hyperv names it after the device's serial), with a network
        interface when ``ifname`` is given.  Only sysfs: nothing drives it."""
        dom, bus = bdf.split(":")[:2]
        real = self.parent / vpci / f"pci{dom}:{bus}" / bdf
        real.mkdir(parents=True, exist_ok=True)
        for name, text in (("vendor", f"0x{vendor:04x}"), ("device", f"0x{device:04x}"),
                           ("class", f"0x{cls:06x}"), ("numa_node", "0"),
                           ("driver_override", "(null)")):
            self.write(real / name, text + "\n", 0o644 if name == "driver_override" else 0o444)
        pci = self.root / "sys/bus/pci"
        for d in ("devices", "drivers", "slots"):
            (pci / d).mkdir(parents=True, exist_ok=True)
        self.link(self.rel(real, pci / "devices"), pci / "devices" / bdf)
        (pci / "slots" / slot).mkdir(parents=True, exist_ok=True)
        self.write(pci / "slots" / slot / "address", bdf.rsplit(".", 1)[0] + "\n", 0o444)
        if ifname and mac:
            n = real / "net" / ifname
            n.mkdir(parents=True, exist_ok=True)
            self.write(n / "address", mac + "\n", 0o444)
            self.write(n / "operstate", "up\n", 0o444)
            self.link(self.rel(n, self.net_class), self.net_class / ifname)

    def remove_vpci_function(self, vpci: str, bdf: str, *, slot: str, ifname: str | None = None) -> None:
        pci = self.root / "sys/bus/pci"
        if ifname:
            self.unlink(self.net_class / ifname)
        self.unlink(pci / "devices" / bdf)
        self.rmtree(pci / "slots" / slot)
        self.rmtree(self.parent / vpci)

    def set_attrs(self, base: Path, values: dict[str, str]) -> None:
        """Refresh live attribute files (each replaced atomically) that exist under ``base``;
        a file that already holds ``text`` is left alone (an idle simulator writes nothing)."""
        for name, text in values.items():
            try:
                with open(base / name) as f:
                    if f.read() == text:
                        continue
            except FileNotFoundError:
                continue
            self.write(base / name, text, 0o444)

    def set_driver_override(self, guid: str, value: str | None) -> None:
        self.write(self.device_dir(guid) / "driver_override", f"{value or '(null)'}\n", 0o644)

    def add_channel(self, guid: str, relid: int, subchannel_id: int, monitor_id: int | None) -> None:
        """``channels/<relid>/`` appears with its attributes at once (built aside, renamed)."""
        base = self.device_dir(guid) / "channels"
        tmp = base / f".{relid}.tmp"
        self.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.write(tmp / "subchannel_id", f"{subchannel_id}\n", 0o444)
        self.write(tmp / "cpu", "0\n", 0o644)
        if monitor_id is not None:
            self.write(tmp / "monitor_id", f"{monitor_id}\n", 0o444)
            for what in ("pending", "latency"):
                self.write(tmp / what, "0\n", 0o444)
        for what in ("out_mask", "in_mask", "read_avail", "write_avail"):
            self.write(tmp / what, "", 0o444)          # no ring yet: the kernel's read fails
        for what in CHANNEL_COUNTERS:
            self.write(tmp / what, "0\n", 0o444)
        os.rename(tmp, base / str(relid))

    def remove_channel(self, guid: str, relid: int) -> None:
        self.rmtree(self.device_dir(guid) / "channels" / str(relid))

    def ring_backing(self, relid: int) -> Path:
        return self.rings / f"{relid}.ring"

    def closed_ring(self, relid: int) -> Path:
        """The stand-in ``ring`` of a bound but closed primary channel (see show_ring)."""
        return self.rings / f"{relid}.closed"

    def show_ring(self, guid: str, relid: int, *, is_open: bool = True, size: int = 0) -> None:
        """Make ``channels/<relid>/ring`` appear, atomically: a hard link to the ring's backing
        file, or (``is_open=False``, a bound primary channel that is not open) to a separate
        sparse file of the same ``size`` — uio_hv_generic creates the primary's ``ring`` at
        probe and its mmap fails with ENODEV until the channel is open; a mapping of the
        stand-in reaches no ring (``uvmbus sim exec`` turns its mmap into ENODEV)."""
        c = self.device_dir(guid) / "channels" / str(relid)
        tmp = c / ".ring.tmp"
        self.unlink(tmp)
        if is_open:
            os.link(self.ring_backing(relid), tmp)
        else:
            stand_in = self.closed_ring(relid)
            with open(stand_in, "ab") as f:
                f.truncate(size)
            os.chmod(stand_in, 0o600)
            os.link(stand_in, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, c / "ring")

    def hide_ring(self, guid: str, relid: int) -> None:
        self.unlink(self.device_dir(guid) / "channels" / str(relid) / "ring")
        self.unlink(self.closed_ring(relid))

    # -- binding -----------------------------------------------------------------------
    def set_driver(self, guid: str, old: str | None, new: str | None) -> None:
        d = self.real_dir(guid)
        modalias = f"MODALIAS={(d / 'modalias').read_text().strip()}\n"
        if old:
            self.unlink(self.drivers / old / guid)
            self.unlink(d / "driver")
            self.write(d / "uevent", modalias, 0o644)
        if new:
            self.link(self.rel(self.drivers / new, d), d / "driver")
            self.link(self.rel(d, self.drivers / new), self.drivers / new / guid)
            self.write(d / "uevent", f"DRIVER={new}\n" + modalias, 0o644)

    def add_uio(self, guid: str, index: int, maps: Iterable[tuple[str, int, int]]) -> None:
        """``maps`` = (name, size, fake address) per map index."""
        u = self.device_dir(guid) / "uio" / f"uio{index}"
        (u / "maps").mkdir(parents=True)
        self.write(u / "name", "uio_hv_generic\n", 0o444)
        self.write(u / "version", UIO_VERSION + "\n", 0o444)
        self.write(u / "event", "0\n", 0o444)
        for k, (name, size, addr) in enumerate(maps):
            m = u / "maps" / f"map{k}"
            m.mkdir()
            self.write(m / "name", name + "\n", 0o444)
            self.write(m / "addr", f"0x{addr:016x}\n", 0o444)
            self.write(m / "size", f"0x{size:016x}\n", 0o444)
            self.write(m / "offset", "0x0\n", 0o444)
        self.link(self.rel(self.real_dir(guid) / "uio" / f"uio{index}", self.uio_class),
                  self.uio_class / f"uio{index}")

    def remove_uio(self, guid: str, index: int) -> None:
        self.unlink(self.uio_class / f"uio{index}")
        self.unlink(self.dev / f"uio{index}")
        self.rmtree(self.device_dir(guid) / "uio")

    def uio_dev(self, index: int) -> Path:
        return self.dev / f"uio{index}"

    # -- OS-side children (what a kernel driver creates) ----------------------------------
    def add_net(self, guid: str, ifname: str, mac: str) -> None:
        n = self.device_dir(guid) / "net" / ifname
        n.mkdir(parents=True)
        self.write(n / "address", mac + "\n", 0o444)
        self.write(n / "mtu", "1500\n", 0o644)
        self.write(n / "operstate", "up\n", 0o444)
        self.link("../..", n / "device")
        self.link(self.rel(self.real_dir(guid) / "net" / ifname, self.net_class), self.net_class / ifname)

    def remove_net(self, guid: str) -> None:
        d = self.device_dir(guid) / "net"
        if d.is_dir():
            for n in d.iterdir():
                self.unlink(self.net_class / n.name)
        self.rmtree(d)

    def add_disks(self, guid: str, host: int, disks: Iterable[tuple[int, str, int]]) -> None:
        """``disks`` = (lun, name, size in bytes)."""
        h = self.real_dir(guid) / f"host{host}"
        for lun, name, size in disks:
            b = h / f"target{host}:0:0" / f"{host}:0:0:{lun}" / "block" / name
            (b / "queue").mkdir(parents=True)
            self.write(b / "dev", f"8:{16 * lun}\n", 0o444)
            self.write(b / "size", f"{size // 512}\n", 0o444)
            self.write(b / "queue/logical_block_size", "512\n", 0o444)
            rel = os.path.relpath(b, self.block_class)
            self.link(rel, self.block_class / name)

    def remove_disks(self, guid: str) -> None:
        d = self.device_dir(guid)
        for h in d.glob("host*"):
            for b in h.glob("target*/*/block/*"):
                self.unlink(self.block_class / b.name)
            self.rmtree(h)

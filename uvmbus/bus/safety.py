"""Refuse to take a device the running OS depends on.

Unbinding the storvsc controller that holds the root disk, or the NIC that carries the
management address, takes the VM down (storvsc_ic.md §6.1: "don't unbind the controller
holding the root disk").  :func:`check_safe_to_take` raises :class:`UnsafeDeviceError` when:

- a disk below the device (``…/block/<sdX>``), one of its partitions (``block/<sdX>/<sdXN>``)
  or a holder stacked on them (``holders/<dm-N|mdN>``, recursively) is mounted
  (``psutil.disk_partitions(all=True)``, matched by name *and* by device number so that
  ``/dev/root`` and ``/dev/mapper/*`` are caught) or used as swap (``/proc/swaps``);
- a network interface below the device (``net/<ifname>``) has any IPv4/IPv6 address or is the
  output interface of a default route (pyroute2, all routing tables).

If the checks themselves fail (no netlink, unreadable ``/proc``) the device is treated as
unsafe: fail closed.  Device and interface names come from the tree under ``bus.root``; the
checks always ask the *real* kernel (a simulated NIC such as ``simeth0`` simply has no
addresses).  The queries go through a :class:`SystemView` so tests can inject a mounted disk
or an addressed NIC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from uvmbus.bus.devices import Bus
from uvmbus.bus.sysfs import read_text
from uvmbus.errors import UnsafeDeviceError

__all__ = ["BlockUser", "LiveSystem", "SystemView", "check_safe_to_take"]

_HOLDER_DEPTH = 4


@dataclass(frozen=True)
class BlockUser:
    """A mounted filesystem or an active swap area."""

    device: str
    """As the OS reports it: ``/dev/sda1``, ``/dev/root``, ``/dev/mapper/vg-root``, …"""
    where: str
    """Mount point, or ``"swap"``."""
    devnum: int | None = None
    """Device number backing it (``st_dev`` of the mount point / ``st_rdev`` of a swap device)."""


class TakeableDevice(Protocol):
    """What the check reads from a device: a VMBus device or a PCI function."""

    path: Path

    @property
    def device_id(self) -> str: ...

    @property
    def class_name(self) -> str: ...

    def block_device_paths(self) -> list[Path]: ...

    def net_interfaces(self) -> list[str]: ...


class SystemView(Protocol):
    """The live-system queries the safety check needs (injectable for tests)."""

    def block_users(self) -> list[BlockUser]: ...

    def interface_addresses(self, ifname: str) -> list[str]: ...

    def default_route_interfaces(self) -> set[str]: ...


class LiveSystem:
    """:class:`SystemView` backed by psutil, ``/proc/swaps`` and pyroute2."""

    def block_users(self) -> list[BlockUser]:
        import psutil

        users = []
        for p in psutil.disk_partitions(all=True):
            if not p.device.startswith("/dev/"):
                continue  # tmpfs, proc, network filesystems: no local disk behind them
            try:
                devnum: int | None = os.stat(p.mountpoint).st_dev
            except OSError:
                devnum = None
            users.append(BlockUser(p.device, p.mountpoint, devnum))
        return users + _read_swaps(Path("/proc/swaps"))

    def interface_addresses(self, ifname: str) -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            out: list[str] = []
            for index in ipr.link_lookup(ifname=ifname):
                out.extend(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index))
            return out

    def default_route_interfaces(self) -> set[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            oifs: set[int] = set()
            for route in ipr.get_default_routes(table=None):
                if (oif := route.get_attr("RTA_OIF")) is not None:
                    oifs.add(oif)
                for hop in route.get_attr("RTA_MULTIPATH") or ():
                    if hop.get("oif"):
                        oifs.add(hop["oif"])
            return {names[i] for i in oifs if i in names}


def _read_swaps(path: Path) -> list[BlockUser]:
    """Active swap areas from ``/proc/swaps`` (names are octal-escaped like mount points)."""
    text = read_text(path) or ""
    users = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2:
            continue
        name = fields[0].encode().decode("unicode_escape")
        try:
            st = os.stat(name)
            devnum: int | None = st.st_rdev if fields[1] == "partition" else st.st_dev
        except OSError:
            devnum = None
        users.append(BlockUser(name, "swap", devnum))
    return users


def _devnum(block_dir: Path) -> int | None:
    text = read_text(block_dir / "dev")
    try:
        major, minor = (text or "").split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def _disk_identities(disk: Path) -> tuple[set[str], set[int]]:
    """Names (as under /dev) and device numbers of a disk, its partitions and holders."""
    names: set[str] = set()
    nums: set[int] = set()
    seen: set[str] = set()

    def visit(d: Path, depth: int) -> None:
        real = os.path.realpath(d)
        if real in seen or depth > _HOLDER_DEPTH:
            return
        seen.add(real)
        names.add(d.name)
        if (dm_name := read_text(d / "dm" / "name")) is not None:
            names.add(f"mapper/{dm_name}")
        if (num := _devnum(d)) is not None:
            nums.add(num)
        for sub in _subdirs(d):
            if (sub / "partition").exists() or (
                sub.name.startswith(d.name) and sub.name[len(d.name):].lstrip("p").isdigit()
            ):
                visit(sub, depth)
        for holder in _subdirs(d / "holders"):
            visit(holder, depth + 1)

    visit(disk, 0)
    return names, nums


def _subdirs(d: Path) -> list[Path]:
    try:
        return [d / e.name for e in os.scandir(d) if e.is_dir()]
    except OSError:
        return []


def _user_names(user: BlockUser) -> set[str]:
    if not user.device.startswith("/dev/"):
        return set()
    names = {user.device[5:]}
    real = os.path.realpath(user.device)
    if real.startswith("/dev/"):
        names.add(real[5:])
    return names


def check_safe_to_take(bus: Bus | Any, device: TakeableDevice | str, *,
                       system: SystemView | None = None) -> None:
    """Raise :class:`UnsafeDeviceError` if the OS uses ``device`` (a device or a reference
    for :meth:`Bus.device`); see the module docstring for what counts as "in use"."""
    if isinstance(device, str):
        device = bus.device(device)
    system = system or LiveSystem()
    reasons: list[str] = []

    disks = device.block_device_paths()
    if disks:
        try:
            users = system.block_users()
        except Exception as exc:  # fail closed: we could not prove the disk is unused
            reasons.append(f"could not list mounted filesystems and swap ({exc})")
            users = []
        for disk in disks:
            names, nums = _disk_identities(disk)
            for u in users:
                if _user_names(u) & names or (u.devnum is not None and u.devnum in nums):
                    what = "used as swap" if u.where == "swap" else f"mounted on {u.where}"
                    reasons.append(f"disk {disk.name}: {u.device} is {what}")

    ifnames = device.net_interfaces()
    if ifnames:
        try:
            default_ifs = system.default_route_interfaces()
        except Exception as exc:
            reasons.append(f"could not read the routing table ({exc})")
            default_ifs = set()
        for ifname in ifnames:
            try:
                addrs = system.interface_addresses(ifname)
            except Exception as exc:
                reasons.append(f"could not read the addresses of {ifname} ({exc})")
                continue
            if addrs:
                reasons.append(f"interface {ifname} has addresses {', '.join(addrs)}")
            if ifname in default_ifs:
                reasons.append(f"interface {ifname} carries a default route")

    if reasons:
        raise UnsafeDeviceError(
            f"refusing to take {device.device_id} ({device.class_name}) from the kernel: "
            + "; ".join(reasons)
            + ". It may be the OS disk or the management NIC, and taking it can make the VM "
            "unbootable or unreachable. Unmount / deconfigure it first (e.g. `ip addr flush "
            "dev IF && ip link set dev IF down`), or pass --force (force=True) to override.",
            path=str(device.path),
        )

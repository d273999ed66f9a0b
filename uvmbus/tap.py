"""A TAP interface: ``/dev/net/tun`` (``TUNSETIFF``, ``IFF_TAP | IFF_NO_PI``) plus link
set-up with pyroute2. Used by the net bridge daemon (guest side) and by the simulator's TAP
backend (host side).

The interface takes the synthetic NIC's MAC address (Hyper-V only delivers frames addressed
to it and drops frames sent from any other source address) and its MTU.  With ``netns`` it
is moved into that network namespace (created if missing, removed at close if we created
it) and brought up there; address, MTU and MAC survive the move, the up state does not.
Moving needs CAP_NET_ADMIN; configuring inside another namespace needs ``setns`` (pyroute2's
``NetNS``), i.e. CAP_SYS_ADMIN — under systemd use ``NetworkNamespacePath=`` instead.

The TAP is not persistent: it disappears when the file descriptor is closed.

With ``offload`` (large send offload through the bridge, docs/services.md): the TAP is
opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` (TUN_F_CSUM, plus TUN_F_TSO4 / TUN_F_TSO6
as asked), so the kernel hands over TCP frames up to ``gso_max_size`` bytes with a
``struct virtio_net_hdr`` in front (GSO type, gso_size = MSS, partial checksum); every frame
read or written then starts with that 10-byte header (Documentation/networking/tuntap.rst,
include/uapi/linux/virtio_net.h).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from uvmbus.errors import ConfigError, NetError, PrivilegeError

__all__ = ["TapInterface"]

TUNSETIFF = 0x400454CA
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
#: sizeof(struct virtio_net_hdr): flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset u16
VNET_HDR_LEN = 10
IFNAMSIZ = 16


class TapInterface:
    """One non-persistent TAP interface, optionally inside a network namespace."""

    def __init__(self, name: str, *, netns: str | None = None, mac: str | None = None, mtu: int = 1500,
                 addresses: Sequence[str] = (), up: bool = True, offload: bool = False,
                 tso4: bool = False, tso6: bool = False, gso_max_size: int = 0):
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
            raise ConfigError(f"TAP name {name!r}: 1..15 characters, no '/' or spaces")
        self.name = name
        self.netns = netns or None
        self.mac = mac
        self.mtu = mtu
        self.created_netns = False
        self.fd = -1
        #: frames read/written carry a virtio_net_hdr (IFF_VNET_HDR)
        self.vnet_hdr = offload
        self._tso = (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
        self.gso_max_size = gso_max_size
        for a in addresses:
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise ConfigError(f"--address {a!r}: not ADDRESS/PREFIX") from None
        try:
            self._create(addresses, up)
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute, NetNS

        ipr = NetNS(self.netns) if self.netns else IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def _create(self, addresses: Sequence[str], up: bool) -> None:
        from pyroute2 import IPRoute, netns

        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PrivilegeError("cannot open /dev/net/tun: needs CAP_NET_ADMIN (and "
                                 "DeviceAllow=/dev/net/tun rw under systemd)") from exc
        except FileNotFoundError as exc:
            raise ConfigError("/dev/net/tun does not exist: `modprobe tun`") from exc
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if self.vnet_hdr else 0)
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", self.name.encode(), flags))
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise PrivilegeError(f"TUNSETIFF {self.name}: needs CAP_NET_ADMIN") from exc
            if exc.errno == errno.EBUSY:
                raise ConfigError(f"interface {self.name} already exists and is in use") from exc
            if exc.errno == errno.EINVAL:
                raise ConfigError(f"interface {self.name} already exists and is not a TAP: pick "
                                  "another --tap name") from exc
            raise NetError(f"TUNSETIFF {self.name}: {exc}") from exc
        if self.vnet_hdr:
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | self._tso)
            except OSError as exc:
                raise NetError(f"TUNSETOFFLOAD {self.name}: {exc} (offloads through the TAP need "
                               "Linux >= 2.6.27; open it without offload)") from exc
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise NetError(f"TAP {self.name} did not appear")
            if self._tso and self.gso_max_size:
                # no GSO frame larger than the NIC's large-send limit (Linux netvsc does the
                # same with netif_set_tso_max_size); settable since Linux 5.19 (BIG TCP)
                try:
                    ipr.link("set", index=idx[0], gso_max_size=self.gso_max_size)
                except Exception as exc:      # pyroute2 raises NetlinkError, or the kernel ignores it
                    raise NetError(f"{self.name}: cannot set gso_max_size {self.gso_max_size} ({exc}): "
                                   "run the bridge with --no-lso") from exc
            kw: dict[str, Any] = {"mtu": self.mtu}
            if self.mac:
                kw["address"] = self.mac
            ipr.link("set", index=idx[0], **kw)
            if self.netns:
                if self.netns not in netns.listnetns():
                    netns.create(self.netns)
                    self.created_netns = True
                ipr.link("set", index=idx[0], net_ns_fd=self.netns)
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise NetError(f"TAP {self.name} not found after set-up")
            for a in addresses:
                iface = ipaddress.ip_interface(a)
                ipr.addr("add", index=idx[0], address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if up:
                ipr.link("set", index=idx[0], state="up")
            if self.netns:
                lo = ipr.link_lookup(ifname="lo")
                if lo:
                    ipr.link("set", index=lo[0], state="up")

    def fileno(self) -> int:
        return self.fd

    def set_carrier(self, up: bool) -> bool:
        """Carrier on/off (``TUNSETCARRIER``, Linux ≥ 4.19); False if unsupported."""
        try:
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1 if up else 0))
        except OSError:
            return False
        return True

    def _set_link(self, what: str, **kw: Any) -> None:
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise NetError(f"TAP {self.name} is gone (deleted by someone else?): cannot set its {what}")
            try:
                ipr.link("set", index=idx[0], **kw)
            except Exception as exc:          # pyroute2's NetlinkError
                raise NetError(f"{self.name}: cannot set {what} ({exc})") from exc

    def set_mtu(self, mtu: int) -> None:
        """Change the interface's MTU in place (same ifindex, addresses and routes kept)."""
        self._set_link(f"MTU {mtu}", mtu=mtu)
        self.mtu = mtu

    def set_mac(self, mac: str) -> None:
        """Change the interface's MAC address in place (a TAP allows it while up)."""
        self._set_link(f"MAC {mac}", address=mac)
        self.mac = mac

    def set_tso(self, tso4: bool, tso6: bool) -> None:
        """Change which GSO frames the kernel may hand us (``TUNSETOFFLOAD`` again; the
        virtio-net header stays): a NIC that lost its large sends gets MTU-sized frames."""
        if not self.vnet_hdr:
            return
        tso = (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | tso)
        except OSError as exc:
            raise NetError(f"TUNSETOFFLOAD {self.name}: {exc}") from exc
        self._tso = tso

    def info(self) -> dict[str, Any]:
        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                return {}
            link = ipr.get_links(idx[0])[0]
            return {"name": self.name, "netns": self.netns, "ifindex": idx[0],
                    "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                    "state": link.get_attr("IFLA_OPERSTATE"), "vnet_hdr": self.vnet_hdr,
                    "gso_max_size": link.get_attr("IFLA_GSO_MAX_SIZE")}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)               # a non-persistent TAP disappears with its fd
            self.fd = -1
        if self.created_netns and self.netns:
            from pyroute2 import netns

            try:
                netns.remove(self.netns)
            except OSError:
                pass
            self.created_netns = False

    def __enter__(self) -> TapInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

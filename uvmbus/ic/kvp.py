"""Key-value pair (data exchange) IC (type 2): pools 0–4, GET/SET/DELETE/ENUMERATE and the
host's IP-address query (§7.7).

Pool files are those of Linux's ``hv_kvp_daemon``: ``<dir>/.kvp_pool_<N>`` (default dir
``/var/lib/hyperv``), a sequence of fixed records ``char key[512]; char value[2048]`` (UTF-8,
NUL padded), read under an ``F_RDLCK`` and rewritten in place under an ``F_WRLCK`` on the file
itself, so tools written for hv_kvp_daemon's files keep working.

Wire rules (Linux hv_kvp.c + hv_kvp_daemon.c): keys and values come as UTF-16LE with sizes in
bytes *including* the NUL; REG_U32 / REG_U64 values are stored as decimal strings; answers are
REG_SZ.  ENUMERATE of the AUTO pool (2) returns the fixed guest facts (index 0..9: FQDN,
integration services version, IPv4/IPv6 addresses, OS build, name, major/minor version, OS
version, architecture); other pools enumerate their records; past the end the status is
S_CONT (no more items).  Every size from the host is checked: a key over 512 bytes, a value
over 2048, an odd size or a string without its NUL is refused with E_FAIL.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, ProtocolError
from uvmbus.ic import wire
from uvmbus.ic.framework import IcService
from uvmbus.ic.wire import KvpOp, MsgType, Status
from uvmbus.native import lib

__all__ = ["KvpPools", "KvpService", "IpInfo", "decode_utf16", "encode_utf16", "guest_facts"]

log = logging.getLogger("uvmbus.ic")

KEY_SIZE: int = lib.IC_KVP_MAX_KEY_SIZE          # 512
VALUE_SIZE: int = lib.IC_KVP_MAX_VALUE_SIZE      # 2048
RECORD_SIZE = KEY_SIZE + VALUE_SIZE
POOL_COUNT: int = lib.IC_KVP_POOL_COUNT          # 5
REG_SZ, REG_U32, REG_U64, REG_QWORD = lib.IC_REG_SZ, lib.IC_REG_U32, lib.IC_REG_U64, lib.IC_REG_QWORD
DEFAULT_DIR = "/var/lib/hyperv"
#: the version hv_kvp_daemon reports as IntegrationServicesVersion
IS_VERSION = "3.1"

#: seconds the AUTO pool's facts are reused (one host enumeration)
FACTS_TTL = 2.0
_VALUE_OFF = 4                                   # body offset of the value (after hv_kvp_hdr)
_ENUM_VALUE_OFF = 8                              # after hdr + u32 index


def decode_utf16(raw: bytes, size: int, limit: int, what: str) -> str:
    """A UTF-16LE string of ``size`` bytes (NUL included) out of a ``limit``-byte field."""
    if size < 2 or size > limit or size % 2:
        raise ProtocolError(f"{what}: size {size} bytes (must be even, 2..{limit})")
    units = raw[:size]
    end = next((i for i in range(0, size, 2) if units[i:i + 2] == b"\0\0"), None)
    if end is None:
        raise ProtocolError(f"{what}: no NUL terminator within {size} bytes")
    try:
        return units[:end].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: invalid UTF-16 ({exc.reason})") from None


def encode_utf16(text: str, limit: int, what: str) -> bytes:
    """``text`` as UTF-16LE plus NUL; raises when it does not fit ``limit`` bytes."""
    data = text.encode("utf-16-le", "surrogatepass") + b"\0\0"
    if len(data) > limit:
        raise ProtocolError(f"{what}: {len(data)} bytes as UTF-16 exceeds {limit}")
    return data


# ---- pool files ------------------------------------------------------------------------------------

class KvpPools:
    """hv_kvp_daemon-compatible pool files under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_DIR, *, max_records: int = 1024):
        self.dir = Path(directory)
        self.max_records = max_records

    def path(self, pool: int) -> Path:
        if not 0 <= pool < POOL_COUNT:
            raise ConfigError(f"KVP pool {pool}: pools are 0..{POOL_COUNT - 1}")
        return self.dir / f".kvp_pool_{pool}"

    def _open(self, pool: int) -> int:
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(self.path(pool), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _parse(data: bytes) -> list[tuple[str, str]]:
        out = []
        for off in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
            k = data[off:off + KEY_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
            v = data[off + KEY_SIZE:off + RECORD_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append((k, v))
        return out

    @staticmethod
    def _record(key: str, value: str) -> bytes:
        k, v = key.encode(), value.encode()
        if len(k) >= KEY_SIZE or len(v) >= VALUE_SIZE:
            raise ProtocolError(f"KVP record too large: key {len(k)} / value {len(v)} bytes as UTF-8 "
                                f"(max {KEY_SIZE - 1} / {VALUE_SIZE - 1})")
        return k.ljust(KEY_SIZE, b"\0") + v.ljust(VALUE_SIZE, b"\0")

    def records(self, pool: int) -> list[tuple[str, str]]:
        try:
            fd = os.open(self.path(pool), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            with os.fdopen(os.dup(fd), "rb") as f:
                return self._parse(f.read())
        finally:
            os.close(fd)

    def _update(self, pool: int, change: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]) -> None:
        fd = self._open(pool)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "r+b") as f:
                recs = change(self._parse(f.read()))
                data = b"".join(self._record(k, v) for k, v in recs)
                f.seek(0)
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)

    def get(self, pool: int, key: str) -> str | None:
        for k, v in self.records(pool):
            if k == key:
                return v
        return None

    def set(self, pool: int, key: str, value: str) -> None:
        self._record(key, value)                       # size check before touching the file

        def change(recs: list[tuple[str, str]]) -> list[tuple[str, str]]:
            for i, (k, _) in enumerate(recs):
                if k == key:
                    recs[i] = (key, value)
                    return recs
            if len(recs) >= self.max_records:
                raise ProtocolError(f"KVP pool {pool} is full ({self.max_records} records)")
            return [*recs, (key, value)]
        self._update(pool, change)

    def delete(self, pool: int, key: str) -> bool:
        found = []

        def change(recs: list[tuple[str, str]]) -> list[tuple[str, str]]:
            keep = [(k, v) for k, v in recs if k != key]
            found.append(len(keep) != len(recs))
            return keep
        self._update(pool, change)
        return found[0]


# ---- guest facts (the AUTO pool) and IP information -------------------------------------------------

def _os_release(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in (root / "etc/os-release", root / "usr/lib/os-release"):
        try:
            for line in p.read_text().splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    out[k.strip()] = v.strip().strip('"')
            return out
        except OSError:
            continue
    return out


@dataclass
class IpInfo:
    """What the host's GET_IP_INFO asks about one adapter (by MAC address)."""

    addresses: list[str]
    subnets: list[str]
    gateways: list[str]
    dns: list[str]
    dhcp: bool


def _netmask(prefix: int, v6: bool) -> str:
    if v6:
        return str(prefix)
    bits = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return socket.inet_ntoa(struct.pack(">I", bits))


def pyroute2_ip_info(mac: str | None, root: str | os.PathLike[str] = "/") -> IpInfo | None:
    """The addresses of the interface with MAC ``mac`` (any interface when None), via
    pyroute2; None when no interface has that MAC."""
    from pyroute2 import IPRoute

    want = None if mac is None else mac.replace("-", ":").lower()
    with IPRoute() as ipr:
        index = None
        for link in ipr.get_links():
            addr = (link.get_attr("IFLA_ADDRESS") or "").lower()
            if want is None or addr == want:
                index = link["index"]
                if want is not None:
                    break
        if index is None:
            return None
        kw: dict[str, Any] = {} if want is None else {"index": index}
        addrs, subnets = [], []
        dhcp = False
        for a in ipr.get_addr(**kw):
            ip = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
            if not ip:
                continue
            v6 = a["family"] == socket.AF_INET6
            addrs.append(ip)
            subnets.append(_netmask(int(a["prefixlen"]), v6))
            ci = a.get_attr("IFA_CACHEINFO")
            if ci is not None and not v6 and ci.get("ifa_valid", 0xFFFFFFFF) != 0xFFFFFFFF:
                dhcp = True           # a finite lifetime: a leased (DHCP) address
        gws = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, **({"oif": index} if want is not None else {})):
                gw = r.get_attr("RTA_GATEWAY")
                if gw and r["dst_len"] == 0:
                    gws.append(gw)
    dns = []
    try:
        for line in (Path(root) / "etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                dns.append(parts[1])
    except OSError:
        pass
    return IpInfo(addrs, subnets, gws, dns, dhcp)


def guest_facts(root: str | os.PathLike[str] = "/",
                ip_info: Callable[[str | None], IpInfo | None] | None = None) -> list[tuple[str, str]]:
    """The AUTO pool's ten fixed items, in hv_kvp_daemon's index order."""
    osr = _os_release(Path(root))
    u = platform.uname()
    ver = osr.get("VERSION_ID", "")
    major, _, minor = ver.partition(".")
    v4 = v6 = ""
    if ip_info is not None:
        try:
            info = ip_info(None)
        except Exception as exc:          # facts must not fail because netlink did
            log.warning("kvp: guest addresses unavailable: %s", exc)
            info = None
        if info is not None:
            v4 = ";".join(a for a in info.addresses if ":" not in a)
            v6 = ";".join(a for a in info.addresses if ":" in a)
    return [
        # the host name as configured: no DNS lookup (it could stall the worker for seconds,
        # and uvmbus-ic.service allows only localhost IP traffic)
        ("FullyQualifiedDomainName", socket.gethostname()),
        ("IntegrationServicesVersion", IS_VERSION),
        ("NetworkAddressIPv4", v4),
        ("NetworkAddressIPv6", v6),
        ("OSBuildNumber", u.release),
        ("OSName", osr.get("NAME", u.system)),
        ("OSMajorVersion", major),
        ("OSMinorVersion", minor),
        ("OSVersion", u.version),
        ("ProcessorArchitecture", u.machine),
    ]


# ---- the service ------------------------------------------------------------------------------------

def _put_value(body: memoryview, off: int, key: str, value: str) -> None:
    """Fill an ``ic_kvp_value`` at ``body[off:]`` with REG_SZ key/value."""
    k = encode_utf16(key, KEY_SIZE, "key")
    v = encode_utf16(value, VALUE_SIZE, "value")
    struct.pack_into("<III", body, off, REG_SZ, len(k), len(v))
    body[off + 12:off + 12 + KEY_SIZE] = k.ljust(KEY_SIZE, b"\0")
    body[off + 12 + KEY_SIZE:off + 12 + KEY_SIZE + VALUE_SIZE] = v.ljust(VALUE_SIZE, b"\0")


def _value_text(vtype: int, raw: bytes, size: int) -> str:
    if vtype in (REG_SZ, lib.IC_REG_EXPAND_SZ):
        return decode_utf16(raw, size, VALUE_SIZE, "value")
    if vtype == REG_U32:
        if size < 4:
            raise ProtocolError(f"REG_U32 value of {size} bytes")
        return str(struct.unpack_from("<I", raw)[0])
    if vtype in (REG_U64, REG_QWORD):
        if size < 8:
            raise ProtocolError(f"REG_U64 value of {size} bytes")
        return str(struct.unpack_from("<Q", raw)[0])
    raise ProtocolError(f"value type {vtype} not supported")


class KvpService(IcService):
    name = "kvp"
    msgtype = MsgType.KVPEXCHANGE
    message_versions = ((4, 0), (3, 0), (1, 0))       # Linux: WIN8, WIN7, WS2008
    min_body = 2                                      # operation + pool; each op checks its size

    def __init__(self, pools: KvpPools | None = None, *, root: str | os.PathLike[str] = "/",
                 ip_info: Callable[[str | None], IpInfo | None] | None = None) -> None:
        super().__init__()
        self.pools = pools or KvpPools()
        self.root = root
        if ip_info is None:
            import pyroute2  # noqa: F401  (import once at start, not inside the first request)
            ip_info = lambda mac: pyroute2_ip_info(mac, root)  # noqa: E731
        self.ip_info = ip_info
        self._facts: tuple[float, list[tuple[str, str]]] | None = None

    def facts(self) -> list[tuple[str, str]]:
        """The AUTO pool, computed once per enumeration (the host walks indexes 0..10 in a
        row; netlink is asked once, not eleven times)."""
        now = time.monotonic()
        if self._facts is None or now - self._facts[0] > FACTS_TTL:
            self._facts = (now, guest_facts(self.root, self.ip_info))
        return self._facts[1]

    def on_message(self, body: memoryview) -> tuple[int, Callable[[], None] | None]:
        op, pool = body[0], body[1]
        try:
            status = self._dispatch(op, pool, body)
        except ProtocolError as exc:
            self._problem("refused", f"op {op} pool {pool}: {exc}")
            status = int(Status.E_FAIL)
        except OSError as exc:
            self._problem("errors", f"op {op} pool {pool}: pool file: {exc}")
            status = int(Status.E_FAIL)
        return status, None

    def _need(self, body: memoryview, size: int, what: str) -> None:
        if len(body) < size:
            raise ProtocolError(f"{what}: body of {len(body)} bytes, needs {size}")

    def _dispatch(self, op: int, pool: int, body: memoryview) -> int:
        if op == KvpOp.GET_IP_INFO:
            return self._ip_info(body)
        if op == KvpOp.SET_IP_INFO:
            self._problem("refused", "SET_IP_INFO (IP injection into the guest) is not supported")
            return int(Status.NOT_SUPPORTED)
        if pool >= POOL_COUNT:
            raise ProtocolError(f"pool {pool} out of range")
        if op in (KvpOp.GET, KvpOp.SET):
            self._need(body, wire.sizeof("ic_kvp_msg_value"), "GET/SET")
            vtype, ksize, vsize = struct.unpack_from("<III", body, _VALUE_OFF)
            key = decode_utf16(bytes(body[_VALUE_OFF + 12:_VALUE_OFF + 12 + KEY_SIZE]), ksize, KEY_SIZE, "key")
            if op == KvpOp.SET:
                if vsize > VALUE_SIZE:
                    raise ProtocolError(f"value size {vsize} exceeds {VALUE_SIZE}")
                raw = bytes(body[_VALUE_OFF + 12 + KEY_SIZE:_VALUE_OFF + 12 + KEY_SIZE + VALUE_SIZE])
                self.pools.set(pool, key, _value_text(vtype, raw, vsize))
                self.counters["set"] += 1
                return int(Status.S_OK)
            value = self.pools.get(pool, key)
            self.counters["get"] += 1
            if value is None:
                return int(Status.E_FAIL)
            _put_value(body, _VALUE_OFF, key, value)
            return int(Status.S_OK)
        if op == KvpOp.DELETE:
            self._need(body, wire.sizeof("ic_kvp_msg_delete"), "DELETE")
            ksize = struct.unpack_from("<I", body, 4)[0]
            key = decode_utf16(bytes(body[8:8 + KEY_SIZE]), ksize, KEY_SIZE, "key")
            self.counters["delete"] += 1
            return int(Status.S_OK) if self.pools.delete(pool, key) else int(Status.E_FAIL)
        if op == KvpOp.ENUMERATE:
            self._need(body, wire.sizeof("ic_kvp_msg_enumerate"), "ENUMERATE")
            index = struct.unpack_from("<I", body, 4)[0]
            items = self.facts() if pool == wire.KvpPool.AUTO else self.pools.records(pool)
            self.counters["enumerate"] += 1
            if index >= len(items):
                return int(Status.S_CONT)
            key, value = items[index]
            _put_value(body, _ENUM_VALUE_OFF, key, value)
            return int(Status.S_OK)
        raise ProtocolError(f"operation {op} unknown")

    def _ip_info(self, body: memoryview) -> int:
        self._need(body, wire.sizeof("ic_kvp_ip_msg"), "GET_IP_INFO")
        m = wire.load("ic_kvp_ip_msg", body)
        raw_id = bytes(wire.dump(m)[2:2 + 256])
        mac = decode_utf16(raw_id, 256, 256, "adapter id")
        info = self.ip_info(mac)
        self.counters["ip_info"] += 1
        family = int(m.kvp_ip_val.addr_family)
        if info is not None and family in (lib.IC_ADDR_FAMILY_IPV4, lib.IC_ADDR_FAMILY_IPV6):
            v6 = family == lib.IC_ADDR_FAMILY_IPV6           # the host asked for one family only
            keep = [(":" in a) == v6 for a in info.addresses]
            info = IpInfo([a for a, k in zip(info.addresses, keep, strict=True) if k],
                          [s for s, k in zip(info.subnets, keep, strict=True) if k],
                          [g for g in info.gateways if (":" in g) == v6], info.dns, info.dhcp)
        if info is None:
            self._problem("refused", f"GET_IP_INFO: no interface with MAC {mac!r}")
            return int(Status.E_FAIL)
        fields = (("ip_addr", ";".join(info.addresses), 2048), ("sub_net", ";".join(info.subnets), 2048),
                  ("gate_way", ";".join(info.gateways), 1024), ("dns_addr", ";".join(info.dns), 2048))
        for name, text, limit in fields:
            data = text.encode("utf-16-le")
            data = data[:limit - 2]                  # truncate long lists, keep the NUL
            off = 2 + wire.offsetof("ic_kvp_ipaddr_value", name)
            body[off:off + limit] = (data + b"\0\0").ljust(limit, b"\0")
        body[2 + wire.offsetof("ic_kvp_ipaddr_value", "dhcp_enabled")] = 1 if info.dhcp else 0
        return int(Status.S_OK)

"""The few pcapng blocks uvmbus traces use: writer for the headers, reader for all.

Enhanced Packet Blocks are built in C on the fast path (native/trace.c), so a Python
pcapng library could only write the two header blocks here; python-pcapng and dpkt were
considered and left out for that reason (a runtime dependency for ~40 lines).  CI checks
every file this module and the C recorder write with tshark, an independent reader.

Format: https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html (little-endian
sections only: that is what we write; a big-endian file is refused with a clear error).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from uvmbus.errors import TraceError

SHB = 0x0A0D0D0A
IDB = 0x00000001
EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_END = 0
OPT_COMMENT = 1
OPT_SHB_USERAPPL = 4
OPT_IF_NAME = 2
OPT_IF_DESCRIPTION = 3
OPT_IF_TSRESOL = 9


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def section_header(application: str, comment: str = "") -> bytes:
    opts = _opt(OPT_SHB_USERAPPL, application.encode())
    if comment:
        opts += _opt(OPT_COMMENT, comment.encode())
    opts += _opt(OPT_END, b"")
    return _block(SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + opts)


def interface_description(linktype: int, name: str, description: str, snaplen: int = 0) -> bytes:
    """An IDB with nanosecond timestamps (if_tsresol 9)."""
    opts = (_opt(OPT_IF_NAME, name.encode()) + _opt(OPT_IF_DESCRIPTION, description.encode())
            + _opt(OPT_IF_TSRESOL, bytes([9])) + _opt(OPT_END, b""))
    return _block(IDB, struct.pack("<HHI", linktype, 0, snaplen) + opts)


@dataclass
class Interface:
    linktype: int
    name: str = ""
    description: str = ""
    tsresol_ns: int = 1000        # ns per timestamp unit (default microseconds)


@dataclass
class Record:
    iface: int
    ts_ns: int
    data: bytes
    interface: Interface = field(repr=False, default_factory=lambda: Interface(0))


@dataclass
class ReadStatus:
    """What :func:`read` found besides records: where a cut-off file ends."""
    size: int = 0                       # bytes read
    truncated_at: int | None = None     # offset of the incomplete block (None: the file is whole)

    @property
    def truncated(self) -> bool:
        return self.truncated_at is not None

    def warning(self, name: str) -> str:
        return (f"{name} is truncated: the block at byte {self.truncated_at} is cut off "
                f"(the file ends at byte {self.size}); only the records before it were read "
                "(a recorder killed mid-write, or a file copied short)")


def _options(body: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(body):
        code, ln = struct.unpack_from("<HH", body, off)
        if code == OPT_END:
            return
        yield code, body[off + 4:off + 4 + ln]
        off += 4 + ln + (-ln % 4)


def _tsresol(v: int) -> int:
    if v & 0x80:
        raise TraceError(f"if_tsresol {v:#x}: power-of-two timestamp resolutions are not supported")
    return 10 ** max(0, 9 - v) if v <= 9 else 1


def read(f: BinaryIO, name: str = "trace", status: ReadStatus | None = None) -> Iterator[Record]:
    """Yield the packet records of every section of a pcapng stream.  A block cut off at the
    end (a recorder killed mid-write) ends the stream quietly: pass ``status`` to learn where."""
    st = status if status is not None else ReadStatus()
    ifaces: list[Interface] = []
    first = True
    offset = 0
    while True:
        head = f.read(8)
        st.size = offset + len(head)
        if not head:
            return
        if len(head) < 8:
            st.truncated_at = offset     # everything before is good
            return
        btype, total = struct.unpack("<II", head)
        if first and btype != SHB:
            raise TraceError(f"{name}: not a pcapng file (first block {btype:#x}); "
                             "record traces with --record / uvmbus sim --record")
        first = False
        if total < 12 or total % 4 or total > 1 << 26:
            if btype == SHB and struct.unpack(">I", head[4:])[0] % 4 == 0:
                raise TraceError(f"{name}: big-endian pcapng sections are not supported")
            raise TraceError(f"{name}: corrupt block length {total} at a {btype:#x} block")
        body = f.read(total - 8)
        st.size = offset + 8 + len(body)
        if len(body) < total - 8:
            st.truncated_at = offset     # a recorder killed mid-write: everything before is good
            return
        offset += total
        body = body[:-4]
        if btype == SHB:
            magic, = struct.unpack_from("<I", body, 0)
            if magic != BYTE_ORDER_MAGIC:
                raise TraceError(f"{name}: big-endian pcapng sections are not supported")
            ifaces = []
        elif btype == IDB:
            linktype, _, _ = struct.unpack_from("<HHI", body, 0)
            itf = Interface(linktype)
            for code, val in _options(body[8:]):
                if code == OPT_IF_NAME:
                    itf.name = val.decode(errors="replace")
                elif code == OPT_IF_DESCRIPTION:
                    itf.description = val.decode(errors="replace")
                elif code == OPT_IF_TSRESOL and val:
                    itf.tsresol_ns = _tsresol(val[0])
            ifaces.append(itf)
        elif btype == EPB:
            iface, hi, lo, cap, _orig = struct.unpack_from("<IIIII", body, 0)
            if iface >= len(ifaces):
                raise TraceError(f"{name}: packet on interface {iface} before its description block")
            itf = ifaces[iface]
            yield Record(iface, ((hi << 32) | lo) * itf.tsresol_ns, bytes(body[20:20 + cap]), itf)

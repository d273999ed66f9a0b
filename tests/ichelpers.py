"""Host-side IC messages for unit tests, built by hand from storvsc_ic.md §7 (not from the
guest code under test)."""

from __future__ import annotations

import struct


def ic_packet(msgtype: int, body: bytes, *, fw: tuple[int, int] = (3, 0),
              ver: tuple[int, int] = (0, 0), flags: int = 0x03, status: int = 0) -> bytes:
    """vmbuspipe_hdr (8) + icmsg_hdr (20) + body, as a host sends it."""
    pipe = struct.pack("<II", 1, 20 + len(body))
    hdr = struct.pack("<HHHHHHIBBH", fw[0], fw[1], msgtype, ver[0], ver[1], len(body) & 0xFFFF,
                      status, 0, flags, 0)
    return pipe + hdr + body


def negotiate_body(fw: list[tuple[int, int]], msg: list[tuple[int, int]]) -> bytes:
    return struct.pack("<HHI", len(fw), len(msg), 0) + b"".join(struct.pack("<HH", *v) for v in fw + msg)


def reply_fields(reply: bytes) -> dict[str, int]:
    """status, flags, msgtype, icmsgsize of a guest reply."""
    return {"msgtype": struct.unpack_from("<H", reply, 12)[0],
            "icmsgsize": struct.unpack_from("<H", reply, 18)[0],
            "status": struct.unpack_from("<I", reply, 20)[0],
            "txid": reply[24], "flags": reply[25]}


def negotiated(reply: bytes) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    fc, mc = struct.unpack_from("<HH", reply, 28)
    return fc, mc, struct.unpack_from("<HH", reply, 36), struct.unpack_from("<HH", reply, 40)


def u16(text: str, units: int) -> bytes:
    """A UTF-16LE string with its NUL, padded to ``units`` code units."""
    return (text.encode("utf-16-le") + b"\0\0").ljust(2 * units, b"\0")[:2 * units]

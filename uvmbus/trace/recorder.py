"""Recording VMBus sessions to pcapng (see docs/trace.md).

A :class:`Recorder` is one output file (or a size-rotated series).  Each channel gets a
:class:`Port` (one pcapng interface); attaching a port to a ring makes the C ring commits
append every packet they publish or release to the recorder's buffer — no Python runs per
packet.  A background thread writes the buffer out every ``flush_interval`` seconds and
names the finished files of a rotation (C starts each next file itself, on the write-out
that would pass ``rotate_bytes``: a file never passes the size unless one record does);
:meth:`Recorder.close` writes the rest.

The file is written as ``FILE.part`` and renamed to ``FILE`` when it is complete; a
recorder closed with ``ok=False`` (the command failed) never replaces an older ``FILE``:
its trace goes to ``FILE-failed.pcapng`` instead.  A crashed one leaves a readable
``.part`` file.
"""

from __future__ import annotations

import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, TraceError
from uvmbus.native import ffi, lib
from uvmbus.trace import pcapng

#: attachment bytes kept per referenced buffer (an RNDIS control message or a frame's
#: headers fit; override with snaplen=, 0 = attach nothing)
DEFAULT_SNAPLEN = 256
DEFAULT_BUFFER = 1 << 20

SIDES = {"guest": lib.UVB_TRACE_SIDE_GUEST, "host": lib.UVB_TRACE_SIDE_HOST}
_IC_CLASSES = {"shutdown", "timesync", "heartbeat", "kvp", "vss", "fcopy"}


def _version() -> str:
    try:
        return metadata.version("uvmbus")
    except metadata.PackageNotFoundError:
        return "dev"


def device_class_code(class_name: str) -> int:
    """The trace header's device class for a bus class short name."""
    if class_name == "netvsc":
        return int(lib.UVB_TRACE_CLASS_NET)
    if class_name == "storvsc":
        return int(lib.UVB_TRACE_CLASS_SCSI)
    if class_name in _IC_CLASSES:
        return int(lib.UVB_TRACE_CLASS_IC)
    return int(lib.UVB_TRACE_CLASS_OTHER)


class Port:
    """One channel of a recorder (one pcapng interface)."""

    def __init__(self, recorder: Recorder, iface: int, relid: int, subchan: int, devclass: int, name: str):
        self.recorder = recorder
        self.iface = iface
        self.name = name
        self.raw = ffi.new("struct uvb_rec_port *")
        self.raw.rec = recorder.raw
        self.raw.iface = iface
        self.raw.relid = relid
        self.raw.subchan = subchan
        self.raw.devclass = devclass
        self.raw.side = recorder.side
        self._rings: list[Any] = []

    def attach(self, *rings: Any) -> None:
        """Record every packet committed on these rings (``struct uvb_ring *`` or ring objects)."""
        for r in rings:
            raw = getattr(r, "raw", r)
            raw.rec = self.raw
            self._rings.append(raw)

    def detach(self) -> None:
        for raw in self._rings:
            raw.rec = ffi.NULL
        self._rings = []

    def add_pageset(self, pageset_id: int, ptr: Any, size: int) -> None:
        """Attach transfer-page range bytes of packets that name ``pageset_id`` (receive buffer)."""
        n = int(self.raw.npagesets)
        for i in range(n):
            if self.raw.pagesets[i].id == pageset_id:
                break
        else:
            if n >= lib.UVB_REC_MAX_PAGESETS:
                raise ConfigError(f"at most {lib.UVB_REC_MAX_PAGESETS} transfer page sets per channel")
            i = n
            self.raw.npagesets = n + 1
        self.raw.pagesets[i].id = pageset_id
        self.raw.pagesets[i].base = ffi.cast("uint8_t *", ptr)
        self.raw.pagesets[i].len = size

    def set_send_buffer(self, ptr: Any, size: int, section_size: int) -> None:
        """Attach the send-buffer section of each NVSP RNDIS packet the guest sends."""
        self.raw.sendbuf.base = ffi.cast("uint8_t *", ptr)
        self.raw.sendbuf.len = size
        self.raw.sendbuf.section_size = section_size

    def packet(self, data: bytes, *, to_host: bool) -> None:
        """Record a packet that did not go through a ring commit (tests, tools)."""
        d = lib.UVB_TRACE_DIR_G2H if to_host else lib.UVB_TRACE_DIR_H2G
        lib.uvb_rec_packet(self.raw, d, data, len(data))

    def read_data(self, trans_id: int, data: Any, transferred: int) -> None:
        """Record what a read put in the guest's buffer (storvsc: INQUIRY, READ CAPACITY, VPD
        pages, ...), after the host's completion of request ``trans_id``: an ``EV_DATA`` event
        holding the first ``snaplen`` bytes (none with ``no_payload``), so a replay can put
        them back into the live request's buffer.  ``transferred``: the bytes the host moved."""
        rec = self.recorder.raw
        cap = 0 if rec.no_payload else min(int(rec.snaplen), transferred, len(data))
        b = bytes(data[:cap])
        lib.uvb_rec_event(self.raw, lib.UVB_TRACE_DIR_H2G, lib.UVB_TRACE_EV_DATA, transferred & 0xFFFFFFFF,
                          trans_id & (2**64 - 1), b, len(b))

    def event(self, code: int, arg0: int = 0, arg1: int = 0, text: str = "", *, to_host: bool = True) -> None:
        """Record an event (``lib.UVB_TRACE_EV_*``)."""
        t = text.encode()
        d = lib.UVB_TRACE_DIR_G2H if to_host else lib.UVB_TRACE_DIR_H2G
        lib.uvb_rec_event(self.raw, d, code, arg0 & 0xFFFFFFFF, arg1 & (2**64 - 1), t, len(t))


class Recorder:
    """A pcapng trace being written.  ``side``: "guest" or "host"."""

    def __init__(self, path: str | os.PathLike[str], *, side: str = "guest", snaplen: int = DEFAULT_SNAPLEN,
                 no_payload: bool = False, rotate_bytes: int = 0, buffer_bytes: int = DEFAULT_BUFFER,
                 flush_interval: float = 0.2, comment: str = ""):
        if side not in SIDES:
            raise ConfigError(f"recorder side {side!r}: use 'guest' or 'host'")
        if snaplen < 0 or snaplen > 65535:
            raise ConfigError(f"snap length {snaplen}: use 0..65535 bytes")
        if rotate_bytes and rotate_bytes < 64 * 1024:
            raise ConfigError(f"rotation size {rotate_bytes}: use at least 64 KiB (or 0 for one file)")
        self.path = Path(path)
        if self.path.suffix != ".pcapng":
            raise ConfigError(f"{self.path}: name trace files *.pcapng (Wireshark opens them by that name)")
        if not self.path.parent.is_dir():
            raise ConfigError(f"{self.path}: directory {self.path.parent} does not exist")
        self.side = SIDES[side]
        self.side_name = side
        self.rotate_bytes = rotate_bytes
        self.comment = comment
        self.files: list[Path] = []          # completed files, in order
        self._index = 0                      # files before this one are complete and renamed
        self._idbs: list[bytes] = []
        self._ports: list[Port] = []
        self._lock = threading.Lock()
        self._buf = ffi.new("uint8_t[]", max(buffer_bytes, 65536))
        self.raw = ffi.new("struct uvb_rec *")
        self.closed = False
        self._shb = pcapng.section_header(f"uvmbus {_version()} ({self.side_name} side)", self.comment)
        self._head = ffi.new("uint8_t[]", self._shb)
        self._dirfd = -1
        stem = os.fsencode(self.path.stem)
        if rotate_bytes and len(stem) >= ffi.sizeof(self.raw.stem) - 1:
            raise ConfigError(f"{self.path}: name too long for a rotated series (at most "
                              f"{ffi.sizeof(self.raw.stem) - 2} bytes before .pcapng)")
        fd = self._open_first()
        lib.uvb_rec_init(self.raw, self._buf, len(self._buf), fd)
        self.raw.file_bytes = len(self._shb)
        self.raw.head = self._head
        self.raw.head_len = len(self._shb)
        if rotate_bytes:
            # C starts FILE.N.pcapng.part itself when the next write-out would pass the size
            try:
                self._dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                os.close(fd)
                raise TraceError(f"cannot open directory {self.path.parent}: {e.strerror}") from e
            self.raw.dirfd = self._dirfd
            self.raw.rotate_bytes = rotate_bytes
            self.raw.stem = stem
        self.raw.snaplen = snaplen
        self.raw.no_payload = 1 if no_payload else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, args=(flush_interval,), daemon=True,
                                        name="uvmbus-trace")
        self._thread.start()

    # ---- files ----------------------------------------------------------------------
    def _name(self, index: int) -> Path:
        if index == 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{index}{self.path.suffix}")

    def _part(self, index: int) -> Path:
        final = self._name(index)
        return final.with_name(final.name + ".part")

    def _open_first(self) -> int:
        """Create the first file (as .part) and write its section header; returns the fd."""
        part = self._part(0)
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            os.write(fd, self._shb)
        except OSError as e:
            raise TraceError(f"cannot create trace file {part}: {e.strerror}") from e
        return fd

    def _finish_file(self, part: Path, *, ok: bool = True) -> None:
        final = part.with_name(part.name[:-len(".part")])
        if not ok and final.exists():
            final = final.with_name(f"{final.stem}-failed{final.suffix}")
        os.replace(part, final)
        self.files.append(final)

    def _collect(self) -> None:
        """Name the files C has finished (it closed them when it started the next)."""
        current = int(self.raw.file_index)
        while self._index < current:
            self._finish_file(self._part(self._index))
            self._index += 1

    def flush(self) -> None:
        """Write buffered records out now (the C recorder starts the next file of a
        rotation itself) and name the files that are complete."""
        if self.closed:
            return
        with self._lock:
            rc = lib.uvb_rec_flush(self.raw)
            self._collect()
            if rc < 0:
                raise TraceError(f"writing {self._part(self._index)}: {os.strerror(-rc)} "
                                 f"({self.raw.dropped} records lost so far)")

    def _flusher(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except (TraceError, OSError):
                pass       # counted in stats(); close() reports it

    # ---- channels ---------------------------------------------------------------------
    def port(self, relid: int, *, subchan: int = 0, devclass: int | str = 0, instance: str = "",
             name: str = "") -> Port:
        """A new interface for one channel."""
        if isinstance(devclass, str):
            cls_name = devclass
            devclass = device_class_code(devclass)
        else:
            cls_name = {1: "netvsc", 2: "storvsc", 3: "ic"}.get(devclass, "vmbus")
        name = name or f"{cls_name}/{relid}"
        desc = (f"uvmbus {self.side_name} side; class {cls_name}; instance {instance or '-'}; "
                f"relid {relid}; subchannel {subchan}")
        idb = pcapng.interface_description(lib.UVB_TRACE_LINKTYPE, name, desc)
        with self._lock:
            if self.closed:
                raise TraceError(f"recorder {self.path} is closed")
            p = Port(self, len(self._idbs), relid, subchan, devclass, name)
            head_bytes = self._shb + b"".join(self._idbs) + idb
            head = ffi.new("uint8_t[]", head_bytes)
            if lib.uvb_rec_idb(self.raw, idb, len(idb), head, len(head_bytes)) < 0:
                raise TraceError(f"recorder {self.path}: no room for the interface block of {name}")
            self._head = head          # C reads it when it starts the next file
            self._idbs.append(idb)
            self._ports.append(p)
        return p

    # ---- end ------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        r = self.raw
        return {"records": int(r.records), "bytes": int(r.bytes), "dropped": int(r.dropped),
                "write_errors": int(r.write_errors), "rotate_errors": int(r.rotate_errors),
                "files": int(r.file_index) + (0 if self.closed else 1)}

    def close(self, ok: bool = True) -> None:
        """Write the rest and name the files.  ``ok=False`` (the session failed): an older
        trace of the same name is kept and this one is named ``FILE-failed.pcapng``."""
        if self.closed:
            return
        self._stop.set()
        self._thread.join()
        for p in self._ports:
            p.detach()
        err = None
        with self._lock:
            rc = lib.uvb_rec_flush(self.raw)
            if rc < 0:
                err = os.strerror(-rc)
            lib.uvb_rec_lock(self.raw)
            fd, self.raw.fd = int(self.raw.fd), -1
            lib.uvb_rec_unlock(self.raw)
            self.closed = True
            self._collect()
            os.close(fd)
            if self._dirfd >= 0:
                os.close(self._dirfd)
                self._dirfd = -1
            self._finish_file(self._part(self._index), ok=ok)
        if err or self.raw.dropped:
            raise TraceError(f"trace {self.path}: {self.raw.dropped} records lost"
                             + (f" ({err})" if err else "") + "; the file holds the rest")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)

    def __repr__(self) -> str:
        return f"<Recorder {self.path} {self.side_name} side {self.stats()}>"


def as_recorder(record: Any, *, side: str = "guest", **options: Any) -> tuple[Recorder | None, bool]:
    """``record=`` argument → (recorder, owned): a path opens a new recorder the caller owns."""
    if record is None or record is False:
        return None, False
    if isinstance(record, Recorder):
        return record, False
    return Recorder(record, side=side, **options), True

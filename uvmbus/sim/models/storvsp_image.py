"""Raw image files behind the simulated SCSI disks (one file per LUN).

Spec syntax (``uvmbus sim --disk SPEC``)::

    IMAGE[:ro][:bs=512|4096][:size=SIZE][:lun=N][:serial=TEXT][:nounmap][:maxxfer=SIZE]
         [:pr][:odx][:rsoc][:nolbastatus][:rotation=N]

* ``IMAGE`` is a raw image.  With ``size=`` a missing file is created sparse with that size
  (``new.img:size=1G``); an existing file must already have that size.
* ``ro`` opens it read-only (writes fail with DATA PROTECT / WRITE PROTECTED).
* ``bs`` is the logical block size (default 512); the image size must be a multiple of it.
* ``lun`` places the disk at that LUN (default: the next free one).
* ``serial`` is reported in VPD page 0x80 (no page 0x80 without it, as OpenVMM).
* ``nounmap`` hides logical block provisioning (no UNMAP, no VPD 0xB0-0xB2).
* ``maxxfer=SIZE`` reports a MAXIMUM TRANSFER LENGTH in VPD 0xB0 (at most 8 MiB; without it
  none, as OpenVMM's SimpleScsiDisk); a READ/WRITE longer than it fails with ILLEGAL REQUEST /
  INVALID FIELD IN CDB, as SBC-3 §6.6.4 (Block Limits VPD page) prescribes.
* ``pr`` supports SCSI-3 persistent reservations (a Hyper-V *shared* VHDX, or an OpenVMM
  disk whose backend has ``pr()``); the state is shared by every LUN on the same file
  (storvsp_pr.py).  Without it PERSISTENT RESERVE IN/OUT fail ILLEGAL REQUEST / 0x20.
* ``odx`` reports VPD 0x8F (third-party copy: OpenVMM's ``odx`` parameter, default off).
* ``rsoc`` answers REPORT SUPPORTED OPERATION CODES with the model's command table.  Hyper-V
  and OpenVMM do not (ILLEGAL REQUEST / 0x20; Linux sets no_report_opcodes for storvsc):
  a test option, off by default.
* ``nolbastatus`` refuses GET LBA STATUS (OpenVMM's default: ``get_lba_status`` off).  By
  default it answers from the image file's holes (SEEK_HOLE/SEEK_DATA).
* ``rotation=N`` sets the VPD 0xB1 MEDIUM ROTATION RATE (default 1, non-rotating).

Data moves between the file and guest RAM in C (``uvb_vsp_rw``: preadv/pwritev straight
into the guest-RAM mapping after every PFN was bounds-checked).
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uvmbus.errors import ConfigError, from_oserror
from uvmbus.native import ffi, lib
from uvmbus.sim.models.storvsp_pr import pr_state_for
from uvmbus.units import parse_size

__all__ = ["DiskSpec", "ImageDisk", "parse_disk_spec"]

_NAMESPACE = uuid.UUID("2b8b1e0e-7573-766d-6275-73746f727670")


@dataclass
class DiskSpec:
    path: Path
    readonly: bool = False
    block_size: int = 512
    size: int | None = None
    lun: int | None = None
    serial: str | None = None
    unmap: bool = True
    #: MAXIMUM TRANSFER LENGTH in bytes (None: the model's default)
    max_transfer: int | None = None
    pr: bool = False
    odx: bool = False
    rsoc: bool = False
    lba_status: bool = True
    rotation: int = 1


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse ``IMAGE[:ro][:bs=N][:size=S][:lun=N][:serial=T][:nounmap][:maxxfer=S]``."""
    parts = str(text).split(":")
    if not parts[0]:
        raise ConfigError(f"disk spec {text!r}: missing image path")
    spec = DiskSpec(Path(parts[0]))
    for opt in parts[1:]:
        key, _, val = opt.partition("=")
        if key == "ro" and not val:
            spec.readonly = True
        elif key == "nounmap" and not val:
            spec.unmap = False
        elif key == "bs":
            if val not in ("512", "4096"):
                raise ConfigError(f"disk spec {text!r}: bs must be 512 or 4096")
            spec.block_size = int(val)
        elif key == "size":
            spec.size = parse_size(val, what="disk size", allow_zero=False)
        elif key == "lun":
            try:
                spec.lun = int(val, 0)
            except ValueError:
                raise ConfigError(f"disk spec {text!r}: lun must be a number") from None
            if not 0 <= spec.lun < lib.UVB_VSP_MAX_LUNS:
                raise ConfigError(f"disk spec {text!r}: lun must be 0..{lib.UVB_VSP_MAX_LUNS - 1}")
        elif key == "serial" and val:
            spec.serial = val
        elif key == "maxxfer":
            spec.max_transfer = parse_size(val, what="maxxfer", allow_zero=False)
        elif key in ("pr", "odx", "rsoc") and not val:
            setattr(spec, key, True)
        elif key == "nolbastatus" and not val:
            spec.lba_status = False
        elif key == "rotation":
            try:
                spec.rotation = int(val, 0)
            except ValueError:
                spec.rotation = -1
            if not 0 <= spec.rotation <= 0xFFFE:
                raise ConfigError(f"disk spec {text!r}: rotation must be 0 (not reported), 1 "
                                  "(non-rotating) or an RPM up to 65534")
        else:
            raise ConfigError(f"disk spec {text!r}: unknown option {opt!r} (known: ro, bs=512|4096, "
                              "size=SIZE, lun=N, serial=TEXT, nounmap, maxxfer=SIZE, pr, odx, rsoc, "
                              "nolbastatus, rotation=N)")
    if spec.max_transfer is not None and spec.max_transfer % spec.block_size:
        raise ConfigError(f"disk spec {text!r}: maxxfer must be a multiple of the "
                          f"{spec.block_size}-byte block size")
    return spec


@dataclass
class MediaError:
    """LBAs ``[start, start + count)`` fail with MEDIUM ERROR for ``kinds`` ("read", "write")."""

    start: int
    count: int
    kinds: frozenset[str] = frozenset({"read", "write"})

    def hits(self, lba: int, blocks: int, kind: str) -> bool:
        return kind in self.kinds and lba < self.start + self.count and self.start < lba + blocks


class ImageDisk:
    """One LUN backed by a raw image file."""

    def __init__(self, spec: DiskSpec) -> None:
        self.spec = spec
        self.path = spec.path.absolute()
        self.readonly = spec.readonly
        self.block_size = spec.block_size
        self.block_shift = 9 if spec.block_size == 512 else 12
        self.unmap_supported = spec.unmap
        self.serial = spec.serial
        self.disk_id = uuid.uuid5(_NAMESPACE, str(self.path))
        self.media_errors: list[MediaError] = []
        self.lock = threading.Lock()
        self.unit_attention = False
        self.saved_sense: bytes | None = None
        self.write_cache = True
        self._create_if_needed()
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise from_oserror(exc, f"disk image {self.path}") from exc
        size = os.fstat(self.fd).st_size
        if spec.size is not None and size != spec.size:
            os.close(self.fd)
            raise ConfigError(f"disk image {self.path} has {size} bytes but size={spec.size} was "
                              "given; drop size= to use the file as it is")
        if size == 0 or size % self.block_size:
            os.close(self.fd)
            raise ConfigError(f"disk image {self.path}: size {size} is not a positive multiple of "
                              f"the {self.block_size}-byte block size")
        self.nblocks = size // self.block_size
        self.closed = False
        #: persistent reservations (shared by every LUN on this file), None without ``pr``
        self.pr = pr_state_for(self.fd) if spec.pr else None
        #: read-only shared mappings (reads are one memcpy from the page cache); older ones
        #: stay mapped until close, a pump may still be reading through them
        self.maps: list[tuple[Any, int]] = []
        self._map()

    def _map(self) -> None:
        err = ffi.new("int32_t *")
        ptr = lib.uvb_vsp_map(self.fd, self.size, err)
        if ptr != ffi.NULL:
            self.maps.append((ptr, self.size))

    @property
    def map(self) -> tuple[Any, int]:
        """(pointer, length) of the current mapping, or (NULL, 0)."""
        return self.maps[-1] if self.maps else (ffi.NULL, 0)

    def _create_if_needed(self) -> None:
        if self.path.exists() or self.spec.size is None:
            if not self.path.exists():
                raise ConfigError(f"disk image {self.path} does not exist; add :size=SIZE to "
                                  "create a sparse one")
            return
        if self.spec.size % self.block_size:
            raise ConfigError(f"disk image {self.path}: size {self.spec.size} is not a multiple of "
                              f"the {self.block_size}-byte block size")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, self.spec.size)         # sparse
            finally:
                os.close(fd)
        except OSError as exc:
            raise from_oserror(exc, f"create disk image {self.path}") from exc

    @property
    def size(self) -> int:
        return self.nblocks * self.block_size

    @property
    def slow(self) -> bool:
        """Commands must take the Python path (media errors, a pending unit attention, a
        transfer limit below the one the C path assumes, a persistent reservation to check)."""
        return (bool(self.media_errors) or self.unit_attention or self.spec.max_transfer is not None
                or (self.pr is not None and self.pr.reserved))

    def media_error(self, lba: int, blocks: int, kind: str) -> bool:
        return any(m.hits(lba, blocks, kind) for m in self.media_errors)

    # -- data ---------------------------------------------------------------------------
    def transfer(self, vsp: Any, write: bool, lba: int, nbytes: int, rng: tuple[int, int, list[int]],
                 *, fua: bool = False) -> int:
        """Move ``nbytes`` at ``lba`` between the image and the GPA range ``rng``.
        Returns 0 or a UVB_VSP_E* code."""
        _count, offset, pfns = rng
        arr = ffi.new("uint64_t[]", pfns)
        bad = ffi.new("uint32_t *")
        flags = (lib.UVB_VSP_WRITE if write else 0) | (lib.UVB_VSP_FUA if fua else 0)
        ptr, length = self.map
        return int(lib.uvb_vsp_rw(vsp, self.fd, ptr, length, flags, lba << self.block_shift,
                                  nbytes, arr, len(pfns), offset, bad))

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def write_blocks(self, lba: int, data: bytes) -> None:
        os.pwrite(self.fd, data, lba << self.block_shift)

    def discard(self, lba: int, blocks: int) -> None:
        """Deallocate blocks (reads return zeros afterwards)."""
        off, length = lba << self.block_shift, blocks << self.block_shift
        err = lib.uvb_dma_punch(self.fd, off, length)
        if err:     # no hole punching here: write zeros
            chunk = bytes(min(length, 1 << 20))
            done = 0
            while done < length:
                n = min(len(chunk), length - done)
                os.pwrite(self.fd, chunk[:n], off + done)
                done += n

    def allocation(self, lba: int, blocks: int) -> list[tuple[int, int, bool]]:
        """``(lba, count, mapped)`` runs covering ``[lba, lba + blocks)`` from the file's
        data and holes (SEEK_DATA/SEEK_HOLE).  A block partly in data counts as mapped; a
        file system without hole reporting shows everything mapped."""
        bs = self.block_size
        first, last = lba, lba + blocks
        end = last * bs
        mapped: list[tuple[int, int]] = []          # block ranges holding data
        pos = first * bs
        while pos < end:
            try:
                d0 = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:                          # ENXIO: only holes from here on
                break
            if d0 >= end:
                break
            try:
                d1 = os.lseek(self.fd, d0, os.SEEK_HOLE)
            except OSError:
                d1 = end
            d1 = min(max(d1, d0 + 1), end)
            b0, b1 = max(first, d0 // bs), -(-d1 // bs)
            if mapped and mapped[-1][1] >= b0:
                mapped[-1] = (mapped[-1][0], max(mapped[-1][1], b1))
            else:
                mapped.append((b0, b1))
            pos = b1 * bs
        runs: list[tuple[int, int, bool]] = []
        cur = first
        for b0, b1 in mapped:
            if b0 > cur:
                runs.append((cur, b0 - cur, False))
            runs.append((b0, b1 - b0, True))
            cur = b1
        if cur < last:
            runs.append((cur, last - cur, False))
        return runs

    def resize(self, size: int) -> None:
        """Grow the image (a live disk only grows: a shrink under a mapping could fault);
        the next command gets UNIT ATTENTION / CAPACITY DATA HAS CHANGED."""
        if size <= 0 or size % self.block_size:
            raise ConfigError(f"new size {size} is not a positive multiple of {self.block_size}")
        if size < self.size:
            raise ConfigError(f"disk image {self.path}: {size} < {self.size} bytes; a live disk "
                              "can only grow")
        if self.readonly:
            raise ConfigError(f"disk image {self.path} is read-only: cannot resize")
        os.ftruncate(self.fd, size)
        self.nblocks = size // self.block_size
        self._map()
        self.unit_attention = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for ptr, length in self.maps:
                lib.uvb_vsp_unmap(ptr, length)
            self.maps.clear()
            os.close(self.fd)

    def describe(self) -> dict[str, Any]:
        return {"image": str(self.path), "size": self.size, "block_size": self.block_size,
                "readonly": self.readonly, "unmap": self.unmap_supported,
                "pr": self.pr is not None, "odx": self.spec.odx, "rsoc": self.spec.rsoc,
                "lba_status": self.spec.lba_status, "rotation": self.spec.rotation,
                "media_errors": [[m.start, m.count, sorted(m.kinds)] for m in self.media_errors]}


@dataclass
class DiskTable:
    """LUN -> disk of one controller (path 0, target 0)."""

    disks: dict[int, ImageDisk] = field(default_factory=dict)

    def free_lun(self) -> int:
        for i in range(lib.UVB_VSP_MAX_LUNS):
            if i not in self.disks:
                return i
        raise ConfigError(f"no free LUN (all {lib.UVB_VSP_MAX_LUNS} used)")

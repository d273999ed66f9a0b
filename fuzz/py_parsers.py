"""atheris harness: the Python parsers of host-controlled data.

Every parser of bytes the host (or the sysfs tree the kernel lays out from host offers)
controls must return a value or raise a uvmbus error — never struct.error, IndexError,
ValueError, ... :

- NVSP / RNDIS / NDIS objects (uvmbus/netvsc/protocol.py), VSTOR packets / properties /
  SRBs (uvmbus/storvsc/protocol.py), SCSI data-in and sense (uvmbus/storvsc/scsi.py): the
  oracle of tests/test_fuzz_parsers.py (``all_parsers``), reused, not copied;
- sysfs: one attribute of a simulated VMBus device tree (class_id, device_id, id,
  monitor_id, channel dirs, uio maps...) replaced by the input, then the bus scanned.

Run by fuzz/run.py (``python fuzz/py_parsers.py [libFuzzer flags] CORPUS...``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

with atheris.instrument_imports(include=["uvmbus"]):   # coverage of uvmbus code only
    from sysfs_fixtures import NIC_CLASS, SysfsTree
    from test_fuzz_parsers import all_parsers

    from uvmbus.bus.devices import Bus
    from uvmbus.bus.kernel import parse_release
    from uvmbus.errors import UvmbusError

_TREE: list[Path] = []


def _tree() -> list[Path]:
    """A VMBus tree with one NIC bound to uio (made once); its attribute files."""
    if not _TREE:
        top = Path(tempfile.mkdtemp(prefix="uvb-fuzz-sysfs-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        tree = SysfsTree(top)
        tree.add_driver("uio_hv_generic")
        tree.add_device(NIC_CLASS, monitor_id=3, driver="uio_hv_generic")
        files = sorted(p for p in top.rglob("*") if p.is_file() and not p.is_symlink()
                       and p.stat().st_size < 4096)
        _TREE.extend([top, *files])
    return _TREE


def sysfs_attribute(data: bytes) -> None:
    top, *files = _tree()
    if not files or not data:
        return
    path = files[data[0] % len(files)]
    old = path.read_bytes()
    try:
        path.write_bytes(data[1:])
        try:
            for dev in Bus(top).devices():
                repr(dev)
        except UvmbusError as exc:
            assert str(exc)
    finally:
        path.write_bytes(old)


def one_input(data: bytes) -> None:
    all_parsers(data)
    sysfs_attribute(data)
    try:
        parse_release(data.decode("latin-1"))
    except UvmbusError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

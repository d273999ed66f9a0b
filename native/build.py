"""cffi builder for uvmbus._native (named in setup.py's cffi_modules).

Headers are listed once, in native/uvmbus.h.  Headers included inside its
`#pragma pack(push, 1)` block hold wire layouts and are given to cdef with
packed=True; the others hold the C API.  The C compiler sees exactly the same
files through uvmbus.h, so a layout is defined in one place for C and Python.
Every native/*.c file is compiled into the one extension.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_DEFINE_INT = re.compile(r"^#define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)[uU]?\s*(/\*.*\*/)?\s*$")


def _cdef_text(path: Path) -> str:
    """Header text with every preprocessor line except integer #defines removed."""
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#") and not _DEFINE_INT.match(s):
            out.append("")
            continue
        if s.startswith("#define"):
            # cffi wants plain literals: drop C suffixes like 1u
            line = re.sub(r"(\b0x[0-9a-fA-F]+|\b\d+)[uU]\b", r"\1", line)
        out.append(line)
    return "\n".join(out)


def _headers() -> tuple[list[Path], list[Path]]:
    packed, plain = [], []
    in_pack = False
    for line in (HERE / "uvmbus.h").read_text().splitlines():
        s = line.strip()
        if s.startswith("#pragma pack(push"):
            in_pack = True
        elif s.startswith("#pragma pack(pop"):
            in_pack = False
        m = re.match(r'#include\s+"([^"]+)"', s)
        if m:
            (packed if in_pack else plain).append(HERE / m.group(1))
    return packed, plain


def native_sources() -> list[Path]:
    """Every C source of the extension (also compiled by fuzz/build.py's harnesses)."""
    return sorted(HERE.glob("*.c"))


def make_builder(absolute: bool = False) -> cffi.FFI:
    ffi = cffi.FFI()
    packed, plain = _headers()
    for h in packed:
        ffi.cdef(_cdef_text(h), packed=True)
    for h in plain:
        ffi.cdef(_cdef_text(h))
    # setuptools wants paths relative to the project root; a direct compile
    # (which runs the compiler in a temporary directory) needs absolute ones.
    rel = (lambda p: str(p)) if absolute else (lambda p: os.path.relpath(p, ROOT))
    sources = [rel(p) for p in native_sources()]
    ffi.set_source(
        "uvmbus._native",
        '#include "uvmbus.h"\n',
        sources=sources,
        include_dirs=[rel(HERE)],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fno-strict-aliasing"],
    )
    return ffi


# setuptools runs this file with the project root as the working directory
if Path.cwd() != ROOT:
    os.chdir(ROOT)
ffibuilder = make_builder()

def build_preload(out_dir: Path) -> Path:
    """Compile the LD_PRELOAD library of `uvmbus sim exec` (setup.py builds it for pip)."""
    import subprocess
    import sysconfig

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = out_dir / f"_preload{suffix}"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    subprocess.run([*cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-fPIC", "-shared", "-o",
                    str(target), str(HERE / "preload" / "uvmbus_preload.c"), "-ldl", "-lpthread"],
                   check=True)
    return target


if __name__ == "__main__":
    # Developer build: compile in place (python native/build.py).
    ffibuilder = make_builder(absolute=True)
    out = ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose="-v" in sys.argv)
    target = ROOT / "uvmbus" / Path(out).name
    for stale in (ROOT / "uvmbus").glob("_native*.so"):
        stale.unlink()  # one build only: avoid an old .so shadowing this one
    Path(out).replace(target)
    print(f"built {target}")
    print(f"built {build_preload(ROOT / 'uvmbus')}")

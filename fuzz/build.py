"""Build the libFuzzer harnesses (the C files of fuzz/) (clang, -fsanitize=fuzzer,address,undefined).

The native sources are the extension's own list (native/build.py's ``native_sources()``),
compiled once into instrumented objects under build/fuzz/obj; each harness links them.
Rebuilds only what is older than its inputs.  ``python fuzz/build.py [NAME...]``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NATIVE = ROOT / "native"
OUT = ROOT / "build" / "fuzz"

SANITIZE = "-fsanitize=fuzzer,address,undefined"
# Small bounds where a source allows them, so floods reach the "queue full" paths quickly.
DEFINES = ["-DIB_BYTES=(64u<<10)", "-DIB_PKTS=64u"]
CFLAGS = ["-g", "-O1", "-fno-inline", "-std=gnu11", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
          "-Wno-unused-parameter", f"-I{NATIVE}", f"-I{HERE}"]


def native_sources() -> list[Path]:
    """native/build.py's list (imported, not copied: it follows splits of the sources)."""
    spec = importlib.util.spec_from_file_location("uvmbus_native_build", NATIVE / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    try:
        spec.loader.exec_module(mod)      # it chdirs to the root and parses the headers
    finally:
        os.chdir(cwd)
    return list(mod.native_sources())


def harnesses() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.c"))


def find_clang() -> str | None:
    for name in (os.environ.get("CLANG"), "clang-14", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _stale(target: Path, inputs: list[Path]) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(p.stat().st_mtime > t for p in inputs)


def build(names: list[str] | None = None, verbose: bool = False) -> dict[str, Path]:
    clang = find_clang()
    if clang is None:
        raise SystemExit("fuzz: clang not found; install Debian's clang-14 and libclang-rt-14-dev "
                         "(.ci/install-deps does, as root)")
    headers = sorted(NATIVE.glob("*.h")) + [HERE / "common.h"]
    objdir = OUT / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in native_sources():
        obj = objdir / (src.stem + ".o")
        if _stale(obj, [src, *headers, Path(__file__)]):
            cmd = [clang, *CFLAGS, "-fsanitize=fuzzer-no-link,address,undefined", *DEFINES, "-c", str(src),
                   "-o", str(obj)]
            if verbose:
                print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        objs.append(obj)
    # objects of sources that no longer exist must not be linked: only the list above is
    built = {}
    for name in names or harnesses():
        src = HERE / f"{name}.c"
        exe = OUT / name
        if _stale(exe, [src, *headers, *objs, Path(__file__)]):
            cmd = [clang, *CFLAGS, SANITIZE, str(src), *map(str, objs), "-lm", "-lpthread", "-latomic", "-o", str(exe)]
            if verbose:
                print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        built[name] = exe
    return built


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    for exe in build(args or None, verbose="-v" in sys.argv).values():
        print(f"built {exe.relative_to(ROOT)}")

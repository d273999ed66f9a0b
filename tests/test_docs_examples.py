"""The Python examples of README.md and docs/*.md run as written (issue 10.3): every
```python block compiles, and those that drive a NIC or a disk are executed against a
simulated host (a loopback NIC, a disk), with ``root="/"`` / ``ROOT`` pointing at it.
(The netvsc.md quick-start used to send a 9-byte frame that was silently dropped.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for f in DOCS:
        text = f.read_text()
        for m in BLOCK.finditer(text):
            out.append((f"{f.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return out


BLOCKS = _blocks()
DRIVES = [(where, code) for where, code in BLOCKS if "netvsc.open(" in code or "storvsc.open(" in code]


def test_there_are_examples() -> None:
    assert len(DRIVES) >= 3, [w for w, _ in BLOCKS]


@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_example_compiles(where: str, code: str) -> None:
    compile(code, where, "exec")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp = tmp_path_factory.mktemp("docs")
    img = tmp / "disk.img"
    img.write_bytes(b"\0" * (8 << 20))
    with run_sim(tmp, "--echo", "0", "--no-ic", "--device", "netvsc:backend=loopback,vf=1",
                 "--disk", str(img)) as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield str(sim.root)


OPEN_WITHOUT_ROOT = re.compile(r'(\.open\("(?:netvsc|storvsc)")(?![^)\n]*root=)')


@pytest.mark.parametrize("where,code", DRIVES, ids=[w for w, _ in DRIVES])
def test_example_runs_against_the_simulator(where: str, code: str, root: str, tmp_path: Path) -> None:
    """Each example in its own process (as a user runs it; what it leaves open is released
    when it exits), in a scratch directory, pointed at the simulator's root."""
    code = OPEN_WITHOUT_ROOT.sub(r"\1, root=ROOT", code.replace('root="/"', "root=ROOT"))
    prog = f"ROOT = {root!r}\n" + code
    r = subprocess.run([sys.executable, "-c", prog], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"{where}:\n{code}\n{r.stderr}"

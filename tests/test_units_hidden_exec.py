"""`uvmbus units install` (and `bind --persist`, which installs the bind unit) refuse an
ExecStart= the units' own sandbox hides: ProtectHome=yes makes /home, /root and /run/user
inaccessible and PrivateTmp=yes gives the service an empty /tmp, so a command (or its venv's
python, or the package it imports) there fails at every start with status 203/EXEC or an
ImportError.  For another --root (an image being prepared) it is a warning.

The refusals are run for real with root `/`, inside a private mount namespace whose
/etc/systemd/system, /home and /opt are empty tmpfs mounts (nothing reaches this machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uvmbus.services.persist import UNITS, hidden_from_units

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent("""\
    set -e
    mount -t tmpfs uvb-units /etc/systemd/system
    mount -t tmpfs uvb-units /home
    mount -t tmpfs uvb-units /opt
    mkdir -p /home/alice/venv/bin /opt/good/bin
    ln -s {python} /home/alice/venv/bin/python
    printf '#!/home/alice/venv/bin/python\\n' > /home/alice/venv/bin/uvmbus
    printf '#!/usr/bin/python3\\n' > /opt/good/bin/uvmbus
    chmod +x /home/alice/venv/bin/uvmbus /opt/good/bin/uvmbus
    run() {{ echo "== $*"; {python} -m uvmbus "$@" 2>&1 && echo "rc=0" || echo "rc=$?"; ls /etc/systemd/system; }}
    run units install --exec /home/alice/venv/bin/uvmbus
    run units install --exec {tmp}/uvmbus
    run units install --exec /opt/good/bin/uvmbus
    rm -f /etc/systemd/system/*
    run units install --exec /home/alice/venv/bin/uvmbus --force
""")


def sections(out: str) -> list[str]:
    return out.split("== ")[1:]


@pytest.mark.root
def test_units_install_refuses_hidden_exec_start(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a private mount namespace: the "
                    "refusal is only tested with the real root `/`")
    tmp_exec = tmp_path / "uvmbus"            # pytest's tmp_path is under /tmp
    tmp_exec.write_text("#!/usr/bin/python3\n")
    tmp_exec.chmod(0o755)
    if not str(tmp_exec).startswith("/tmp/"):
        pytest.skip(f"pytest's tmp_path {tmp_path} is not under /tmp")
    script = SCRIPT.format(python=sys.executable, tmp=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.pop("UVMBUS_ROOT", None)
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=90, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    home, tmp, good, forced = sections(p.stdout)

    # venv under /home: refused, the message says why and what to do, nothing written
    assert "rc=1" in home and "uvmbus: error: ExecStart=/home/alice/venv/bin/uvmbus" in home, home
    assert "ProtectHome=yes hides it" in home and "/opt/uvmbus" in home and "--force" in home
    assert ".service" not in home, home
    # a command under /tmp: refused for PrivateTmp=
    assert "rc=1" in tmp and "PrivateTmp=yes hides it" in tmp and ".service" not in tmp, tmp
    # outside both: written, no warning
    assert "rc=0" in good and "warning" not in good, good
    assert all(u in good for u in UNITS), good
    # --force: written, with the warning
    assert "rc=0" in forced and "uvmbus: warning: ExecStart=/home/alice/venv/bin/uvmbus" in forced
    assert all(u in forced for u in UNITS), forced


def test_other_root_only_warns(tmp_path, capsys):
    from uvmbus.services.cli import main

    exe = tmp_path / "venv/bin/uvmbus"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/usr/bin/python3\n")
    root = tmp_path / "image"
    assert main(["units", "install", "--root", str(root), "--exec", str(exe)]) == 0
    err = capsys.readouterr().err
    assert f"uvmbus: warning: ExecStart={exe} would fail" in err and "PrivateTmp=yes" in err
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == sorted(UNITS)


def test_hidden_from_units_follows_links_interpreter_and_package(tmp_path):
    venv = tmp_path / "venv/bin"
    venv.mkdir(parents=True)
    (venv / "uvmbus").write_text("#!/home/bob/.venv/bin/python3 -E\nimport sys\n")
    link = tmp_path / "uvmbus-link"
    link.symlink_to(venv / "uvmbus")
    got = dict(hidden_from_units(str(link), "/root/src/uvmbus"))
    assert got[str(venv / "uvmbus")] == "PrivateTmp=yes"          # the link's target
    assert got["/home/bob/.venv/bin/python3"] == "ProtectHome=yes"  # the venv's python
    assert got["/root/src/uvmbus"] == "ProtectHome=yes"            # an editable checkout
    assert hidden_from_units("/usr/bin/true") == []
    assert hidden_from_units("/tmpfoo/uvmbus") == [] and hidden_from_units("/homer/x") == []

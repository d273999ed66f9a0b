"""`uvmbus bind --persist`: what it writes equals what `systemctl enable` would, and running
the installed unit's ExecStart after a "reboot" binds the device again."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from simhelpers import run_sim

from uvmbus.bus import Bus
from uvmbus.services.cli import main
from uvmbus.services.persist import UNITS, persisted, read_record

pytestmark = pytest.mark.timeout(180)

need_systemctl = pytest.mark.skipif(shutil.which("systemctl") is None or shutil.which("systemd-analyze") is None,
                                    reason="systemctl/systemd-analyze not installed (package systemd)")


def links(base: Path) -> dict[str, str]:
    """Symlinks under base: relative path -> target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                out[str(p.relative_to(base))] = os.readlink(p)
    return out


def exec_start(unit: Path, instance: str) -> list[str]:
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.split("=", 1)[1].replace("%i", instance))
    raise AssertionError(f"{unit} has no ExecStart=")


@need_systemctl
def test_persist_enable_reboot_unpersist(tmp_path, capsys):
    with run_sim(tmp_path, "--nic", "1", "--nic-backend", "none", "--echo", "0", "--no-ic") as sim:
        root = sim.root
        nic = sim.device("netvsc")["device_id"]
        bus = Bus(root)
        assert bus.device(nic).driver == "hv_netvsc"

        assert main(["bind", nic, "--root", str(root), "--persist"]) == 0
        assert bus.device(nic).driver == "uio_hv_generic"
        rec = read_record(root, nic)
        assert rec == {"DEVICE": nic, "CLASS": "netvsc", "FORCE": "0"}
        unit = root / "etc/systemd/system/uvmbus-bind@.service"
        assert exec_start(unit, nic)[0] == str(Path(sys.executable).parent / "uvmbus")

        # exactly what `systemctl enable` creates for the instance
        ref = tmp_path / "ref"
        (ref / "etc/systemd/system").mkdir(parents=True)
        shutil.copy(unit, ref / "etc/systemd/system/uvmbus-bind@.service")
        p = subprocess.run(["systemctl", f"--root={ref}", "enable", f"uvmbus-bind@{nic}.service"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        ours = links(root / "etc/systemd/system")
        assert ours == links(ref / "etc/systemd/system") and ours, (ours, links(ref / "etc"))
        p = subprocess.run(["systemctl", f"--root={root}", "is-enabled", f"uvmbus-bind@{nic}.service"],
                           capture_output=True, text=True, timeout=60)
        assert p.stdout.strip() == "enabled", p.stdout + p.stderr
        p = subprocess.run(["systemd-analyze", "verify", str(root / f"etc/systemd/system/uvmbus-bind@{nic}.service")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr
        assert [r["ENABLED"] for r in persisted(root)] == ["1"]

        # "reboot": the kernel driver has the NIC again; the unit's command takes it back
        capsys.readouterr()
        assert main(["unbind", nic, "--root", str(root)]) == 0
        assert "still bound to uio_hv_generic at every boot" in capsys.readouterr().err
        assert bus.device(nic).driver == "hv_netvsc"
        env = dict(os.environ, UVMBUS_ROOT=str(root))
        p = subprocess.run(exec_start(unit, nic), env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert bus.device(nic).driver == "uio_hv_generic"

        # unpersist: record and enablement gone, the boot command now refuses
        assert main(["unbind", nic, "--root", str(root), "--persist"]) == 0
        assert bus.device(nic).driver == "hv_netvsc"
        assert read_record(root, nic) is None
        assert links(root / "etc/systemd/system") == {}
        p = subprocess.run(["systemctl", f"--root={root}", "is-enabled", f"uvmbus-bind@{nic}.service"],
                           capture_output=True, text=True, timeout=60)
        assert p.stdout.strip() == "disabled", p.stdout + p.stderr
        p = subprocess.run(exec_start(unit, nic), env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "no persisted binding" in p.stderr
        assert bus.device(nic).driver == "hv_netvsc"


def test_persist_refuses_non_guid(tmp_path):
    from uvmbus.errors import ConfigError
    from uvmbus.services.persist import persist_binding

    with pytest.raises(ConfigError):
        persist_binding(tmp_path, "netvsc")


@need_systemctl
def test_units_install(tmp_path):
    exe = str(Path(sys.executable).parent / "uvmbus")
    assert main(["units", "install", "--root", str(tmp_path), "--exec", exe]) == 0
    d = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in d.iterdir()) == sorted(UNITS)
    for name in UNITS:
        text = (d / name).read_text()
        assert "/usr/local/bin/uvmbus" not in text and f"ExecStart={exe} " in text
        p = subprocess.run(["systemd-analyze", "verify", str(d / name)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr

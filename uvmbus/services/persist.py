"""Bindings that come back after a reboot, and installing uvmbus's systemd units.

``uvmbus bind GUID --persist`` writes, under the root:

* ``etc/uvmbus/bind.d/<GUID>.conf`` — the record (``KEY=VALUE`` lines: ``DEVICE``, ``CLASS``,
  ``FORCE``); ``uvmbus-bind@.service`` only starts when it exists
  (``ConditionPathExists=``) and ``uvmbus bind --boot GUID`` reads its options from it;
* ``etc/systemd/system/uvmbus-bind@.service`` — when no unit search directory has it yet,
  with ``ExecStart=`` pointing at the running ``uvmbus``;
* the instance's enablement: exactly the symlink ``systemctl enable
  uvmbus-bind@GUID.service`` creates (``etc/systemd/system/sysinit.target.wants/
  uvmbus-bind@GUID.service`` → the template's path without the root prefix).  On a live
  systemd with root ``/`` it runs ``systemctl enable`` itself (and ``daemon-reload`` after
  installing the unit).

The instance name is the raw GUID (``%i``): ``systemd-escape`` leaves ``-`` alone when
escaping, but ``%I`` *unescapes* and turns each ``-`` into ``/`` — the driverctl trap.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from uvmbus.bus.classes import normalize_guid
from uvmbus.errors import ConfigError, NotFound, UvmbusError

__all__ = [
    "BIND_UNIT",
    "UNITS",
    "PersistResult",
    "check_exec_visible",
    "hidden_from_units",
    "install_units",
    "persist_binding",
    "persisted",
    "read_record",
    "unit_source",
    "unpersist_binding",
    "uvmbus_executable",
]

BIND_UNIT = "uvmbus-bind@.service"
UNITS = ("uvmbus-bind@.service", "uvmbus-net@.service", "uvmbus-blk@.service", "uvmbus-ic.service",
         "uvmbus-nvme@.service")
SHIPPED_EXEC = "/usr/local/bin/uvmbus"
CONF_DIR = Path("etc/uvmbus/bind.d")
UNIT_DIR = Path("etc/systemd/system")
UNIT_SEARCH = ("etc/systemd/system", "run/systemd/system", "usr/local/lib/systemd/system",
               "usr/lib/systemd/system", "lib/systemd/system")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _guid(device_id: str) -> str:
    g = normalize_guid(device_id) or ""
    if not _GUID.match(g):
        raise ConfigError(f"{device_id!r} is not a VMBus instance GUID")
    return g


def uvmbus_executable() -> str:
    """Absolute path of the ``uvmbus`` command running now (for ``ExecStart=``)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and Path(argv0).name == "uvmbus" and os.access(argv0, os.X_OK):
        return os.path.abspath(argv0)
    beside = Path(sys.executable).parent / "uvmbus"          # the venv's console script
    if beside.exists():
        return str(beside)
    found = shutil.which("uvmbus")
    if found:
        return found
    raise NotFound("cannot find the `uvmbus` command to put in ExecStart= "
                   "(install the package, or pass the path)")


def unit_source(name: str) -> Path:
    """The shipped unit file ``name`` (the repository's ``systemd/`` next to the package)."""
    import uvmbus

    here = Path(uvmbus.__file__).resolve().parent.parent / "systemd" / name
    if here.exists():
        return here
    for d in (f"{sys.prefix}/share/uvmbus/systemd", "/usr/share/uvmbus/systemd",
              "/usr/local/share/uvmbus/systemd"):
        p = Path(d) / name
        if p.exists():
            return p
    raise NotFound(f"unit file {name} not found (looked in {here.parent} and /usr/share/uvmbus/systemd)")


def render_unit(name: str, exec_path: str) -> str:
    text = unit_source(name).read_text()
    if SHIPPED_EXEC not in text:
        raise ConfigError(f"{name}: no {SHIPPED_EXEC} in ExecStart= to replace")
    return text.replace(SHIPPED_EXEC, exec_path)


# What the units' sandbox hides from the command it starts: ProtectHome=yes makes these
# inaccessible, PrivateTmp=yes replaces these with an empty private directory (every unit
# has both).
PROTECT_HOME = ("/home", "/root", "/run/user")
PRIVATE_TMP = ("/tmp", "/var/tmp")


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def hidden_from_units(exec_path: str, package_dir: str | None = None) -> list[tuple[str, str]]:
    """What ``ExecStart=exec_path`` needs that the units' ``ProtectHome=``/``PrivateTmp=``
    hide: ``[(path, directive), ...]`` for the command, its resolved path, its interpreter
    (a venv's console script names the venv's python) and ``package_dir`` (where the
    ``uvmbus`` package it imports lives, e.g. an editable install's checkout)."""
    seen: list[str] = []
    for c in (exec_path, os.path.realpath(exec_path)):
        seen.append(c)
        interp = _shebang(c)
        if interp:
            seen += [interp, os.path.realpath(interp)]
    if package_dir:
        seen += [package_dir, os.path.realpath(package_dir)]
    out: list[tuple[str, str]] = []
    for p in dict.fromkeys(os.path.abspath(x) for x in seen):
        for dirs, directive in ((PROTECT_HOME, "ProtectHome=yes"), (PRIVATE_TMP, "PrivateTmp=yes")):
            if any(p == d or p.startswith(d + "/") for d in dirs):
                out.append((p, directive))
    return out


def check_exec_visible(root: Path, exec_path: str, package_dir: str | None, *,
                       force: bool = False,
                       force_hint: str = "--force writes the units anyway") -> str | None:
    """Refuse (``ConfigError``) an ``ExecStart=`` the units' sandbox would hide, when the
    units go to the running system (root ``/``) and not ``force``; otherwise return the
    warning text (None if nothing is hidden)."""
    hidden = hidden_from_units(exec_path, package_dir)
    if not hidden:
        return None
    what = "; ".join(f"{p} ({d} hides it)" for p, d in hidden)
    msg = (f"ExecStart={exec_path} would fail when systemd starts a unit: the units run with "
           f"ProtectHome=yes and PrivateTmp=yes, and {what}. Install uvmbus outside /home, "
           "/root and /tmp (docs/deploy.md: `python3 -m venv /opt/uvmbus`, "
           "`/opt/uvmbus/bin/pip install /path/to/uvmbus`, then "
           "`/opt/uvmbus/bin/uvmbus units install`), or pass --exec PATH")
    if root.resolve() == Path("/") and not force:
        raise ConfigError(f"{msg}; {force_hint} (for a drop-in that relaxes "
                          "ProtectHome=/PrivateTmp=)")
    return msg


def _package_dir() -> str:
    import uvmbus

    return str(Path(uvmbus.__file__).resolve().parent)


def _find_installed(root: Path, name: str) -> Path | None:
    for d in UNIT_SEARCH:
        p = root / d / name
        if p.exists() or p.is_symlink():
            return p
    return None


def _live_systemd(root: Path) -> bool:
    return root.resolve() == Path("/") and Path("/run/systemd/system").is_dir() and bool(shutil.which("systemctl"))


def install_units(root: str | os.PathLike[str] = "/", *, exec_path: str | None = None,
                  names: tuple[str, ...] = UNITS, replace: bool = True, force: bool = False,
                  warn: bool = True) -> list[Path]:
    """Write the units into ``<root>/etc/systemd/system`` with ``ExecStart=`` = ``exec_path``
    (default: this ``uvmbus``).  Returns the files written.

    An ``ExecStart=`` under /home, /root or /tmp (or a venv/package there), which the units'
    ``ProtectHome=``/``PrivateTmp=`` hide, is refused for root ``/`` unless ``force``
    (``ConfigError``), and warned about on stderr for another root."""
    r = Path(root)
    exe = exec_path or uvmbus_executable()
    note = check_exec_visible(r, exe, None if exec_path else _package_dir(), force=force)
    if note and warn:
        print(f"uvmbus: warning: {note}", file=sys.stderr)
    out = []
    d = r / UNIT_DIR
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        dst = d / name
        if dst.exists() and not replace:
            continue
        text = render_unit(name, exe)
        tmp = dst.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
        out.append(dst)
    if out and _live_systemd(r):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return out


@dataclass
class PersistResult:
    device_id: str
    record: Path
    unit: Path
    wants: Path
    created: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    systemctl: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"device_id": self.device_id, "record": str(self.record), "unit": str(self.unit),
                "wants": str(self.wants), "created": [str(p) for p in self.created],
                "removed": [str(p) for p in self.removed], "systemctl": self.systemctl}


def _wanted_by(unit_text: str) -> list[str]:
    out: list[str] = []
    section = ""
    for line in unit_text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s
        elif section == "[Install]" and s.startswith("WantedBy="):
            out += s.split("=", 1)[1].split()
    return out or ["sysinit.target"]


def _record_path(root: Path, guid: str) -> Path:
    return root / CONF_DIR / f"{guid}.conf"


def _instance(guid: str) -> str:
    return BIND_UNIT.replace("@.", f"@{guid}.")


def read_record(root: str | os.PathLike[str], device_id: str) -> dict[str, str] | None:
    """The persisted record of ``device_id`` (``KEY: value``), or None."""
    p = _record_path(Path(root), _guid(device_id))
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    rec: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        rec[k.strip()] = v.strip()
    return rec


def persisted(root: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Every persisted binding under ``root`` (records plus ``ENABLED``: wants link present)."""
    r = Path(root)
    out = []
    try:
        files = sorted((r / CONF_DIR).glob("*.conf"))
    except OSError:
        return []
    for f in files:
        rec = read_record(r, f.stem) if _GUID.match(f.stem) else None
        if rec is None:
            continue
        unit = _find_installed(r, BIND_UNIT)
        targets = _wanted_by(unit.read_text()) if unit is not None and unit.exists() else ["sysinit.target"]
        rec["ENABLED"] = "1" if any((r / UNIT_DIR / f"{t}.wants" / _instance(f.stem)).is_symlink()
                                    for t in targets) else "0"
        out.append(rec)
    return out


def persist_binding(root: str | os.PathLike[str], device_id: str, *, class_name: str = "",
                    force: bool = False, exec_path: str | None = None) -> PersistResult:
    """Make the uio binding of ``device_id`` come back at boot (see the module docstring)."""
    r = Path(root)
    guid = _guid(device_id)
    if _find_installed(r, BIND_UNIT) is None:       # refuse before writing anything
        check_exec_visible(r, exec_path or uvmbus_executable(),
                           None if exec_path else _package_dir(),
                           force_hint="`uvmbus units install --force` writes the units anyway")
    created: list[Path] = []
    rec = _record_path(r, guid)
    rec.parent.mkdir(parents=True, exist_ok=True)
    tmp = rec.with_name(f".{rec.name}.tmp")
    tmp.write_text(
        f"# written by `uvmbus bind {guid} --persist` at {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        f"# removed by `uvmbus unbind {guid} --persist`; read by uvmbus-bind@{guid}.service\n"
        f"DEVICE={guid}\nCLASS={class_name}\nFORCE={1 if force else 0}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, rec)
    created.append(rec)

    unit = _find_installed(r, BIND_UNIT)
    if unit is None:
        created += install_units(r, exec_path=exec_path, names=(BIND_UNIT,))
        unit = r / UNIT_DIR / BIND_UNIT
    inst = _instance(guid)
    live = _live_systemd(r)
    wants = r / UNIT_DIR / f"{_wanted_by(unit.read_text())[0]}.wants" / inst
    if live:
        proc = subprocess.run(["systemctl", "enable", inst], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UvmbusError(f"systemctl enable {inst} failed: {proc.stderr.strip()}")
    else:
        target = "/" + str(unit.relative_to(r))      # as systemctl writes it (no root prefix)
        for t in _wanted_by(unit.read_text()):
            link = r / UNIT_DIR / f"{t}.wants" / inst
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if os.readlink(link) == target:
                    continue
                link.unlink()
            os.symlink(target, link)
            created.append(link)
    return PersistResult(guid, rec, unit, wants, created=created, systemctl=live)


def unpersist_binding(root: str | os.PathLike[str], device_id: str) -> PersistResult:
    """Undo :func:`persist_binding` (record and enablement; the unit file stays)."""
    r = Path(root)
    guid = _guid(device_id)
    removed: list[Path] = []
    rec = _record_path(r, guid)
    unit = _find_installed(r, BIND_UNIT) or (r / UNIT_DIR / BIND_UNIT)
    inst = _instance(guid)
    live = _live_systemd(r)
    targets = _wanted_by(unit.read_text()) if unit.exists() else ["sysinit.target"]
    if live:
        subprocess.run(["systemctl", "disable", inst], capture_output=True, text=True, check=False)
    for t in targets:
        link = r / UNIT_DIR / f"{t}.wants" / inst
        if link.is_symlink() or link.exists():
            link.unlink()
            removed.append(link)
            try:
                link.parent.rmdir()          # as systemctl disable: drop an empty .wants
            except OSError:
                pass
    if rec.exists():
        rec.unlink()
        removed.append(rec)
    return PersistResult(guid, rec, unit, r / UNIT_DIR / f"{targets[0]}.wants" / inst,
                         removed=removed, systemctl=live)

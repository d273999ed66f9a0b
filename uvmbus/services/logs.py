"""Logging set-up for the CLI and the daemons: plain text, journald-friendly, or JSON lines.

* ``text`` — ``LEVEL logger: message``; with a timestamp on a terminal, and without one but
  with sd-daemon priority prefixes (``<3>`` …) when stderr is the journal (``$JOURNAL_STREAM``
  names it), so journald stores the right priority and its own timestamp.
* ``json`` — one object per line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``,
  ``pid``, plus every ``extra=`` field passed to the log call (``device``, ``queue``, …) and
  ``exc`` with the traceback when there is one.  For log shippers.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from typing import Any, TextIO

from uvmbus.errors import ConfigError

__all__ = ["JsonFormatter", "JournalFormatter", "setup_logging"]

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        obj: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                obj[k] = v
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class JournalFormatter(logging.Formatter):
    """``<prio>logger: message`` for stderr connected to journald."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def _on_journal(stream: TextIO) -> bool:
    js = os.environ.get("JOURNAL_STREAM", "")
    if not js or ":" not in js:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = js.partition(":")
    return f"{st.st_dev}" == dev and f"{st.st_ino}" == ino


def setup_logging(fmt: str = "text", level: str | int = "info", stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once (replacing handlers this function installed before)."""
    stream = sys.stderr if stream is None else stream
    if isinstance(level, str):
        lv = logging.getLevelName(level.upper())
        if not isinstance(lv, int):
            raise ConfigError(f"unknown log level {level!r} (debug, info, warning, error)")
        level = lv
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        if _on_journal(stream):
            handler.setFormatter(JournalFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        raise ConfigError(f"unknown log format {fmt!r} (text or json)")
    handler._uvmbus = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_uvmbus", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler

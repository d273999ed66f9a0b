"""`uvmbus trace diff`: two sessions' message sequences, ignoring what must differ.

Each packet becomes one line of what it says: recording side, direction, device class and
sub-channel index, VMBus packet type, protocol message and its fields.  Left out: timestamps,
relids (each host numbers channels its own way), VMBus transaction ids, RNDIS request ids,
GPADL handles, and reserved fields.  Events are left out unless asked for.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uvmbus.trace.decode import Message

IGNORED = ("trans_id", "req_id", "gpadl", "reserved", "dev_vc_handle", "rsvd")


def _keep(name: str) -> bool:
    return not any(part in name for part in IGNORED)


def key(m: Message, *, side: bool = True) -> str:
    """The comparable text of one message (``side``: with who recorded it)."""
    if m.kind == "event":
        return f"{m.side} {m.devclass}/{m.subchan} {m.name} {m.fields.get('text', '')}".rstrip()
    flds = " ".join(f"{k}={v}" for k, v in m.fields.items() if _keep(k))
    inner = " | ".join(
        r["name"] + "".join(f" {k}={v}" for k, v in r.get("fields", {}).items() if _keep(k)) for r in m.inner)
    flags = m.vmbus.get("flags", 0)
    who = f"{m.side} " if side else ""
    return (f"{who}{m.dir} {m.devclass}/{m.subchan} {m.vmbus.get('type_name', '?')}"
            f"{'+c' if flags & 1 else ''} {m.name} {flds}" + (f" | {inner}" if inner else "")).rstrip()


def _range(start: int, end: int) -> str:
    """Unified-diff range of messages [start, end) (0-based): ``first,count``, 1-based; an
    empty range names the message it follows (``4,0``: after message 4)."""
    n = end - start
    return f"{start + 1 if n else start},{n}"


def hunk_header(tag: str, i1: int, i2: int, j1: int, j2: int) -> str:
    """``@@ -5,2 +5,3 @@ replace``: the unified-diff hunk header (message numbers) + what."""
    return f"@@ -{_range(i1, i2)} +{_range(j1, j2)} @@ {tag}"


@dataclass
class DiffResult:
    left: list[str]
    right: list[str]
    hunks: list[tuple[str, int, int, int, int]]     # (tag, i1, i2, j1, j2) from difflib

    @property
    def same(self) -> bool:
        return not self.hunks

    def to_dict(self) -> dict[str, Any]:
        return {"same": self.same, "left_messages": len(self.left), "right_messages": len(self.right),
                "differences": [{"op": t, "left_start": i1, "left": self.left[i1:i2], "right_start": j1,
                                 "right": self.right[j1:j2]} for t, i1, i2, j1, j2 in self.hunks]}

    def lines(self, width: int = 100) -> list[str]:
        if self.same:
            return [f"no differences ({len(self.left)} messages)"]
        out = []
        w = max(20, width // 2 - 3)
        for tag, i1, i2, j1, j2 in self.hunks:
            out.append(hunk_header(tag, i1, i2, j1, j2))
            a, b = self.left[i1:i2], self.right[j1:j2]
            if any(len(x) > w for x in a + b):       # too wide for two columns: one per line
                out += [f"- {x}" for x in a] + [f"+ {x}" for x in b]
                continue
            for k in range(max(len(a), len(b))):
                la = a[k] if k < len(a) else ""
                lb = b[k] if k < len(b) else ""
                out.append(f"{la[:w]:<{w}} | {lb[:w]}")
        out.append(f"{len(self.hunks)} difference(s); {len(self.left)} vs {len(self.right)} messages")
        return out


def diff(a: Sequence[Message], b: Sequence[Message], *, events: bool = False, side: str | None = None) -> DiffResult:
    def sel(ms: Sequence[Message]) -> list[str]:
        return [key(m) for m in ms if (events or m.kind == "packet") and (side is None or m.side == side)]

    left, right = sel(a), sel(b)
    sm = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    hunks: list[tuple[str, int, int, int, int]] = [
        (str(t), i1, i2, j1, j2) for t, i1, i2, j1, j2 in sm.get_opcodes() if t != "equal"]
    return DiffResult(left, right, hunks)

"""Private Unix-domain listening sockets: mode 0600 from the moment they exist."""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["listen_private"]


def listen_private(path: str | os.PathLike[str], kind: int = socket.SOCK_STREAM, *,
                   backlog: int = 16, blocking: bool = False) -> socket.socket:
    """Bind and listen on ``path`` (replacing a stale socket file), owner-only.

    The umask is narrowed around ``bind`` so the socket is never briefly reachable by
    other users; the chmod afterwards documents the intent (and covers odd umask rules)."""
    p = Path(path)
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(str(p))
    except BaseException:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(p, 0o600)
    s.listen(backlog)
    s.setblocking(blocking)
    return s

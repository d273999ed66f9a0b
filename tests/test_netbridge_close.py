"""`uvmbus net bridge` shutting down on an error: the workers stop before the TAP (and the
NIC) they use are closed.  Before, an exception out of the main loop (a reattach that hit a
device being rescinded) closed the TAP under the running tx worker, which then read a closed
fd number (EBADF) or, had the number been reused meanwhile, another file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from uvmbus.services.daemon import Daemon
from uvmbus.services.netbridge import BridgeOptions, NetBridge
from uvmbus.services.sdnotify import Notifier


class _PipeTap:
    """Stands in for the TAP: the tx worker polls and reads the read end of a pipe."""

    def __init__(self, worker_alive: list[bool], thread: list[threading.Thread]):
        self.fd, self.peer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._alive = worker_alive
        self._thread = thread

    def close(self) -> None:
        self._alive.append(self._thread[0].is_alive())
        os.close(self.fd)
        os.close(self.peer)
        self.fd = -1


def test_close_stops_the_workers_before_closing_the_tap(tmp_path: Path) -> None:
    daemon = Daemon("net", root=tmp_path, run_dir=str(tmp_path / "run"), notifier=Notifier(None))
    bridge = NetBridge(BridgeOptions(device="d", tap="t", root=str(tmp_path)), daemon)
    alive_at_close: list[bool] = []
    thread: list[threading.Thread] = []
    tap = _PipeTap(alive_at_close, thread)
    bridge.tap = tap                                  # type: ignore[assignment]
    thread.append(daemon.spawn("tx", bridge._tx_loop))
    os.write(tap.peer, b"frame")                      # the worker is busy with the TAP: no NIC,
    deadline = time.monotonic() + 60                  # so the frame is counted as dropped
    while bridge.stats["tx"].lost_drops < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge.stats["tx"].lost_drops == 1
    bridge.close()                                    # no stop() first: an error path
    assert alive_at_close == [False], "the TAP was closed under the running tx worker"
    thread[0].join(10)
    assert not thread[0].is_alive()
    assert not daemon.failed, "a worker failed"

"""storvsc when the host breaks the channel under requests in flight (issue 12.4)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from simhelpers import run_sim
from test_storvsc_driver import make_image

from uvmbus import storvsc
from uvmbus.errors import RingCorrupt, StorageError

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def test_corrupt_tx_index_under_a_request_in_flight_is_ring_corrupt_at_once(tmp_path: Path) -> None:
    """The host drops a completion (the request stays in flight), then makes the guest TX
    read_index invalid and stops serving.  The driver must fail with RingCorrupt naming the
    index at the interrupt that follows, not after its 30 s request timeout."""
    img = make_image(tmp_path / "a.img", 4 * MiB)
    with run_sim(tmp_path, "--disk", str(img), "--bind", "--no-ic", "--echo", "0") as sim, \
            storvsc.open("storvsc", sim.root, subchannels=0, timeout=30.0) as hba:
        disk = hba.disk(0)
        disk.read(0, 4096)
        sim.fault("drop_completions", 1, device="storvsc")

        def corrupt_later() -> None:
            time.sleep(0.5)
            sim.fault("corrupt_index", "tx", device="storvsc")

        t = threading.Thread(target=corrupt_later)
        t.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(RingCorrupt, match="read_index"):
                disk.read(0, 4096)
        finally:
            t.join()
        assert time.monotonic() - t0 < 10.0        # the request timeout is 30 s
        with pytest.raises(StorageError, match="failed earlier"):
            disk.read(0, 4096)

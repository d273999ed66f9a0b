"""The simulated tree against the kernel's sources (issue 9.5): drivers/hv/vmbus_drv.c,
drivers/uio/uio.c, drivers/uio/uio_hv_generic.c.  Each test names the source it checks."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from simhelpers import SimProcess, run_sim

from uvmbus.bus import Bus

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    with run_sim(tmp_path_factory.mktemp("fidelity"), "--kernel", "6.16", "--no-ic", "--echo", "1",
                 "--nic", "1") as s:
        for d in s.devices:
            s.bind(d["device_id"])
        yield s


def test_map_addresses_are_64_bit_kernel_addresses(sim: SimProcess) -> None:
    """uio.c map_addr_show prints ``%pa``: 0x + 16 hex digits.  uio_hv_generic publishes the
    vzalloc() address of the NIC buffers (x86-64 vmalloc area) as maps 3/4's addr."""
    nic = Bus(sim.root).device(sim.device("netvsc")["device_id"])
    upath = nic.uio_sysfs_path
    assert upath is not None
    for k in range(5):
        text = (upath / "maps" / f"map{k}" / "addr").read_text()
        assert re.fullmatch(r"0x[0-9a-f]{16}\n", text), (k, text)
        if k >= 3:
            assert int(text, 16) >> 40 == 0xFFFFC9, text      # vmalloc area

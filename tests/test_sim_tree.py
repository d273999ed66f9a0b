"""The simulated sysfs/dev tree, binding files, CLI, several simulators, guest RAM (GPA-direct)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simhelpers import run_sim

from uvmbus.bus import Bus
from uvmbus.channel import open_device
from uvmbus.errors import ConfigError, SimulatorError
from uvmbus.ring import PKT_COMP
from uvmbus.sim.kernel import KernelMode
from uvmbus.sim.models import model_for_option
from uvmbus.sim.models.echo import ECHO_CLASS_ID, STATUS_ACCESS_VIOLATION
from uvmbus.sim.simulator import prepare_root

pytestmark = pytest.mark.timeout(90)


def write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def wait_until(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_tree_layout_is_the_kernels() -> None:
    with run_sim("", "--kernel", "6.10", "--page-size", "65536", "--echo", "2") as sim:
        r = sim.root
        assert (r / "proc/sys/kernel/osrelease").read_text() == "6.10.0-uvmbus-sim\n"
        vm = r / "sys/bus/vmbus"
        for drv in ("uio_hv_generic", "hv_netvsc", "hv_storvsc", "hv_utils"):
            for f in ("new_id", "bind", "unbind"):
                assert (vm / "drivers" / drv / f).is_file()
        e = sim.device("echo")
        d = vm / "devices" / e["device_id"]
        assert (d / "class_id").read_text() == f"{{{ECHO_CLASS_ID}}}\n"
        assert (d / "device_id").read_text() == f"{{{e['device_id']}}}\n"
        assert int((d / "id").read_text()) == e["relid"]
        assert (d / "monitor_id").is_file() and not (d / "driver").exists()
        assert (d / "channels" / str(e["relid"]) / "subchannel_id").read_text() == "0\n"
        assert not (d / "channels" / str(e["relid"]) / "ring").exists()   # not bound, not open
        ic = sim.device("heartbeat")
        ic_dir = vm / "devices" / ic["device_id"]
        assert os.readlink(ic_dir / "driver") == "../../../../../../bus/vmbus/drivers/hv_utils"
        assert not (ic_dir / "monitor_id").exists()                # ICs are not monitored
        # new_id binds every unbound device of the class at once
        write(vm / "drivers/uio_hv_generic/new_id", ECHO_CLASS_ID)
        bus = Bus(r)
        echoes = [bus.device(x["device_id"]) for x in sim.devices if x["model"] == "echo"]
        wait_until(lambda: all(x.driver == "uio_hv_generic" for x in echoes), "new_id did not bind")
        uios = sorted(x.uio for x in echoes)
        assert uios == ["uio0", "uio1"]
        for x in echoes:
            assert (r / "dev" / x.uio).is_socket()
            assert (r / "sys/class/uio" / x.uio / "name").read_text() == "uio_hv_generic\n"
            names = [m.name for m in x.maps()]
            assert names[:3] == ["txrx_rings", "int_page", "monitor_page"]
            assert names[3].startswith("recv:") and names[4].startswith("send:")   # before 6.14
        gpadls = sorted(m.gpadl for x in echoes for m in x.maps() if m.gpadl is not None)
        assert len(set(gpadls)) == 4 and min(gpadls) > 0xE1E10   # ICs' rings used handles first
        # unbind, override, drivers_probe
        one = echoes[0]
        write(vm / "drivers/uio_hv_generic/unbind", one.name)
        wait_until(lambda: one.driver is None and one.uio is None, "unbind")
        write(one.path / "driver_override", "hv_netvsc")
        write(vm / "drivers/uio_hv_generic/bind", one.name)      # override says no: ENODEV
        write(vm / "drivers_probe", one.name)
        time.sleep(0.2)
        assert one.driver is None
        write(one.path / "driver_override", "uio_hv_generic\n")
        write(vm / "drivers_probe", one.name)
        wait_until(lambda: one.driver == "uio_hv_generic", "drivers_probe with override")
        assert sim.stats()["counters"]["sysfs_errors"] >= 1


def test_unmonitored_69_refuses_uio_probe() -> None:
    with run_sim("", "--kernel", "6.9", "--unmonitored") as sim:
        e = sim.device("echo")
        vm = sim.root / "sys/bus/vmbus"
        write(vm / "drivers/uio_hv_generic/new_id", ECHO_CLASS_ID)
        write(vm / "drivers/uio_hv_generic/bind", e["device_id"])
        time.sleep(0.3)
        assert Bus(sim.root).device(e["device_id"]).driver is None
        assert "requires hypercall" in sim.stderr


def test_kernel_mode_table() -> None:
    k = KernelMode.parse("6.16", 65536)
    assert k.primary_ring_bytes(ECHO_CLASS_ID) == 0x30000
    assert k.primary_ring_bytes("f8615163-df3e-46c5-913f-f2d2f965ed0e") == 2 * 1024 * 1024 + 65536
    assert k.subchannel_ring_bytes() == 2 * 1024 * 1024 and k.int_map_size == 4096
    assert KernelMode.parse("6.10").primary_ring_bytes("34d14be3-dee4-41c8-9ae7-6b174977c192") == 0x4000
    assert KernelMode.parse("6.9", 65536).ring_file_bytes(123) == 2 * 512 * 65536
    assert not KernelMode.parse("6.14").has_buffer_maps(ECHO_CLASS_ID)
    with pytest.raises(ConfigError):
        KernelMode.parse("six")


def test_several_simulators_and_cleanup(tmp_path: Path) -> None:
    with run_sim("", "--kernel", "6.18") as a, run_sim("", "--kernel", "6.9") as b:
        assert a.root != b.root
        for s in (a, b):
            e = s.device("echo")["device_id"]
            s.bind(e)
            with open_device(e, s.root) as cd:
                assert cd.primary.request(b"hi", timeout=10).type == PKT_COMP
        with pytest.raises(SimulatorError, match="in use"):
            prepare_root(a.root)
        roots = (a.root, b.root)
    assert not any(r.exists() for r in roots)


def test_refuses_a_foreign_root(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_root(tmp_path)
    with pytest.raises(ConfigError):
        prepare_root("/")


def test_ctl_cli_and_list() -> None:
    with run_sim("", "--kernel", "6.18") as sim:
        env = dict(os.environ, UVMBUS_ROOT=str(sim.root))
        out = subprocess.run([sys.executable, "-m", "uvmbus", "sim", "ctl", "stats", "--json"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)["stats"]
        assert stats["kernel"] == "6.18" and stats["totals"]["needless_signals"] == 0
        e = sim.device("echo")["device_id"]
        out = subprocess.run([sys.executable, "-m", "uvmbus", "sim", "ctl", "fault", "stall", "0.1",
                              "--device", e], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([sys.executable, "-m", "uvmbus", "list", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            listed = {d["device_id"]: d for d in json.loads(out.stdout)}
            assert listed[e]["class_id"] == ECHO_CLASS_ID and listed[e]["driver"] is None


def test_missing_model_option_is_a_clear_error() -> None:
    with pytest.raises(SimulatorError, match="not available yet"):
        model_for_option("frobnicator")


def test_guest_ram_gpa_direct() -> None:
    """Guest buffers from simulated guest RAM; the host reads and writes them by PFN and
    fails a PFN outside guest RAM like a real host."""
    from uvmbus.dma import SimGuestMemory

    with run_sim("", "--kernel", "6.18", "--guest-ram", "16M") as sim:
        e = sim.device("echo")["device_id"]
        sim.bind(e)
        mem = SimGuestMemory(sim.root)
        region = mem.alloc_region(2 * 1024 * 1024, name="test")
        try:
            with open_device(e, sim.root) as cd:
                ch = cd.primary
                region.view[100:100 + 5000] = bytes(range(256)) * 19 + bytes(136)
                pfns = region.pfns(0, 3)
                r = ch.request(b"read", gpa=[(5000, 100, pfns[:2])], timeout=10)
                status, length = int.from_bytes(r.payload[:4], "little"), int.from_bytes(r.payload[4:8], "little")
                assert status == 0 and length == 5000
                want = region.view[100:5100].tobytes()
                assert bytes(r.payload[8:8 + 5000]) == want
                r = ch.request(b"Wab", gpa=[(10, 4090, pfns[1:3])], timeout=10)
                assert int.from_bytes(r.payload[:4], "little") == 0
                written = region.view[4096 + 4090:4096 + 4100].tobytes()
                assert written == b"ababababab"
                bad = ch.request(b"read", gpa=[(16, 0, [1])], timeout=10)
                assert int.from_bytes(bad.payload[:4], "little") == STATUS_ACCESS_VIOLATION
                assert ch.request(b"still fine", timeout=10).type == PKT_COMP
        finally:
            gc.collect()          # drop temporary views of the region before unmapping it
            region.close()
            mem.close()


PLUGIN = '''
from uvmbus.ring import FLAG_COMPLETION_REQUESTED, Packet
from uvmbus.sim import DeviceModel, HostChannel, register_model


@register_model
class Upcase(DeviceModel):
    name = "upcase"
    class_id = "5d2ba4a5-0000-4000-8000-000000000001"

    def open(self, channel: HostChannel) -> None:
        self.count = 0

    def packet(self, channel: HostChannel, pkt: Packet) -> None:
        self.count += 1
        channel.send(bytes(pkt.payload).upper(), trans_id=pkt.trans_id)
        if pkt.flags & FLAG_COMPLETION_REQUESTED:
            channel.complete(pkt.trans_id, self.count.to_bytes(4, "little"))
'''


def test_user_model_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' example: a model in the user's own module, loaded with --load-model."""
    (tmp_path / "upcase_model.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with run_sim("", "--load-model", "upcase_model", "--device", "upcase", "--bind", "--no-ic") as sim:
        dev = sim.device("upcase")
        bus = Bus(sim.root)
        wait_until(lambda: bus.device(dev["device_id"]).uio is not None, "--bind did not bind")
        with open_device(dev["device_id"], sim.root) as cd:
            r = cd.primary.request(b"hello host", timeout=10)
            assert r.type == PKT_COMP and int.from_bytes(r.payload[:4], "little") == 1
            (echo,) = cd.primary.poll()
            assert bytes(echo.payload[:10]) == b"HELLO HOST"

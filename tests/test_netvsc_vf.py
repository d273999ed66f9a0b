"""The accelerated-networking VF (issue 14 item 3): VF association announced by the simulated
host after bring-up and exposed by the driver, `uvmbus sim ctl vf` add/remove, SWITCH_DATA_PATH
both ways, the VF withdrawn while the data path is on it, the VF flapping while traffic runs
both ways (every frame accounted on the synthetic path, zero host protocol errors, zero needless
signals), and clear errors where there is no VF protocol or no VF."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from pci_fixtures import PciTree
from simhelpers import SimProcess, run_sim
from test_netvsc_driver import assert_no_needless, drain, udp_frame

import uvmbus.netvsc as nv
from uvmbus.errors import NetError
from uvmbus.netvsc import protocol as P

pytestmark = pytest.mark.timeout(240)

SERIAL = 4711


@pytest.fixture(scope="module")
def vsim(tmp_path_factory) -> Any:
    """NICs: 0 VF present from the start (serial 4711), 1 no VF yet, 2 NVSP 2 only with a VF,
    3 NVSP 4 only with a VF, 4 VF steering "all" (OpenHCL-like), 5 a host that withdraws the
    VF with the association only (no SWITCH_DATA_PATH first)."""
    args = ["--echo", "0", "--no-ic",
            "--device", f"netvsc:backend=loopback,vf=1,vf_serial={SERIAL}",
            "--device", "netvsc:backend=loopback",
            "--device", "netvsc:backend=loopback,vf=1,versions=2",
            "--device", "netvsc:backend=loopback,vf=1,versions=4",
            "--device", "netvsc:backend=loopback,vf=1,vf_steer=all",
            "--device", "netvsc:backend=loopback,vf=1,vf_remove=association_only"]
    with run_sim(tmp_path_factory.mktemp("nvvf"), *args) as sim:
        for d in sim.devices:
            sim.bind(d["device_id"])
        yield sim


def dev(sim: SimProcess, index: int) -> str:
    return str(sim.device("netvsc", index)["device_id"])


def model_vf(sim: SimProcess, device: str) -> dict[str, Any]:
    return dict(sim.device_stats(device)["netvsp"])


def vf_ctl(sim: SimProcess, device: str, action: str, **extra: Any) -> dict[str, Any]:
    return sim.control("model", device=device, op="vf", args={"action": action, **extra})


def bcast_frame(i: int, size: int) -> bytes:
    return b"\xff" * 6 + udp_frame(i, size)[6:]


@pytest.fixture(scope="module")
def vf_pci(vsim) -> tuple[str, str]:
    """(PCI address, vPCI GUID) of device 0's VF, which the simulator lays out as pci-hyperv
    does once the VF was announced (a guest session with SR-IOV must have run)."""
    with nv.open(dev(vsim, 0), vsim.root) as nic:
        assert nic.wait_vf(True, 10)
    vf = model_vf(vsim, dev(vsim, 0))["vf"]
    assert vf["pci"] and vf["vpci"]
    return vf["pci"], vf["vpci"]


def cli(sim: SimProcess, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvmbus", *words], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})


# ==== association ================================================================================
def test_association_after_bring_up_is_exposed_with_its_pci_function(vsim, vf_pci):
    d = dev(vsim, 0)
    bdf, vpci = vf_pci
    seen: list[nv.VfInfo] = []
    with nv.open(d, vsim.root) as nic:
        nic.on_vf_change(seen.append)
        assert nic.wait_vf(True, 10)
        vf = nic.vf
        assert vf.supported and vf.allocated and vf.serial == SERIAL
        assert vf.data_path == "synthetic"              # the driver never switches by itself
        assert vf.pci == [bdf] and vf.mac == nic.mac
        fns = nic.vf_functions()
        assert [f.vmbus_parent for f in fns] == [vpci] and fns[0].slot == str(SERIAL)
        assert fns[0].net_interfaces() == [f"simvf{SERIAL}"]
        info = nic.info().to_dict()["vf"]
        assert info["serial"] == SERIAL and info["pci"] == [bdf]
        m = model_vf(vsim, d)
        assert m["vf"]["advertised"] and m["vf"]["guest_sriov"] and m["vf"]["data_path"] == "synthetic"
        # traffic flows on the synthetic path
        frames = [udp_frame(i, 200) for i in range(50)]
        assert nic.tx_burst(frames, timeout=5) == 50
        assert sorted(drain(nic, 50)[0]) == sorted(frames)
    assert m["fatal_errors"] == 0
    assert_no_needless(vsim)


def test_net_info_and_list_show_the_vf(vsim, vf_pci):
    d = dev(vsim, 0)
    bdf, vpci = vf_pci
    out = cli(vsim, "net", "info", d, "--root", str(vsim.root), "--json")
    assert out.returncode == 0, out.stderr
    vf = json.loads(out.stdout)["vf"]
    assert vf["allocated"] and vf["serial"] == SERIAL and vf["pci"] == [bdf]
    assert vf["data_path"] == "synthetic"
    out = cli(vsim, "net", "info", d, "--root", str(vsim.root))
    assert out.returncode == 0, out.stderr
    assert f"VF: serial {SERIAL}, PCI {bdf}; data path synthetic" in out.stdout
    out = cli(vsim, "list", "--pci", "--root", str(vsim.root), "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r.get("address") == bdf]
    assert rows and rows[0]["slot"] == str(SERIAL) and rows[0]["vmbus_parent"] == vpci
    out = cli(vsim, "net", "info", dev(vsim, 2), "--root", str(vsim.root))
    assert out.returncode == 0 and "VF: none (SR-IOV not advertised" in out.stdout


def test_vf_added_and_removed_after_bring_up(vsim):
    d = dev(vsim, 1)
    with nv.open(d, vsim.root) as nic:
        seen: list[tuple[bool, int | None]] = []
        nic.on_vf_change(lambda v: seen.append((v.allocated, v.serial)))
        assert not nic.vf.allocated and nic.vf.serial is None and nic.vf.pci == []
        vf_ctl(vsim, d, "add", serial=99)
        assert nic.wait_vf(True, 10)
        bdf = model_vf(vsim, d)["vf"]["pci"]
        assert nic.vf.serial == 99 and nic.vf.pci == [bdf]
        vf_ctl(vsim, d, "remove")
        assert nic.wait_vf(False, 10)
        assert nic.vf.pci == [] and not (vsim.root / "sys/bus/pci/devices" / bdf).exists()
        assert not (vsim.root / "sys/bus/pci/slots/99").exists()
        assert seen == [(True, 99), (False, None)]
        assert nic.stats()["events"]["vf_associations"] == 2
    assert model_vf(vsim, d)["fatal_errors"] == 0


def test_sim_ctl_vf_round_trip(vsim):
    d = dev(vsim, 1)

    def ctl(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "uvmbus", "sim", "ctl", "--root", str(vsim.root),
                               "--json", *words], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})

    with nv.open(d, vsim.root) as nic:
        out = ctl("vf", d, "add", "1234")
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)["results"][d]["vf"]
        assert res["present"] and res["advertised"] and res["serial"] == 1234
        assert nic.wait_vf(True, 10) and nic.vf.serial == 1234
        out = ctl("vf", d, "remove")
        assert out.returncode == 0, out.stderr
        assert not json.loads(out.stdout)["results"][d]["vf"]["present"]
        assert nic.wait_vf(False, 10)
        bad = ctl("vf", d, "sideways")
        assert bad.returncode != 0 and "vf needs DEVICE add [SERIAL] or DEVICE remove" in bad.stderr


def test_pci_lookup_by_slot_and_mac_fallback(tmp_path):
    """The serial -> PCI function rules on a pci-hyperv-like tree: the slot named after the
    serial (pci-hyperv.c hv_pci_assign_slots, netvsc_drv.c get_netvsc_byslot), else a
    network interface carrying the NIC's MAC."""
    from uvmbus.vfio.pci import PciBus

    tree = PciTree(tmp_path)
    tree.add_function("7870:00:02.0", vendor=0x15B3, device=0x1016, cls=0x020000, group=None,
                      vmbus_parent="5f2c7870-1111-4222-8333-444455556666")
    tree.add_function("0001:00:00.0", vendor=0x1414, device=0x00BA, cls=0x020000, group=None)
    slot = tree.pci / "slots" / "17"
    slot.mkdir(parents=True)
    (slot / "address").write_text("7870:00:02\n")
    net = tree.paths["0001:00:00.0"] / "net" / "eth9"
    net.mkdir(parents=True)
    (net / "address").write_text("00:15:5d:aa:bb:cc\n")
    bus = PciBus(tmp_path)
    assert [f.name for f in bus.by_slot("17")] == ["7870:00:02.0"]
    assert bus.function("7870:00:02.0").slot == "17" and bus.function("0001:00:00.0").slot is None
    assert bus.by_slot("18") == []
    assert [f.name for f in bus.by_mac(bytes.fromhex("00155daabbcc"))] == ["0001:00:00.0"]
    assert bus.by_mac(bytes.fromhex("00155daabbcd")) == []


# ==== flapping under traffic =====================================================================
@pytest.mark.parametrize("queues", [1, 2])
def test_vf_flapping_while_traffic_runs_loses_nothing(vsim, queues):
    d = dev(vsim, 1)
    flaps = 15
    with nv.open(d, vsim.root, queues=queues) as nic:
        before = model_vf(vsim, d)
        stop = threading.Event()
        errors: list[BaseException] = []
        batches = [0]                             # bursts sent so far (main thread)

        def after_traffic(n: int) -> None:
            """Wait until the main thread has sent ``n`` more bursts: every flap happens
            between bursts, whatever the scheduling on a loaded machine."""
            want = batches[0] + n
            for _ in range(60000):
                if batches[0] >= want:
                    return
                time.sleep(0.0005)
            raise AssertionError("traffic stalled")

        def flapper() -> None:
            try:
                for _ in range(flaps):
                    after_traffic(2)
                    vf_ctl(vsim, d, "add")
                    after_traffic(2)
                    vf_ctl(vsim, d, "remove")
            except BaseException as exc:          # reported by the main thread
                errors.append(exc)
            finally:
                stop.set()

        t = threading.Thread(target=flapper)
        t.start()
        sent: list[bytes] = []
        got: list[bytes] = []
        i = 0
        # keep sending and receiving until the flapping is over, then a last round
        while not stop.is_set() or i < 400:
            batch = [udp_frame(i + k, 60 + (i + k) % 1400, flow=(i + k) % 7) for k in range(32)]
            q = (i // 32) % queues
            n = nic.tx_burst(batch, queue=q, timeout=5)
            assert n == len(batch)
            sent += batch
            i += len(batch)
            batches[0] += 1
            for rq in range(queues):
                got += nic.rx_burst(rq, 256).frames()
        t.join()
        assert not errors, errors
        more = drain(nic, len(sent) - len(got), timeout=30)
        for fl in more.values():
            got += fl
        assert len(got) == len(sent) and sorted(got) == sorted(sent)
        assert nic.wait_vf(False, 10)
        nic.poll_events()
        ev = nic.stats()["events"]
        assert ev["vf_associations"] == 2 * flaps
        assert ev["unknown_messages"] == 0
        s = nic.stats()["total"]
        assert s["drops"] == 0 and s["host_errors"] == 0
        assert nic.vf.data_path == "synthetic"
        after = model_vf(vsim, d)
        assert sum(q["rx_to_vf"] for q in after["queues"].values()) == 0
    assert after["vf_associations"] - before["vf_associations"] == 2 * flaps
    assert after["vf_switches"] == before["vf_switches"]      # the driver stayed synthetic, silent
    assert after["fatal_errors"] == 0 and after["rndis_failed"] == before["rndis_failed"]
    assert_no_needless(vsim)


# ==== switching the data path ====================================================================
def test_switch_to_vf_and_back_then_vf_withdrawn(vsim):
    d = dev(vsim, 0)
    with nv.open(d, vsim.root) as nic:
        assert nic.wait_vf(True, 10)
        assert nic.switch_data_path("vf").data_path == "vf"
        assert model_vf(vsim, d)["vf"]["data_path"] == "vf"
        # Hyper-V: unicast now goes to the VF, broadcast still arrives on the synthetic path
        assert nic.tx_burst([udp_frame(1, 100), bcast_frame(2, 100)], timeout=5) == 2
        assert drain(nic, 1)[0] == [bcast_frame(2, 100)]
        # back to synthetic on request
        assert nic.switch_data_path("synthetic").data_path == "synthetic"
        assert nic.tx_burst([udp_frame(3, 100)], timeout=5) == 1
        assert drain(nic, 1)[0] == [udp_frame(3, 100)]
        # on the VF again, then the host withdraws the VF (servicing): the host switches
        # back itself, then says allocated=0; traffic continues on the synthetic path
        nic.switch_data_path("vf")
        vf_ctl(vsim, d, "remove")
        assert nic.wait_vf(False, 10)
        assert nic.vf.data_path == "synthetic" and nic.vf.host_switches == 1
        frames = [udp_frame(10 + k, 300) for k in range(20)]
        assert nic.tx_burst(frames, timeout=5) == 20
        assert sorted(drain(nic, 20)[0]) == sorted(frames)
        with pytest.raises(NetError, match="no VF to switch to"):
            nic.switch_data_path("vf")
        vf_ctl(vsim, d, "add")
        assert nic.wait_vf(True, 10) and nic.vf.serial == SERIAL
        m = model_vf(vsim, d)
        assert sum(q["rx_to_vf"] for q in m["queues"].values()) == 1
    assert m["vf_switch_backs"] == 1 and m["vf_completions"] == 0 and m["fatal_errors"] == 0
    assert_no_needless(vsim)


def test_association_withdrawn_without_host_switch_makes_the_driver_switch_back(vsim):
    """A host that only says allocated=0 (no SWITCH_DATA_PATH first — what Azure guests' logs
    suggest: "VF slot N removed" before "Data path switched from VF"): the driver undoes its
    switch itself (as DPDK hn_vf_remove_unlocked), and nothing is lost."""
    d = dev(vsim, 5)
    with nv.open(d, vsim.root) as nic:
        assert nic.wait_vf(True, 10)
        nic.switch_data_path("vf")
        switches = model_vf(vsim, d)["vf_switches"]
        vf_ctl(vsim, d, "remove")
        assert nic.wait_vf(False, 10)
        assert nic.vf.data_path == "synthetic" and nic.vf.switch_backs == 1
        assert nic.vf.host_switches == 0
        frames = [udp_frame(k, 500) for k in range(30)]
        assert nic.tx_burst(frames, timeout=5) == 30
        assert sorted(drain(nic, 30)[0]) == sorted(frames)      # the host is synthetic again
        m = model_vf(vsim, d)
        assert m["vf_switches"] == switches + 1 and m["vf"]["data_path"] == "synthetic"
        assert nic.stats()["events"]["unknown_messages"] == 0
    assert model_vf(vsim, d)["fatal_errors"] == 0


def test_steering_all_takes_broadcast_too(vsim):
    d = dev(vsim, 4)
    with nv.open(d, vsim.root) as nic:
        assert nic.wait_vf(True, 10)
        nic.switch_data_path("vf")
        assert nic.tx_burst([bcast_frame(1, 100), udp_frame(2, 100)], timeout=5) == 2
        nic.switch_data_path("synthetic")
        assert nic.tx_burst([bcast_frame(3, 100)], timeout=5) == 1
        assert drain(nic, 1)[0] == [bcast_frame(3, 100)]
        assert sum(q["rx_to_vf"] for q in model_vf(vsim, d)["queues"].values()) == 2


# ==== errors =====================================================================================
def test_switch_on_a_host_without_a_vf_is_a_clear_error(vsim):
    d = dev(vsim, 1)
    with nv.open(d, vsim.root) as nic:
        with pytest.raises(NetError, match="has no VF to switch to: the host has not associated"):
            nic.switch_data_path("vf")
        with pytest.raises(Exception, match="use 'vf' or 'synthetic'"):
            nic.switch_data_path("fast")
        # switching to synthetic is always allowed (the kernel sends it on VF removal)
        assert nic.switch_data_path("synthetic").data_path == "synthetic"
    assert model_vf(vsim, d)["fatal_errors"] == 0


def test_nvsp_below_4_has_no_vf(vsim):
    d = dev(vsim, 2)
    with nv.open(d, vsim.root) as nic:
        assert nic.nvsp_version < P.NVSP_V4
        nic.poll_events()
        assert not nic.vf.supported and not nic.vf.allocated
        with pytest.raises(NetError, match="need NVSP 4 or later"):
            nic.switch_data_path("vf")
        with pytest.raises(NetError, match="need NVSP 4 or later"):
            nic.switch_data_path("synthetic")
    m = model_vf(vsim, d)
    assert not m["vf"]["advertised"] and m["vf_associations"] == 0 and m["fatal_errors"] == 0


def test_nvsp_4_and_sriov_off_get_no_association(vsim):
    """Linux and DPDK advertise SR-IOV from NVSP 5 on; the host announces a VF only to a
    guest that advertised it (O guest_vf_is_available)."""
    d4 = dev(vsim, 3)
    with nv.open(d4, vsim.root) as nic:
        assert not nic.wait_vf(True, 0.5) and not nic.vf.supported
        with pytest.raises(NetError, match="SR-IOV was not advertised"):
            nic.switch_data_path("vf")
    assert model_vf(vsim, d4)["vf_associations"] == 0
    d = dev(vsim, 0)
    with nv.open(d, vsim.root, sriov=False) as nic:
        assert not nic.wait_vf(True, 0.5) and not nic.vf.supported
    m = model_vf(vsim, d)
    assert not m["vf"]["guest_sriov"] and not m["vf"]["advertised"]


def test_malformed_vf_messages_are_counted_not_trusted(vsim):
    """Host messages are copied then validated: a VF association too short for its serial is
    a counted host problem (strict mode raises), never half-read.  (A SWITCH_DATA_PATH cannot
    be short: VMBus pads packets to 8 bytes, its full size.)"""
    d = dev(vsim, 1)
    with nv.open(d, vsim.root) as nic:
        short_assoc = struct.pack("<II", 128, 1)                 # no serial
        before = nic.stats()["events"]["unknown_messages"]
        vsim.control("model", device=d, op="inband", args={"payload": short_assoc.hex()})
        deadline = 50
        while nic.stats()["events"]["unknown_messages"] == before and deadline:
            nic.rx_burst(0, 8, timeout=0.1)
            deadline -= 1
        assert nic.stats()["events"]["unknown_messages"] == before + 1
        assert "VF association of 8 bytes" in nic.last_host_error
        assert not nic.vf.allocated and nic.vf.associations == 0
        frames = [udp_frame(k, 128) for k in range(10)]
        assert nic.tx_burst(frames, timeout=5) == 10
        assert sorted(drain(nic, 10)[0]) == sorted(frames)
    with nv.open(d, vsim.root, strict=True) as nic:
        vsim.control("model", device=d, op="inband", args={"payload": short_assoc.hex()})
        with pytest.raises(Exception, match="VF association of 8 bytes"):
            for _ in range(50):
                nic.rx_burst(0, 8, timeout=0.1)
    assert model_vf(vsim, d)["fatal_errors"] == 0


def test_reinitialisation_starts_on_the_synthetic_path_and_reannounces(vsim):
    """set_mtu is a full NVSP/RNDIS re-initialisation: a new session, synthetic data path on
    both sides, and the host announces its VF again."""
    d = dev(vsim, 0)
    with nv.open(d, vsim.root) as nic:
        assert nic.wait_vf(True, 10)
        seen: list[tuple[bool, str]] = []
        nic.on_vf_change(lambda v: seen.append((v.allocated, v.data_path)))
        nic.switch_data_path("vf")
        nic.set_mtu(4000)
        assert nic.vf.data_path == "synthetic" and nic.vf.associations <= 1
        assert nic.wait_vf(True, 10) and nic.vf.serial == SERIAL
        assert seen == [(True, "vf"), (False, "synthetic"), (True, "synthetic")]
        m = model_vf(vsim, d)
        assert m["vf"]["data_path"] == "synthetic" and m["vf"]["advertised"]
        frames = [udp_frame(k, 3000) for k in range(10)]
        assert nic.tx_burst(frames, timeout=5) == 10
        assert sorted(drain(nic, 10)[0]) == sorted(frames)
    assert model_vf(vsim, d)["fatal_errors"] == 0

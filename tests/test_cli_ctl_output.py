"""`uvmbus sim ctl` says what it did: `model DEV detach` (and every model/link operation)
prints one line per device naming the operation, with the model's result below it; `--json`
keeps the machine-readable reply."""

from __future__ import annotations

import json

import pytest
from simhelpers import run_sim

from uvmbus.services.cli import main

pytestmark = pytest.mark.timeout(120)


def test_model_operations_say_what_was_done(tmp_path, capsys):
    img = tmp_path / "d.img"
    with run_sim(tmp_path, "--disk", f"{img}:size=1M", "--nic", "1", "--no-ic", "--echo", "0") as sim:
        root = str(sim.root)
        disk = sim.device("storvsc")["device_id"]
        nic = sim.device("netvsc")["device_id"]

        assert main(["sim", "ctl", "--root", root, "model", "storvsc", "detach", "lun=0"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{disk} (detach):\n") and "  detached_lun: 0\n" in out
        assert f"  image: {img}\n" in out and "  luns_left: []" in out

        assert main(["sim", "ctl", "--root", root, "--json", "model", "storvsc", "attach",
                     f"spec={img}"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ok": True, "results": {disk: {"lun": 0}}}

        assert main(["sim", "ctl", "--root", root, "--json", "model", "storvsc", "detach", "lun=0"]) == 0
        res = json.loads(capsys.readouterr().out)["results"][disk]
        assert res["detached_lun"] == 0 and res["disk"]["image"] == str(img) and res["luns_left"] == []

        assert main(["sim", "ctl", "--root", root, "link", "netvsc", "down"]) == 0
        assert capsys.readouterr().out == f"{nic} (link down):\n  link: down\n"


def test_sim_exec_help_says_what_v_does(capsys):
    with pytest.raises(SystemExit):
        main(["sim", "exec", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "print on stderr each mount made in the namespace" in text
    assert "a -v after -- is CMD's" in text


def test_actions_name_the_devices_they_were_done_to(tmp_path, capsys):
    with run_sim(tmp_path, "--echo", "2", "--no-ic") as sim:
        root = str(sim.root)
        a, b = (d["device_id"] for d in sim.devices)

        def ctl(*args: str) -> str:
            assert main(["sim", "ctl", "--root", root, *args]) == 0
            return capsys.readouterr().out

        assert ctl("fault", "stall", "2") == f"{a}: fault stall 2 set\n{b}: fault stall 2 set\n"
        assert ctl("clear", "--device", a) == f"{a}: faults cleared\n"
        assert ctl("subchannels", b, "1") == f"{b}: 1 sub-channel(s) offered\n"
        assert ctl("rescind", a, "--reoffer-after", "30") == f"{a}: rescinded (re-offer in 30 s)\n"
        assert ctl("reoffer", a) == f"{a}: re-offered\n"
        assert main(["sim", "ctl", "--root", root, "--json", "clear"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ok": True, "devices": [a, b]}


def test_ctl_errors_say_what_to_pass(tmp_path, capsys):
    img = tmp_path / "d.img"
    with run_sim(tmp_path, "--disk", f"{img}:size=1M", "--nic", "1", "--no-ic", "--echo", "0") as sim:
        root = str(sim.root)
        assert main(["sim", "ctl", "--root", root, "model", "storvsc", "detach"]) == 1
        err = capsys.readouterr().err
        assert "refused model 'detach'" in err and "missing argument 'lun'" in err
        assert "sim ctl model DEVICE detach lun=VALUE" in err
        assert main(["sim", "ctl", "--root", root, "vf", "netvsc", "add", "abc"]) == 1
        err = capsys.readouterr().err
        assert "SERIAL is the VF's serial number, a decimal number" in err and "'abc'" in err

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

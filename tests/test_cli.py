"""The inc-bridge command line."""

from __future__ import annotations

import pytest
import torch

import inc_bridge as ib
from inc_bridge.cli import main


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "linear  emulated  available" in out and "cuda      not implemented" in out


def test_inspect_recipe_measurements_and_dump(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  format: e5m2\n")
    assert main(["inspect", str(recipe)]) == 0
    assert "format: e5m2" in capsys.readouterr().out
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    meas = ib.calibrate(model, [torch.ones(2, 4)], workdir=tmp_path / "dump")
    meas.save(tmp_path / "meas.json")
    for target in (tmp_path / "meas.json", tmp_path / "dump"):
        assert main(["inspect", str(target)]) == 0
        out = capsys.readouterr().out
        assert "1 layers" in out and "input amax 1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    assert main(["inspect", str(bad)]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "subclass and module forms give identical logits: True" in out
    fp32 = float(out.split("fp32")[1].split("%")[0])
    fp8 = float(out.split("form=module")[-1].split("%")[0])
    assert fp32 > 90 and abs(fp32 - fp8) < 2.0

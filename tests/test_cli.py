"""The inc-bridge command line."""

from __future__ import annotations

import re

import pytest
import torch

import inc_bridge as ib
import inc_bridge.demo  # noqa: F401  (ib.demo.RECIPE)
from inc_bridge.cli import main


def test_doctor(capsys):
    from inc_bridge import kernels

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for backend in ("emulated", "cpu", "cuda", "hpu"):  # one line per backend: status and the reason
        ok, reason = kernels.backend_availability(backend)
        assert f"{backend:<10}{'available' if ok else 'unavailable':<13}{reason}" in out
    assert f"backend='auto' picks: {kernels.resolve_backend('auto', 'cpu')} for cpu tensors" in out
    assert "linear     emulated  available    qdq(x) @ dequant(W)" in out  # the op x backend table


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
        assert out.startswith("1 layer; ") and "input amax" in out
        assert re.search(r"^  0 +(linear|unknown) +\S+ +1 +", out, re.M), out  # input amax 1 (a dump has no kind)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    assert main(["inspect", str(bad)]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the trained CNN is cached here
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "-> met" in text and "report: " in text
    fp32 = float(text.split("test accuracy (%)")[1].split()[0])
    fp8 = float(text.split("test accuracy (%)")[1].split()[1])
    assert fp32 > 90 and fp32 - fp8 <= 0.5
    assert (out / "report" / "report.html").exists() and (out / "locked_recipe.yaml").exists()
    assert (tmp_path / "cache" / "inc_bridge" / "digits_cnn.pt").exists()
    # the second run uses the cached model and re-renders; `report` re-renders from report.json
    assert main(["report", str(out)]) == 0
    assert "rendered" in capsys.readouterr().out


def test_tune_and_apply_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    recipe = tmp_path / "digits.yaml"
    base = ib.load_recipe(ib.demo.RECIPE).model_dump(mode="json", exclude_none=True)
    base["tuning"].update(max_trials=2, search_space={})
    recipe.write_text(ib.Recipe.model_validate(base).to_yaml())
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) in (0, 1)
    out = capsys.readouterr().out
    assert "locked recipe:" in out and "time: total" in out and "calibration" in out
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--quiet", "--resume"]) in (0, 1)
    resumed = capsys.readouterr().out.split("time:")[1].split("\n")[0]
    assert "baseline" not in resumed and "trials" not in resumed  # nothing evaluated again
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("quantization: {format: e4m3}\n")
    assert main(["tune", str(no_model)]) == 2
    assert "model: missing" in capsys.readouterr().err


def test_inspect_saved_model_and_apply(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = ib.load_recipe(ib.demo.RECIPE).model_dump(mode="json", exclude_none=True)
    base["tuning"].update(max_trials=1, search_space={}, tolerable_loss={"absolute": 100.0})
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(ib.Recipe.model_validate(base).to_yaml())
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "run" / "locked_recipe.yaml"), "--out", str(tmp_path / "model")]) == 0
    assert "saved the FP8 model" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "saved FP8 model: format version 1, form module" in out and "conv2d 2, linear 2" in out


def test_failed_tune_without_out_leaves_no_directory(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's default --out would go
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  format: e4m3\n")  # no model.factory: tune fails
    assert main(["tune", str(recipe)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]

"""Robustness: INC's global state, hostile inputs, and property-based checks that only IncBridgeError escapes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inc_bridge as ib

from .conftest import REPO
from .models import LinearNet, ToyNet, linear_batches, toy_batches

_FRESH = """
import sys, torch
sys.path.insert(0, {repo!r})
import inc_bridge as ib
from tests.models import ToyNet, toy_batches
torch.manual_seed(0)
model = ToyNet()
q = ib.quantize(model, toy_batches(), form="module")
torch.save(q(toy_batches(1, seed=11)[0]).detach(), sys.argv[1])
"""


def test_back_to_back_quantizations_equal_fresh_processes(tmp_path):
    out = tmp_path / "fresh.pt"
    subprocess.run([sys.executable, "-c", _FRESH.format(repo=str(REPO)), str(out)], check=True, timeout=300,
                   capture_output=True, cwd=tmp_path)
    fresh = torch.load(out, weights_only=True)
    x = toy_batches(1, seed=11)[0]
    torch.manual_seed(0)
    model = ToyNet()
    first = ib.quantize(model, toy_batches(), form="module")(x)
    ib.quantize(LinearNet(), linear_batches(), form="module")  # another model in between
    with pytest.raises(ib.CalibrationError):  # and a failed quantization
        ib.quantize(model, [torch.randn(2, 3)])
    again = ib.quantize(model, toy_batches(), form="module")(x)
    assert torch.equal(first, fresh) and torch.equal(again, fresh)


def test_huge_magnitudes_saturate_instead_of_nan():
    model = LinearNet()
    calib = [torch.randn(4, 32) * 1e30]
    qmodel = ib.quantize(model, calib)
    for x in (torch.randn(4, 32) * 1e30, torch.full((4, 32), 3e38), torch.randn(4, 32)):
        assert torch.isfinite(qmodel(x)).all()
    scales = ib.compute_scales(ib.calibrate(model, calib), model=model)
    assert all(math.isfinite(float(s.input_scale)) and float(s.input_scale) > 0 for s in scales.layers.values())


def test_saturation_is_counted_in_the_report(tmp_path):
    model = LinearNet()
    calib = [torch.cat([torch.randn(64, 32), torch.full((1, 32), 1e4)])]
    recipe = ib.Recipe.model_validate({"quantization": {"activation": {"scale_method": "percentile", "percentile": 99.0}},
                                       "tuning": {"layer_fallback": False}})
    result = ib.autotune(model, lambda m: 1.0, calib_data=calib, recipe=recipe, progress=False)
    fc1 = next(r for r in result.report.layers if r.name == "fc1")
    assert fc1.saturation is not None and 0 < fc1.saturation < 0.05  # the outlier row is clipped


# ---------------------------------------------------------------- property-based: only IncBridgeError escapes

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_recipe_keys = st.sampled_from(["version", "quantization", "form", "backend", "tuning", "calibration", "evaluation",
                                "report", "locked", "model", "format", "weight", "activation", "ops", "include"])
_recipes = st.dictionaries(_recipe_keys, _json, max_size=5) | st.fixed_dictionaries(
    {"quantization": st.dictionaries(st.sampled_from(["format", "target", "weight", "activation", "ops", "include",
                                                      "exclude", "overrides"]), _json, max_size=4)})
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=_recipes)
def test_random_recipes_raise_only_recipe_error(data):
    try:
        recipe = ib.Recipe.model_validate(data)
    except ib.RecipeError as exc:
        assert str(exc)
        return
    assert ib.Recipe.model_validate(recipe.model_dump(mode="json")) == recipe


@FAST
@given(text=st.text(max_size=200))
def test_random_recipe_files(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    try:
        ib.load_recipe(path)
    except ib.RecipeError as exc:
        assert str(exc)


_nodes = st.dictionaries(st.text(min_size=1, max_size=6), _json, max_size=3)
_dumps = st.fixed_dictionaries({"Mode": st.sampled_from(["DynamicRange", "Scale", "Other", 3]), "Nodes": _nodes | _json},
                               optional={"GlobalRank": _json, "LocalRank": _json})


@FAST
@given(data=_dumps | _json)
def test_random_inc_dumps_raise_only_calibration_error(tmp_path, data):
    path = tmp_path / "measure_hooks_maxabs.json"
    path.write_text(json.dumps(data))
    model = LinearNet()
    try:
        meas = ib.load_inc_measurements(path)
        ib.compute_scales(meas, model=model)
    except ib.IncBridgeError as exc:
        assert str(exc)


@FAST
@given(data=st.dictionaries(st.sampled_from(["format_version", "layers", "inc_version", "ranks"]), _json, max_size=4))
def test_random_measurement_json(data):
    try:
        ib.Measurements.from_dict(data)
    except ib.CalibrationError as exc:
        assert str(exc)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model"
    ib.save(ib.quantize(LinearNet(), linear_batches(2), form="module"), path)
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["model.safetensors", "inc_bridge.json"]), cut=st.floats(0, 1),
       flip=st.integers(0, 10_000), mode=st.sampled_from(["truncate", "flip", "garbage"]))
def test_corrupted_saved_models_raise_only_serialization_error(saved_model, tmp_path, which, cut, flip, mode):
    import shutil

    target = tmp_path / "m"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(saved_model, target)
    f = target / which
    data = bytearray(f.read_bytes())
    if mode == "truncate":
        data = data[: int(len(data) * cut)]
    elif mode == "flip" and data:
        data[flip % len(data)] ^= 0xFF
    else:
        data = bytearray(b"\x00garbage" * (flip % 7))
    f.write_bytes(bytes(data))
    skeleton = LinearNet()
    before = {n: p.clone() for n, p in skeleton.state_dict().items()}
    try:
        ib.load(skeleton, target)
    except ib.SerializationError as exc:
        assert str(exc)
        assert all(torch.equal(before[n], p) for n, p in skeleton.state_dict().items())

"""calibrate: INC measurement over any calibration-data shape, leaving the caller's model as it was."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import inc_bridge as ib

from .models import LinearNet, ToyNet, inc_reference, toy_batches


def _state(model):
    return {n: (p, p.detach().clone()) for n, p in model.state_dict(keep_vars=True).items()}


def test_model_is_left_unchanged():
    model = ToyNet()
    types = {n: type(m) for n, m in model.named_modules()}
    before = _state(model)
    forwards = model.forward
    ib.calibrate(model, toy_batches())
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (tensor, copy) in before.items():
        assert after[name] is tensor  # the very same tensor objects
        assert torch.equal(after[name], copy)
    assert model.forward == forwards
    assert not hasattr(model, "quant_config") and not hasattr(model, "is_prepared")


def test_measurements_content_and_json_round_trip():
    model = ToyNet()
    meas = ib.calibrate(model, toy_batches())
    assert set(meas.names) == {"conv1", "conv2", "conv3", "proj", "seq", "head"}
    conv2 = meas["conv2"]
    assert conv2.kind == "conv2d" and conv2.dtype == "float32" and conv2.source is ib.measurements.Source.INC
    w = model.conv2.weight.detach()
    assert conv2.weight_amax == float(w.abs().max())
    assert conv2.weight_amax_per_channel == tuple(w.abs().amax(dim=(1, 2, 3)).tolist())
    assert meas["conv1"].input_amax == (max(float(b.abs().max()) for b in toy_batches()),)
    assert meas.num_batches == 4 and meas.inc_version.startswith("3.10")
    assert meas.inc_config["scale_method"] == "maxabs_arbitrary"
    again = ib.Measurements.from_json(meas.to_json())
    assert again == meas


def test_measurements_save_and_load(tmp_path):
    meas = ib.calibrate(LinearNet(), [torch.randn(4, 32)])
    path = meas.save(tmp_path / "meas.json")
    assert ib.Measurements.load(path) == meas
    with pytest.raises(ib.CalibrationError, match="format_version"):
        ib.Measurements.from_json('{"format_version": 99, "layers": {}}', origin="x.json")
    with pytest.raises(ib.CalibrationError, match="not valid JSON"):
        ib.Measurements.from_json("{", origin="x.json")


@pytest.mark.parametrize(
    "make_data",
    [
        lambda: [torch.randn(2, 32) for _ in range(3)],  # tensors
        lambda: [(torch.randn(2, 32),) for _ in range(3)],  # tuples of positional args
        lambda: [{"x": torch.randn(2, 32)} for _ in range(3)],  # dicts of keyword args
        lambda: (torch.randn(2, 32) for _ in range(3)),  # a generator
    ],
    ids=["tensor", "tuple", "dict", "generator"],
)
def test_calibration_data_shapes(make_data):
    meas = ib.calibrate(LinearNet(), make_data())
    assert meas.num_batches == 3 and set(meas.names) == {"fc1", "fc2", "fc3"}


def test_callable_run_fn_gives_same_statistics():
    model = LinearNet()
    data = [torch.randn(2, 32) for _ in range(3)]

    def run_fn(m):
        for x in data:
            m(x)

    a, b = ib.calibrate(model, data), ib.calibrate(model, run_fn)
    assert b.num_batches is None
    assert {n: s.input_amax for n, s in a.layers.items()} == {n: s.input_amax for n, s in b.layers.items()}


def test_workdir_keeps_inc_dumps_and_load_inc_measurements_gives_same_scales(tmp_path):
    model = ToyNet()
    meas = ib.calibrate(model, toy_batches(), workdir=tmp_path)
    assert (tmp_path / "measure_hooks_maxabs.json").exists()
    loaded = ib.load_inc_measurements(tmp_path)
    recipe = ib.Recipe()
    a = ib.compute_scales(meas, recipe, model=model)
    b = ib.compute_scales(loaded, recipe, model=model)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        assert torch.equal(a[name].input_scale, b[name].input_scale)
        assert torch.equal(a[name].weight_scale, b[name].weight_scale)


def test_load_inc_measurements_from_a_plain_inc_run(tmp_path):
    """Dump files written by INC's own prepare/finalize (not by ib.calibrate) give calibrate's scales."""
    model = ToyNet()
    inc_reference(model, toy_batches(), torch.float32, "maxabs_arbitrary", dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "measure_hooks_maxabs.json" in files and "measure_hooks_maxabs_MAXABS_ARBITRARY.json" in files
    for recipe_q, method in [({}, "maxabs_arbitrary"),
                             ({"weight": {"scale_method": "maxabs_pow2"}, "activation": {"scale_method": "maxabs_pow2"}}, "pow2")]:
        recipe = ib.Recipe.model_validate({"quantization": recipe_q})
        ours = ib.compute_scales(ib.calibrate(model, toy_batches(), recipe), recipe, model=model)
        theirs = ib.compute_scales(ib.load_inc_measurements(tmp_path), recipe, model=model)
        for name in ours.layers:
            assert torch.equal(ours[name].input_scale, theirs[name].input_scale), (method, name)
            assert torch.equal(ours[name].weight_scale, theirs[name].weight_scale), (method, name)
    # The Scale-mode file alone (INC's finished maxabs_arbitrary scales) gives the same scales too.
    scale_file = tmp_path / "measure_hooks_maxabs_MAXABS_ARBITRARY.json"
    from_scale_file = ib.compute_scales(ib.load_inc_measurements(scale_file), ib.Recipe(), model=model)
    ours = ib.compute_scales(ib.calibrate(model, toy_batches()), ib.Recipe(), model=model)
    for name in ours.layers:
        assert torch.equal(ours[name].input_scale, from_scale_file[name].input_scale)
        assert torch.equal(ours[name].weight_scale, from_scale_file[name].weight_scale)


def test_no_files_written_outside_temporary_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ib.calibrate(LinearNet(), [torch.randn(2, 32)])
    assert list(tmp_path.iterdir()) == []


def test_empty_calibration_data():
    with pytest.raises(ib.CalibrationError, match="no batches"):
        ib.calibrate(LinearNet(), [])


def test_bad_batch_type():
    with pytest.raises(ib.CalibrationError, match="batch 1: expected a tensor"):
        ib.calibrate(LinearNet(), [torch.randn(2, 32), 3.0])


def test_single_tensor_instead_of_batches():
    with pytest.raises(ib.CalibrationError, match="wrap one batch in a list"):
        ib.calibrate(LinearNet(), torch.randn(2, 32))


def test_failing_forward_is_reported_and_model_unchanged():
    model = LinearNet()
    before = _state(model)
    with pytest.raises(ib.CalibrationError, match="batch 0: RuntimeError"):
        ib.calibrate(model, [torch.randn(2, 31)])
    for name, (tensor, copy) in before.items():
        assert model.state_dict(keep_vars=True)[name] is tensor and torch.equal(tensor, copy)
    assert all(type(m).__name__ in ("LinearNet", "Linear") for m in model.modules())


def test_nan_calibration_data_names_the_layer():
    model = LinearNet()
    x = torch.randn(2, 32)
    x[0, 3] = math.nan
    with pytest.raises(ib.CalibrationError, match="layer 'fc1'.*not finite"):
        ib.calibrate(model, [x])
    assert all(type(m).__name__ in ("LinearNet", "Linear") for m in model.modules())


def test_nothing_selected():
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["conv2d"]}})
    with pytest.raises(ib.CalibrationError, match="selects no layer"):
        ib.calibrate(LinearNet(), [torch.randn(2, 32)], recipe)


def test_recipe_path_is_accepted(tmp_path):
    path = Path(tmp_path / "r.yaml")
    path.write_text("quantization:\n  ops: [linear]\n")
    meas = ib.calibrate(ToyNet(), toy_batches(1), path)
    assert set(meas.names) == {"proj", "seq", "head"}


def test_workdir_holds_only_inc_dumps(tmp_path):
    ib.calibrate(LinearNet(), [torch.randn(2, 32)], workdir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["measure_hooks_maxabs.json", "measure_hooks_maxabs.npz", "measure_hooks_maxabs_mod_list.json"]


def test_inc_global_registries_do_not_keep_models_alive():
    import gc
    import weakref

    from neural_compressor.torch.algorithms.fp8_quant import model_configs
    from neural_compressor.torch.algorithms.fp8_quant._core import patching_common
    from neural_compressor.torch.algorithms.fp8_quant._core.save_measure import save_files

    def sizes():
        return len(patching_common.parent_child_mod_dict), len(model_configs.IMOD_DICT), len(save_files.gmod_list)

    before = sizes()

    def calibrate_twice():
        model = LinearNet()
        ib.calibrate(model, [torch.randn(2, 32)])
        ib.calibrate(model, [torch.randn(2, 32)])
        return weakref.ref(model.fc1.weight)

    gc.disable()  # no collector: INC's patched copy must not survive in a reference cycle
    try:
        ref = calibrate_twice()
        assert sizes() == before
        assert ref() is None  # once the caller lets go, the weights are freed at once
    finally:
        gc.enable()

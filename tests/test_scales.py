"""Scale math: INC's own functions are the reference (torch.equal), plus edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import inc_bridge as ib
from inc_bridge.formats import FP8Format, Target, fullscale
from inc_bridge.kernels import cpu
from inc_bridge.measurements import LayerStats, Measurements
from inc_bridge.recipe import Op, ScaleMethod
from inc_bridge.scales import layer_scales, maxabs_scale


def _inc_scale(amax: torch.Tensor, backoff: float, pow2: bool, full: float = 448.0) -> torch.Tensor:
    from neural_compressor.torch.algorithms.fp8_quant._core.fp_utils import calc_scale_from_maxabs
    from neural_compressor.torch.algorithms.fp8_quant._core.scale_methods.round_scales_function import (
        ScaleToPow2,
    )

    s = calc_scale_from_maxabs(amax, full, backoff)
    return ScaleToPow2().calc(s) if pow2 else s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [ScaleMethod.MAXABS_ARBITRARY, ScaleMethod.MAXABS_POW2])
@pytest.mark.parametrize("backoff", [0.5, 0.25])
def test_maxabs_matches_inc_functions(dtype, method, backoff):
    amax = (torch.rand(500) * 10 ** torch.randint(-4, 4, (500,)).float()).to(dtype)
    ours = maxabs_scale(amax, 448.0, backoff, method)
    theirs = _inc_scale(amax, backoff, method is ScaleMethod.MAXABS_POW2)
    assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_fullscale_per_target():
    assert fullscale(FP8Format.E4M3, Target.CPU) == 448.0
    assert fullscale(FP8Format.E4M3, Target.CUDA) == 448.0
    assert fullscale(FP8Format.E4M3, Target.GAUDI3) == 448.0
    assert fullscale(FP8Format.E4M3, Target.GAUDI2) == 240.0
    assert fullscale(FP8Format.E5M2, Target.GAUDI2) == 57344.0


def test_zero_amax_gives_a_small_positive_scale():
    for method in (ScaleMethod.MAXABS_ARBITRARY, ScaleMethod.MAXABS_POW2):
        s = maxabs_scale(torch.zeros(3), 448.0, 0.5, method)
        assert torch.all(s > 0) and torch.all(torch.isfinite(s)) and torch.all(torch.isfinite(1 / s))
    stats = LayerStats("fc", "linear", input_amax=(0.0,), weight_amax=0.0)
    ls = layer_scales(stats, Op.LINEAR, ib.Recipe(), torch.float32)
    q, s = ls.quantize_weight(torch.zeros(4, 4))
    assert torch.equal(q.float(), torch.zeros(4, 4)) and float(s) > 0


def test_zero_input_runs_through_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    qmodel = ib.quantize(model, [torch.zeros(2, 4)], form="module")
    out = qmodel(torch.zeros(2, 4))
    assert torch.isfinite(out).all() and torch.equal(out, model[0].bias.detach().expand(2, 4))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_raise_naming_the_layer(bad):
    meas = Measurements(layers={"enc.fc": LayerStats("enc.fc", "linear", input_amax=(bad,), weight_amax=1.0, dtype="float32")})
    with pytest.raises(ib.CalibrationError, match="layer 'enc.fc'.*not finite"):
        ib.compute_scales(meas)


def test_compute_scales_without_model_uses_stored_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    meas = ib.calibrate(model, [torch.randn(4, 8)])
    with_model = ib.compute_scales(meas, model=model)
    without = ib.compute_scales(meas)
    pc = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})
    for name in ("0", "2"):
        assert torch.equal(with_model[name].input_scale, without[name].input_scale)
        assert torch.equal(with_model[name].weight_scale, without[name].weight_scale)
        assert torch.equal(ib.compute_scales(meas, pc)[name].weight_scale, ib.compute_scales(meas, pc, model=model)[name].weight_scale)


def test_inc_dump_without_model_needs_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    ib.calibrate(model, [torch.randn(4, 8)], workdir=tmp_path)
    with pytest.raises(ib.CalibrationError, match="pass model= to compute_scales"):
        ib.compute_scales(ib.load_inc_measurements(tmp_path))


def test_scale_set_to_dict_is_plain_data():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    d = ib.compute_scales(ib.calibrate(model, [torch.randn(4, 8)]), model=model).to_dict()
    assert set(d["0"]) == {"kind", "format", "fp8_max", "hp_dtype", "input_scales", "weight_scale"}
    assert isinstance(d["0"]["input_scales"][0], float) and d["0"]["hp_dtype"] == "float32"


def test_histogram_grows_by_exact_merging():
    from inc_bridge.observers import Histogram

    h = Histogram(64)
    a, b = torch.rand(1000) * 0.3, torch.rand(1000) * 5.0
    h.add(a)
    assert h.range == 0.5
    h.add(b)
    assert h.range == 8.0 and float(h.counts.sum()) == 2000
    direct = torch.histc(torch.cat([a, b]).abs(), bins=64, min=0, max=8.0).double()
    assert torch.equal(h.counts, direct)


@pytest.mark.skipif(cpu.native() is None, reason=f"cpu backend unavailable: {cpu.availability().reason}")
def test_mse_clip_is_the_same_with_and_without_native_code(monkeypatch):
    """The search's errors come from native code where it runs: the same clips as the torch path."""
    from inc_bridge.observers import Histogram
    from inc_bridge.scales import clear_caches, histogram_clip

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(50_000, generator=g), torch.rand(20_000, generator=g) ** 4 * 7, torch.randn(300, generator=g) * 1e-3):
        h = Histogram(2048)
        h.add(x)
        hist, amax = h.to_dict(), float(x.abs().max())
        for fmt, top in ((torch.float8_e4m3fn, 448.0), (torch.float8_e4m3fn, 240.0), (torch.float8_e5m2, 57344.0)):
            clear_caches()
            with_native = histogram_clip(hist, ScaleMethod.MSE, 0, amax, fmt, top)
            with monkeypatch.context() as patch:
                patch.setattr(cpu, "native", lambda: None)
                clear_caches()
                assert histogram_clip(hist, ScaleMethod.MSE, 0, amax, fmt, top) == with_native


def test_percentile_and_mse_scales():
    from inc_bridge.scales import histogram_clip

    x = torch.cat([torch.randn(100_000), torch.tensor([60.0])])  # one outlier
    from inc_bridge.observers import Histogram

    h = Histogram(2048)
    h.add(x)
    hist = h.to_dict()
    amax = float(x.abs().max())
    p = histogram_clip(hist, ScaleMethod.PERCENTILE, 99.99, amax, torch.float8_e4m3fn, 448.0)
    assert 3.0 < p < 6.0  # the outlier is clipped away; 99.99 % of |N(0,1)| lies below ~3.9
    assert histogram_clip(hist, ScaleMethod.PERCENTILE, 100.0, amax, torch.float8_e4m3fn, 448.0) == pytest.approx(amax, rel=0.01)
    m = histogram_clip(hist, ScaleMethod.MSE, 0, amax, torch.float8_e4m3fn, 448.0)
    assert 0 < m <= amax
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    data = [torch.cat([torch.randn(64, 8), torch.full((1, 8), 50.0)])]
    meas = ib.calibrate(model, data)
    assert len(meas["0"].input_hist) == 1 and sum(meas["0"].input_hist[0]["counts"]) == 65 * 8
    for method in ("percentile", "mse"):
        r = ib.Recipe.model_validate({"quantization": {"activation": {"scale_method": method, "percentile": 99.0}}})
        s = float(ib.compute_scales(meas, r, model=model)["0"].input_scale)
        assert s < 50.0 / 448.0  # clipped below the outlier, no backoff
    dump = ib.Measurements(layers={"0": ib.LayerStats("0", "linear", input_amax=(1.0,), weight_amax=1.0, dtype="float32")})
    r = ib.Recipe.model_validate({"quantization": {"activation": {"scale_method": "mse"}}})
    with pytest.raises(ib.CalibrationError, match="needs input histograms"):
        ib.compute_scales(dump, r)


def test_per_layer_overrides():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    meas = ib.calibrate(model, [torch.randn(4, 8)])
    r = ib.Recipe.model_validate({"quantization": {"overrides": [
        {"match": "2", "format": "e5m2", "weight": {"granularity": "per_channel", "scale_method": "maxabs_pow2"}}]}})
    scales = ib.compute_scales(meas, r, model=model)
    assert scales["0"].format.value == "e4m3" and scales["0"].weight_scale.dim() == 0
    assert scales["2"].format.value == "e5m2" and scales["2"].weight_scale.shape == (2,)
    assert torch.equal(scales["2"].weight_scale, torch.exp2(torch.ceil(torch.log2(scales["2"].weight_scale))))
    qmodel = ib.convert(model, scales, form="module")
    assert qmodel[2].qweight.dtype == torch.float8_e5m2 and qmodel[0].qweight.dtype == torch.float8_e4m3fn


def test_remembered_scales_follow_the_weights_and_settings():
    """Within a ``weight_memo()`` block (autotune's run, one quantize call) scales are remembered per
    layer statistics and weight (autotune's settings share them); a weight changed in place, another
    granularity or another method gets its own. Outside a block nothing is remembered."""
    from inc_bridge.scales import weight_memo

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    meas = ib.calibrate(model, [torch.randn(16, 8)])
    per_tensor = ib.Recipe.model_validate({})
    per_channel = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})
    pow2 = ib.Recipe.model_validate({"quantization": {"activation": {"scale_method": "maxabs_pow2"}}})
    with weight_memo():
        first = ib.compute_scales(meas, per_tensor, model=model)["0"]
        assert ib.compute_scales(meas, per_tensor, model=model)["0"].weight_scale is first.weight_scale
        assert ib.compute_scales(meas, per_channel, model=model)["0"].weight_scale.shape == (4,)
        a = float(first.input_scale)
        assert float(ib.compute_scales(meas, pow2, model=model)["0"].input_scale) == 2.0 ** math.ceil(math.log2(a))
        with torch.no_grad():
            model[0].weight.mul_(2)
        assert torch.equal(ib.compute_scales(meas, per_tensor, model=model)["0"].weight_scale, first.weight_scale * 2)
    assert ib.compute_scales(meas, per_tensor, model=model)["0"].weight_scale is not first.weight_scale


def test_converted_models_do_not_share_storage_with_remembered_scales():
    """A module-form layer's weight_scale buffer is its own: loading a state dict into the converted
    model leaves the scales remembered for the float model as they were."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    meas = ib.calibrate(model, [torch.randn(16, 8)])
    recipe = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})
    before = ib.compute_scales(meas, recipe, model=model)["0"].weight_scale.clone()
    qmodel = ib.convert(model, ib.compute_scales(meas, recipe, model=model), form="module")
    state = qmodel.state_dict()
    qmodel.load_state_dict({**state, "0.weight_scale": state["0.weight_scale"] * 3})
    assert torch.equal(ib.compute_scales(meas, recipe, model=model)["0"].weight_scale, before)


def test_converted_models_own_their_fp8_weights():
    """Outside autotune's trials each conversion gets FP8 data of its own: one converted model's
    buffers can change (load_state_dict) without changing another's."""
    from inc_bridge.convert import structural_copy, swapped_in
    from inc_bridge.scales import weight_memo

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    scales = ib.compute_scales(ib.calibrate(model, [torch.randn(16, 8)]), model=model)
    scratch = structural_copy(model)
    with weight_memo():  # as in autotune's run
        with swapped_in(scratch, scales, form="module") as trial:  # remembers the FP8 weight...
            remembered = trial[0].qweight
        first = ib.convert(model, scales, form="module")  # ...and hands it over here
        second = ib.convert(model, scales, form="module")
    assert first[0].qweight is remembered and second[0].qweight.data_ptr() != first[0].qweight.data_ptr()
    x = torch.randn(3, 8)
    expected = second(x)
    first.load_state_dict({**first.state_dict(), "0.qweight": torch.zeros_like(first[0].qweight)})
    assert torch.equal(second(x), expected)

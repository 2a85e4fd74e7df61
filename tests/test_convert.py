"""convert: both forms, layer selection, conversion results and failures that change nothing."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import inc_bridge as ib
from inc_bridge.nn import QConv2d, QuantizedLinear

from .models import LinearNet, ToyNet, linear_batches, toy_batches


def _scales(model, recipe=None, batches=None):
    recipe = recipe or ib.Recipe()
    meas = ib.calibrate(model, batches or toy_batches(), recipe)
    return ib.compute_scales(meas, recipe, model=model)


def test_subclass_form_keeps_structure_and_module_form_swaps():
    model = ToyNet()
    scales = _scales(model)
    qsub = ib.convert(model, scales, form="subclass")
    qmod = ib.convert(model, scales, form="module")
    assert type(qsub.proj) is nn.Linear and isinstance(qsub.proj.weight, ib.Float8StaticTensor)
    assert qsub.proj.weight.qdata.dtype == torch.float8_e4m3fn and qsub.proj.weight.shape == model.proj.weight.shape
    assert type(qmod.proj) is QuantizedLinear and type(qmod.conv1) is QConv2d
    sd = qmod.state_dict()
    assert {"proj.qweight", "proj.weight_scale", "proj.input_scale", "proj.bias"} <= sd.keys()
    assert "proj.weight" not in sd and sd["proj.qweight"].dtype == torch.float8_e4m3fn
    # model code reading .weight sees the float layer's dtype and shape
    assert qmod.proj.weight.dtype == torch.float32 and qmod.proj.weight.shape == model.proj.weight.shape
    assert "in_features=6, out_features=16" in repr(qmod.proj) and "input_scale=" in repr(qmod.proj)
    assert "groups=2" in repr(qmod.conv1)
    # the caller's model is a float model still
    assert type(model.proj) is nn.Linear and model.proj.weight.dtype == torch.float32
    assert not isinstance(model.proj.weight, ib.Float8StaticTensor)


def test_forms_agree_on_higher_rank_inputs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 4, 5, 8)
    scales = _scales(model, batches=[x])
    qsub, qmod = ib.convert(model, scales), ib.convert(model, scales, form="module")
    with torch.no_grad():
        a, b = qsub(x), qmod(x)
    assert a.shape == (2, 3, 4, 5, 3) and torch.equal(a, b)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_padding_variants_agree_between_forms(padding, padding_mode):
    conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 9, 9)
    scales = _scales(model, batches=[x])
    qsub, qmod = ib.convert(model, scales), ib.convert(model, scales, form="module")
    with torch.no_grad():
        a, b, ref = qsub(x), qmod(x), model(x)
    assert torch.equal(a, b) and a.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(a.flatten(), ref.flatten(), dim=0) > 0.99


def test_include_exclude_and_conversion_result():
    model = ToyNet()
    recipe = ib.Recipe.model_validate({"quantization": {"include": ["re:conv", "head"], "exclude": ["conv2"]}})
    scales = _scales(model, recipe)
    assert set(scales.layers) == {"conv1", "conv3", "head"}
    qmodel = ib.convert(model, scales, form="module")
    result = ib.conversion_result(qmodel)
    assert result.converted == {"conv1": "conv2d", "conv3": "conv2d", "head": "linear"}
    assert result.skipped == {
        "conv2": "excluded by 'conv2'",
        "proj": "not matched by quantization.include",
        "seq": "not matched by quantization.include",
    }
    assert type(qmodel.conv2) is nn.Conv2d and type(qmodel.proj) is nn.Linear
    assert "3 layers converted" in result.summary()
    assert re.search(r"kept conv2 \(Conv2d, \d+ B\): excluded by 'conv2'", result.summary())


def test_ops_selection():
    model = ToyNet()
    scales = _scales(model, ib.Recipe.model_validate({"quantization": {"ops": ["linear"]}}))
    assert set(scales.layers) == {"proj", "seq", "head"}
    assert scales.skipped["conv1"] == "op 'conv2d' not in quantization.ops"


def test_conversion_result_requires_converted_model():
    with pytest.raises(ib.ConversionError, match="not produced by inc_bridge.convert"):
        ib.conversion_result(ToyNet())


def test_unsupported_module_named_in_recipe():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    recipe = ib.Recipe.model_validate({"quantization": {"include": ["2"]}})
    with pytest.raises(ib.ConversionError, match=r"'2' \(LayerNorm\), which inc_bridge cannot quantize; quantizable: linear"):
        ib.calibrate(model, [torch.randn(2, 4)], recipe)
    missing = ib.Recipe.model_validate({"quantization": {"include": ["encoder.fc"]}})
    with pytest.raises(ib.ConversionError, match="no module of that name"):
        ib.quantize(model, [torch.randn(2, 4)], missing)
    off = ib.Recipe.model_validate({"quantization": {"include": ["0"], "ops": ["conv2d"]}})
    with pytest.raises(ib.ConversionError, match="'linear' is not in quantization.ops"):
        ib.quantize(model, [torch.randn(2, 4)], off)


def test_layer_missing_from_measurements():
    model = ToyNet()
    meas = ib.calibrate(model, toy_batches())
    del meas.layers["seq"]
    with pytest.raises(ib.CalibrationError, match="layer 'seq' is selected for quantization but has no measurements"):
        ib.compute_scales(meas, model=model)


def test_layer_not_run_during_calibration_is_reported():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    meas = ib.calibrate(model, [torch.randn(2, 4)])
    assert meas.names == ["used"]
    with pytest.raises(ib.CalibrationError, match="'unused'.*did not run during calibration"):
        ib.compute_scales(meas, model=model)


def test_failed_convert_leaves_model_unchanged():
    model = ToyNet()
    scales = _scales(model)
    other = ToyNet()
    other.seq = nn.Linear(16, 12, bias=False).to(torch.bfloat16)  # dtype differs from its scales
    before = {n: (p, p.clone()) for n, p in other.state_dict(keep_vars=True).items()}
    for inplace in (False, True):
        with pytest.raises(ib.ConversionError, match="layer 'seq': weight dtype torch.bfloat16 differs"):
            ib.convert(other, scales, form="module", inplace=inplace)
        for name, (t, c) in before.items():
            assert other.state_dict(keep_vars=True)[name] is t and torch.equal(t, c)
        assert all(not isinstance(m, (QuantizedLinear, QConv2d)) for m in other.modules())
    wrong = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ib.ConversionError, match="no module of that name"):
        ib.convert(wrong, scales)


def test_inplace_conversion():
    model = ToyNet()
    scales = _scales(model)
    x = toy_batches(1, seed=3)[0]
    expected = ib.convert(model, scales, form="module")(x)
    out = ib.convert(model, scales, form="module", inplace=True)
    assert out is model and type(model.proj) is QuantizedLinear
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_convert_copy_shares_nothing_with_the_float_model(form):
    model = ToyNet()
    qmodel = ib.convert(model, _scales(model), form=form)
    assert qmodel.proj is not model.proj and qmodel.conv1.bias is not model.conv1.bias
    for name in ("conv1", "proj"):
        assert getattr(qmodel, name).bias.data_ptr() != getattr(model, name).bias.data_ptr()
    if form == "module":
        return
    qmodel.conv1.register_forward_hook(lambda *a: None)
    qmodel.proj.register_buffer("extra", torch.zeros(1))
    assert not model.conv1._forward_hooks and "extra" not in model.proj._buffers
    assert isinstance(qmodel.proj.weight, nn.Parameter) and not qmodel.proj.weight.requires_grad


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_swapped_in_converts_for_the_block_and_restores_the_same_modules(form):
    from inc_bridge.convert import structural_copy, swapped_in

    model = ToyNet()
    scales = _scales(model)
    x = toy_batches(1, seed=3)[0]
    expected, float_out = ib.convert(model, scales, form=form)(x), model(x)
    scratch = structural_copy(model)
    before = dict(scratch.named_modules())
    with swapped_in(scratch, scales, form=form) as qmodel:
        assert qmodel is scratch and torch.equal(qmodel(x), expected)
        assert set(ib.conversion_result(qmodel).converted) == set(scales.layers)
    assert dict(scratch.named_modules()) == before  # the very same module objects, weights float again
    assert torch.equal(scratch(x), float_out)
    with pytest.raises(ib.ConversionError):
        ib.conversion_result(scratch)
    with pytest.raises(RuntimeError, match="inside"), swapped_in(scratch, scales, form=form):
        raise RuntimeError("inside")
    assert dict(scratch.named_modules()) == before and torch.equal(scratch(x), float_out)
    assert torch.equal(model(x), float_out)  # the model the scratch copy shares weights with: untouched


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_swapped_in_shares_biases_only_inside_the_block(form):
    from inc_bridge.convert import structural_copy, swapped_in
    from inc_bridge.sharing import tensors_shared

    model = ToyNet()
    scratch = structural_copy(model)
    with swapped_in(scratch, _scales(model), form=form) as qmodel:
        assert qmodel.proj.bias.data_ptr() == model.proj.bias.data_ptr()
        assert not tensors_shared()  # only while the layers are built
    copied = ib.convert(model, _scales(model), form=form)
    assert copied.proj.bias.data_ptr() != model.proj.bias.data_ptr()


def test_shared_conversion_of_a_layer_with_children_still_gets_the_fp8_weight():
    """A Linear with a child module is deep-copied; sharing its tensors must not undo the FP8 weight."""
    from inc_bridge.convert import structural_copy, swapped_in

    model = LinearNet()
    model.fc1.extra = nn.Identity()
    scales = ib.compute_scales(ib.calibrate(model, linear_batches()), model=model)
    scratch = structural_copy(model)
    with swapped_in(scratch, scales) as qmodel:
        assert isinstance(qmodel.fc1.weight, ib.Float8StaticTensor)
        assert qmodel.fc1.bias is model.fc1.bias
    assert isinstance(ib.convert(model, scales).fc1.weight, ib.Float8StaticTensor)


def test_backend_choice():
    model = LinearNet()
    scales = _scales(model, batches=[torch.randn(2, 32)])
    # auto: the best available backend for the model's device (cpu when its native kernels are built)
    expected = "cpu" if ib.kernels.backend_availability("cpu").available else "emulated"
    assert ib.conversion_result(ib.convert(model, scales, backend="auto")).backend == expected
    if not ib.kernels.backend_availability("cuda").available:
        with pytest.raises(ib.BackendUnavailableError, match="backend 'cuda' is not available here: .*available here: .*emulated"):
            ib.convert(model, scales, backend="cuda")
    with pytest.raises(ib.ConversionError, match="valid forms"):
        ib.convert(model, scales, form="modules")


@pytest.mark.parametrize("fmt,target,expected_max", [("e5m2", "cpu", 57344.0), ("e4m3", "gaudi2", 240.0), ("e4m3", "gaudi3", 448.0)])
def test_formats_and_target_ranges(fmt, target, expected_max):
    model = LinearNet()
    recipe = ib.Recipe.model_validate({"quantization": {"format": fmt, "target": target}})
    batches = [torch.randn(4, 32) * 1000]
    qmodel = ib.quantize(model, batches, recipe, form="module")
    assert qmodel.fc1.fp8_max == expected_max
    assert qmodel.fc1.qweight.dtype == (torch.float8_e5m2 if fmt == "e5m2" else torch.float8_e4m3fn)
    # activations far beyond the calibrated range saturate at the target's range instead of overflowing
    x = torch.randn(4, 32) * 1e6
    qsub = ib.quantize(model, batches, recipe)
    y_mod, y_sub = qmodel(x), qsub(x)
    assert torch.isfinite(y_mod).all() and torch.equal(y_mod, y_sub)


def test_weight_bytes_are_one_byte():
    model = ToyNet()
    qmodel = ib.convert(model, _scales(model), form="module")
    for name in ("proj", "conv1"):
        q, f = getattr(qmodel, name), getattr(model, name)
        assert q.qweight.element_size() == 1 and q.qweight.numel() == f.weight.numel()


def test_unit_scale():
    model = LinearNet()
    recipe = ib.Recipe.model_validate({"quantization": {"weight": {"scale_method": "unit_scale"}, "activation": {"scale_method": "unit_scale"}}})
    scales = _scales(model, recipe, batches=[torch.randn(2, 32)])
    assert float(scales["fc1"].input_scale) == 1.0 and float(scales["fc1"].weight_scale) == 1.0


class _Tokens(nn.Module):
    def __init__(self, max_norm=None):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0, max_norm=max_norm)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding_weight_only(granularity, dtype):
    model = _Tokens().to(dtype)
    ids = [torch.randint(0, 50, (3, 7)) for _ in range(2)]
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"], "weight": {"granularity": granularity}}})
    scales = ib.compute_scales(ib.calibrate(model, ids, recipe), recipe, model=model)
    assert scales["emb"].input_scale is None
    qsub, qmod = ib.convert(model, scales), ib.convert(model, scales, form="module")
    assert type(qmod.emb).__name__ == "QEmbedding" and qmod.emb.qweight.dtype == torch.float8_e4m3fn
    # independent reference: dequantize the whole table, then look up
    w = model.emb.weight.detach()
    s = scales["emb"].weight_scale.float().reshape(-1, 1) if granularity == "per_channel" else scales["emb"].weight_scale.float()
    s_q = torch.reciprocal(torch.reciprocal(scales["emb"].weight_scale)).float().reshape(s.shape) if granularity == "per_channel" \
        else torch.tensor(1.0 / float(torch.reciprocal(scales["emb"].weight_scale)))
    table = ((w.float() / s_q).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(dtype)
    x = torch.randint(0, 50, (2, 9))
    expected = torch.nn.functional.embedding(x, table)
    assert torch.equal(qsub.emb(x), expected) and torch.equal(qmod.emb(x), expected)
    assert torch.equal(qsub(x), qmod(x))


def test_embedding_not_in_default_ops_and_max_norm_refused():
    model = _Tokens()
    scales = ib.compute_scales(ib.calibrate(model, [torch.randint(0, 50, (2, 3))]), model=model)
    assert "emb" not in scales and scales.skipped["emb"] == "op 'embedding' not in quantization.ops"
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["embedding", "linear"]}})
    normed = _Tokens(max_norm=1.0)
    scales = ib.compute_scales(ib.calibrate(normed, [torch.randint(0, 50, (2, 3))], recipe), recipe, model=normed)
    with pytest.raises(ib.ConversionError, match="max_norm"):
        ib.convert(normed, scales, form="module")


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_dtype_casts_keep_fp8_data(form):
    model = ToyNet()
    scales = _scales(model)
    qmodel = ib.convert(model, scales, form=form)
    x = toy_batches(1, seed=4)[0]
    expected = qmodel(x)
    qmodel.float()  # a no-op cast: FP8 data, scales and outputs unchanged
    data = qmodel.proj.weight.qdata if form == "subclass" else qmodel.proj.qweight
    assert data.dtype == torch.float8_e4m3fn and torch.equal(qmodel(x), expected)
    qmodel.to(torch.bfloat16)  # now computes in bf16, weights stay FP8
    data = qmodel.proj.weight.qdata if form == "subclass" else qmodel.proj.qweight
    assert data.dtype == torch.float8_e4m3fn
    if form == "module":
        assert qmodel.proj.weight_scale.dtype == torch.float32 and qmodel.proj.dtype == torch.bfloat16
    assert qmodel.proj.weight.dtype == torch.bfloat16 and qmodel.proj.weight.scale.dtype == torch.float32
    y = qmodel(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(y.float().flatten(), expected.flatten(), dim=0) > 0.99

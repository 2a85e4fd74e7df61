"""INC parity: INC's own converted model, the subclass form and the module form agree bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import inc_bridge as ib
from inc_bridge.quant import dequantize_fp8, quantize_fp8

from .models import LinearNet, ToyNet, inc_reference, linear_batches, toy_batches

DTYPES = [torch.float32, torch.bfloat16]
PER_TENSOR = {
    "maxabs_arbitrary": {},
    "maxabs_pow2": {"weight": {"scale_method": "maxabs_pow2"}, "activation": {"scale_method": "maxabs_pow2"}},
}
PCS_POW2 = {"weight": {"granularity": "per_channel", "scale_method": "maxabs_pow2"}, "activation": {"scale_method": "maxabs_pow2"}}


def _both_forms(model, batches, recipe):
    meas = ib.calibrate(model, batches, recipe)
    scales = ib.compute_scales(meas, recipe, model=model)
    return ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module"), scales


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(PER_TENSOR))
def test_toy_model_matches_inc_exactly(dtype, method):
    model = ToyNet().to(dtype)
    batches = toy_batches(dtype=dtype)
    recipe = ib.Recipe.model_validate({"quantization": PER_TENSOR[method]})
    reference = inc_reference(model, batches, dtype, method)
    qsub, qmod, _ = _both_forms(model, batches, recipe)
    fresh = toy_batches(n=3, dtype=dtype, seed=7)
    with torch.no_grad():
        for x in fresh:
            expected = reference(x)
            assert torch.equal(qsub(x), expected)
            assert torch.equal(qmod(x), expected)
            assert not torch.equal(model(x), expected)  # the check can fail: FP8 changes the output


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_per_channel_linear_matches_inc_exactly(dtype):
    model = LinearNet().to(dtype)
    batches = linear_batches(dtype=dtype)
    recipe = ib.Recipe.model_validate({"quantization": PCS_POW2})
    reference = inc_reference(model, batches, dtype, "act_maxabs_pow2_weights_pcs_maxabs_pow2")
    qsub, qmod, scales = _both_forms(model, batches, recipe)
    assert scales["fc1"].weight_scale.shape == (64,)
    for x in linear_batches(n=3, dtype=dtype, seed=9):
        with torch.no_grad():
            expected = reference(x)
            assert torch.equal(qsub(x), expected)
            assert torch.equal(qmod(x), expected)


def _plain_reference_conv(x, w, b, ls: ib.LayerScales, conv: torch.nn.Conv2d, method: str):
    """Independent plain-torch FP8 QDQ conv: per-channel weight scales, per-tensor activation."""
    fp8, mx = ls.format.dtype, ls.fp8_max
    s_x = ls.activation_scale()
    xq = ((x.float() / s_x).clamp(-mx, mx).to(fp8).float() * s_x).to(x.dtype)
    expected_scale = w.detach().abs().amax(dim=(1, 2, 3)) / (mx * 0.5)
    if method == "maxabs_pow2":
        expected_scale = torch.exp2(torch.ceil(torch.log2(expected_scale)))
    assert torch.equal(ls.weight_scale, expected_scale)
    s_w = ls.weight_scale.float().view(-1, 1, 1, 1)
    s_wq = torch.reciprocal(torch.reciprocal(ls.weight_scale)).float().view(-1, 1, 1, 1)
    wq = ((w.detach().float() / s_wq).clamp(-mx, mx).to(fp8).float() * s_w).to(w.dtype)
    return F.conv2d(xq, wq, b, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["maxabs_pow2", "maxabs_arbitrary"])
def test_per_channel_conv_matches_plain_torch_reference(dtype, method):
    # INC cannot convert per-channel Conv2d (it fails in its convert), so the reference is plain torch.
    model = ToyNet().to(dtype)
    batches = toy_batches(dtype=dtype)
    q = {"weight": {"granularity": "per_channel", "scale_method": method}, "activation": {"scale_method": method},
         "ops": ["conv2d"]}
    recipe = ib.Recipe.model_validate({"quantization": q})
    qsub, qmod, scales = _both_forms(model, batches, recipe)
    x = toy_batches(n=1, dtype=dtype, seed=5)[0]
    ls = scales["conv1"]
    assert ls.weight_scale.shape == (8,)
    with torch.no_grad():
        expected = _plain_reference_conv(x, model.conv1.weight, model.conv1.bias, ls, model.conv1, method)
        assert torch.equal(qsub.conv1(x), expected)
        assert torch.equal(qmod.conv1(x), expected)
        assert torch.equal(qsub(x), qmod(x))


def test_per_channel_scales_follow_inc_formula():
    model = ToyNet()
    recipe = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})
    scales = ib.compute_scales(ib.calibrate(model, toy_batches(), recipe), recipe, model=model)
    w = model.conv2.weight.detach()
    expected = w.abs().amax(dim=(1, 2, 3)) / (448.0 * 0.5)
    assert torch.equal(scales["conv2"].weight_scale, expected)
    w = model.seq.weight.detach()
    assert torch.equal(scales["seq"].weight_scale, w.abs().amax(dim=1) / 224.0)


def test_quantize_primitive_equals_torchao():
    from torchao.quantization.quant_primitives import _dequantize_affine_float8, _quantize_affine_float8

    x = torch.randn(64, 33) * 100
    s = torch.tensor(0.37)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        ours = quantize_fp8(x, s, fp8, torch.finfo(fp8).max)
        theirs = _quantize_affine_float8(x, s, fp8)
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
        for out in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_fp8(ours, s, out), _dequantize_affine_float8(theirs, s, out))

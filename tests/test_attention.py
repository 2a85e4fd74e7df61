"""Attention in FP8: SDPA as a module, capture, QSDPA/QMatmul, and the Float8 activation subclass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inc_bridge as ib
from inc_bridge.nn import QSDPA, SDPA, Matmul, QMatmul

from .attention_models import (
    BaddbmmAttention,
    BmmAttention,
    FunctionalAttention,
    HelperAttention,
    MhaModel,
    TwoPaths,
)
from .models import SENTENCES, ToyNet, embed, load_minilm, minilm_batches, toy_batches

ATTN = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa", "bmm"]}})


def _qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain-torch FP8 E4M3 quantize-dequantize with a static fp32 scale."""
    s = scale.float()
    return ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


def _quantize(model, calib, recipe=ATTN):
    meas = ib.calibrate(model, calib, recipe)
    scales = ib.compute_scales(meas, recipe, model=model)
    return ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module"), scales, meas


# ------------------------------------------------------------------ SDPA module


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "additive_mask", "scale", "gqa"])
def test_sdpa_module_is_the_functional_call(case):
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    kwargs: dict = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 7, 7) > 0.3
        kwargs["attn_mask"][..., 0] = True
    elif case == "additive_mask":
        kwargs["attn_mask"] = torch.randn(7, 7)
    elif case == "scale":
        kwargs["scale"] = 0.1
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    assert torch.equal(SDPA()(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


# ------------------------------------------------------------------ capture


def _capture_is_exact(model, x):
    with torch.no_grad():
        before = model(x)
        ib.capture_attention(model, x)
        after = model(x)
    assert torch.equal(before, after)
    return model


def test_capture_functional_sdpa():
    model = _capture_is_exact(nn.Sequential(FunctionalAttention(), FunctionalAttention()).eval(), torch.randn(2, 6, 32))
    assert ib.captured_sites(model) == {"0.sdpa": "sdpa", "1.sdpa": "sdpa"}
    assert isinstance(model[0].sdpa, SDPA)


def test_capture_bmm_attention():
    model = _capture_is_exact(BmmAttention().eval(), torch.randn(2, 6, 32))
    assert ib.captured_sites(model) == {"bmm": "bmm", "bmm_1": "bmm"}


@pytest.mark.parametrize("need_weights", [False, True])
def test_capture_multihead_attention(need_weights):
    model = _capture_is_exact(MhaModel(need_weights=need_weights).eval(), torch.randn(6, 2, 32))
    expected = {"mha.bmm": "bmm", "mha.bmm_1": "bmm"} if need_weights else {"mha.sdpa": "sdpa"}
    assert ib.captured_sites(model) == expected


def test_capture_leaves_a_model_without_attention_alone():
    model = ToyNet()
    x = toy_batches(1)[0]
    before = model(x)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    modules = [type(m) for m in model.modules()]
    ib.capture_attention(model, x)
    assert ib.captured_sites(model) == {} and [type(m) for m in model.modules()] == modules
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks and "forward" not in vars(model)
    assert torch.equal(model(x), before)


def _sdpa_calls(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.sdpa.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_captured_model_copies_and_pickles_with_its_routing(monkeypatch):
    """The routing travels with the model: deep and shallow copies, a DataParallel-style replica and
    an unpickled copy (also in a process that never captured) route to their own modules; the
    class keeps its name and forward signature; dropping the model frees it at once (no cycle)."""
    import copy
    import gc
    import inspect
    import io
    import weakref

    from inc_bridge import capture, capture_rewrite

    model = FunctionalAttention().eval()
    x = torch.randn(2, 5, 32)
    signature, name = inspect.signature(model.forward), type(model).__name__
    ib.capture_attention(model, x)
    ib.capture_attention(model, x)  # again: routed once, no second sdpa module
    assert ib.captured_sites(model) == {"sdpa": "sdpa"} and not hasattr(model, "sdpa_1")
    assert inspect.signature(model.forward) == signature and type(model).__name__ == name
    assert isinstance(model, FunctionalAttention) and "forward" not in vars(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    monkeypatch.setattr(capture, "_ROUTED_CLASSES", {})  # as in a fresh process
    monkeypatch.setattr(capture_rewrite, "_REWRITTEN", {})
    unpickled = torch.load(buffer, weights_only=False)
    replica = model.__new__(type(model))
    replica.__dict__ = model.__dict__.copy()
    replica._modules = {k: copy.deepcopy(v) for k, v in model._modules.items()}
    clones = (copy.deepcopy(model), unpickled, copy.copy(model), replica)  # before any hook is added
    with torch.no_grad():
        expected = model(x)
    original_calls = _sdpa_calls(model)
    for clone in clones:
        calls = _sdpa_calls(clone) if clone.sdpa is not model.sdpa else original_calls
        original_calls.clear()
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
        assert calls == [1] and (calls is original_calls or not original_calls)  # its own sdpa module
    gc.disable()
    try:
        dropped = ib.capture_attention(FunctionalAttention().eval(), x)
        ref = weakref.ref(dropped)
        del dropped
        assert ref() is None
    finally:
        gc.enable()


def test_capture_keeps_an_instance_level_forward_and_routes_it():
    model = FunctionalAttention().eval()
    x = torch.randn(2, 5, 32)
    seen = []

    def wrapped(*args, **kwargs):  # as a tool that wraps forward on the instance would
        seen.append(1)
        return FunctionalAttention.forward(model, *args, **kwargs)

    model.forward = wrapped
    ib.capture_attention(model, x)
    calls = _sdpa_calls(model)
    with torch.no_grad():
        model(x)
    assert seen and calls == [1]


def test_failed_export_of_a_captured_model_leaves_no_function_mode():
    """torch skips forward hooks when forward raises while exporting: the routing is a ``with``
    block inside forward, so the function-mode stack is as it was (it kept torch.export's own mode)."""
    from torch.overrides import _get_current_function_mode_stack

    model = FunctionalAttention().eval()
    x = torch.randn(2, 5, 32)
    ib.capture_attention(model, x)

    def fails(*args, **kwargs):
        raise RuntimeError("inside forward")

    model.o.forward = fails
    with pytest.raises(RuntimeError, match="inside forward"):
        torch.export.export(model, (x,), strict=False)
    assert _get_current_function_mode_stack() == []


def test_capture_needs_example_for_plain_models():
    with pytest.raises(ib.ConversionError, match="needs example_inputs"):
        ib.capture_attention(BmmAttention())


# ------------------------------------------------------------------ quantized attention vs independent references


def test_bmm_attention_matches_plain_torch_reference():
    torch.manual_seed(0)
    model = ib.capture_attention(BmmAttention().eval(), torch.randn(2, 6, 32))
    qsub, qmod, scales, meas = _quantize(model, [torch.randn(2, 6, 32) for _ in range(3)])
    assert meas["bmm"].source is ib.measurements.Source.BRIDGE and meas["q"].source is ib.measurements.Source.INC
    assert isinstance(qmod.bmm, QMatmul) and type(qsub.bmm) is Matmul
    x = torch.randn(2, 6, 32)
    s1, s2 = scales["bmm"].activation_scales(), scales["bmm_1"].activation_scales()
    with torch.no_grad():
        q, k, v = qmod.q(x), qmod.k(x), qmod.v(x)  # the quantized Linear layers (checked elsewhere)
        scores = torch.bmm(_qdq(q, s1[0]), _qdq(k.transpose(1, 2), s1[1])) / 32**0.5
        expected = torch.bmm(_qdq(torch.softmax(scores, -1), s2[0]), _qdq(v, s2[1]))
        assert torch.equal(qmod(x), expected)
        assert torch.equal(qsub(x), expected)


def test_multihead_attention_matches_plain_torch_reference():
    torch.manual_seed(0)
    model = ib.capture_attention(MhaModel().eval(), torch.randn(6, 2, 32))
    qsub, qmod, scales, _ = _quantize(model, [torch.randn(6, 2, 32) for _ in range(3)])
    mha, x = model.mha, torch.randn(5, 3, 32)
    s = scales["mha.sdpa"].activation_scales()
    with torch.no_grad():
        h = qmod.inp(x)
        t, b, e = h.shape
        proj = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = (z.view(t, b * 4, e // 4).transpose(0, 1).view(b, 4, t, e // 4) for z in (q, k, v))
        y = F.scaled_dot_product_attention(_qdq(q, s[0]), _qdq(k, s[1]), _qdq(v, s[2]))
        y = y.permute(2, 0, 1, 3).contiguous().view(b * t, e)
        expected = F.linear(y, mha.out_proj.weight, mha.out_proj.bias).view(t, b, e)
        assert torch.equal(qmod(x), expected)
        assert torch.equal(qsub(x), expected)


def test_multihead_attention_with_weights_both_forms_agree():
    model = ib.capture_attention(MhaModel(need_weights=True).eval(), torch.randn(6, 2, 32))
    qsub, qmod, _, _ = _quantize(model, [torch.randn(6, 2, 32) for _ in range(3)])
    x = torch.randn(7, 2, 32)
    with torch.no_grad():
        a, b, ref = qsub(x), qmod(x), model(x)
    assert torch.equal(a, b)
    assert F.cosine_similarity(a.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("mask", ["causal", "bool", "additive", "padding"])
@pytest.mark.parametrize("gqa", [False, True])
def test_masks_and_gqa(mask, gqa):
    torch.manual_seed(0)
    attn = FunctionalAttention(kv_heads=2 if gqa else None).eval()
    t = 6
    kwargs: dict = {}
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "bool":
        kwargs["attn_mask"] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    elif mask == "additive":
        kwargs["attn_mask"] = torch.randn(t, t)
    else:  # padding: the last two key positions of the second sequence are padding
        pad = torch.ones(2, 1, 1, t, dtype=torch.bool)
        pad[1, ..., -2:] = False
        kwargs["attn_mask"] = pad

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, **kwargs)

    model = _capture_is_exact(Wrap().eval(), torch.randn(2, t, 32))
    qsub, qmod, scales, _ = _quantize(model, [torch.randn(2, t, 32) for _ in range(2)])
    x = torch.randn(2, t, 32)
    s = scales["attn.sdpa"].activation_scales()
    with torch.no_grad():
        a, b = qsub(x), qmod(x)
        inner = qmod.attn
        q = inner.q(x).view(2, t, inner.h, inner.hd).transpose(1, 2)
        k, v = inner.kv_proj(x).view(2, t, 2, inner.kv, inner.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(_qdq(q, s[0]), _qdq(k, s[1]), _qdq(v, s[2]), enable_gqa=gqa, **kwargs)
        expected = inner.o(y.transpose(1, 2).reshape(2, t, 32))
    assert torch.equal(a, b) and torch.equal(a, expected) and torch.isfinite(a).all()


@pytest.mark.parametrize("cls", [FunctionalAttention, BmmAttention, BaddbmmAttention, MhaModel])
def test_call_sites_become_module_calls_that_compile_without_graph_breaks(cls):
    """A call site in its owner's forward is rewritten into a call of its module: nothing is routed
    at run time (no function mode), so dynamo sees one graph."""
    from inc_bridge import capture

    model = cls().eval()
    x = torch.randn(6, 2, 32) if cls is MhaModel else torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = model(x)
    ib.capture_attention(model, x)
    assert type(model) not in capture._ROUTED_CLASSES.values() and isinstance(model, cls)
    with torch.no_grad():
        got = model(x)
        assert torch.equal(got[0] if cls is MhaModel else got, expected[0] if cls is MhaModel else expected)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_call_site_in_a_helper_function_stays_routed():
    """Attention in a helper function cannot be rewritten with certainty: the function mode routes it."""
    from inc_bridge import capture

    model = ib.capture_attention(HelperAttention().eval(), torch.randn(2, 6, 32))
    assert type(model) in capture._ROUTED_CLASSES.values() and ib.captured_sites(model) == {"sdpa": "sdpa"}
    calls = _sdpa_calls(model)
    with torch.no_grad():
        model(torch.randn(2, 6, 32))
    assert calls == [1]


def test_capturing_again_adds_only_new_call_sites():
    model = ib.capture_attention(TwoPaths().eval(), torch.randn(2, 6, 32))  # short: one path
    assert set(ib.captured_sites(model)) == {"attn.sdpa"}
    first = model.attn.sdpa
    ib.capture_attention(model, torch.randn(2, 10, 32))  # long: both paths
    assert set(ib.captured_sites(model)) == {"attn.sdpa", "sdpa"} and model.attn.sdpa is first


def test_unseen_call_site_is_an_error_naming_it():
    model = ib.capture_attention(TwoPaths().eval(), torch.randn(2, 10, 32))  # long example: both sites
    assert set(ib.captured_sites(model)) == {"attn.sdpa", "sdpa"}
    meas = ib.calibrate(model, [torch.randn(2, 6, 32)], ATTN)  # short batches never reach the second
    with pytest.raises(ib.CalibrationError, match="layer 'sdpa' is selected for quantization but has no measurements"):
        ib.compute_scales(meas, ATTN, model=model)
    with pytest.raises(ib.CalibrationError, match="'sdpa'"):
        ib.quantize(model, [torch.randn(2, 6, 32)], ATTN)


def test_quantize_captures_a_copy():
    model = BmmAttention().eval()
    qmodel = ib.quantize(model, [torch.randn(2, 6, 32) for _ in range(2)], ATTN, form="module")
    assert isinstance(qmodel.bmm, QMatmul) and ib.captured_sites(model) == {}
    assert not hasattr(model, "bmm")


def test_subclass_form_keeps_attention_modules():
    model = ib.capture_attention(nn.Sequential(FunctionalAttention()).eval(), torch.randn(2, 6, 32))
    qsub, qmod, _, _ = _quantize(model, [torch.randn(2, 6, 32)])
    assert type(qsub[0].sdpa) is SDPA and qsub[0].sdpa.input_scales.shape == (3,)
    assert type(qmod[0].sdpa) is QSDPA and "q/k/v scales" in repr(qmod[0].sdpa)
    seen = {}
    qsub[0].sdpa.register_forward_pre_hook(lambda m, a: seen.update(types=[type(t) for t in a[:3]]))
    qsub(torch.randn(2, 6, 32))
    assert seen["types"] == [ib.Float8ActivationTensor] * 3


# ------------------------------------------------------------------ the activation subclass on its own


@pytest.mark.parametrize("shapes", [((5, 8), (8, 3)), ((2, 5, 8), (2, 8, 3)), ((2, 3, 5, 8), (2, 3, 8, 4)), ((8,), (8,))])
def test_float8_activation_matmul_any_rank(shapes):
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    sa, sb = torch.tensor(0.01), torch.tensor(0.02)
    fa = ib.Float8ActivationTensor.from_hp(a, sa, torch.float8_e4m3fn, 448.0)
    fb = ib.Float8ActivationTensor.from_hp(b, sb, torch.float8_e4m3fn, 448.0)
    expected = torch.matmul(_qdq(a, sa), _qdq(b, sb))
    assert torch.equal(torch.matmul(fa, fb), expected) and torch.equal(fa @ fb, expected)
    assert torch.equal(fa.matmul(_qdq(b, sb)), expected)


def test_float8_activation_bmm_baddbmm_sdpa():
    a, b = torch.randn(2, 5, 8), torch.randn(2, 8, 5)
    s = torch.tensor(0.02)
    fa, fb = (ib.Float8ActivationTensor.from_hp(t, s, torch.float8_e4m3fn, 448.0) for t in (a, b))
    assert torch.equal(torch.bmm(fa, fb), torch.bmm(_qdq(a, s), _qdq(b, s)))
    bias = torch.randn(2, 5, 5)
    assert torch.equal(torch.baddbmm(bias, fa, fb), torch.baddbmm(bias, _qdq(a, s), _qdq(b, s)))
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    fq, fk, fv = (ib.Float8ActivationTensor.from_hp(t, s, torch.float8_e4m3fn, 448.0) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(_qdq(q, s), _qdq(k, s), _qdq(v, s), is_causal=True)
    assert torch.equal(F.scaled_dot_product_attention(fq, fk, fv, is_causal=True), expected)
    assert fa.shape == (2, 5, 8) and fa.dtype == torch.float32 and fa.qdata.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_activation_conversions_equal_torch_in_any_dense_layout(monkeypatch, dtype):
    """q/k/v arrive as transposed views: the native conversions keep their layout and their bits."""
    from inc_bridge.kernels import cpu

    x = (torch.randn(2, 6, 4, 8) * 3).to(dtype).transpose(1, 2)  # [B, H, S, D] over a [B, S, H, D] buffer
    s = torch.tensor(0.013)
    fast = ib.Float8ActivationTensor.from_hp(x, s, torch.float8_e5m2, 57344.0)
    deq = fast.dequantize()
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "native", lambda: None)
        slow = ib.Float8ActivationTensor.from_hp(x, s, torch.float8_e5m2, 57344.0)
        assert torch.equal(fast.qdata.view(torch.uint8), slow.qdata.view(torch.uint8))
        assert torch.equal(deq, slow.dequantize()) and deq.stride() == slow.dequantize().stride() == x.stride()
    assert deq.dtype == dtype


def test_float8_activation_traces_with_fake_tensors():
    """Tracing (fake tensors, no data) takes the torch ops; the native conversions need real data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, s = torch.randn(2, 4, 6, 8).transpose(1, 2), torch.tensor(0.02)
        f = ib.Float8ActivationTensor.from_hp(x, s, torch.float8_e4m3fn, 448.0)
        assert f.dequantize().shape == x.shape


# ------------------------------------------------------------------ real models


@pytest.mark.slow
def test_minilm_linear_and_attention():
    model, tokenizer = load_minilm()
    evaluate = minilm_batches(tokenizer, SENTENCES)
    reference = embed(model, evaluate)
    ib.capture_attention(model)
    assert len([n for n in ib.captured_sites(model) if n.endswith("attention.self.sdpa")]) == 6
    assert torch.equal(embed(model, evaluate), reference)  # capture changes nothing
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa"]}})
    qsub, qmod, scales, _ = _quantize(model, minilm_batches(tokenizer, SENTENCES[::2]), recipe)
    assert len(scales) == 37 + 6
    sub, mod = embed(qsub, evaluate), embed(qmod, evaluate)
    assert torch.equal(sub, mod)
    cosine = (sub * reference).sum(-1)
    print(f"MiniLM FP8 Linear + attention: mean cosine {cosine.mean():.5f} over {len(cosine)} sentences")
    assert len(cosine) >= 32 and cosine.mean() >= 0.996


@pytest.mark.slow
def test_tiny_llama_gqa_generate_both_forms():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = llama(ids).logits
    ib.capture_attention(llama)
    assert set(ib.captured_sites(llama)) == {"model.layers.0.self_attn.sdpa", "model.layers.1.self_attn.sdpa"}
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa"], "exclude": ["lm_head"]}})
    calib = [torch.randint(0, 128, (2, n)) for n in (8, 12, 16)]
    qsub, qmod, _, _ = _quantize(llama, calib, recipe)
    with torch.no_grad():
        a, b = qsub(ids).logits, qmod(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, before)
    assert F.cosine_similarity(a.flatten(), before.flatten(), dim=0) > 0.98
    prompt = ids[:, :5]
    out_sub = qsub.generate(prompt, max_new_tokens=5, do_sample=False)
    out_mod = qmod.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out_sub.shape == (2, 10) and torch.equal(out_sub, out_mod)
    assert not math.isnan(float(a.sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boolean_masks_reach_the_sdpa_op_as_the_additive_mask_torch_makes_of_them(dtype):
    """QSDPA and the subclass form pass a boolean mask to ``inc_bridge::sdpa`` as 0 / -inf in the
    query's dtype (what F.scaled_dot_product_attention makes of it; inductor builds floats ~6x
    faster than booleans): attention is unchanged with either CPU kernel, a fully masked query
    included (zeros). test_masks_and_gqa checks whole models with boolean masks against torch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from inc_bridge.kernels.ops import sdpa_mask

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    mask[0, 0, 2] = False  # a query that sees no key
    additive = sdpa_mask(mask, dtype)
    assert additive.dtype == dtype and set(additive.unique().tolist()) <= {0.0, float("-inf")}
    assert sdpa_mask(None, dtype) is None and sdpa_mask(additive, dtype) is additive
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=additive), expected)
    assert torch.equal(expected[0, :, 2], torch.zeros_like(expected[0, :, 2]))

"""``torchao.quantization.quantize_`` with ``ib.IncFp8Config``: the same model as ``ib.convert(form="subclass")``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

import inc_bridge as ib

from .attention_models import FunctionalAttention
from .models import ToyNet, toy_batches

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WHOLE = ib.IncFp8Config.whole_model


class Tokens(nn.Module):
    """Embedding → Linear → Linear (ops linear + embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.fc = nn.Linear(16, 24)
        self.out = nn.Linear(24, 6, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids))))


def _toy(dtype):
    return ToyNet().eval().to(dtype), toy_batches(dtype=dtype), toy_batches(1, dtype=dtype, seed=7)[0], []


def _tokens(dtype):
    g = torch.Generator().manual_seed(3)
    return Tokens().eval().to(dtype), [torch.randint(0, 50, (3, 7), generator=g) for _ in range(3)], \
        torch.randint(0, 50, (2, 9), generator=g), ["embedding"]


MODELS = {"toynet": _toy, "tokens": _tokens}


def _scales(model, batches, ops_extra=(), granularity="per_tensor", **quant):
    recipe = ib.Recipe.model_validate(
        {"quantization": {"ops": ["linear", "conv2d", *ops_extra], "weight": {"granularity": granularity}, **quant}})
    return ib.compute_scales(ib.calibrate(model, batches, recipe), recipe, model=model)


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same module types by name; every parameter and buffer equal, FP8 weights part by part."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        q = pb[name]
        assert type(p) is type(q) and p.dtype == q.dtype and p.shape == q.shape, name
        if isinstance(p, ib.Float8StaticTensor):
            assert torch.equal(p.qdata, q.qdata) and p.qdata.dtype == q.qdata.dtype, name
            assert torch.equal(p.scale, q.scale), name
            assert (p.act_scale is None) == (q.act_scale is None), name
            assert p.act_scale is None or torch.equal(p.act_scale, q.act_scale), name
            assert (p.fp8_max, p.backend) == (q.fp8_max, q.backend), name
        else:
            assert torch.equal(p, q), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and all(torch.equal(t, bb[k]) for k, t in ba.items())


def _run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("kind", MODELS)
def test_quantize_equals_convert(kind, granularity, dtype):
    model, batches, x, ops_extra = MODELS[kind](dtype)
    scales = _scales(model, batches, ops_extra, granularity)
    reference = ib.convert(model, scales, form="subclass")
    target = copy.deepcopy(model)
    assert quantize_(target, ib.IncFp8Config(scales), filter_fn=WHOLE) is None  # in place, like every quantize_
    _assert_same_model(target, reference)
    assert sum(isinstance(p, ib.Float8StaticTensor) for p in target.parameters()) == len(scales)
    out = _run(target, x)
    assert out.dtype == dtype and torch.equal(out, _run(reference, x))
    # the conversion result is the one convert attaches
    got, want = ib.conversion_result(target), ib.conversion_result(reference)
    assert (got.form, got.backend, got.backend_requested) == (want.form, want.backend, "auto")
    assert got.converted == want.converted and got.skipped == want.skipped and got.scales is scales
    assert got.summary() == want.summary()
    # the float model given to convert is untouched
    assert not any(isinstance(p, ib.Float8StaticTensor) for p in model.parameters())


def test_layers_without_scales_are_left_alone():
    model, batches, x, _ = _toy(torch.float32)
    scales = _scales(model, batches, exclude=["head", "conv2"])
    target = copy.deepcopy(model)
    kept = {name: getattr(target, name).weight for name in ("head", "conv2")}
    quantize_(target, ib.IncFp8Config(scales, backend="emulated"), filter_fn=WHOLE)
    for name, weight in kept.items():  # the very same float parameter object
        assert getattr(target, name).weight is weight and type(weight) is nn.Parameter
    assert isinstance(target.proj.weight, ib.Float8StaticTensor) and target.proj.weight.backend == "emulated"
    reference = ib.convert(model, scales, form="subclass", backend="emulated")
    _assert_same_model(target, reference)
    assert torch.equal(_run(target, x), _run(reference, x))
    assert set(ib.conversion_result(target).skipped) == {"head", "conv2"}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_saved_quantize_model_loads_back_equal(dtype, tmp_path):
    model, batches, x, _ = _toy(dtype)
    scales = _scales(model, batches)
    target = copy.deepcopy(model)
    quantize_(target, ib.IncFp8Config(scales), filter_fn=WHOLE)
    ib.save(target, tmp_path / "m")
    loaded = ib.load(ToyNet().eval().to(dtype), tmp_path / "m")
    _assert_same_model(loaded, target)
    assert torch.equal(_run(loaded, x), _run(target, x))
    assert ib.conversion_result(loaded).converted == ib.conversion_result(target).converted


def _state(model: nn.Module):
    """Module and tensor objects by name, with a copy of each tensor's values."""
    return ([(n, m) for n, m in model.named_modules()],
            {k: (t, t.detach().clone()) for k, t in model.state_dict(keep_vars=True).items()})


def _assert_unchanged(model: nn.Module, state) -> None:
    modules, tensors = state
    assert [(n, m) for n, m in model.named_modules()] == modules
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for k, (t, values) in tensors.items():
        assert now[k] is t and not isinstance(t, ib.Float8StaticTensor), k
        assert torch.equal(now[k], values), k
    assert getattr(model, "_inc_bridge_conversion", None) is None


def test_errors_leave_the_model_unchanged():
    model, batches, _, _ = _toy(torch.float32)
    scales = _scales(model, batches)
    missing = ib.ScaleSet(layers={**scales.layers, "nope": scales["head"]}, skipped=scales.skipped,
                          format=scales.format, target=scales.target)
    state = _state(model)
    with pytest.raises(ib.ConversionError, match="scales name layer 'nope', but the model has no module of that name"):
        quantize_(model, ib.IncFp8Config(missing), filter_fn=WHOLE)
    _assert_unchanged(model, state)
    # quantize_'s default filter hands the handler single nn.Linear layers, without their names
    with pytest.raises(ib.ConversionError, match="single Linear layer.*filter_fn=inc_bridge.IncFp8Config.whole_model"):
        quantize_(model, ib.IncFp8Config(scales))
    _assert_unchanged(model, state)
    other = ToyNet().eval()
    other.seq = nn.Linear(16, 12, bias=False).to(torch.bfloat16)  # dtype differs from its scales
    other_state = _state(other)
    with pytest.raises(ib.ConversionError, match="layer 'seq': weight dtype torch.bfloat16 differs"):
        quantize_(other, ib.IncFp8Config(scales), filter_fn=WHOLE)
    _assert_unchanged(other, other_state)
    # twice: the second call refuses, the first result stays
    quantize_(model, ib.IncFp8Config(scales), filter_fn=WHOLE)
    weight = model.proj.weight
    with pytest.raises(ib.ConversionError, match="already quantized"):
        quantize_(model, ib.IncFp8Config(scales), filter_fn=WHOLE)
    assert model.proj.weight is weight


def test_config_fields_are_checked():
    model, batches, _, _ = _toy(torch.float32)
    scales = _scales(model, batches)
    with pytest.raises(ib.ConversionError, match=r"IncFp8Config.backend 'gpu' is not a backend; valid: \['auto'"):
        ib.IncFp8Config(scales, backend="gpu")
    with pytest.raises(ib.ConversionError, match="IncFp8Config.scales must be an inc_bridge.ScaleSet.*not dict"):
        ib.IncFp8Config({"head": scales["head"]})  # type: ignore[arg-type]
    config = ib.IncFp8Config(scales, backend="emulated")
    assert config.backend is ib.recipe.Backend.EMULATED
    with pytest.raises(AttributeError):  # frozen
        config.backend = "cpu"  # type: ignore[misc]


def test_captured_attention_equals_convert():
    """Subclass form with captured SDPA (ops linear + sdpa): the SDPA module quantizes q, k, v in place."""
    model = nn.Sequential(FunctionalAttention(), FunctionalAttention(kv_heads=2)).eval()
    x = torch.randn(2, 6, 32)
    ib.capture_attention(model, x)
    scales = _scales(model, [torch.randn(2, 6, 32) for _ in range(3)], ["sdpa"])
    assert {"0.sdpa", "1.sdpa"} <= scales.layers.keys()
    reference = ib.convert(model, scales, form="subclass")
    target = copy.deepcopy(model)
    quantize_(target, ib.IncFp8Config(scales), filter_fn=WHOLE)
    _assert_same_model(target, reference)
    assert torch.equal(target[0].sdpa.input_scales, reference[0].sdpa.input_scales)
    assert torch.equal(_run(target, x), _run(reference, x))
    assert not torch.equal(_run(target, x), _run(model, x))  # it did quantize
    assert ib.conversion_result(target).converted["1.sdpa"] == "sdpa"


class TiedTokens(nn.Module):
    """The output head holds the input embedding's weight (a language-model shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_tied_weights_stay_tied():
    model = TiedTokens().eval()
    _, batches, x, ops_extra = _tokens(torch.float32)
    scales = _scales(model, batches, ops_extra)
    assert {"emb", "head"} <= scales.layers.keys()
    reference = ib.convert(model, scales, form="subclass")
    target = copy.deepcopy(model)
    quantize_(target, ib.IncFp8Config(scales), filter_fn=WHOLE)
    assert isinstance(target.emb.weight, ib.Float8StaticTensor) and target.emb.weight is target.head.weight
    _assert_same_model(target, reference)
    assert torch.equal(_run(target, x), _run(reference, x))

"""Op ``conv1d``: ``torch.nn.Conv1d`` quantized as ``conv2d`` is, checked end to end on a small 1-D CNN.

INC 3.10 does not patch ``nn.Conv1d`` (its CPU, HPU and XPU module tables name Linear, Conv2d and
others, never Conv1d), so there is no INC model to compare with: the reference is the float model
with every quantized layer computing INC's QDQ math in plain torch, ``conv1d(qdq(x), dequant(W))``
(and ``qdq(x) @ dequant(W)ᵀ`` for the Linear head), from the same scales; the scales themselves are
checked against INC's ``maxabs_arbitrary`` formula on amax measured by hooks on the float model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inc_bridge as ib
from inc_bridge.kernels import cpu, ops
from inc_bridge.measurements import Source
from inc_bridge.nn import QConv1d
from inc_bridge.recipe import Op
from inc_bridge.tensor import Float8StaticTensor

from .models import AudioCNN

FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
CONVS = ("c1", "c2", "c3", "c4", "c5")
RECIPE = {"quantization": {"ops": ["linear", "conv1d"]}}
PER_CHANNEL = {"quantization": {"ops": ["linear", "conv1d"], "weight": {"granularity": "per_channel"}}}


def _batches(n: int = 3, dtype: torch.dtype = torch.float32, seed: int = 1, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 4, length, generator=g) * 2).to(dtype) for _ in range(n)]


def _float_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return AudioCNN().eval().to(dtype)


def _scales(model: nn.Module, recipe: dict, dtype: torch.dtype = torch.float32) -> ib.ScaleSet:
    r = ib.Recipe.model_validate(recipe)
    return ib.compute_scales(ib.calibrate(model, _batches(dtype=dtype), r), r, model=model)


# ------------------------------------------------------------------ the plain-torch reference


def _qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INC's quantize-dequantize in fp32: divide, clamp, round to FP8, multiply."""
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).to(x.dtype)


def _reference(model: nn.Module, scales: ib.ScaleSet) -> nn.Module:
    """``model`` with every quantized layer computing INC's QDQ math in plain torch, from ``scales``."""
    ref = copy.deepcopy(model)
    for name, ls in scales.layers.items():
        layer = ref.get_submodule(name)
        w = layer.weight.detach()
        shape = (-1,) + (1,) * (w.dim() - 1) if ls.weight_scale.dim() else ()
        # INC quantizes a weight with 1/(1/s) (as a Python float per tensor) and dequantizes with s.
        q_scale = (torch.tensor(1.0 / float(torch.reciprocal(ls.weight_scale))) if not ls.weight_scale.dim()
                   else torch.reciprocal(torch.reciprocal(ls.weight_scale)).float())
        qw = (w.float() / q_scale.reshape(shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        dq = (qw.float() * ls.weight_scale.float().reshape(shape)).to(w.dtype)
        s_x = torch.reciprocal(torch.reciprocal(ls.input_scale)).float()
        if isinstance(layer, nn.Conv1d):  # nn.Conv1d.forward: pad (non-"zeros" modes), then F.conv1d
            layer.weight = nn.Parameter(dq, requires_grad=False)
            layer.register_forward_pre_hook(lambda m, args, s=s_x: (_qdq(args[0], s),))
        else:  # INC's PatchedLinear: matmul with the contiguous [in, out] weight, then the bias
            w_kn = dq.t().contiguous()
            layer.forward = lambda x, s=s_x, w_kn=w_kn, b=layer.bias: torch.matmul(_qdq(x, s), w_kn) + b
    return ref


# ------------------------------------------------------------------ recipe and calibration


def test_conv1d_is_a_recipe_op_measured_by_the_bridge_and_not_in_the_default():
    assert Op("conv1d") is Op.CONV1D and Op.CONV1D.has_weight and Op.CONV1D.n_inputs == 1
    assert Op.CONV1D not in ib.Recipe().quantization.ops  # the default quantizes what INC quantizes
    model = _float_model()
    r = ib.Recipe.model_validate(RECIPE)
    meas = ib.calibrate(model, _batches(), r)
    assert {n: (s.kind, s.source) for n, s in meas.layers.items()} == {
        **{c: (Op.CONV1D.value, Source.BRIDGE) for c in CONVS}, "head": (Op.LINEAR.value, Source.INC)}
    # Only Conv1d layers: nothing for INC to measure, the bridge alone calibrates.
    only = ib.Recipe.model_validate({"quantization": {"ops": ["conv1d"]}})
    assert ib.calibrate(model, _batches(), only).layers["c3"].input_amax == meas.layers["c3"].input_amax
    # The default recipe leaves Conv1d in float and says why.
    left = {f.name: f.reason for f in ib.conversion_result(ib.quantize(model, _batches())).float_left}
    assert left == {c: "op 'conv1d' not in quantization.ops" for c in CONVS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scales_are_inc_maxabs_arbitrary_of_the_float_models_amax(dtype):
    """Activation scale amax/(448·0.25), weight scale amax/(448·0.5), computed in the model dtype,
    from the running max of |x| that hooks on the float model see (INC's statistic)."""
    model = _float_model(dtype)
    amax: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args) -> None:
            a = args[0].detach().abs().amax()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in CONVS]
    with torch.no_grad():
        for x in _batches(dtype=dtype):
            model(x)
    for h in hooks:
        h.remove()
    scales = _scales(model, RECIPE, dtype)
    for n in CONVS:
        assert torch.equal(scales[n].input_scale, amax[n] / (FP8_MAX * 0.25)), n
        assert torch.equal(scales[n].weight_scale, model.get_submodule(n).weight.detach().abs().amax() / (FP8_MAX * 0.5))


# ------------------------------------------------------------------ both forms, reference, backends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", [RECIPE, PER_CHANNEL], ids=["per_tensor", "per_channel"])
def test_both_forms_equal_each_other_and_the_plain_torch_reference(recipe, dtype):
    model = _float_model(dtype)
    scales = _scales(model, recipe, dtype)
    qsub, qmod = ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module")
    assert type(qsub.c2) is nn.Conv1d and isinstance(qsub.c2.weight, Float8StaticTensor)
    assert type(qmod.c2) is QConv1d and qmod.c2.qweight.dtype == FP8 and qmod.c2.groups == 4
    ref = _reference(model, scales)
    with torch.no_grad():
        for x in _batches(2, dtype=dtype, seed=7) + _batches(1, dtype=dtype, seed=8, length=31):
            out = qsub(x)
            assert torch.equal(out, qmod(x)) and torch.equal(out, ref(x))
            assert out.dtype == dtype


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_cpu_backend_equals_emulated(form):
    if cpu.native() is None:
        pytest.fail("the cpu backend's native library is not built (make kernels)")
    model = _float_model()
    scales = _scales(model, RECIPE)
    qcpu, qemu = (ib.convert(model, scales, form=form, backend=b) for b in ("cpu", "emulated"))
    assert ib.conversion_result(qcpu).backend == "cpu"
    with torch.no_grad():
        for x in _batches(2, seed=9) + [_batches(1, seed=10)[0][:, :, 3:]]:  # a slice with gaps too
            assert torch.equal(qcpu(x), qemu(x))


def test_op_gradient_is_straight_through():
    """``inc_bridge::conv1d``'s backward: the input gets ``F.conv1d``'s gradient with the dequantized
    weight (the activation's quantize-dequantize passes it unchanged), the bias its ordinary one."""
    x = torch.randn(2, 4, 11, requires_grad=True)
    qweight = (torch.randn(6, 2, 3) * 50).clamp(-448, 448).to(FP8)
    scale, bias = torch.tensor(0.02), torch.randn(6, requires_grad=True)
    y = ops.conv1d(x, qweight, scale, torch.tensor(0.03), bias, 448.0, torch.float32, "auto", [2], [1], "", [1], 2)
    grad = torch.randn_like(y)
    y.backward(grad)
    x2 = x.detach().requires_grad_()
    F.conv1d(x2, qweight.float() * scale, None, 2, 1, 1, 2).backward(grad)
    assert torch.equal(x.grad, x2.grad) and torch.equal(bias.grad, grad.sum((0, 2)))


# ------------------------------------------------------------------ compile, export, save, ONNX


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_compile_fullgraph_and_export_equal_eager(form):
    model = _float_model()
    q = ib.convert(model, _scales(model, RECIPE), form=form)
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        eager = q(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(q)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        assert torch.equal(torch.compile(q, backend="aot_eager", fullgraph=True)(x), eager)
    torch._dynamo.reset()
    exported = torch.export.export(q, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("inc_bridge.conv1d.default") == len(CONVS) and "inc_bridge.linear.default" in targets
    assert torch.equal(exported.module()(x), eager)


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_save_and_load_equal(tmp_path, form):
    model = _float_model()
    q = ib.convert(model, _scales(model, PER_CHANNEL), form=form)
    ib.save(q, tmp_path / "m")
    loaded = ib.load(_float_model(), tmp_path / "m")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    x = _batches(1, seed=6)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_a_saved_qconv1d_config_is_checked_for_one_spatial_dim():
    model = _float_model()
    layer = ib.convert(model, _scales(model, RECIPE), form="module").c3
    cfg = layer.quant_config()
    assert cfg["kernel_size"] == [3] and cfg["padding"] == "same" and cfg["padding_mode"] == "reflect"
    twin = QConv1d.from_config(cfg, device="meta")
    assert twin._reversed_padding_repeated_twice == layer._reversed_padding_repeated_twice == [1, 1]
    with pytest.raises(ib.SerializationError, match="'stride' must be one positive integer, got"):
        QConv1d.from_config({**cfg, "stride": [1, 1]}, device="meta")
    with pytest.raises(ib.SerializationError, match="'stride' must be two positive integers"):
        ib.nn.QConv2d.from_config({**cfg, "kernel_size": [3, 3]}, device="meta")


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch_and_length(tmp_path, form):
    """FP8 QDQ around each Conv (as for conv2d): every QuantizeLinear→DequantizeLinear equals torch's
    quant_dequant of its own input bit for bit; end to end within 1e-5 of the output scale when no
    element rounds to another FP8 value than in torch (onnxruntime sums the conv in another order),
    else 5e-2 (the bound tests/test_onnx.py uses for conv2d)."""
    onnx = pytest.importorskip("onnx")
    from .test_onnx import _assert_qdq_structure, _Probe, _qdq_inputs, _rounding_flips

    model = _float_model()
    q = ib.convert(model, _scales(model, RECIPE), form=form)
    path = ib.export_onnx(q, _batches(1, seed=3)[0], tmp_path / "cnn.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    _assert_qdq_structure(proto, n_layers=len(CONVS) + 1, fp8_type=onnx.TensorProto.FLOAT8E4M3FN)
    assert [n.op_type for n in proto.graph.node].count("Conv") == len(CONVS)
    probe = _Probe(path)
    for batch, length in [(2, 24), (1, 24), (5, 37)]:
        x = torch.randn(batch, 4, length) * 2
        out, values = probe.run(x)
        probe.assert_fp8_ops_exact(values, FP8, FP8_MAX)
        torch_inputs = _qdq_inputs(q, x)
        for name in CONVS:  # reflect / circular: the twin quantizes the padded input, as nn.Conv1d pads first
            layer = q.get_submodule(name)
            if layer.padding_mode != "zeros":
                key = f"{name}.input_scale"
                torch_inputs[key] = F.pad(torch_inputs[key], layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        ref = torch_inputs["<output>"]
        flips = _rounding_flips(probe, values, torch_inputs, FP8, FP8_MAX)
        err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        print(f"conv1d {form} {(batch, length)}: ORT vs torch max abs error {err:.3g}, output scale {scale:.3g}, "
              f"FP8 rounding flips {flips}")
        assert out.shape == ref.shape and err <= (1e-5 if flips == 0 else 5e-2) * scale

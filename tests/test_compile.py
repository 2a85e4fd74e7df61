"""torch.compile and torch.export of quantized models: the kernels are custom ops (``inc_bridge::*``).

For a conv + linear model and a linear-only model, both forms, backend auto (``cpu`` where the
native library is built) and ``emulated``: dynamo sees one graph (no breaks), ``fullgraph=True``
compiles, and the compiled and the exported model give eager's output bit for bit (the kernels
are opaque ops to inductor, so it cannot reorder their arithmetic).
"""

from __future__ import annotations

import pytest
import torch

import inc_bridge as ib
from inc_bridge.kernels import cpu, ops
from inc_bridge.nn import QSDPA, QMatmul
from inc_bridge.tensor import Float8StaticTensor

from .attention_models import BmmAttention, FunctionalAttention
from .models import LinearNet, ToyNet, linear_batches, toy_batches

MODELS = {"toy": (ToyNet, toy_batches), "linear": (LinearNet, linear_batches)}
INC_OPS = {f"inc_bridge.{name}.default" for name in ("linear", "conv2d", "embedding", "quantize", "dequantize")}


@pytest.fixture(scope="module")
def quantized():
    """Each (model, form, backend) quantized once for the whole file, with its eager output."""
    cache: dict = {}

    def get(model: str, form: str, backend: str):
        key = (model, form, backend)
        if key not in cache:
            cls, batches = MODELS[model]
            torch.manual_seed(0)
            q = ib.quantize(cls().eval(), batches(), form=form, backend=backend)
            x = batches(1, seed=5)[0]
            cache[key] = (q, x, q(x))
        return cache[key]

    return get


CASES = [(m, f, b) for m in MODELS for f in ("subclass", "module") for b in ("auto", "emulated")]


@pytest.mark.parametrize(("model", "form", "backend"), CASES)
def test_the_quantized_model_is_what_the_case_says(quantized, model, form, backend):
    q, _, _ = quantized(model, form, backend)
    expected = ("cpu" if cpu.native() is not None else "emulated") if backend == "auto" else backend
    assert ib.conversion_result(q).backend == expected
    layer = q.head if model == "toy" else q.fc1
    assert isinstance(layer.weight, Float8StaticTensor)  # module form: a view of qweight and its scales
    if form == "module":
        assert layer.qweight.dtype == torch.float8_e4m3fn and layer.weight.qdata is layer.qweight
    else:
        assert type(layer) is torch.nn.Linear


@pytest.mark.parametrize(("model", "form", "backend"), CASES)
def test_dynamo_sees_one_graph(quantized, model, form, backend):
    q, x, _ = quantized(model, form, backend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize(("model", "form", "backend"), CASES)
def test_compiled_fullgraph_equals_eager(quantized, model, form, backend):
    q, x, eager = quantized(model, form, backend)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True)(x)
    # Measured: bit-identical for both backends (the kernels are opaque custom ops; inductor compiles
    # only the float glue around them: relu, permute, mean).
    assert torch.equal(compiled, eager), (compiled - eager).abs().max()


@pytest.mark.parametrize(("model", "form", "backend"), CASES)
def test_exported_program_equals_eager_and_calls_the_custom_ops(quantized, model, form, backend):
    q, x, eager = quantized(model, form, backend)
    exported = torch.export.export(q, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"inc_bridge.linear.default"} <= targets
    if model == "toy":
        assert "inc_bridge.conv2d.default" in targets
    assert not any("_local_scalar_dense" in t or "item" in t for t in targets), targets
    assert torch.equal(exported.module()(x), eager)


# ------------------------------------------------------------------ the ops themselves


def _fp8(shape, dtype=torch.float8_e4m3fn, scale=0.05):
    return (torch.randn(shape) / scale).clamp(-448, 448).to(dtype)


def _op_cases():
    """(name, op, args, index of the backend argument) per op: per-tensor and per-channel weights,
    fp32 and bf16, both backends."""
    s, a = torch.tensor(0.02), torch.tensor(0.03)
    for hp in (torch.float32, torch.bfloat16):
        for backend in ("emulated", "auto"):
            x = torch.randn(2, 5, 16, dtype=hp)
            yield "linear", ops.linear, (x, _fp8((8, 16)), s, a, torch.randn(8, dtype=hp), 448.0, hp, backend), 7
            yield "linear", ops.linear, (x, _fp8((8, 16)), torch.rand(8, 1) * 0.05, a, None, 240.0, hp, backend), 7
            rows, offs = torch.randn(8, 16, dtype=hp), torch.tensor([3, 3, 7], dtype=torch.int32)  # expert 1: no rows
            yield "grouped_linear", ops.grouped_linear, (rows, _fp8((3, 8, 16)), torch.rand(3) * 0.05 + 0.01,
                                                         torch.rand(3) * 0.05 + 0.01, offs, 448.0, hp, backend), 7
            yield "grouped_linear", ops.grouped_linear, (rows, _fp8((3, 8, 16)), torch.rand(3, 8, 1) * 0.05 + 0.01,
                                                         torch.rand(3) * 0.05 + 0.01, offs, 448.0, hp, backend), 7
            img = torch.randn(2, 4, 9, 9, dtype=hp)
            yield "conv2d", ops.conv2d, (img, _fp8((6, 2, 3, 3)), s, a, torch.randn(6, dtype=hp), 448.0, hp, backend,
                                         [2, 1], [1, 1], "", [1, 2], 2), 7
            yield "conv2d", ops.conv2d, (img, _fp8((6, 4, 3, 3)), torch.rand(6, 1, 1, 1) * 0.05, a, None, 448.0, hp,
                                         backend, [1, 1], [0, 0], "same", [1, 1], 1), 7
            seq = torch.randn(2, 4, 11, dtype=hp)
            yield "conv1d", ops.conv1d, (seq, _fp8((6, 2, 3)), s, a, torch.randn(6, dtype=hp), 448.0, hp, backend,
                                         [2], [1], "", [2], 2), 7
            yield "conv1d", ops.conv1d, (seq, _fp8((6, 4, 3)), torch.rand(6, 1, 1) * 0.05, a, None, 448.0, hp,
                                         backend, [1], [0], "same", [1], 1), 7
            yield "embedding", ops.embedding, (torch.tensor([[0, 3], [2, 2]]), _fp8((5, 8)), torch.rand(5, 1) * 0.05,
                                               448.0, hp, backend), 5
            yield "quantize", ops.quantize, (x, a, torch.float8_e4m3fn, 448.0, backend), 4
            yield "dequantize", ops.dequantize, (_fp8((3, 7)), s, hp, backend), 3
            q, k, v = (_fp8((2, 4, 6, 8)) for _ in range(3))
            sq, sk, sv = torch.tensor(0.02), torch.tensor(0.03), torch.tensor(0.04)
            yield "sdpa", ops.sdpa, (q, k, v, sq, sk, sv, None, 0.0, True, None, False, hp, backend), 12
            mask = torch.randn(6, 6, dtype=hp)
            k5, v5 = _fp8((2, 2, 6, 8), torch.float8_e5m2), _fp8((2, 2, 6, 8), torch.float8_e5m2)
            yield "sdpa", ops.sdpa, (_fp8((2, 4, 6, 8), torch.float8_e5m2), k5, v5, sq, sk, sv, mask, 0.0, False, 0.3,
                                     True, hp, backend), 12
            yield "matmul", ops.matmul, ("matmul", q, k.transpose(-1, -2), sq, sk, None, 1.0, 1.0, hp, backend), 9
            m1, m2 = _fp8((3, 5, 8)), _fp8((3, 8, 4))
            yield "matmul", ops.matmul, ("bmm", m1, m2, sq, sk, None, 1.0, 1.0, hp, backend), 9
            yield "matmul", ops.matmul, ("baddbmm", m1, m2, sq, sk, torch.randn(3, 5, 4, dtype=hp), 0.5, 2.0, hp,
                                         backend), 9


OP_CASES = list(_op_cases())


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c[0]}-{c[2][c[3]]}")
def test_each_op_passes_torch_library_opcheck(case):
    """Fake implementation (shapes, dtypes, strides match the real kernel), autograd registration
    and AOT dispatch, as torch.library checks them; no input is mutated."""
    _, op, args, _ = case
    before = [a.view(torch.uint8).clone() if isinstance(a, torch.Tensor) and a.dtype.itemsize == 1 else a for a in args]
    # opcheck's schema test cannot compare FP8 tensors (SchemaCheckMode multiplies them); the
    # no-mutation half of it is checked by hand below, on the raw bytes.
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    op(*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b)


@pytest.mark.parametrize("case", [c for c in OP_CASES if c[2][c[3]] == "auto"], ids=lambda c: c[0])
def test_each_op_with_backend_auto_equals_emulated(case):
    """auto resolves from the device inside the op (cpu here when built); at these sizes the cpu
    kernels are bit-identical to emulated."""
    _, op, args, i = case
    assert torch.equal(op(*args), op(*args[:i], "emulated", *args[i + 1:]))


def test_gradients_are_straight_through():
    """A bias that requires grad, or an input that does, must not stop compile: the formula is the
    straight-through one (qdq of the activation passes the gradient, the weight is used dequantized)."""
    x = torch.randn(3, 16, requires_grad=True)
    qweight, scale = _fp8((8, 16)), torch.tensor(0.02)
    bias = torch.randn(8, requires_grad=True)
    y = ops.linear(x, qweight, scale, torch.tensor(0.03), bias, 448.0, torch.float32, "auto")
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad @ (qweight.float() * scale))
    assert torch.equal(bias.grad, grad.sum(0))


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize("backend", ["auto", "emulated"])
def test_qsdpa_and_qmatmul_compile_fullgraph_equal_to_eager(backend):
    """The attention ops on their own: one graph, the eager values. (Models with captured attention:
    tests/test_compile_models.py and the model matrix.)"""
    resolved = "emulated" if backend == "emulated" else ("cpu" if cpu.native() is not None else "emulated")
    common = {"fp8_dtype": torch.float8_e4m3fn, "fp8_max": 448.0, "dtype": torch.float32, "backend": resolved}
    sdpa, bmm = QSDPA(**common), QMatmul("baddbmm", **common)
    sdpa.input_scales = torch.tensor([0.02, 0.03, 0.04])
    bmm.input_scales = torch.tensor([0.02, 0.03])
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    a, b, c = torch.randn(3, 5, 8), torch.randn(3, 8, 4), torch.randn(3, 5, 4)
    for module, args, kwargs in ((sdpa, (q, k, v), {"is_causal": True}), (bmm, (c, a, b), {"beta": 0.5})):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(module)(*args, **kwargs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        assert torch.equal(torch.compile(module, fullgraph=True)(*args, **kwargs), module(*args, **kwargs))


ATTN = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa", "bmm"]}})


@pytest.mark.parametrize("model", ["sdpa", "bmm"])
@pytest.mark.parametrize("form", ["subclass", "module"])
def test_captured_attention_models_export_equal_to_eager(model, form):
    """torch.export (non-strict) runs the capture code in Python and records the ops: both forms call
    inc_bridge::quantize for the attention inputs, then inc_bridge::sdpa / matmul."""
    torch.manual_seed(0)
    float_model = (FunctionalAttention(kv_heads=2) if model == "sdpa" else BmmAttention()).eval()
    calib = [torch.randn(2, 6, 32) for _ in range(3)]
    x = torch.randn(2, 6, 32)
    q = ib.quantize(float_model, calib, ATTN, form=form)
    exported = torch.export.export(q, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    expected = {"inc_bridge.quantize.default", "inc_bridge.sdpa.default" if model == "sdpa" else "inc_bridge.matmul.default"}
    assert expected <= targets, targets
    assert torch.equal(exported.module()(x), q(x))

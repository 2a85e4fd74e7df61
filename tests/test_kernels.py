"""Kernel backends: availability and resolution, and every non-emulated kernel checked against
``emulated`` on the devices this machine has.

Bounds: ``torch.equal`` where a kernel does the same math as ``emulated`` (the cpu backend's native
conversions feeding the same torch op); otherwise SQNR against ``emulated`` of at least
``SQNR_DB`` = 40 dB (the FP8 GEMMs, which sum exact FP8 products in fp32 instead of rounding the
dequantized operands to the model dtype first). For scale: FP8 E4M3 itself is ~30 dB from the
float model, and bf16 rounding alone ~50 dB.

No CUDA GPU or Gaudi runs these tests: the cuda backend's ``_scaled_mm`` call runs on CPU (same
op, same argument contract), and the hpu backend's ops are a **stand-in** registered below.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization.utils import compute_error

import inc_bridge as ib
from inc_bridge import kernels
from inc_bridge.errors import ConversionError
from inc_bridge.kernels import cpu, cuda, emulated, hpu
from inc_bridge.kernels.emulated import MATMUL_OPERANDS
from inc_bridge.kernels.registry import Fp8Params
from inc_bridge.quant import dequantize_fp8, quant_dequant, quantize_fp8

from .models import LinearNet, ToyNet, linear_batches, toy_batches

SQNR_DB = 40.0
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FORMATS = [(E4M3, 448.0), (E4M3, 240.0), (E5M2, 57344.0)]  # (format, clamp bound): e4m3, e4m3 on Gaudi2, e5m2

needs_native = pytest.mark.skipif(cpu.native() is None, reason=f"cpu backend unavailable: {cpu.availability().reason}")


def _weight(n: int, k: int, fmt=E4M3, per_row=False, fp8_max=448.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
    scale = (amax / (fp8_max * 0.5)).float()
    return quantize_fp8(w, scale, fmt, fp8_max), scale


def _act(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    return x, (x.float().abs().max() / 112.0).float()


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(compute_error(ref.float(), y.float()))


# ------------------------------------------------------------------ registry and availability


def test_every_backend_registers_every_op():
    for backend in ("emulated", "cpu", "cuda", "hpu"):
        assert all(kernels.kernel_note(op, backend) for op in kernels.OPS), backend
        for op in kernels.OPS:
            assert kernels.get_kernel(op, backend) is not None
    with pytest.raises(ValueError, match="unknown kernel op 'bmm'; valid: linear, conv2d"):
        kernels.register_kernel("bmm", "cpu")


def test_auto_picks_the_best_available_backend_for_the_device(monkeypatch):
    native = cpu.native() is not None
    assert kernels.resolve_backend("auto", "cpu") == ("cpu" if native else "emulated")
    assert kernels.resolve_backend("auto") == kernels.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setattr(cpu, "_load", lambda: (None, "native library not built (test)"))
    assert kernels.resolve_backend("auto", "cpu") == "emulated"
    assert kernels.available_backends("cpu") == ["emulated"]
    with pytest.raises(ib.BackendUnavailableError, match=r"backend 'cpu' is not available here: native library not built \(test\); available here: emulated"):
        kernels.resolve_backend("cpu")


def _fake_cuda(monkeypatch, capability, name):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_cuda_needs_compute_capability_8_9(monkeypatch):
    _fake_cuda(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    ok, reason = cuda.availability()
    assert not ok and reason == "CUDA device NVIDIA A100-SXM4-80GB has compute capability 8.0; FP8 GEMM needs 8.9"
    with pytest.raises(ib.BackendUnavailableError, match=r"backend 'cuda' is not available here: CUDA device .* has compute "
                       r"capability 8\.0; FP8 GEMM needs 8\.9; available here: .*emulated"):
        kernels.resolve_backend("cuda")
    assert kernels.resolve_backend("auto", "cuda") == "emulated"

    _fake_cuda(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    assert cuda.availability() == (True, "torch._scaled_mm on NVIDIA H100 80GB HBM3 (compute capability 9.0)")
    assert kernels.resolve_backend("cuda") == "cuda"
    assert kernels.resolve_backend("auto", "cuda:0") == "cuda"
    assert kernels.available_backends("cuda") == ["cuda", "emulated"]


def test_cuda_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = cuda.availability()
    assert not ok and reason.endswith("(torch.cuda.is_available() is False)")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm build" in cuda.availability().reason


def test_hpu_unavailable_reasons(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "habana_frameworks" else real_find_spec(name, *a))
    assert hpu.availability() == (False, "habana_frameworks (the Gaudi PyTorch bridge) is not installed")
    with pytest.raises(ib.BackendUnavailableError, match="backend 'hpu' is not available here: habana_frameworks .* is not installed"):
        kernels.resolve_backend("hpu")
    assert kernels.resolve_backend("auto", "hpu") == "emulated"


def test_unknown_backend_and_the_convert_error():
    with pytest.raises(ib.BackendUnavailableError, match="backend 'tpu' is not available: no kernels are registered"):
        kernels.resolve_backend("tpu")
    assert not kernels.backend_availability("tpu").available


def test_convert_resolves_auto_for_the_model_device(monkeypatch):
    model = LinearNet()
    scales = ib.compute_scales(ib.calibrate(model, linear_batches()), model=model)
    seen = []
    real = kernels.registry.available_backends
    monkeypatch.setattr(kernels.registry, "available_backends", lambda device=None: seen.append(device) or real(device))
    ib.convert(model, scales)
    assert seen == [torch.device("cpu")]


# ------------------------------------------------------------------ cpu: native conversions are exact


def _all_bf16() -> torch.Tensor:
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return x[~x.isnan()]  # every finite and infinite bf16 value


def _wide_f32(n=200_000, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-45, 38, n)
    return torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, 448.0, 464.0, 480.0])])


def _equal_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@needs_native
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
@pytest.mark.parametrize("scale", [1.0, 0.013671875, 3.7e-3, 250.0, 1e-30, 1e-37])  # 1e-37: fp32 denormal outputs
def test_native_quantize_and_qdq_are_torch_bit_for_bit(fmt, fp8_max, scale):
    lib = cpu.native()
    s = torch.tensor(scale, dtype=torch.float32)
    for x in (_all_bf16(), _all_bf16().float(), _wide_f32(), torch.tensor([float("nan"), 1.0])):
        assert torch.equal(lib.quantize(x, s, fmt, fp8_max).view(torch.uint8), quantize_fp8(x, s, fmt, fp8_max).view(torch.uint8))
        for out in (torch.float32, torch.bfloat16):
            assert _equal_or_both_nan(lib.qdq(x, s, fmt, fp8_max, out), quant_dequant(x, s, fmt, fp8_max, out))


@needs_native
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
def test_native_quantize_is_exact_with_denormals_flushed_and_at_random_scales(fmt, fp8_max):
    """The bf16 quantize builds FP8 denormal bytes from fp32 denormals, which a thread that flushes
    them (torch.set_flush_denormal) would zero: it must notice and take the other path. And the
    conversions are exact at any scale, not only the few above (fresh mantissas, every bf16 input)."""
    lib = cpu.native()
    x = _all_bf16()
    x = x[(x.float().abs() >= 2**-100) | (x == 0)]  # no bf16 denormal inputs: flushed inputs are another matter
    s = torch.tensor(1.0)
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        torch.set_num_threads(1)  # the flag is per thread: run the kernel on this one
        flushed = lib.quantize(x, s, fmt, fp8_max)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert torch.equal(flushed.view(torch.uint8), quantize_fp8(x, s, fmt, fp8_max).view(torch.uint8))
    g = torch.Generator().manual_seed(11)
    x = _all_bf16()
    for scale in torch.rand(12, generator=g).mul(40).sub(20).exp2():  # 2^-20 .. 2^20, random mantissas
        assert torch.equal(lib.quantize(x, scale, fmt, fp8_max).view(torch.uint8), quantize_fp8(x, scale, fmt, fp8_max).view(torch.uint8))
        assert _equal_or_both_nan(lib.qdq(x, scale, fmt, fp8_max, torch.bfloat16), quant_dequant(x, scale, fmt, fp8_max))


@needs_native
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
def test_native_weight_quantization_per_tensor_and_per_row_is_torch_bit_for_bit(fmt, fp8_max, hp):
    """What weights go through (``kernels.weights.quantize_fp8_rows``): native for both granularities, same bytes."""
    from inc_bridge.kernels.weights import quantize_fp8_rows

    g = torch.Generator().manual_seed(4)
    w = (torch.randn(67, 3, 5, generator=g) * torch.logspace(-6, 3, 67).reshape(-1, 1, 1)).to(hp)
    w[3, 0, 0], w[5, 1, 2] = 1e6, -1e6  # saturates
    for scale in (torch.tensor(0.0173), torch.rand(67, 1, 1, generator=g) * 0.05 + 1e-4):
        expected = quantize_fp8(w, scale, fmt, fp8_max)
        native = cpu.native_quantize(w, scale, fmt, fp8_max)
        assert native is not None and torch.equal(native.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(quantize_fp8_rows(w, scale, fmt, fp8_max).view(torch.uint8), expected.view(torch.uint8))
    one = torch.tensor(0.1)
    dense = cpu.native_quantize(w.transpose(0, 1), one, fmt, fp8_max)  # one scale: any dense layout, kept
    assert dense.stride() == w.transpose(0, 1).stride()
    assert torch.equal(dense.view(torch.uint8), quantize_fp8(w.transpose(0, 1), one, fmt, fp8_max).view(torch.uint8))
    assert cpu.native_quantize(w.transpose(0, 1), torch.rand(3, 1, 1) * 0.1, fmt, fp8_max) is None  # per row: contiguous
    assert cpu.native_quantize(w[:, :, ::2], one, fmt, fp8_max) is None  # gaps: torch
    square, per_column = w[:5, 0, :5].contiguous(), torch.rand(5, generator=g) * 0.05 + 1e-4
    assert cpu.native_quantize(square, per_column, fmt, fp8_max) is None  # [N] on [N, N] broadcasts per column
    with pytest.raises(ValueError, match="one per row"):
        quantize_fp8_rows(square, per_column, fmt, fp8_max)


@needs_native
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
def test_native_clip_errors_are_torch_bit_for_bit(monkeypatch, fmt, fp8_max):
    """The MSE clip search's errors: the same bits with and without the native library."""
    from inc_bridge.scales import clip_errors

    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 777, 2048):
        counts = torch.randint(0, 10_000, (n,), generator=g).double() * (torch.rand(n, generator=g) < 0.6)
        width = fp8_max / 300
        scales = torch.linspace(1 / 128, 1, 128, dtype=torch.float64) * (n * width / fp8_max)
        native = clip_errors(counts, width, scales, fmt, fp8_max)
        with monkeypatch.context() as patch:
            patch.setattr(cpu, "native", lambda: None)
            assert torch.equal(native, clip_errors(counts, width, scales, fmt, fp8_max))


@needs_native
def test_native_qdq_keeps_the_layout_of_a_dense_non_contiguous_input():
    x = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2)  # as attention's q/k/v arrive
    s = torch.tensor(0.02)
    y = cpu.native().qdq(x, s, E4M3, 448.0, torch.bfloat16)
    assert y.stride() == x.stride() and torch.equal(y, quant_dequant(x, s, E4M3, 448.0))
    assert not cpu._dense(torch.randn(4, 6)[:, :3])  # a slice with gaps goes to the emulated path


@needs_native
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize(("n", "k"), [(37, 53), (64, 128), (5, 300), (130, 17)])
@pytest.mark.parametrize("per_row", [False, True])
def test_native_dequant_is_torch_bit_for_bit(fmt, n, k, per_row):
    values = torch.arange(256, dtype=torch.uint8).view(fmt)  # every code, NaN (and e5m2's inf) included
    q = values[torch.randint(len(values), (n, k))]
    scale = torch.rand(n, 1) * 0.01 if per_row else torch.tensor(0.0123)
    if per_row:
        scale[::3] = 1e-38  # outputs that are fp32 denormals
    lib = cpu.native()
    for out in (torch.float32, torch.bfloat16):
        assert _equal_or_both_nan(lib.dequant(q, scale, out), dequantize_fp8(q, scale, out))
        expected = dequantize_fp8(q.t().contiguous(), scale.t() if per_row else scale, out)
        assert _equal_or_both_nan(lib.dequant(q, scale, out, transpose=True), expected)


# ------------------------------------------------------------------ cpu kernels against emulated


def _linear_case(rows_shape, n, k, hp, fmt=E4M3, fp8_max=448.0, per_row=False, bias=True):
    qw, ws = _weight(n, k, fmt, per_row, fp8_max)
    x, xs = _act((*rows_shape, k), hp)
    b = torch.randn(n).to(hp) if bias else None
    return (x, qw, ws, xs, b, Fp8Params(fmt, fp8_max, hp))


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize(("rows_shape", "n", "k"), [((2, 7), 48, 32), ((33,), 64, 96), ((4, 9), 640, 512), ((3,), 16, 8)])
def test_cpu_linear_equals_emulated(hp, fmt, fp8_max, per_row, rows_shape, n, k):
    """Many rows, or a small weight: native qdq/dequant + the emulated kernel's matmul: identical."""
    args = _linear_case(rows_shape, n, k, hp, fmt, fp8_max, per_row, bias=n % 32 == 0)
    assert torch.equal(cpu.linear_cpu(*args), emulated.linear_emulated(*args))


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "fp8_max"), FORMATS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize(("rows_shape", "n", "k"), [((1,), 512, 512), ((2, 4), 1024, 384), ((16,), 300, 1000), ((1, 1, 5), 256, 1030)])
def test_cpu_linear_gemv_within_sqnr_of_emulated(monkeypatch, hp, fmt, fp8_max, per_row, rows_shape, n, k):
    """Few rows of a large weight: the FP8 GEMV (one native call: quantize, GEMV, scales, rounding,
    bias). Same products, fp32 sums in another order: SQNR; and the bits of the raw GEMV composed in
    torch."""
    assert math.prod(rows_shape) <= cpu.GEMV_MAX_ROWS
    assert n * k >= cpu.GEMV_MIN_WEIGHT
    calls = []
    linear = cpu._Native.linear
    monkeypatch.setattr(cpu._Native, "linear", lambda self, *a: calls.append(1) or linear(self, *a))
    args = _linear_case(rows_shape, n, k, hp, fmt, fp8_max, per_row)
    y, ref = cpu.linear_cpu(*args), emulated.linear_emulated(*args)
    assert calls == [1] and y.dtype == ref.dtype and y.shape == ref.shape
    assert _sqnr(ref, y) >= SQNR_DB
    x, qw, ws, xs, b, p = args
    lib = cpu.native()
    acc = lib.gemv(lib.quantize(x.reshape(-1, k), xs, fmt, fp8_max), qw)
    assert torch.equal(y, ((acc * (xs * (ws.reshape(1, n) if per_row else ws))).to(hp) + b).reshape(y.shape))


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_cpu_linear_large_layer_tiles_within_sqnr_of_emulated(monkeypatch, hp, per_row):
    """Large layers, many rows: dequantized in row blocks, one GEMM each. Same values as emulated
    but other GEMM calls, so the bound is SQNR (equality is typical, not promised)."""
    monkeypatch.setattr(cpu, "TILE_BYTES", 300 * 2048 * hp.itemsize)  # several blocks, the last one short
    monkeypatch.setattr(cpu, "FP8_GEMM_MAX_ROWS", 16)  # 40 rows: the tiled path, not the FP8 GEMM
    args = _linear_case((2, 20), 2048, 2048, hp, per_row=per_row)
    assert 2048 * 2048 >= cpu.TILED_MIN_WEIGHT
    y, ref = cpu.linear_cpu(*args), emulated.linear_emulated(*args)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert _sqnr(ref, y) >= SQNR_DB


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "fp8_max"), [(E4M3, 448.0), (E5M2, 57344.0)])
@pytest.mark.parametrize("per_row", [False, True])
def test_cpu_linear_fp8_gemm_for_large_layers_is_the_gemv_math(monkeypatch, hp, fmt, fp8_max, per_row):
    """Large layers, up to FP8_GEMM_MAX_ROWS rows (prefill): the FP8 kernel, one native call that also
    quantizes, scales, rounds and adds the bias. Its bits are those of the raw FP8 GEMV composed in
    torch (the row blocking does not change any sum), and it is within SQNR of emulated."""
    monkeypatch.setattr(cpu, "TILED_MIN_WEIGHT", 1 << 18)  # a 640 x 512 weight counts as large: a fast test
    x, qw, ws, xs, b, p = _linear_case((3, 23), 640, 512, hp, fmt, fp8_max, per_row)
    assert 16 < 69 <= cpu.FP8_GEMM_MAX_ROWS
    lib = cpu.native()
    y = cpu.linear_cpu(x, qw, ws, xs, b, p)
    xq = lib.quantize(x.reshape(-1, 512), xs, fmt, fp8_max)
    acc = lib.gemv(xq, qw)
    assert torch.equal(acc, torch.cat([lib.gemv(row, qw) for row in xq.split(1)]))  # blocked rows = one row at a time
    composed = (acc * (xs * (ws.reshape(1, -1) if per_row else ws))).to(hp).reshape(3, 23, 640) + b
    assert torch.equal(y, composed)
    assert _sqnr(emulated.linear_emulated(x, qw, ws, xs, b, p), y) >= SQNR_DB
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu.linear_cpu(x, qw, ws, xs, b, p), y)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_cpu_gemv_is_the_exact_fp8_dot_product_and_thread_count_free():
    """The GEMV's sums against float64 sums of the same FP8 products, for 1 and 3 threads."""
    lib = cpu.native()
    qw, _ = _weight(300, 1000)
    xq = quantize_fp8(torch.randn(5, 1000) * 50, torch.tensor(1.0), E4M3, 448.0)
    ref = xq.double() @ qw.double().t()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lib.gemv(xq, qw)
        torch.set_num_threads(3)
        three = lib.gemv(xq, qw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert ((one.double() - ref).abs() <= 1e-6 * (xq.double().abs() @ qw.double().abs().t())).all()


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_conv2d_equals_emulated(hp, per_row, channels_last):
    qw, ws = _weight(8, 4 * 9, per_row=per_row)
    qw, ws = qw.reshape(8, 4, 3, 3), ws.reshape(8, 1, 1, 1) if per_row else ws
    x, xs = _act((2, 8, 10, 10), hp)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p, b = Fp8Params(E4M3, 448.0, hp), torch.randn(8).to(hp)
    for conv_args in [(1, 1, 1, 2), ((2, 1), 0, 2, 2)]:  # (stride, padding, dilation, groups)
        args = (x, qw, ws, xs, b, p, *conv_args)
        assert torch.equal(cpu.conv2d_cpu(*args), emulated.conv2d_emulated(*args))


@needs_native
@pytest.mark.parametrize("per_row", [False, True])
def test_cpu_embedding_equals_emulated(per_row):
    qw, ws = _weight(50, 24, per_row=per_row)
    ids = torch.randint(50, (3, 7))
    for hp in (torch.float32, torch.bfloat16):
        p = Fp8Params(E4M3, 448.0, hp)
        assert torch.equal(cpu.embedding_cpu(ids, qw, ws, p), emulated.embedding_emulated(ids, qw, ws, p))


@needs_native
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_native_bias_add_is_torch_add_bit_for_bit(dt):
    """The exact path's bias add (linear's last step): torch's ``y.add_(bias)``, every bit, for
    widths that are and are not multiples of the vector, sums that are fp32 denormals (rounded, not
    flushed), ties, saturation to inf and NaN."""
    lib = cpu.native()
    g = torch.Generator().manual_seed(5)
    for n in (1, 31, 32, 33, 384, 1000):
        y = (torch.randn(37, n, generator=g) * torch.logspace(-3, 3, n)).to(dt)
        b = (torch.randn(n, generator=g) * 10).to(dt)
        y[0] = -b  # exact zeros
        y[1, : n // 2] = 3e38  # inf for a positive bias
        y[2, 0] = float("nan")
        y[3] = (b.float() * -1).to(dt) + torch.tensor(2**-130).to(dt)  # sums near fp32 denormals
        y[4, :] = torch.tensor(2**-127, dtype=dt)  # a denormal sum where b is 0
        b[: min(n, 3)] = 0.0
        assert _equal_or_both_nan(lib.add_bias(y.clone(), b), y.clone().add_(b))
    tiny = torch.full((4, 64), 2**-127, dtype=dt)  # only denormal sums in the vector: the slow lanes
    assert torch.equal(lib.add_bias(tiny.clone(), torch.full((64,), 2**-128, dtype=dt)), tiny + 2**-128)
    with pytest.raises(ConversionError, match="bias"):
        lib.add_bias(torch.zeros(3, 4, dtype=dt), torch.zeros(5, dtype=dt))


@needs_native
def test_cpu_scratch_buffers_change_no_bit_and_never_reach_an_output(monkeypatch):
    """Temporaries live in per-thread scratch buffers (cpu._Scratch): the same bits as fresh ones,
    an earlier output is not overwritten by a later call, and threads running at once do not share
    them."""
    cases = [_linear_case((4, 50), 384, 512, hp, bias=True) for hp in (torch.bfloat16, torch.float32)]
    q8, k8, v8 = (quantize_fp8(torch.randn(2, 9, 4, 16).transpose(1, 2), torch.tensor(0.02), E4M3, 448.0)
                  for _ in range(3))
    scales = (torch.tensor(0.02),) * 3

    def run(case):
        return cpu.linear_cpu(*case), cpu.sdpa_cpu(q8, k8, v8, scales, case[0].dtype)

    first = [run(case) for case in cases]  # the second case reuses the first one's buffers
    kept = [tuple(t.clone() for t in out) for out in first]
    assert all(cpu.linear_route(c[0], c[1], c[5]) == "exact" for c in cases)
    assert all(torch.equal(a, b) for out, copy in zip(first, kept, strict=True) for a, b in zip(out, copy, strict=True))
    buffers = list(cpu._SCRATCH.buffers.values())
    assert buffers and all(t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                           for out in first for t in out for b in buffers)
    with ThreadPoolExecutor(4) as pool:  # each thread its own buffers
        concurrent = list(pool.map(run, cases * 8))
    assert all(torch.equal(a, b) for i, out in enumerate(concurrent) for a, b in zip(out, kept[i % 2], strict=True))
    monkeypatch.setattr(cpu, "SCRATCH_MAX_BYTES", 0)  # fresh temporaries: the same bits
    assert all(torch.equal(a, b) for case, copy in zip(cases, kept, strict=True) for a, b in zip(run(case), copy, strict=True))


@needs_native
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
def test_cpu_sdpa_and_matmul_equal_emulated(hp):
    """The attention ops take FP8 operands (quantized by ``inc_bridge::quantize``) and their scales."""
    q, k, v = (torch.randn(2, 7, 4, 8).to(hp).transpose(1, 2) for _ in range(3))  # [B, H, T, D], non-contiguous
    scales = tuple(torch.tensor(s) for s in (0.01, 0.02, 0.015))
    q8, k8, v8 = (quantize_fp8(t, s, E4M3, 448.0) for t, s in zip((q, k, v), scales, strict=True))
    assert q8.stride() == q.stride()
    mask = torch.rand(2, 1, 7, 7) > 0.3
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
        out = cpu.sdpa_cpu(q8, k8, v8, scales, hp, **kwargs)
        assert torch.equal(out, emulated.sdpa_emulated(q8, k8, v8, scales, hp, **kwargs))
        expected = torch.nn.functional.scaled_dot_product_attention(
            *(quant_dequant(t, s, E4M3, 448.0) for t, s in zip((q, k, v), scales, strict=True)), **kwargs)
        assert torch.equal(out, expected)
    a, b, c = torch.randn(3, 5, 6).to(hp), torch.randn(3, 6, 4).to(hp), torch.randn(3, 5, 4).to(hp)
    a8, b8 = quantize_fp8(a, scales[0], E4M3, 448.0), quantize_fp8(b, scales[1], E4M3, 448.0)
    for fn in ("matmul", "bmm", "baddbmm"):
        assert len(MATMUL_OPERANDS[fn]) == 2
        addend = c if fn == "baddbmm" else None
        assert torch.equal(cpu.matmul_cpu(fn, a8, b8, scales[:2], addend, 1.0, 1.0, hp),
                           emulated.matmul_emulated(fn, a8, b8, scales[:2], addend, 1.0, 1.0, hp))


@needs_native
def test_cpu_falls_back_to_emulated_where_native_code_does_not_reach():
    # float16 model dtype, and a non-dense activation: emulated kernel, so trivially identical
    args16 = _linear_case((4,), 640, 512, torch.float16)
    assert torch.equal(cpu.linear_cpu(*args16), emulated.linear_emulated(*args16))
    x, qw, ws, xs, b, p = _linear_case((6, 40), 512, 512, torch.bfloat16)
    gappy = x[:, ::2]
    assert torch.equal(cpu.linear_cpu(gappy, qw, ws, xs, b, p), emulated.linear_emulated(gappy, qw, ws, xs, b, p))


@needs_native
@pytest.mark.parametrize("form", ["subclass", "module"])
def test_models_with_the_cpu_backend_equal_emulated(form):
    """Small layers (and many rows) take the exact paths: whole models are bit-identical."""
    for model, batches in ((ToyNet().eval(), toy_batches()), (LinearNet().eval(), linear_batches())):
        scales = ib.compute_scales(ib.calibrate(model, batches), model=model)
        qcpu = ib.convert(model, scales, form=form, backend="cpu")
        qemu = ib.convert(model, scales, form=form, backend="emulated")
        assert ib.conversion_result(qcpu).backend == "cpu"
        with torch.no_grad():
            for x in batches:
                assert torch.equal(qcpu(x), qemu(x))


@needs_native
def test_both_forms_agree_on_the_gemv_path():
    """Decode-shaped calls through two large layers: both forms run the same kernel (identical).

    Against emulated, a one-ulp difference in layer 1's output can move layer 2's input to the
    next FP8 step, so whole-model differences are not bounded by the per-kernel SQNR; the fair
    check is the distance to the float model, which must be as good as emulated's (within 1 dB).
    """
    model = nn.Sequential(nn.Linear(512, 768), nn.ReLU(), nn.Linear(768, 512)).eval().to(torch.bfloat16)
    batches = [torch.randn(4, 512, dtype=torch.bfloat16) for _ in range(3)]
    scales = ib.compute_scales(ib.calibrate(model, batches), model=model)
    sub, mod = ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module")
    emu = ib.convert(model, scales, form="module", backend="emulated")
    xs = [torch.randn(1, 512, dtype=torch.bfloat16) for _ in range(16)]
    with torch.no_grad():
        ours = torch.cat([mod(x) for x in xs])
        assert torch.equal(torch.cat([sub(x) for x in xs]), ours)
        ref, theirs = torch.cat([model(x) for x in xs]), torch.cat([emu(x) for x in xs])
    assert _sqnr(ref, ours) >= _sqnr(ref, theirs) - 1.0


# ------------------------------------------------------------------ cpu: the portable C build


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_portable_build_of_the_native_library(tmp_path):
    """The library built without -march=native (the path non-AVX512-BF16 CPUs take) is exact too."""
    src = Path(cpu.__file__).with_name("csrc") / "fp8_cpu.c"
    so = tmp_path / "libportable.so"
    subprocess.run(["cc", "-O2", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared", "-o", str(so), str(src), "-lpthread"], check=True)
    lib = cpu._Native(ctypes.CDLL(str(so)))
    assert not lib.simd
    s = torch.tensor(0.013671875)
    x = _all_bf16()
    assert _equal_or_both_nan(lib.qdq(x, s, E4M3, 448.0, torch.bfloat16), quant_dequant(x, s, E4M3, 448.0))
    y, b = torch.randn(5, 130).to(torch.bfloat16), torch.randn(130).to(torch.bfloat16)
    assert torch.equal(lib.add_bias(y.clone(), b), y + b)
    qw, ws = _weight(70, 130, per_row=True)
    assert torch.equal(lib.dequant(qw, ws, torch.bfloat16, transpose=True), dequantize_fp8(qw.t().contiguous(), ws.t(), torch.bfloat16))
    counts = torch.rand(500, dtype=torch.float64).mul(50).floor()  # some empty bins
    scales = torch.linspace(1 / 128, 1, 128, dtype=torch.float64) * (9.0 / 448.0)
    from inc_bridge.scales import clip_errors

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "native", lambda: None)
        assert torch.equal(lib.clip_errors(counts, 0.018, scales, E4M3, 448.0), clip_errors(counts, 0.018, scales, E4M3, 448.0))
    xq = quantize_fp8(torch.randn(3, 130) * 40, torch.tensor(1.0), E4M3, 448.0)
    ref = xq.double() @ qw.double().t()
    assert ((lib.gemv(xq, qw).double() - ref).abs() <= 1e-6 * (xq.double().abs() @ qw.double().abs().t())).all()


# ------------------------------------------------------------------ cuda: the _scaled_mm call, run on CPU


@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("rows_shape", [(1,), (3, 10), (64,)])
def test_cuda_scaled_mm_call_within_sqnr_of_emulated(hp, per_row, rows_shape):
    """CPU torch._scaled_mm has the CUDA op's argument contract; the numerics are the FP8 GEMM's."""
    args = _linear_case(rows_shape, 64, 128, hp, per_row=per_row)
    assert cuda.supports(args[0], args[1], args[5])
    y, ref = cuda.scaled_mm_linear(*args), emulated.linear_emulated(*args)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert _sqnr(ref, y) >= SQNR_DB


def test_cuda_kernel_off_gpu_or_unsupported_runs_emulated():
    args = _linear_case((5,), 64, 128, torch.bfloat16)
    assert torch.equal(cuda.linear_cuda(*args), emulated.linear_emulated(*args))  # CPU tensors
    x, qw, ws, xs, b, p = _linear_case((5,), 64, 128, torch.bfloat16, fmt=E5M2, fp8_max=57344.0)
    assert not cuda.supports(x, qw, p)  # no e5m2 x e5m2 FP8 GEMM
    x, qw, ws, xs, b, p = _linear_case((5,), 64, 100, torch.bfloat16)
    assert not cuda.supports(x, qw, p)  # K not a multiple of 16


# ------------------------------------------------------------------ hpu: against a STAND-IN of Gaudi's ops


@pytest.fixture
def hpu_standin_ops():
    """A CPU STAND-IN for torch.ops.hpu.cast_to_fp8_v2 / fp8_gemm_v2, implementing the documented
    math (see kernels/hpu.py). It is not Gaudi: it checks our call path and argument contract only."""
    if importlib.util.find_spec("habana_frameworks") is not None:
        pytest.skip("a real habana_frameworks is installed; the stand-in would clash with its ops")
    lib = torch.library.Library("hpu", "FRAGMENT")
    lib.define("cast_to_fp8_v2(Tensor input, Tensor? scale, bool stochastic_rounding, bool is_amax, ScalarType dtype) -> (Tensor, Tensor)")
    lib.define("fp8_gemm_v2(Tensor A, bool trans_A, Tensor B, bool trans_B, Tensor? D, ScalarType out_dtype, "
               "Tensor? A_scale_inv, Tensor? B_scale_inv, Tensor? bias, bool accumulate) -> Tensor")

    def cast_to_fp8_v2(x, scale, stochastic_rounding, is_amax, dtype):
        fmax = torch.finfo(dtype).max  # the device saturates to its FP8 range
        scaled = x.float() * (scale if scale is not None else 1.0)
        return scaled.clamp(-fmax, fmax).to(dtype), scaled.abs().amax()

    def fp8_gemm_v2(a, trans_a, b, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate):
        a, b = (a.t() if trans_a else a).double(), (b.t() if trans_b else b).double()
        y = (a @ b) * a_scale.double() * b_scale.double()  # 1-D B scale: one per output column
        y = y + bias if bias is not None else y
        return y.to(out_dtype)

    lib.impl("cast_to_fp8_v2", cast_to_fp8_v2, "CPU")
    lib.impl("fp8_gemm_v2", fp8_gemm_v2, "CPU")
    yield
    lib._destroy()


@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_hpu_fp8_gemm_call_with_a_standin_within_sqnr_of_emulated(hpu_standin_ops, hp, per_row):
    args = _linear_case((3, 10), 64, 128, hp, per_row=per_row)
    y, ref = hpu.fp8_gemm_linear(*args), emulated.linear_emulated(*args)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert _sqnr(ref, y) >= SQNR_DB
    assert torch.equal(hpu.linear_hpu(*args), ref)  # CPU tensors: the hpu kernel runs the emulated math


def test_registered_kernels_take_the_emulated_arguments():
    """Backends that have no special kernel for an op reuse the emulated one as is."""
    for backend in ("cuda", "hpu"):
        for op in ("conv2d", "conv1d", "embedding", "sdpa", "matmul"):
            assert kernels.get_kernel(op, backend) is kernels.get_kernel(op, "emulated")

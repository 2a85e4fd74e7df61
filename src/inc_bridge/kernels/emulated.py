"""``emulated``: the exact reference kernels, on any device.

They quantize and dequantize with plain torch ops exactly as INC's CPU QDQ model does and run the
matmul / conv in the model's dtype, so their outputs equal INC's converted model bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize_fp8, quant_dequant, quantize_fp8
from .registry import EMULATED, Availability, Fp8Params, register_backend, register_kernel

# The torch functions the ``matmul`` op stands for, and which positional arguments of each are the
# two activation operands that get static scales (baddbmm's first argument is the added input).
MATMUL_FUNCTIONS = {"matmul": torch.matmul, "bmm": torch.bmm, "baddbmm": torch.baddbmm}
MATMUL_OPERANDS = {"matmul": (0, 1), "bmm": (0, 1), "baddbmm": (1, 2)}

register_backend(
    EMULATED,
    device_type=None,
    check=lambda: Availability(True, "exact reference in plain torch ops, on any device (bit-exact with INC's QDQ model)"),
)


@register_kernel("linear", EMULATED, "qdq(x) @ dequant(W) in the model dtype (INC's math)")
def linear_emulated(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """INC's PatchedLinear QDQ math: ``matmul(qdq(x), dequant(W)ᵀ) + bias``.

    The weight is dequantized into a contiguous [K, N] matrix because that is the layout INC keeps
    (it stores FP8 weights transposed); BLAS sums in a layout-dependent order, so the transposed
    view of an [N, K] matrix would differ in the last bit for some shapes. For the same reason the
    bias is added after the matmul instead of through ``addmm``.
    """
    xq = quant_dequant(x, input_scale, p.fp8_dtype, p.fp8_max, p.hp_dtype)
    scale_kn = weight_scale.t() if weight_scale.dim() == 2 else weight_scale
    w_kn = dequantize_fp8(qweight.t().contiguous(), scale_kn, p.hp_dtype)
    y = torch.matmul(xq, w_kn)
    return y + bias if bias is not None else y


def _conv_emulated(conv, x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                   bias: torch.Tensor | None, p: Fp8Params, *geometry) -> torch.Tensor:
    """INC's PatchedConv2d QDQ math with the torch ``conv`` of the layer: ``conv(qdq(x), dequant(W), bias, ...)``."""
    xq = quant_dequant(x, input_scale, p.fp8_dtype, p.fp8_max, p.hp_dtype)
    w = dequantize_fp8(qweight, weight_scale, p.hp_dtype)
    return conv(xq, w, bias, *geometry)


@register_kernel("conv2d", EMULATED, "conv2d(qdq(x), dequant(W)) in the model dtype")
def conv2d_emulated(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """INC's PatchedConv2d QDQ math: ``conv2d(qdq(x), dequant(W), bias, ...)``."""
    return _conv_emulated(F.conv2d, x, qweight, weight_scale, input_scale, bias, p, stride, padding, dilation, groups)


@register_kernel("conv1d", EMULATED, "conv1d(qdq(x), dequant(W)) in the model dtype")
def conv1d_emulated(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``conv2d_emulated``'s math for ``nn.Conv1d`` (INC has no Conv1d patch; this is the same QDQ)."""
    return _conv_emulated(F.conv1d, x, qweight, weight_scale, input_scale, bias, p, stride, padding, dilation, groups)


@register_kernel("embedding", EMULATED, "gather FP8 rows, dequantize them")
def embedding_emulated(ids: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """Gather FP8 rows, then dequantize only those: equal to ``F.embedding(ids, dequant(W))``."""
    rows = F.embedding(ids, qweight.view(torch.uint8)).view(qweight.dtype)
    scale = F.embedding(ids, weight_scale) if weight_scale.dim() else weight_scale
    return dequantize_fp8(rows, scale, p.hp_dtype)


def is_fp8(t: torch.Tensor) -> bool:
    """Whether ``t`` holds FP8 codes (a one-byte floating-point dtype): K/V from an FP8 KV cache."""
    return t.dtype.is_floating_point and t.dtype.itemsize == 1


@register_kernel("sdpa", EMULATED, "dequantize q, k, v, then SDPA in the model dtype")
def sdpa_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: tuple[torch.Tensor, ...],
                  out_dtype: torch.dtype, **sdpa_kwargs) -> torch.Tensor:
    """Dequantize FP8 q, k, v with their static scales, then attention in high precision."""
    q, k, v = (dequantize_fp8(t, s, out_dtype) for t, s in zip((q, k, v), scales, strict=True))
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)


@register_kernel("matmul", EMULATED, "dequantize both operands, then the matmul in the model dtype")
def matmul_emulated(fn: str, a: torch.Tensor, b: torch.Tensor, scales: tuple[torch.Tensor, ...],
                    addend: torch.Tensor | None, beta: float, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize two FP8 operands, then run matmul / bmm / baddbmm on them in high precision."""
    a, b = dequantize_fp8(a, scales[0], out_dtype), dequantize_fp8(b, scales[1], out_dtype)
    return matmul_call(fn, a, b, addend, beta, alpha)


def matmul_call(fn: str, a: torch.Tensor, b: torch.Tensor, addend: torch.Tensor | None, beta: float,
                alpha: float) -> torch.Tensor:
    """``fn`` on its two (high-precision) operands; baddbmm adds ``addend`` with ``beta`` and ``alpha``."""
    if fn == "baddbmm":
        kwargs = {} if (beta, alpha) == (1.0, 1.0) else {"beta": beta, "alpha": alpha}
        return torch.baddbmm(addend, a, b, **kwargs)
    return MATMUL_FUNCTIONS[fn](a, b)


@register_kernel("quantize", EMULATED, "clamp(x / scale) cast to FP8, in fp32 (INC's quantize)")
def quantize_emulated(x: torch.Tensor, scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """Quantize an activation with its static scale (``p.hp_dtype`` is unused: the output is FP8)."""
    return quantize_fp8(x, scale, p.fp8_dtype, p.fp8_max)


@register_kernel("dequantize", EMULATED, "q * scale in fp32, cast to the model dtype (INC's dequantize)")
def dequantize_emulated(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize FP8 data with its scale into ``out_dtype``."""
    return dequantize_fp8(q, scale, out_dtype)

"""``emulated``: the exact reference kernels, on any device.

They quantize and dequantize with plain torch ops exactly as INC's CPU QDQ model does and run the
matmul / conv in the model's dtype, so their outputs equal INC's converted model bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConversionError
from ..quant import dequantize_fp8, quant_dequant, quantize_fp8
from .registry import EMULATED, Availability, Fp8Params, register_backend, register_kernel

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
    xq = quant_dequant(x, input_scale, p.fp8_dtype, p.fp8_max, p.hp_dtype)
    w = dequantize_fp8(qweight, weight_scale, p.hp_dtype)
    return F.conv2d(xq, w, bias, stride, padding, dilation, groups)


@register_kernel("embedding", EMULATED, "gather FP8 rows, dequantize them")
def embedding_emulated(ids: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """Gather FP8 rows, then dequantize only those: equal to ``F.embedding(ids, dequant(W))``."""
    rows = F.embedding(ids, qweight.view(torch.uint8)).view(qweight.dtype)
    scale = F.embedding(ids, weight_scale) if weight_scale.dim() else weight_scale
    return dequantize_fp8(rows, scale, p.hp_dtype)


def sdpa_compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Fp8Params) -> torch.dtype:
    """The dtype attention runs in: that of the inputs not given as FP8 codes (the query's, in practice).

    K and V arrive as FP8 codes from an FP8 KV cache (``kv_cache.py``): quantized with this layer's
    own k/v scales, they are what quantizing high-precision K/V here would give, so the kernel
    dequantizes them (no round trip through high precision and back).

    Raises:
        ConversionError: an FP8 input in another format than the layer's.
    """
    for name, t in zip("qkv", (q, k, v), strict=True):
        if is_fp8(t) and t.dtype != p.fp8_dtype:
            raise ConversionError(f"sdpa: {name} holds {t.dtype} codes, but the layer's format is {p.fp8_dtype}")
    hp = [t.dtype for t in (q, k, v) if not is_fp8(t)]
    return hp[0] if hp else p.hp_dtype


def is_fp8(t: torch.Tensor) -> bool:
    """Whether ``t`` holds FP8 codes (a one-byte floating-point dtype)."""
    return t.dtype.is_floating_point and t.dtype.itemsize == 1


@register_kernel("sdpa", EMULATED, "qdq(q, k, v) (FP8 codes from an FP8 KV cache: dequantized), then SDPA in the model dtype")
def sdpa_emulated(q, k, v, input_scales: torch.Tensor, p: Fp8Params, **sdpa_kwargs) -> torch.Tensor:
    """Quantize-dequantize q, k, v with their static scales, then attention in high precision.

    An input given as FP8 codes (see ``sdpa_compute_dtype``) is only dequantized.
    """
    hp = sdpa_compute_dtype(q, k, v, p)
    q, k, v = (dequantize_fp8(t, input_scales[i], hp) if is_fp8(t)
               else quant_dequant(t, input_scales[i], p.fp8_dtype, p.fp8_max, t.dtype) for i, t in enumerate((q, k, v)))
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)


@register_kernel("matmul", EMULATED, "qdq of both operands, then the matmul in the model dtype")
def matmul_emulated(fn: str, args: tuple, kwargs: dict, input_scales: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """Quantize-dequantize both operands of a matmul / bmm / baddbmm, then run it in high precision."""
    from ..nn.attention import MATMUL_FUNCTIONS, MATMUL_OPERANDS

    args = list(args)
    for i, pos in enumerate(MATMUL_OPERANDS[fn]):
        args[pos] = quant_dequant(args[pos], input_scales[i], p.fp8_dtype, p.fp8_max, args[pos].dtype)
    return MATMUL_FUNCTIONS[fn](*args, **kwargs)


@register_kernel("quantize", EMULATED, "clamp(x / scale) cast to FP8, in fp32 (INC's quantize)")
def quantize_emulated(x: torch.Tensor, scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """Quantize an activation with its static scale (``p.hp_dtype`` is unused: the output is FP8)."""
    return quantize_fp8(x, scale, p.fp8_dtype, p.fp8_max)


@register_kernel("dequantize", EMULATED, "q * scale in fp32, cast to the model dtype (INC's dequantize)")
def dequantize_emulated(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize FP8 data with its scale into ``out_dtype``."""
    return dequantize_fp8(q, scale, out_dtype)

"""FP8 quantize / dequantize primitives, written op for op as INC's CPU QDQ path runs them.

INC 3.10 on CPU quantizes with torchao's ``_quantize_affine_float8`` (cast to fp32, divide by the
scale, clamp to the format's range, cast to FP8) and dequantizes with ``_dequantize_affine_float8``
(cast to fp32, multiply, cast to the high-precision dtype). We keep the same op order so results
agree bit for bit; the only addition is a clamp bound that can be the target's range (240 on Gaudi2).

One INC quirk matters for exactness: INC stores the *inverse* of each quantization scale and
quantizes with the inverse of that inverse, which is not always the scale itself:

* activations (``QuantDequant``): ``reciprocal(reciprocal(s))``, both in the high-precision dtype;
* per-tensor weights (``QuantInput``): ``1.0 / float(reciprocal(s))``, the outer division done by
  Python in double precision (the stored inverse is a Python float by then), then rounded to fp32;
* per-channel weights: ``reciprocal(reciprocal(s))`` in the high-precision dtype.

In bf16 these differ from ``s`` in the last bits for most scales, so each is reproduced as is.
Weights are always *dequantized* with ``s`` itself.
"""

from __future__ import annotations

import torch


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """``clamp(x / scale, ±fp8_max)`` cast to ``fp8_dtype`` (computed in fp32)."""
    scaled = x.to(torch.float32) / scale
    return scaled.clamp(min=-fp8_max, max=fp8_max).to(fp8_dtype)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` computed in fp32, cast to ``out_dtype``."""
    return (q.to(torch.float32) * scale).to(out_dtype)


def quant_dequant(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Round ``x`` through FP8 with a static scale, back to ``out_dtype`` (default: ``x``'s dtype)."""
    return dequantize_fp8(quantize_fp8(x, scale, fp8_dtype, fp8_max), scale, out_dtype or x.dtype)


def inc_activation_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scale INC quantizes and dequantizes an activation with."""
    return torch.reciprocal(torch.reciprocal(scale)).to(torch.float32)


def inc_weight_quant_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scale INC quantizes a weight with (0-d per tensor, or one per channel)."""
    if scale.dim() == 0:
        return torch.tensor(1.0 / float(torch.reciprocal(scale)), dtype=torch.float32, device=scale.device)
    return torch.reciprocal(torch.reciprocal(scale)).to(torch.float32)

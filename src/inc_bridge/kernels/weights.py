"""Weights are quantized once per scale setting, at conversion: native code where it can run.

Not a kernel (no layer calls it at run time), but it uses the ``cpu`` backend's native
conversion when the library is built, which is why it lives in this package and not in
``quant`` (the pure math below the kernels).
"""

from __future__ import annotations

import torch

from ..quant import quantize_fp8
from .cpu import native_quantize

__all__ = ["quantize_fp8_rows"]

_QUANT_BLOCK = 1 << 18  # elements per block when quantizing with torch


def quantize_fp8_rows(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """``quantize_fp8`` with one fp32 scale or one per row of dim 0 (shaped to broadcast), same bits.

    For weights, quantized once per scale setting: the cpu backend's native code where it can run
    (torch's eager FP8 cast takes ~5 ns per element, it ~0.5), else torch in blocks of rows so the
    fp32 temporaries stay small (elementwise, so blocks give the same result).
    """
    if scale.dim() and tuple(scale.shape) != (x.shape[0],) + (1,) * (x.dim() - 1):
        raise ValueError(f"scale of shape {tuple(scale.shape)}: expected one scale or one per row of {tuple(x.shape)}")
    q = native_quantize(x, scale, fp8_dtype, fp8_max)
    if q is not None:
        return q
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    step = max(1, _QUANT_BLOCK // max(1, x[0].numel())) if x.dim() else 1
    for i in range(0, max(1, x.shape[0] if x.dim() else 1), step):
        rows = slice(i, i + step)
        q[rows] = quantize_fp8(x[rows], scale[rows] if scale.dim() else scale, fp8_dtype, fp8_max)
    return q

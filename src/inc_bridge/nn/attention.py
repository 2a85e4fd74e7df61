"""Attention as modules: ``SDPA`` and ``Matmul`` (float, from capture), ``QSDPA`` and ``QMatmul``.

``SDPA`` is exactly ``F.scaled_dot_product_attention`` as an ``nn.Module``, so that attention has a
name, can be measured (q, k, v) and can be swapped. ``Matmul`` stands for one activation ×
activation ``torch.matmul`` / ``torch.bmm`` / ``torch.baddbmm`` call site (native attention written as
matmul + softmax + matmul). The quantized versions quantize their inputs with static scales
(op ``inc_bridge::quantize``) and call ``inc_bridge::sdpa`` / ``inc_bridge::matmul`` on the FP8
data, the same ops the subclass form calls (no backend has an FP8 attention kernel yet: they
dequantize and run torch's op in high precision).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConversionError
from ..formats import dtype_name
from ..kernels import ops as kernel_ops
from ..kernels.emulated import MATMUL_FUNCTIONS, MATMUL_OPERANDS, is_fp8
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # only an annotation: from_float calls its methods; scales sit above this layer
    from ..scales import LayerScales

__all__ = ["MATMUL_FUNCTIONS", "MATMUL_OPERANDS", "QSDPA", "SDPA", "Matmul", "QMatmul"]


class SDPA(nn.Module):
    """``F.scaled_dot_product_attention`` as a module; outputs are identical to the functional call."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )


class Matmul(nn.Module):
    """One captured activation × activation matmul call site (``fn`` is matmul, bmm or baddbmm)."""

    def __init__(self, fn: str = "matmul") -> None:
        super().__init__()
        if fn not in MATMUL_FUNCTIONS:
            raise ValueError(f"Matmul fn must be one of {sorted(MATMUL_FUNCTIONS)}, got {fn!r}")
        self.fn = fn

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return MATMUL_FUNCTIONS[self.fn](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


class QSDPA(Fp8Module):
    """SDPA with static FP8 scales for q, k and v (buffer ``input_scales``, fp32 [3])."""

    _fixed_dtype_buffers = ("input_scales",)

    def __init__(self, *, fp8_dtype: torch.dtype, fp8_max: float, dtype: torch.dtype, backend: str = "emulated",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fp8_dtype = fp8_dtype
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        self.register_buffer("input_scales", torch.ones(3, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, module: SDPA, scales: LayerScales, backend: str = "emulated") -> QSDPA:
        q = cls(fp8_dtype=scales.format.dtype, fp8_max=scales.fp8_max, dtype=scales.hp_dtype, backend=backend)
        q.input_scales = scales.activation_scales()
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {"fp8_dtype": dtype_name(self.fp8_dtype), "fp8_max": self.fp8_max, "dtype": dtype_name(self.dtype),
                "backend": self.backend}


    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # K/V from an FP8 KV cache arrive as FP8 codes made with these very scales (kv_cache.py)
        q, k, v = (self._codes(t, i) for i, t in enumerate((query, key, value)))
        return kernel_ops.sdpa(q, k, v, self.input_scales[0], self.input_scales[1], self.input_scales[2],
                               kernel_ops.sdpa_mask(attn_mask, query.dtype),
                               float(dropout_p), bool(is_causal), None if scale is None else float(scale),
                               bool(enable_gqa), query.dtype, self.backend)

    def _codes(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Input ``i`` as FP8 codes: quantized with its static scale, or as given when it already is."""
        if not is_fp8(t):
            return kernel_ops.quantize(t, self.input_scales[i], self.fp8_dtype, self.fp8_max, self.backend)
        if t.dtype != self.fp8_dtype or i == 0:
            raise ConversionError(f"QSDPA: input {i} holds {t.dtype} codes; expected {self.fp8_dtype} codes for "
                                  "keys/values beside a high-precision query")
        return t

    def extra_repr(self) -> str:
        s = ", ".join(f"{float(v):.6g}" for v in self.input_scales)
        return f"fp8={dtype_name(self.fp8_dtype)}, q/k/v scales=({s}), dtype={dtype_name(self.dtype)}, backend={self.backend}"


class QMatmul(Fp8Module):
    """Matmul with static FP8 scales for both operands (buffer ``input_scales``, fp32 [2])."""

    _fixed_dtype_buffers = ("input_scales",)

    def __init__(self, fn: str = "matmul", *, fp8_dtype: torch.dtype, fp8_max: float, dtype: torch.dtype,
                 backend: str = "emulated", device: torch.device | str | None = None) -> None:
        super().__init__()
        if fn not in MATMUL_FUNCTIONS:
            raise ValueError(f"QMatmul fn must be one of {sorted(MATMUL_FUNCTIONS)}, got {fn!r}")
        self.fn = fn
        self.fp8_dtype = fp8_dtype
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        self.register_buffer("input_scales", torch.ones(2, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, module: Matmul, scales: LayerScales, backend: str = "emulated") -> QMatmul:
        q = cls(module.fn, fp8_dtype=scales.format.dtype, fp8_max=scales.fp8_max, dtype=scales.hp_dtype, backend=backend)
        q.input_scales = scales.activation_scales()
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {"fn": self.fn, "fp8_dtype": dtype_name(self.fp8_dtype), "fp8_max": self.fp8_max,
                "dtype": dtype_name(self.dtype), "backend": self.backend}


    def forward(self, *args, **kwargs) -> torch.Tensor:
        a, b, addend, beta, alpha = kernel_ops.matmul_args(self.fn, args, kwargs)
        qa = kernel_ops.quantize(a, self.input_scales[0], self.fp8_dtype, self.fp8_max, self.backend)
        qb = kernel_ops.quantize(b, self.input_scales[1], self.fp8_dtype, self.fp8_max, self.backend)
        return kernel_ops.matmul(self.fn, qa, qb, self.input_scales[0], self.input_scales[1], addend, beta, alpha,
                                 a.dtype, self.backend)

    def extra_repr(self) -> str:
        s = ", ".join(f"{float(v):.6g}" for v in self.input_scales)
        return f"fn={self.fn}, fp8={dtype_name(self.fp8_dtype)}, operand scales=({s}), dtype={dtype_name(self.dtype)}, backend={self.backend}"

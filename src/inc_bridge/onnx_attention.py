"""ONNX export twins for quantized attention: ``QSDPA`` / ``QMatmul`` and their subclass-form twins.

An attention twin quantize-dequantizes its activation inputs with the layer's static scales
(``QuantizeLinear`` → ``DequantizeLinear``, see ``onnx_export.qdq``) and then runs the op with ONNX's
own high-precision ops:

* SDPA: ``MatMul(q, kᵀ) · scale`` (default ``1/sqrt(head_dim)``), the causal or the given mask,
  ``Softmax``, ``MatMul`` with v. Boolean masks select (``Where`` with -inf), float masks are added,
  and a query whose keys are all masked gets zeros (as from torch's SDPA, where ``Softmax`` alone
  would give NaN); ``enable_gqa`` repeats the k/v heads as ``F.scaled_dot_product_attention`` does. Opset 21 has no
  attention op, and spelling it out keeps every FP8 op visible to tools that look for QDQ pairs.
* matmul / bmm / baddbmm: the same function on the two quantize-dequantized operands (``MatMul``;
  baddbmm adds its input, times ``beta`` and ``alpha`` when given).

The static scales are 0-d buffers of their own (``q_scale``, ``k_scale``, ``v_scale``; ``a_scale``,
``b_scale``), so each ``QuantizeLinear`` reads an initializer rather than a slice computed at run time.

What a twin cannot express (attention dropout, a mask together with ``is_causal``, unknown keyword
arguments) it records while the model is traced (``OnnxTwin.refuse``); ``export_onnx`` then raises
``SerializationError`` naming the layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import SerializationError
from .nn.attention import MATMUL_FUNCTIONS, MATMUL_OPERANDS, QSDPA, SDPA, Matmul, QMatmul
from .onnx_export import OnnxTwin, qdq, register_onnx_export


class OnnxFp8SDPA(OnnxTwin):
    """``softmax(DQ(Q(q)) @ DQ(Q(k))ᵀ · scale + mask) @ DQ(Q(v))``, in the inputs' dtype."""

    def __init__(self, input_scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> None:
        super().__init__()
        if input_scales.shape != (3,):
            raise SerializationError(f"SDPA needs 3 input scales (q, k, v), got shape {tuple(input_scales.shape)}")
        for name, s in zip(("q_scale", "k_scale", "v_scale"), input_scales.detach().to(torch.float32), strict=True):
            self.register_buffer(name, s.clone())
        self.fp8_dtype, self.fp8_max = fp8_dtype, float(fp8_max)

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            self.refuse(f"dropout_p={dropout_p} (attention dropout has no export; models pass 0 in eval mode)")
        if is_causal and attn_mask is not None:
            self.refuse("both attn_mask and is_causal (F.scaled_dot_product_attention rejects this too)")
            attn_mask = None
        q = qdq(query, self.q_scale, self.fp8_dtype, self.fp8_max)
        k = qdq(key, self.k_scale, self.fp8_dtype, self.fp8_max)
        v = qdq(value, self.v_scale, self.fp8_dtype, self.fp8_max)
        if enable_gqa and k.size(-3) != q.size(-3):
            groups = q.size(-3) // k.size(-3)
            k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
        if is_causal:  # top-left aligned, as in F.scaled_dot_product_attention; no row is fully masked
            rows = torch.arange(q.size(-2), device=q.device).unsqueeze(-1)
            scores = scores.masked_fill(rows < torch.arange(k.size(-2), device=q.device), float("-inf"))
        if attn_mask is None:
            return torch.matmul(torch.softmax(scores, dim=-1), v)
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
        # A query whose keys are all masked gets zeros from torch's SDPA; ONNX's Softmax would give NaN.
        probs = torch.softmax(scores, dim=-1).masked_fill(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)
        return torch.matmul(probs, v)


class OnnxFp8Matmul(OnnxTwin):
    """``fn(..., DQ(Q(a)), DQ(Q(b)), ...)`` for ``fn`` in matmul, bmm, baddbmm."""

    def __init__(self, fn: str, input_scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> None:
        super().__init__()
        if input_scales.shape != (2,):
            raise SerializationError(f"{fn} needs 2 operand scales, got shape {tuple(input_scales.shape)}")
        self.fn = fn
        for name, s in zip(("a_scale", "b_scale"), input_scales.detach().to(torch.float32), strict=True):
            self.register_buffer(name, s.clone())
        self.fp8_dtype, self.fp8_max = fp8_dtype, float(fp8_max)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        allowed = {"beta", "alpha"} if self.fn == "baddbmm" else set()
        if set(kwargs) - allowed:
            self.refuse(f"{self.fn} with keyword arguments {sorted(set(kwargs) - allowed)}")
            kwargs = {k: v for k, v in kwargs.items() if k in allowed}
        args = list(args)
        for pos, scale in zip(MATMUL_OPERANDS[self.fn], (self.a_scale, self.b_scale), strict=True):
            args[pos] = qdq(args[pos], scale, self.fp8_dtype, self.fp8_max)
        return MATMUL_FUNCTIONS[self.fn](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


@register_onnx_export(QSDPA)
def _export_qsdpa(m: QSDPA) -> nn.Module:
    return OnnxFp8SDPA(m.input_scales, m.fp8_dtype, m.fp8_max)


@register_onnx_export(QMatmul)
def _export_qmatmul(m: QMatmul) -> nn.Module:
    return OnnxFp8Matmul(m.fn, m.input_scales, m.fp8_dtype, m.fp8_max)


def _captured_fp8(m: nn.Module) -> tuple[torch.Tensor, torch.dtype, float]:
    """A captured SDPA / Matmul quantized in the subclass form: its ``input_scales`` and FP8 format."""
    fp8 = getattr(m, "_inc_bridge_fp8", None)  # set by activation.attach_input_quant
    scales = m._buffers.get("input_scales")
    if fp8 is None or scales is None:
        raise SerializationError(f"{type(m).__name__} holds no static input scales (it is not quantized)")
    return scales, fp8[0], fp8[1]


@register_onnx_export(SDPA)
def _export_captured_sdpa(m: SDPA) -> nn.Module:
    return OnnxFp8SDPA(*_captured_fp8(m))


@register_onnx_export(Matmul)
def _export_captured_matmul(m: Matmul) -> nn.Module:
    return OnnxFp8Matmul(m.fn, *_captured_fp8(m))

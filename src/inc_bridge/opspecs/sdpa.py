"""Op ``sdpa``: captured ``F.scaled_dot_product_attention`` with static FP8 scales for q, k and v.

The float module is ``SDPA`` (from ``capture_attention``). Both forms quantize q, k, v with op
``inc_bridge::quantize`` and call ``inc_bridge::sdpa`` on the FP8 data: the module form is
``QSDPA``; the subclass form keeps the ``SDPA`` module, whose pre-hook makes q, k, v
``Float8ActivationTensor``s, and ``F.scaled_dot_product_attention`` on them (registered below)
calls the op. ONNX: ``OnnxFp8SDPA`` spells attention out with ONNX ops (opset 21 has no attention
op): ``MatMul(q, kᵀ) · scale`` (default ``1/sqrt(head_dim)``), the causal or the given mask,
``Softmax``, ``MatMul`` with v; boolean masks select (``Where`` with -inf), float masks are added,
a query whose keys are all masked gets zeros (as from torch's SDPA, where ``Softmax`` alone would
give NaN); ``enable_gqa`` repeats the k/v heads. Saving records ``QSDPA``'s ``quant_config()``
(module form) or the in-place kind ``fp8_inputs`` (subclass form).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..activation import Float8ActivationTensor, dequantized_call, input_quant_of
from ..errors import SerializationError
from ..kernels import ops as kernel_ops
from ..nn.attention import QSDPA, SDPA
from ._build import fp8_inputs_kind, input_quant_builder
from ._onnx import OnnxTwin, qdq
from .spec import OpSpec

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@Float8ActivationTensor.implements_torch_function(F.scaled_dot_product_attention)
def _sdpa(func, types, args, kwargs):
    """q, k and v all FP8 (the subclass form's hook made them): the op; anything else: dequantize first."""
    call = dict(zip(_NAMES, args, strict=False)) | kwargs
    q, k, v = call.get("query"), call.get("key"), call.get("value")
    if len(args) > len(_NAMES) or set(call) - set(_NAMES) or not all(
            isinstance(t, Float8ActivationTensor) for t in (q, k, v)):
        return dequantized_call(func, args, kwargs)
    scale = call.get("scale")
    return kernel_ops.sdpa(q.qdata, k.qdata, v.qdata, q.scale, k.scale, v.scale, kernel_ops.sdpa_mask(call.get("attn_mask"), q.dtype),
                           float(call.get("dropout_p", 0.0)), bool(call.get("is_causal", False)),
                           None if scale is None else float(scale), bool(call.get("enable_gqa", False)), q.dtype,
                           q.backend)


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


def _onnx_twin(m: nn.Module) -> nn.Module:
    if isinstance(m, QSDPA):
        return OnnxFp8SDPA(m.input_scales, m.fp8_dtype, m.fp8_max)
    iq = input_quant_of(m)
    if iq is None:
        raise SerializationError(f"{type(m).__name__} holds no static input scales (it is not quantized)")
    return OnnxFp8SDPA(m.input_scales, iq.fp8_dtype, iq.fp8_max)


def _positions(module: nn.Module) -> tuple[int, ...]:
    return (0, 1, 2)


def _names(module: nn.Module) -> tuple[str, ...]:
    return _NAMES[:3]


SDPA_SPEC = OpSpec(
    name="sdpa",
    module_types=(SDPA,),
    quantized_type=QSDPA,
    has_weight=False,
    n_inputs=3,
    input_positions=_positions,
    to_subclass=input_quant_builder(_positions, _names),
    to_module=QSDPA.from_float,
    kernel=kernel_ops.sdpa,
    onnx_twin=_onnx_twin,
    in_place=fp8_inputs_kind(SDPA, _positions, _names),
)

"""ONNX export twins of LLM layers: transformers' ``Conv1D`` (GPT-2) and fused MoE experts.

``export_onnx`` looks them up here: the module form by class (``MODULE_TWINS``: ``QConv1D``,
``QExperts``), the subclass form by the FP8 tensor type its float module holds (``TENSOR_TWINS``:
``Float8StaticTensorKN``, ``Float8ExpertsTensor``), since the float classes belong to transformers.

* Conv1D is a linear layer: its twin is ``OnnxFp8Linear`` over the [out, in] FP8 codes (the
  storage the tensor already keeps, no copy) and per-output-feature scales.
* Fused experts: ``OnnxFp8Experts`` runs every expert on every token (QDQ of the input with that
  expert's static scale, dequantized FP8 weights, the float layer's gate) and weights each
  token's result by its routing weight for that expert (0 where not routed). ONNX has no grouped
  matmul; a dense loop over the (static) experts exports with dynamic token counts. The values of
  routed tokens are those of the eager layer; only the summation order of the top-k results differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SerializationError
from .experts_layout import check_layout
from .nn.conv1d import QConv1D
from .nn.experts import QExperts
from .opspecs._onnx import OnnxTwin, dequantize_weight, qdq
from .opspecs.linear import OnnxFp8Linear
from .tensor_experts import Float8ExpertsTensor
from .tensor_kn import Float8StaticTensorKN


def _conv1d_twin(w: Float8StaticTensorKN, bias: torch.Tensor | None) -> nn.Module:
    scale = w.scale.t() if w.scale.dim() else w.scale  # [1, out] -> [out, 1]: per output feature, axis 0
    return OnnxFp8Linear(w.qdata.t(), scale, w.act_scale, bias, w.fp8_max, w.dtype)


def _export_qconv1d(m: QConv1D) -> nn.Module:
    return _conv1d_twin(m.weight, m.bias)


def _export_subclass_conv1d(m: nn.Module) -> nn.Module:
    return _conv1d_twin(m.weight, m.bias)


class OnnxFp8Experts(OnnxTwin):
    """Fused experts (gate_up [E, 2I, H], down [E, H, I]) as a loop over experts with FP8 QDQ.

    Each expert's FP8 matrices are their own initializers (ONNX's Gather and Slice take no FP8).
    """

    def __init__(self, gate_up: Float8ExpertsTensor, down: Float8ExpertsTensor, act_fn: nn.Module, apply_gate) -> None:
        super().__init__()
        self.num_experts = gate_up.num_experts
        self.fp8_max, self.dtype = gate_up.fp8_max, gate_up.dtype
        self.act_fn = act_fn
        self._apply_gate_fn = apply_gate
        for name, w in (("gate_up", gate_up), ("down", down)):
            for e in range(self.num_experts):
                self.register_buffer(f"{name}_qweight_{e}", w.qdata[e].contiguous())
                self.register_buffer(f"{name}_scale_{e}", w.scale[e].reshape(-1).contiguous() if w.scale.dim() > 1
                                     else w.scale[e].clone())
                self.register_buffer(f"{name}_input_scale_{e}", w.act_scale[e].clone())

    def _linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        q = self._buffers[f"{name}_qweight_{e}"]
        xq = qdq(x, self._buffers[f"{name}_input_scale_{e}"], q.dtype, self.fp8_max)
        return torch.matmul(xq, dequantize_weight(q, self._buffers[f"{name}_scale_{e}"], 0, self.dtype).t())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            weight = ((top_k_index == e).to(top_k_weights.dtype) * top_k_weights).sum(dim=-1, keepdim=True)
            h = self._apply_gate_fn(self, self._linear("gate_up", e, hidden_states))
            out = out + self._linear("down", e, h) * weight.to(hidden_states.dtype)
        return out


def _gate_of(float_cls: type) -> object:
    gate = getattr(float_cls, "_apply_gate", None)
    if gate is None:
        raise SerializationError(f"{float_cls.__name__} has no _apply_gate (the gated-experts step this export follows)")
    return gate


def _export_qexperts(m: QExperts) -> nn.Module:
    if m._float_apply_gate is None:
        raise SerializationError("QExperts has no gate from its float experts class (adopt() was not called)")
    return OnnxFp8Experts(m.gate_up_proj, m.down_proj, m.act_fn, m._float_apply_gate)


def _export_subclass_experts(m: nn.Module) -> nn.Module:
    check_layout(m, type(m).__name__, SerializationError)
    if not isinstance(m.gate_up_proj, Float8ExpertsTensor) or not isinstance(m.down_proj, Float8ExpertsTensor):
        raise SerializationError("only experts layers with both matrices in FP8 can be exported")
    return OnnxFp8Experts(m.gate_up_proj, m.down_proj, m.act_fn, _gate_of(type(m)))


MODULE_TWINS = {QConv1D: _export_qconv1d, QExperts: _export_qexperts}
TENSOR_TWINS = {Float8StaticTensorKN: _export_subclass_conv1d, Float8ExpertsTensor: _export_subclass_experts}

"""Op ``linear``: ``nn.Linear`` with an FP8 weight and a static FP8 activation scale.

Subclass form: the layer keeps its type and its weight becomes a ``Float8StaticTensor``; ``F.linear``
on that weight (registered below) calls ``inc_bridge::linear``. Module form: ``QuantizedLinear``,
whose forward calls the same op. ONNX: ``OnnxFp8Linear``. Saving records ``QuantizedLinear``'s
``quant_config()`` (module form) or the weight's flattened parts (subclass form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SerializationError
from ..kernels import ops as kernel_ops
from ..nn.linear import QuantizedLinear
from ..tensor import Float8StaticTensor, call_arg, need_act_scale
from ._build import with_fp8_weight
from ._onnx import OnnxTwin, dequantize_weight, qdq, subclass_weight
from .spec import OpSpec


@Float8StaticTensor.implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, w, bias = args[0], args[1], call_arg(args, kwargs, 2, "bias")
    need_act_scale(w, "linear")
    return kernel_ops.linear(x, w.qdata, w.scale, w.act_scale, bias, w.fp8_max, w.dtype, w.backend)


class OnnxFp8Linear(OnnxTwin):
    """``y = DQ(Q(x)) @ DQ(W)ᵀ + b``; the FP8 weight is the layer's own [out, in] tensor, not a
    transposed copy, so layers that share it (tied weights) export one initializer."""

    def __init__(self, qweight, weight_scale, input_scale, bias, fp8_max: float, dtype: torch.dtype) -> None:
        super().__init__()
        if input_scale is None:
            raise SerializationError("a linear layer without an activation scale cannot be exported")
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp8_max, self.dtype = fp8_max, dtype
        self.out_features, self.in_features = qweight.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [out, in] weight in the model's dtype, for model code that reads ``.weight``
        (its dtype or shape); traced only where read."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = qdq(x, self.input_scale, self.qweight.dtype, self.fp8_max)
        y = torch.matmul(xq, self.weight.t())
        return y + self.bias if self.bias is not None else y


def _onnx_twin(m: nn.Module) -> nn.Module:
    if isinstance(m, QuantizedLinear):
        return OnnxFp8Linear(m.qweight, m.weight_scale, m.input_scale, m.bias, m.fp8_max, m.dtype)
    w = subclass_weight(m)
    return OnnxFp8Linear(w.qdata, w.scale, w.act_scale, m.bias, w.fp8_max, w.dtype)


LINEAR = OpSpec(
    name="linear",
    module_types=(nn.Linear,),
    quantized_type=QuantizedLinear,
    has_weight=True,
    n_inputs=1,
    input_positions=lambda module: (0,),
    to_subclass=with_fp8_weight,
    to_module=QuantizedLinear.from_float,
    kernel=kernel_ops.linear,
    onnx_twin=_onnx_twin,
)

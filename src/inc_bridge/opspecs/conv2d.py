"""Op ``conv2d``: ``nn.Conv2d`` with an FP8 weight and a static FP8 activation scale.

Subclass form: a ``Float8StaticTensor`` weight; ``F.conv2d`` on it (registered below) calls
``inc_bridge::conv2d``. Module form: ``QConv2d``, whose forward calls the same op. ONNX:
``OnnxFp8Conv2d``. Saving records ``QConv2d``'s ``quant_config()`` or the flattened weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SerializationError
from ..kernels import ops as kernel_ops
from ..nn.conv import QConv2d
from ..tensor import Float8StaticTensor, call_arg, need_act_scale
from ._build import with_fp8_weight
from ._onnx import OnnxTwin, dequantize_weight, qdq, subclass_weight
from .spec import OpSpec


@Float8StaticTensor.implements_torch_function(F.conv2d)
def _conv2d(func, types, args, kwargs):
    x, w = args[0], args[1]
    need_act_scale(w, "conv2d")
    stride, padding, padding_mode, dilation = kernel_ops.conv2d_args(
        call_arg(args, kwargs, 3, "stride", 1), call_arg(args, kwargs, 4, "padding", 0),
        call_arg(args, kwargs, 5, "dilation", 1))
    return kernel_ops.conv2d(x, w.qdata, w.scale, w.act_scale, call_arg(args, kwargs, 2, "bias"), w.fp8_max, w.dtype,
                             w.backend, stride, padding, padding_mode, dilation, call_arg(args, kwargs, 6, "groups", 1))


class OnnxFp8Conv2d(OnnxTwin):
    """``y = conv2d(DQ(Q(x)), DQ(W), b)`` with ``nn.Conv2d``'s stride, padding (and padding modes), dilation, groups."""

    def __init__(self, qweight, weight_scale, input_scale, bias, fp8_max: float, dtype: torch.dtype, conv) -> None:
        super().__init__()
        if input_scale is None:
            raise SerializationError("a conv2d layer without an activation scale cannot be exported")
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp8_max, self.dtype = fp8_max, dtype
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.pad = list(conv._reversed_padding_repeated_twice)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype, for model code that reads ``.weight`` (ViT
        casts its pixel values to its dtype); traced only where read."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # same two steps as nn.Conv2d._conv_forward
            x = F.pad(x, self.pad, mode=self.padding_mode)
            padding = (0, 0)
        xq = qdq(x, self.input_scale, self.qweight.dtype, self.fp8_max)
        w = dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)
        return F.conv2d(xq, w, self.bias, self.stride, padding, self.dilation, self.groups)


def _onnx_twin(m: nn.Module) -> nn.Module:
    if isinstance(m, QConv2d):
        return OnnxFp8Conv2d(m.qweight, m.weight_scale, m.input_scale, m.bias, m.fp8_max, m.dtype, m)
    w = subclass_weight(m)
    return OnnxFp8Conv2d(w.qdata, w.scale, w.act_scale, m.bias, w.fp8_max, w.dtype, m)


CONV2D = OpSpec(
    name="conv2d",
    module_types=(nn.Conv2d,),
    quantized_type=QConv2d,
    has_weight=True,
    n_inputs=1,
    input_positions=lambda module: (0,),
    to_subclass=with_fp8_weight,
    to_module=QConv2d.from_float,
    kernel=kernel_ops.conv2d,
    onnx_twin=_onnx_twin,
)

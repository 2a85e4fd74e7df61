"""What the conv ops (``conv1d``, ``conv2d``) share: the subclass form's torch-function entry and the ONNX twin.

The two ops differ only in the number of spatial dims: which torch function and custom op they
stand for, and how many values stride, padding and dilation take.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SerializationError
from ..tensor import Float8StaticTensor, call_arg, need_act_scale
from ._onnx import OnnxTwin, dequantize_weight, qdq, subclass_weight


def conv_torch_function(name: str, op: Callable[..., torch.Tensor], op_args: Callable[..., tuple]):
    """``F.conv1d`` / ``F.conv2d`` on a ``Float8StaticTensor`` weight: unwrap it and call ``op``.

    ``op_args`` turns the call's stride, padding, dilation into the op's (``kernel_ops.conv2d_args``).
    """

    def entry(func, types, args, kwargs):
        x, w = args[0], args[1]
        need_act_scale(w, name)
        stride, padding, padding_mode, dilation = op_args(
            call_arg(args, kwargs, 3, "stride", 1), call_arg(args, kwargs, 4, "padding", 0),
            call_arg(args, kwargs, 5, "dilation", 1))
        return op(x, w.qdata, w.scale, w.act_scale, call_arg(args, kwargs, 2, "bias"), w.fp8_max, w.dtype, w.backend,
                  stride, padding, padding_mode, dilation, call_arg(args, kwargs, 6, "groups", 1))

    return entry


class OnnxFp8Conv(OnnxTwin):
    """``y = convNd(DQ(Q(x)), DQ(W), b)`` with the float conv's stride, padding (and padding modes),
    dilation, groups; ``conv_fn`` is ``F.conv1d`` or ``F.conv2d``."""

    def __init__(self, qweight, weight_scale, input_scale, bias, fp8_max: float, dtype: torch.dtype, conv,
                 conv_fn: Callable[..., torch.Tensor], op: str) -> None:
        super().__init__()
        if input_scale is None:
            raise SerializationError(f"a {op} layer without an activation scale cannot be exported")
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp8_max, self.dtype = fp8_max, dtype
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.pad = list(conv._reversed_padding_repeated_twice)
        self.conv_fn = conv_fn

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype, for model code that reads ``.weight`` (ViT
        casts its pixel values to its dtype); traced only where read."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # same two steps as nn.Conv1d/2d._conv_forward
            x = torch.nn.functional.pad(x, self.pad, mode=self.padding_mode)
            padding = (0,) * len(self.stride)
        xq = qdq(x, self.input_scale, self.qweight.dtype, self.fp8_max)
        w = dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)
        return self.conv_fn(xq, w, self.bias, self.stride, padding, self.dilation, self.groups)


def conv_twin(quantized_type: type[nn.Module], conv_fn: Callable[..., torch.Tensor], op: str):
    """``OpSpec.onnx_twin`` of a conv op: the twin of a module-form (``quantized_type``) or subclass-form layer."""

    def twin(m: nn.Module) -> nn.Module:
        if isinstance(m, quantized_type):
            return OnnxFp8Conv(m.qweight, m.weight_scale, m.input_scale, m.bias, m.fp8_max, m.dtype, m, conv_fn, op)
        w: Float8StaticTensor = subclass_weight(m)
        return OnnxFp8Conv(w.qdata, w.scale, w.act_scale, m.bias, w.fp8_max, w.dtype, m, conv_fn, op)

    return twin

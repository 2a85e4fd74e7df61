"""ONNX building blocks the ops' export twins share: FP8 QDQ through ``torch.onnx.ops.symbolic``.

``export_onnx`` (``onnx_export.py``) swaps each quantized layer for its op's twin (``OpSpec.onnx_twin``);
the twins compute what the kernels compute with ONNX's own ops. Only torch is needed here: the
``onnx`` package is imported by ``export_onnx`` when it checks and writes the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SerializationError
from ..tensor import Float8StaticTensor

MIN_OPSET = 21  # QuantizeLinear's output_dtype attribute and FP8 in the standard ops
ONNX_FP8 = {torch.float8_e4m3fn: 17, torch.float8_e5m2: 19}  # onnx.TensorProto.FLOAT8E4M3FN / FLOAT8E5M2


# ---------------------------------------------------------------- QDQ building blocks


def onnx_op(op: str, inputs: tuple[torch.Tensor, ...], attrs: dict[str, int], dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=dtype, shape=shape, version=MIN_OPSET)


def qdq(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """``QuantizeLinear`` → ``DequantizeLinear`` with a static fp32 scale, in fp32, back to ``x``'s dtype.

    Matches ``quant.quant_dequant``: divide, clamp to ±fp8_max, round to FP8, multiply. ONNX
    saturates at the FP8 type's own maximum, so a smaller target range (Gaudi2's 240) adds a Clip.
    """
    x32 = x.to(torch.float32)
    if fp8_max < torch.finfo(fp8_dtype).max:
        bound = scale * fp8_max
        x32 = torch.clamp(x32, -bound, bound)
    q = onnx_op("QuantizeLinear", (x32, scale), {"output_dtype": ONNX_FP8[fp8_dtype], "saturate": 1}, fp8_dtype, x.shape)
    return onnx_op("DequantizeLinear", (q, scale), {}, torch.float32, x.shape).to(x.dtype)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """``DequantizeLinear`` of an FP8 initializer: per tensor (0-d scale) or per ``axis``."""
    attrs = {"axis": axis} if scale.dim() else {}
    return onnx_op("DequantizeLinear", (qweight, scale.reshape(-1) if scale.dim() > 1 else scale), attrs, torch.float32,
                    qweight.shape).to(dtype)


# ---------------------------------------------------------------- export twins: Linear, Conv2d, Embedding


class OnnxTwin(nn.Module):
    """Base of the export twins: records calls it cannot express, for ``export_onnx`` to report by layer.

    A twin that meets such a call (attention dropout, say) notes it with ``refuse`` and still returns
    a result, and ``export_onnx`` raises once tracing is over, naming every refused layer at once
    rather than the first one torch.export's error would surface through its own traceback.
    """

    layer_name, layer_type = "?", "?"  # the quantized layer it stands for; set by export_onnx

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[str] = []

    def refuse(self, what: str) -> None:
        if what not in self.refused:
            self.refused.append(what)


def subclass_weight(module: nn.Module):
    """A subclass-form layer's ``Float8StaticTensor`` weight; SerializationError for anything else."""
    w = module.weight
    if not isinstance(w, Float8StaticTensor):
        raise SerializationError(f"{type(module).__name__} weight is a {type(w).__name__}, not a Float8StaticTensor")
    return w

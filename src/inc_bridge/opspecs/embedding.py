"""Op ``embedding``: ``nn.Embedding`` with a weight-only FP8 table (its input is integer ids).

Subclass form: a weight-only ``Float8StaticTensor``; ``F.embedding`` on it (registered below) calls
``inc_bridge::embedding``. Module form: ``QEmbedding``, whose forward calls the same op. ONNX:
``OnnxFp8Embedding``. Saving records ``QEmbedding``'s ``quant_config()`` or the flattened weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SerializationError
from ..kernels import ops as kernel_ops
from ..nn.embedding import QEmbedding
from ..tensor import Float8StaticTensor, call_arg
from ._build import with_fp8_weight
from ._onnx import OnnxTwin, dequantize_weight, subclass_weight
from .spec import OpSpec


@Float8StaticTensor.implements_torch_function(F.embedding)
def _embedding(func, types, args, kwargs):
    ids, w = args[0], args[1]
    if call_arg(args, kwargs, 3, "max_norm") is not None:
        raise NotImplementedError("F.embedding with max_norm renormalises the weight in place; FP8 weights cannot")
    return kernel_ops.embedding(ids, w.qdata, w.scale, w.fp8_max, w.dtype, w.backend)


class OnnxFp8Embedding(OnnxTwin):
    """``Gather(DQ(W), ids)``: the FP8 table is dequantized (per tensor, or per row: axis 0), then rows gathered.

    The kernel gathers FP8 rows first, but ONNX's ``Gather`` (opset 13, still current) does not take
    FP8 tensors; dequantization is elementwise, so gathering afterwards gives the same values.
    """

    def __init__(self, qweight, weight_scale, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table in the model's dtype, for model code that reads ``.weight``."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _onnx_twin(m: nn.Module) -> nn.Module:
    if isinstance(m, QEmbedding):
        return OnnxFp8Embedding(m.qweight, m.weight_scale, m.dtype, m.padding_idx)
    if m.max_norm is not None:
        raise SerializationError("nn.Embedding with max_norm renormalises its weight; it cannot be exported in FP8")
    w = subclass_weight(m)
    return OnnxFp8Embedding(w.qdata, w.scale, w.dtype, m.padding_idx)


EMBEDDING = OpSpec(
    name="embedding",
    module_types=(nn.Embedding,),
    quantized_type=QEmbedding,
    has_weight=True,
    n_inputs=0,
    input_positions=lambda module: (),
    to_subclass=with_fp8_weight,
    to_module=QEmbedding.from_float,
    kernel=kernel_ops.embedding,
    onnx_twin=_onnx_twin,
)

"""``QEmbedding``: the module form of a weight-only FP8 ``nn.Embedding``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConversionError
from ..formats import dtype_name
from ..kernels import ops as kernel_ops
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # only an annotation: from_float calls its methods; scales sit above this layer
    from ..scales import LayerScales


class QEmbedding(Fp8Module):
    """An embedding table stored in FP8; looked-up rows are dequantized to the model's dtype.

    Buffers: ``qweight`` (FP8, [num_embeddings, embedding_dim]) and ``weight_scale`` (fp32, 0-d or
    [num_embeddings, 1], one scale per row). There is no activation scale: the input is integer ids.
    ``weight`` reads as a weight-only ``Float8StaticTensor`` in the model's dtype (see ``Fp8Module``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        fp8_dtype: torch.dtype,
        fp8_max: float,
        dtype: torch.dtype,
        per_channel: bool = False,
        backend: str = "emulated",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        self._register_fp8_weight((num_embeddings, embedding_dim), fp8_dtype, per_channel, device)

    @classmethod
    def from_float(cls, module: nn.Embedding, scales: LayerScales, backend: str = "emulated") -> QEmbedding:
        if module.max_norm is not None:
            raise ConversionError("nn.Embedding with max_norm renormalises its weight in place; it cannot be FP8")
        qweight, weight_scale = scales.quantize_weight(module.weight)
        q = cls(
            module.num_embeddings,
            module.embedding_dim,
            module.padding_idx,
            fp8_dtype=scales.format.dtype,
            fp8_max=scales.fp8_max,
            dtype=module.weight.dtype,
            per_channel=weight_scale.dim() > 0,
            backend=backend,
            device="meta",
        )
        q.qweight = qweight
        q.weight_scale = weight_scale
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "fp8_dtype": dtype_name(self.qweight.dtype),
            "fp8_max": self.fp8_max,
            "dtype": dtype_name(self.dtype),
            "per_channel": self.weight_scale.dim() > 0,
            "backend": self.backend,
        }


    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernel_ops.embedding(ids, self.qweight, self.weight_scale, self.fp8_max, self.dtype, self.backend)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.weight_scale.dim() else "per_tensor"
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, fp8={dtype_name(self.qweight.dtype)}, "
            f"weight={gran}, dtype={dtype_name(self.dtype)}, backend={self.backend}"
        )

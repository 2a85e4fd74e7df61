"""Quantized modules of the "module" form."""

from .attention import QSDPA, SDPA, Matmul, QMatmul
from .conv import QConv2d
from .embedding import QEmbedding
from .linear import QuantizedLinear

__all__ = ["SDPA", "Matmul", "QConv2d", "QEmbedding", "QMatmul", "QSDPA", "QuantizedLinear"]

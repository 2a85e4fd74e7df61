"""Quantized modules of the "module" form."""

from .attention import QSDPA, SDPA, Matmul, QMatmul
from .conv import QConv1d, QConv2d
from .conv1d import QConv1D
from .embedding import QEmbedding
from .experts import QExperts
from .linear import QuantizedLinear

__all__ = ["SDPA", "Matmul", "QConv1D", "QConv1d", "QConv2d", "QEmbedding", "QExperts", "QMatmul", "QSDPA", "QuantizedLinear"]

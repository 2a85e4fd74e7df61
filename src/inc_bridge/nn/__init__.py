"""Quantized modules of the "module" form."""

from .conv import QConv2d
from .embedding import QEmbedding
from .linear import QuantizedLinear

__all__ = ["QConv2d", "QEmbedding", "QuantizedLinear"]

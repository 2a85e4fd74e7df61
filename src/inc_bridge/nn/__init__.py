"""Quantized modules of the "module" form."""

from .conv import QConv2d
from .linear import QuantizedLinear

__all__ = ["QConv2d", "QuantizedLinear"]

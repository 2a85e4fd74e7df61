"""FP8 formats, target devices and their representable ranges.

INC scales a tensor so that its amax maps to ``fullscale * backoff``. The fullscale depends on the
format and the device: Gaudi2 implements E4M3 with the ``fnuz`` range (240), every other target uses
the dtype's own maximum (448 for E4M3, 57344 for E5M2).
"""

from __future__ import annotations

from enum import Enum

import torch


class FP8Format(str, Enum):
    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is FP8Format.E4M3 else torch.float8_e5m2

    @property
    def max(self) -> float:
        """The dtype's largest finite value (448 or 57344): no FP8 range of this format exceeds it."""
        return float(torch.finfo(self.dtype).max)


class Target(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    GAUDI2 = "gaudi2"
    GAUDI3 = "gaudi3"


def fullscale(fmt: FP8Format, target: Target) -> float:
    """The largest magnitude the target represents in ``fmt`` (INC's ``get_fullscale``)."""
    if fmt is FP8Format.E4M3 and target is Target.GAUDI2:
        return float(torch.finfo(torch.float8_e4m3fnuz).max)  # 240.0
    return float(torch.finfo(fmt.dtype).max)


# INC's backoff factors for maxabs scale methods: headroom below fullscale.
WEIGHT_BACKOFF = 0.5
ACTIVATION_BACKOFF = 0.25

# Smallest scale we ever produce: INC's own floor for per-channel scales. It keeps an all-zero
# tensor from giving a zero (and then infinite inverse) scale.
MIN_SCALE = float(torch.finfo(torch.bfloat16).tiny)

SUPPORTED_HP_DTYPES = (torch.float32, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype

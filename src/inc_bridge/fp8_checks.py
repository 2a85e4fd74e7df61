"""What a consistent FP8 weight is: the checks every way of building one goes through.

A quantized weight is three tensors and a number that must fit each other: FP8 ``qdata``, an fp32
``scale`` (one value, or one per output row shaped to broadcast over ``qdata``), an fp32 0-d
activation scale, and ``fp8_max`` within the format's range. The cpu kernels hand these tensors'
pointers to C, which trusts the sizes; a scale of the wrong length read there is garbage, NaN or a
segfault. So ``Float8StaticTensor`` (built, unflattened or unpickled), the module-form layers
(``load_state_dict``, buffer assignment, ``from_config``) and ``inc_bridge.load`` all check with
the functions here, and the kernels check again right before the pointers leave Python.

Structure (dtype, shape, numel) is checked everywhere, tracing included; values (finite, > 0) only
where data arrives from outside (loading), as reading values is a sync and breaks tracing.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import torch

from .errors import IncBridgeError

# The FP8 formats the kernels implement (the C library knows exactly these two).
FP8_FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fail(error: type[IncBridgeError], where: str, what: str) -> NoReturn:
    raise error(f"{where}: {what}")


def _desc(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
    return type(t).__name__


def check_fp8_max(value: Any, fp8_dtype: torch.dtype, *, where: str, error: type[IncBridgeError]) -> float:
    """``fp8_max`` as a float: a finite number in (0, the format's largest value]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(error, where, f"fp8_max must be a number, got {type(value).__name__}")
    limit = float(torch.finfo(fp8_dtype).max)
    if not (math.isfinite(value) and 0 < value <= limit):
        _fail(error, where, f"fp8_max {value!r} is not in (0, {limit:g}], the range of {fp8_dtype}")
    return float(value)


def check_hp_dtype(dtype: Any, *, where: str, error: type[IncBridgeError]) -> None:
    """The dtype a layer computes in: a float of 2 bytes or more (not FP8, not an integer)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        _fail(error, where, f"the compute dtype must be a float dtype such as float32 or bfloat16, got {dtype!r}")


def check_scalar_scale(t: Any, *, where: str, error: type[IncBridgeError]) -> None:
    """An fp32 0-d scale (an activation scale)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 0:
        _fail(error, where, f"expected an fp32 0-d scale, got {_desc(t)}")


def check_weight_parts(qdata: Any, scale: Any, act_scale: Any, *, fp8_max: Any, hp_dtype: Any, where: str,
                       error: type[IncBridgeError]) -> None:
    """Raise ``error`` unless qdata, scale, act_scale, fp8_max and the compute dtype fit together.

    ``qdata``: an FP8 tensor of at least one dimension. ``scale``: fp32, 0-d or shaped
    [rows, 1, ...] with ``rows = qdata.shape[0]`` and as many dims as ``qdata``. ``act_scale``: None
    or an fp32 0-d tensor. All on one device.
    """
    if not isinstance(qdata, torch.Tensor) or qdata.dtype not in FP8_FORMATS or qdata.dim() == 0:
        _fail(error, where, f"qdata must be an FP8 tensor (float8_e4m3fn or float8_e5m2) of at least one dimension, "
                            f"got {_desc(qdata)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        _fail(error, where, f"scale must be an fp32 tensor, got {_desc(scale)}")
    per_row = (qdata.shape[0],) + (1,) * (qdata.dim() - 1)
    if scale.dim() != 0 and tuple(scale.shape) != per_row:
        _fail(error, where, f"scale of shape {list(scale.shape)} does not fit qdata of shape {list(qdata.shape)}: "
                            f"expected [] or {list(per_row)}")
    if act_scale is not None:
        check_scalar_scale(act_scale, where=f"{where} (act_scale)", error=error)
    check_fp8_max(fp8_max, qdata.dtype, where=where, error=error)
    check_hp_dtype(hp_dtype, where=where, error=error)
    devices = {t.device for t in (qdata, scale, act_scale) if t is not None}
    if len(devices) > 1:
        _fail(error, where, f"qdata, scale and act_scale are on different devices ({sorted(map(str, devices))})")


def check_scale_values(t: torch.Tensor, *, where: str, error: type[IncBridgeError]) -> None:
    """Every value of a scale tensor is finite and positive (skipped for tensors without data)."""
    if t.is_meta or type(t) is not torch.Tensor or t.numel() == 0:
        return
    values = t.detach().to("cpu", torch.float64)
    bad = ~(torch.isfinite(values) & (values > 0))
    if bool(bad.any()):
        first = float(values.reshape(-1)[bad.reshape(-1)][0])
        _fail(error, where, f"scales must be finite and positive, found {first!r} "
                            f"({int(bad.sum())} of {values.numel()} values invalid)")

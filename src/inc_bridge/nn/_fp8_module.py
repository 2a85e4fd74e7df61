"""Behaviour every quantized module shares: dtype casts never touch FP8 data or scales."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, SerializationError
from ..formats import dtype_from_name
from ..fp8_checks import FP8_FORMATS, check_fp8_max, check_hp_dtype, check_scale_values
from ..safe_io import shorten
from ..sharing import tensors_shared

# What each constructor argument found in a saved config must be (a file can hold any JSON).
_COUNTS = ("in_features", "out_features", "in_channels", "out_channels", "num_embeddings", "embedding_dim")
_PAIRS = ("kernel_size", "stride", "dilation")
_FLAGS = ("bias", "per_channel")
_NAMES = ("backend", "padding_mode", "fn")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be constructor argument ``key``, or None when it can."""
    if key in _COUNTS:
        return None if _is_int(value) and value >= 0 else "a non-negative integer"
    if key == "groups":
        return None if _is_int(value) and value >= 1 else "a positive integer"
    if key in _PAIRS:
        ok = isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)
        return None if ok else "two positive integers"
    if key == "padding":
        ok = isinstance(value, str) or (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value))
        return None if ok else "\"same\", \"valid\" or two non-negative integers"
    if key in _FLAGS:
        return None if isinstance(value, bool) else "true or false"
    if key in _NAMES:
        return None if isinstance(value, str) else "a string"
    if key == "padding_idx":
        return None if value is None or _is_int(value) else "an integer or null"
    return None


class Fp8Module(nn.Module):
    """Base of the quantized modules.

    ``Module.to(dtype)`` / ``.float()`` / ``.bfloat16()`` cast every floating buffer, FP8 included,
    which would silently turn an FP8 weight into a float one. Here the FP8 buffers and the fp32
    scales keep their dtype (they still move with ``.to(device)``); the cast changes only the
    dtype the layer computes in (``self.dtype``) and its bias.
    """

    dtype: torch.dtype
    _fixed_dtype_buffers: tuple[str, ...] = ("weight", "weight_scale", "input_scale")

    def __setattr__(self, name: str, value: Any) -> None:
        # A scale or FP8 weight replaced by one of another dtype or shape would reach the kernels
        # (and the C code behind the cpu backend) with sizes they do not expect.
        old = self.__dict__.get("_buffers", {}).get(name)
        if old is not None and name in self._fixed_dtype_buffers and isinstance(value, torch.Tensor):
            if value.dtype != old.dtype or value.shape != old.shape:
                raise ConversionError(
                    f"{type(self).__name__}.{name}: {value.dtype}{list(value.shape)} cannot replace "
                    f"{old.dtype}{list(old.shape)}; build a new layer for another format or granularity"
                )
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        """``load_state_dict``: FP8 weights and scales must match this layer's dtype and shape, scales
        must be finite and positive; checked before torch assigns or copies anything of this layer."""
        for name in self._fixed_dtype_buffers:
            key, old = prefix + name, self._buffers.get(name)
            if key not in state_dict or old is None:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.dtype != old.dtype or value.shape != old.shape:
                got = f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise SerializationError(
                    f"state_dict[{key!r}]: {got} does not fit {type(self).__name__}.{name} ({old.dtype}{list(old.shape)})"
                )
            if name != "weight":
                check_scale_values(value, where=f"state_dict[{key!r}]", error=SerializationError)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_buffers(self) -> dict[str, torch.Tensor]:
        """This layer's fp32 scale buffers by name (everything fixed-dtype but the FP8 weight)."""
        return {n: self._buffers[n] for n in self._fixed_dtype_buffers if n != "weight" and self._buffers.get(n) is not None}

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {n: b for n, b in self._buffers.items() if n in self._fixed_dtype_buffers and b is not None}
        result = super()._apply(fn, recurse)
        for name, before in fixed.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        probe = fn(torch.zeros((), dtype=self.dtype))
        if probe.dtype.is_floating_point and probe.dtype.itemsize > 1:
            self.dtype = probe.dtype
        return result

    def _register_fp8_weight(self, shape: tuple[int, ...], fp8_dtype: torch.dtype, per_channel: bool,
                             device: torch.device | str | None) -> None:
        """Zero FP8 ``weight`` and a unit fp32 ``weight_scale``: 0-d, or one per output row shaped
        to broadcast over the weight ([rows, 1, ...])."""
        self.register_buffer("weight", torch.zeros(shape, dtype=fp8_dtype, device=device))
        scale_shape = (shape[0],) + (1,) * (len(shape) - 1) if per_channel else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    def _take_bias(self, bias: torch.Tensor) -> None:
        """The float layer's bias: a copy, or the same storage under ``sharing_tensors()``."""
        bias = bias.detach()
        self.bias = nn.Parameter(bias if tensors_shared() else bias.clone(), requires_grad=False)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None):
        """An empty module (zero FP8 data, unit scales) shaped by the class's ``quant_config()``.

        ``device="meta"`` allocates nothing; ``inc_bridge.load`` fills the tensors afterwards.
        """
        where = f"{cls.__name__} config"
        if not isinstance(cfg, dict):
            raise SerializationError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        for key, value in cfg.items():
            problem = _config_problem(key, value)
            if problem is not None:
                raise SerializationError(f"{where}: {key!r} must be {problem}, got {shorten(value, 60)}")
        try:
            fp8_dtype, dtype = dtype_from_name(cfg["fp8_dtype"]), dtype_from_name(cfg["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"{where}: fp8_dtype and dtype must name torch dtypes ({shorten(str(exc), 80)})") from None
        if fp8_dtype not in FP8_FORMATS:
            raise SerializationError(f"{where}: fp8_dtype {cfg['fp8_dtype']!r} is not float8_e4m3fn or float8_e5m2")
        check_hp_dtype(dtype, where=where, error=SerializationError)
        check_fp8_max(cfg.get("fp8_max"), fp8_dtype, where=where, error=SerializationError)
        try:
            return cls(**{**cfg, "fp8_dtype": fp8_dtype, "dtype": dtype}, device=device)
        except (TypeError, ValueError) as exc:  # unknown or missing arguments
            raise SerializationError(f"{where}: {shorten(str(exc), 120)}") from None

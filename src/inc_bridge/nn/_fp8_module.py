"""Behaviour every quantized module shares: dtype casts never touch FP8 data or scales, and
``.weight`` reads as the model's dtype while the FP8 data lives in ``qweight``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, SerializationError
from ..formats import dtype_from_name
from ..fp8_checks import FP8_FORMATS, check_fp8_max, check_hp_dtype, check_scale_values
from ..safe_io import shorten
from ..sharing import tensors_shared
from ..tensor import Float8StaticTensor

# What each constructor argument found in a saved config must be (a file can hold any JSON).
_COUNTS = ("in_features", "out_features", "in_channels", "out_channels", "num_embeddings", "embedding_dim")
_PAIRS = ("kernel_size", "stride", "dilation")
_FLAGS = ("bias", "per_channel")
_NAMES = ("backend", "padding_mode", "fn")
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_problem(key: str, value: Any, dims: int = 2) -> str | None:
    """Why ``value`` cannot be constructor argument ``key``, or None when it can (``dims``: a conv's
    spatial dims, the length of its kernel_size, stride, padding and dilation)."""
    if key in _COUNTS:
        return None if _is_int(value) and value >= 0 else "a non-negative integer"
    if key == "groups":
        return None if _is_int(value) and value >= 1 else "a positive integer"
    if key in _PAIRS:
        ok = isinstance(value, list) and len(value) == dims and all(_is_int(v) and v >= 1 for v in value)
        return None if ok else f"{_COUNT_WORDS[dims]} positive integer{'s' if dims > 1 else ''}"
    if key == "padding":
        ok = isinstance(value, str) or (isinstance(value, list) and len(value) == dims and all(_is_int(v) and v >= 0 for v in value))
        return None if ok else f"\"same\", \"valid\" or {_COUNT_WORDS[dims]} non-negative integer{'s' if dims > 1 else ''}"
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

    Model code reads ``layer.weight`` for its dtype (ViT and T5 cast their inputs to it) or hands
    it to fused kernels (``nn.TransformerEncoderLayer``'s fast path). So the FP8 data is stored as
    ``qweight`` and ``weight`` is a read-only ``Float8StaticTensor`` view of this layer's own
    tensors: its dtype is the model's, ops on it run this layer's kernels, and as a tensor
    subclass it makes PyTorch's fused fast paths step aside.
    """

    dtype: torch.dtype
    fp8_max: float
    backend: str
    config_dims: int = 2  # a conv's spatial dims (the length of kernel_size, stride ... in a saved config)
    _fixed_dtype_buffers: tuple[str, ...] = ("qweight", "weight_scale", "input_scale")
    # The float layer's tensors this layer holds under another name. State dicts and saved
    # directories written before the rename hold them under the float name; loading reads both.
    renamed_tensors: Mapping[str, str] = MappingProxyType({"weight": "qweight"})

    @property
    def weight(self) -> Float8StaticTensor:
        """This layer's weight as model code expects it (built on access, sharing the buffers)."""
        qweight = self._buffers.get("qweight")
        if qweight is None:
            raise AttributeError(f"{type(self).__name__} has no weight")
        return Float8StaticTensor(qweight, self.weight_scale, self.fp8_max, self.backend, self.dtype,
                                  act_scale=self._buffers.get("input_scale"))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and "qweight" in self.__dict__.get("_buffers", {}):
            # Re-tying (``head.weight = emb.weight``) or replacing the weight would bypass the scales.
            raise ConversionError(
                f"{type(self).__name__}.weight is read-only (a view of qweight, weight_scale and input_scale); "
                "assign qweight and weight_scale, or build a new layer with from_float"
            )
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
        must be finite and positive; checked before torch assigns or copies anything of this layer.

        A state_dict saved before the FP8 data moved to ``qweight`` holds it under ``weight``; that
        key is read as ``qweight`` (torch hands each module a copy of the caller's dict).
        """
        given = {name: prefix + name for name in self._fixed_dtype_buffers}
        for old_name, name in self.renamed_tensors.items():
            if name in self._buffers and prefix + old_name in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + old_name)
                given[name] = prefix + old_name  # errors name the key the caller gave
        for name in self._fixed_dtype_buffers:
            key, old = prefix + name, self._buffers.get(name)
            if key not in state_dict or old is None:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.dtype != old.dtype or value.shape != old.shape:
                got = f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise SerializationError(
                    f"state_dict[{given[name]!r}]: {got} does not fit {type(self).__name__}.{name} "
                    f"({old.dtype}{list(old.shape)})"
                )
            if name != "qweight":
                check_scale_values(value, where=f"state_dict[{key!r}]", error=SerializationError)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_buffers(self) -> dict[str, torch.Tensor]:
        """This layer's fp32 scale buffers by name (everything fixed-dtype but the FP8 weight)."""
        return {n: self._buffers[n] for n in self._fixed_dtype_buffers if n != "qweight" and self._buffers.get(n) is not None}

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
        """Zero FP8 ``qweight`` and a unit fp32 ``weight_scale``: 0-d, or one per output row shaped
        to broadcast over the weight ([rows, 1, ...])."""
        self.register_buffer("qweight", torch.zeros(shape, dtype=fp8_dtype, device=device))
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
            problem = _config_problem(key, value, cls.config_dims)
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

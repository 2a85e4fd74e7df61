"""Behaviour every quantized module shares: dtype casts never touch FP8 data or scales."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import dtype_from_name
from ..sharing import tensors_shared


class Fp8Module(nn.Module):
    """Base of the quantized modules.

    ``Module.to(dtype)`` / ``.float()`` / ``.bfloat16()`` cast every floating buffer, FP8 included,
    which would silently turn an FP8 weight into a float one. Here the FP8 buffers and the fp32
    scales keep their dtype (they still move with ``.to(device)``); the cast changes only the
    dtype the layer computes in (``self.dtype``) and its bias.
    """

    dtype: torch.dtype
    _fixed_dtype_buffers: tuple[str, ...] = ("weight", "weight_scale", "input_scale")

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
        kwargs = {**cfg, "fp8_dtype": dtype_from_name(cfg["fp8_dtype"]), "dtype": dtype_from_name(cfg["dtype"])}
        return cls(**kwargs, device=device)

"""The bridge's own observer, for what INC cannot measure on CPU (captured attention inputs).

INC 3.10 on CPU patches only Linear, Conv2d and EmbeddingBag; registering a custom module for CPU
needs private workarounds and its fused-SDPA quantizer is not CPU-ready. So the q/k/v of captured
``SDPA`` modules and the operands of captured ``Matmul`` modules are measured here, by forward
pre-hooks, in the same calibration pass as INC's Linear/Conv2d measurement. The statistic is INC's:
the running maximum of |x| per input.
"""

from __future__ import annotations

import torch
from torch import nn

from .activation import quantized_positions

_NAMES = ("query", "key", "value")


class AmaxObserver:
    """Running amax of each quantized input of one module (NaN propagates, as in INC)."""

    def __init__(self, module: nn.Module) -> None:
        self.positions = quantized_positions(module)
        self.amax: list[torch.Tensor | None] = [None] * len(self.positions)
        self.dtype: torch.dtype | None = None
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for i, pos in enumerate(self.positions):
            x = args[pos] if pos < len(args) else kwargs.get(_NAMES[pos]) if pos < len(_NAMES) else None
            if not isinstance(x, torch.Tensor):
                continue
            a = x.detach().abs().amax().float()
            self.amax[i] = a if self.amax[i] is None else torch.maximum(self.amax[i], a)
            self.dtype = x.dtype

    def result(self) -> tuple[float, ...]:
        """Amax per input; empty when the module never ran."""
        if any(a is None for a in self.amax):
            return ()
        return tuple(float(a) for a in self.amax)  # type: ignore[arg-type]

    def remove(self) -> None:
        self.handle.remove()

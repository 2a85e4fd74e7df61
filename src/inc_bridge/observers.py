"""The bridge's own input observer: running amax and a histogram of |x| per quantized input.

Two jobs, both in the same calibration pass as INC's measurement:

* Captured attention (``SDPA`` q/k/v, ``Matmul`` operands): INC 3.10 on CPU patches only Linear,
  Conv2d and EmbeddingBag (registering a custom module for CPU needs private workarounds and its
  fused-SDPA quantizer is not CPU-ready), so their amax is measured here, with INC's statistic: the
  running maximum of |x|.
* Histograms of |x| for every quantized input, so percentile and MSE-optimal activation scales can
  be computed later without calibrating again. The histogram covers [0, R) in ``bins`` equal bins;
  R is a power of two that doubles as larger values arrive (merging bins pairwise, exactly), so one
  pass suffices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NAMES = ("query", "key", "value")


class Histogram:
    """Counts of |x| in ``bins`` equal bins over [0, range)."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.range = 0.0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        amax = float(a.max()) if a.numel() else 0.0
        if not math.isfinite(amax):
            return  # the amax statistic reports NaN/Inf by layer name
        if self.counts is None:
            self.range = 2.0 ** math.ceil(math.log2(max(amax, 2.0**-24)))
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        while amax > self.range:  # double the range: bin pairs merge into one, exactly
            merged = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.range *= 2.0
        self.counts += torch.histc(a, bins=self.bins, min=0.0, max=self.range).double()

    def to_dict(self) -> dict:
        return {"range": self.range, "counts": [] if self.counts is None else self.counts.tolist()}


def merge_histograms(hists: list[dict]) -> dict:
    """One histogram of all the data behind ``hists`` (ranges are powers of two: bins merge exactly)."""
    hists = [h for h in hists if h["counts"]]
    if not hists:
        return {"range": 0.0, "counts": []}
    top = max(h["range"] for h in hists)
    total = None
    for h in hists:
        counts = torch.tensor(h["counts"], dtype=torch.float64)
        factor = round(top / h["range"])
        while factor > 1:  # double this histogram's range until it matches
            merged = counts.view(-1, 2).sum(dim=1)
            counts = torch.cat([merged, torch.zeros_like(merged)])
            factor //= 2
        total = counts if total is None else total + counts
    return {"range": top, "counts": total.tolist()}


class InputObserver:
    """Running amax and histogram of each quantized input of one module (NaN propagates, as in INC)."""

    def __init__(self, module: nn.Module, positions: tuple[int, ...], bins: int) -> None:
        self.positions = positions
        self.amax: list[torch.Tensor | None] = [None] * len(positions)
        self.hists = [Histogram(bins) for _ in positions]
        self.dtype: torch.dtype | None = None
        self.module = module
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not self.module:
            # INC's patched modules share their hook dicts with the module they wrap and call it
            # inside their forward: count each input once, at the outer call.
            return
        for i, pos in enumerate(self.positions):
            x = args[pos] if pos < len(args) else kwargs.get(_NAMES[pos]) if pos < len(_NAMES) else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue
            a = x.detach().abs().amax().float()
            self.amax[i] = a if self.amax[i] is None else torch.maximum(self.amax[i], a)
            self.hists[i].add(x)
            self.dtype = x.dtype

    def input_amax(self) -> tuple[float, ...]:
        """Amax per input; empty when the module never ran."""
        if any(a is None for a in self.amax):
            return ()
        return tuple(float(a) for a in self.amax)  # type: ignore[arg-type]

    def histograms(self) -> tuple[dict, ...]:
        return tuple(h.to_dict() for h in self.hists) if self.input_amax() else ()

    def remove(self) -> None:
        self.handle.remove()

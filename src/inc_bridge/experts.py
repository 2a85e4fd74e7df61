"""Fused MoE experts: which modules they are, and how their inputs are measured per expert.

transformers 5 keeps each MoE layer's experts as fused 3-D parameters inside one experts module
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) and runs them through ``eager`` (a loop of
``F.linear(x_e, weight[e])``) or ``grouped_mm`` (``F.grouped_mm(x_sorted, weight.transpose(-2, -1),
offs)``). INC's measurement sees none of this. ``ExpertsObserver`` measures, during the same
calibration pass, the amax of the tokens each expert actually receives, for both matrices: it runs
the experts' forward under a ``TorchFunctionMode`` that looks at each matmul whose weight is one of
the two parameters (a view of it: one expert; the whole transposed parameter: grouped rows) and
records ``max |x|`` of the rows that go to each expert. The forward itself runs unchanged, so the
model computes exactly what the float model computes; the cost is one amax per expert and matrix.

Experts classes are recognised by identity (module path and class name) from ``FUSED_EXPERTS``:
classes whose forward is transformers' standard experts algorithm with [E, out, in] weights, no
bias and a gate (checked on the instance too). ``register_fused_experts`` adds another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CalibrationError

# Re-exported: the layout facts live below the modules that use them (experts_layout.py).
from .experts_layout import (  # noqa: E402
    FUSED_EXPERTS,
    MATRICES,
    SUPPORTED_IMPLEMENTATIONS,
    check_layout,
    is_fused_experts_type,
    register_fused_experts,
)
from .measurements import LayerStats, Source
from .observers import merge_histograms

__all__ = ["FUSED_EXPERTS", "MATRICES", "SUPPORTED_IMPLEMENTATIONS", "ExpertsObserver", "check_layout",
           "is_fused_experts_type", "register_fused_experts", "sibling_expert_stats"]


class _RoutedRows(TorchFunctionMode):
    """Records, for each matmul on one of the experts' parameters, the amax of each expert's rows."""

    def __init__(self, observer: ExpertsObserver) -> None:
        super().__init__()
        self.observer = observer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            self.observer.linear(args[0], args[1])
        elif func in (F.grouped_mm, torch._grouped_mm) and len(args) >= 2:
            self.observer.grouped(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None))
        return func(*args, **kwargs)


class ExpertsObserver:
    """Per-expert input amax and token counts of a fused experts module, for both matrices."""

    def __init__(self, module: nn.Module, bins: int = 0) -> None:
        """Observe ``module`` (the calibration copy's experts module). ``bins`` is unused: there are
        no per-expert histograms (histogram activation methods are refused for experts)."""
        self.module = module
        self.num_experts = module.gate_up_proj.shape[0]
        e = self.num_experts
        self.amax = {m: torch.zeros(e, dtype=torch.float32) for m in MATRICES}
        self.tokens = {m: torch.zeros(e, dtype=torch.int64) for m in MATRICES}
        self.dtype: torch.dtype | None = None
        self.calls = 0
        self.seen = 0  # matmuls recognised as expert matmuls
        original = module.forward

        def observed_forward(*args, **kwargs):
            self.calls += 1
            with _RoutedRows(self):
                return original(*args, **kwargs)

        module.forward = observed_forward  # an instance attribute on the calibration copy only

    def _which(self, w: torch.Tensor) -> str | None:
        if not isinstance(w, torch.Tensor) or type(w) is not torch.Tensor and not isinstance(w, nn.Parameter):
            return None
        ptr, offset = w.untyped_storage().data_ptr(), w.storage_offset()
        for m in MATRICES:
            p = getattr(self.module, m)
            # a view of this parameter: same storage and within its extent (checkpoints loaded into one
            # shared buffer put several parameters in one storage)
            if p.untyped_storage().data_ptr() == ptr and p.storage_offset() <= offset < p.storage_offset() + p.numel():
                return m
        return None

    def _add(self, m: str, expert_of_row: torch.Tensor, row_amax: torch.Tensor) -> None:
        """Fold in rows: ``expert_of_row[i]`` received a row of amax ``row_amax[i]``."""
        self.amax[m] = self.amax[m].scatter_reduce(0, expert_of_row, row_amax.float(), "amax", include_self=True)
        self.tokens[m] += torch.bincount(expert_of_row, minlength=self.num_experts)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> None:
        m = self._which(w)
        if m is None or w.dim() != 2 or x.numel() == 0:
            return
        p = getattr(self.module, m)
        e = (w.storage_offset() - p.storage_offset()) // p.stride(0)
        rows = x.reshape(-1, x.shape[-1])
        self.seen += 1
        self.dtype = x.dtype
        row_amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())
        self._add(m, torch.full((rows.shape[0],), e, dtype=torch.int64), row_amax)

    def grouped(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None) -> None:
        m = self._which(w)
        if m is None or offs is None or x.dim() != 2:
            return
        self.seen += 1
        self.dtype = x.dtype
        ends = offs.to(torch.int64)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        n = int(ends[-1]) if ends.numel() else 0
        if n == 0:
            return
        rows = x[:n]
        row_amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())
        self._add(m, torch.repeat_interleave(torch.arange(counts.numel()), counts), row_amax)

    def layer_stats(self, name: str, kind: str) -> LayerStats | None:
        """The layer's statistics, or None when it never ran (``compute_scales`` names it).

        Raises:
            CalibrationError: the layer ran but none of its matmuls was recognised (an experts
                implementation other than eager / grouped_mm).
        """
        if self.calls == 0:
            return None
        if self.seen == 0:
            impl = getattr(getattr(self.module, "config", None), "_experts_implementation", None)
            raise CalibrationError(
                f"layer {name!r}: its experts ran with implementation {impl!r}, whose matmuls inc_bridge cannot "
                f"measure per expert; supported: {', '.join(SUPPORTED_IMPLEMENTATIONS)} "
                "(model.set_experts_implementation('grouped_mm'))"
            )
        tokens = self.tokens[MATRICES[0]]
        amax = tuple(tuple(float(v) for v in self.amax[m]) for m in MATRICES)
        layer_amax = tuple(max(a) for a in amax)
        return LayerStats(name=name, kind=kind, input_amax=layer_amax, source=Source.BRIDGE,
                          dtype=str(self.dtype).removeprefix("torch."), expert_tokens=tuple(int(t) for t in tokens),
                          expert_input_amax=amax)

    def input_amax(self) -> tuple[float, ...]:
        return tuple(float(self.amax[m].max()) for m in MATRICES) if self.calls else ()

    def histograms(self) -> tuple[dict, ...]:
        return ()

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


# ------------------------------------------------------------------ experts as a ModuleList of Linears

_LIST_EXPERT = re.compile(r"^(?P<prefix>.*\bexperts)\.(?P<index>\d+)(?P<rest>(\..+)?)$")
LIST_FALLBACK_RULE = ("no calibration tokens: input scales from the largest input amax of the same layer in the "
                      "other experts ({})")


def sibling_expert_stats(name: str, layers: Mapping[str, LayerStats]) -> tuple[LayerStats, str] | None:
    """Statistics for a Linear of an expert that received no calibration tokens (older MoE models keep
    experts as ``experts.<i>.<linear>`` in an ``nn.ModuleList``; INC measures each Linear on the tokens
    it receives, and records nothing for one that never ran): the elementwise max of the input amax
    of the same Linear in the other experts, with their histograms merged. None when ``name`` is not
    such a Linear or no sibling was measured. Returns the statistics and the reason to report.
    """
    found = _LIST_EXPERT.match(name)
    if found is None:
        return None
    pattern = re.compile(re.escape(found["prefix"]) + r"\.(\d+)" + re.escape(found["rest"]) + "$")
    siblings = [s for n, s in layers.items() if n != name and pattern.match(n) and s.input_amax]
    if not siblings or len({len(s.input_amax) for s in siblings}) != 1:
        return None
    amax = tuple(max(values) for values in zip(*(s.input_amax for s in siblings), strict=True))
    n_hist = min(len(s.input_hist) for s in siblings)
    hists = tuple(merge_histograms([s.input_hist[i] for s in siblings]) for i in range(n_hist))
    first = siblings[0]
    stats = LayerStats(name=name, kind=first.kind, input_amax=amax, dtype=first.dtype, source=first.source,
                       input_hist=hists)
    names = sorted(s.name for s in siblings)
    return stats, LIST_FALLBACK_RULE.format(", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else ""))

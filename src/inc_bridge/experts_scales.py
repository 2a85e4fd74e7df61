"""Scales of a fused MoE experts layer: per expert, per matrix, from the tokens each expert received.

Each expert's matrix is scaled as if it were its own ``nn.Linear`` (INC's ``maxabs`` math, in the
model's dtype): weight scale from that expert's weight amax (per tensor, or per output row), input
scale from the amax of the tokens routed to that expert during calibration.

Fallback: an expert that received no calibration tokens has no input statistics. It gets, for each
matrix, the largest input amax among the layer's other experts (for ``gate_up_proj`` that is the
amax of every token that reached the layer, as each token goes to some expert). The scale set lists
these experts (``ExpertsScales.fallback``) and the conversion summary names them, expert by expert.
A layer none of whose experts received a token is reported as a layer that never ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CalibrationError, ConversionError
from .experts import MATRICES
from .formats import ACTIVATION_BACKOFF, WEIGHT_BACKOFF, fullscale
from .kernels.weights import quantize_fp8_rows
from .measurements import LayerStats
from .quant import inc_activation_scale, inc_weight_quant_scale
from .recipe import Granularity, Op, Recipe
from .scales import LayerScales, maxabs_scale

FALLBACK_RULE = "no calibration tokens: input scales from the largest input amax of the layer's other experts"


@dataclass(frozen=True)
class ExpertsScales(LayerScales):
    """``LayerScales`` of a fused experts layer (``input_scales`` empty, ``weight_scale`` None).

    ``expert_input_scales[m]``: one scale per expert for matrix ``MATRICES[m]`` ([E], hp dtype);
    ``expert_weight_scales[m]``: [E] per tensor or [E, out] per channel; ``fallback``: experts that
    received no calibration tokens (see the module docstring); ``tokens``: tokens per expert.
    """

    expert_input_scales: tuple[torch.Tensor, ...]
    expert_weight_scales: tuple[torch.Tensor, ...]
    fallback: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return self.expert_input_scales[0].numel()

    @property
    def granularity(self) -> Granularity:
        return Granularity.PER_CHANNEL if self.expert_weight_scales[0].dim() == 2 else Granularity.PER_TENSOR

    def check_weight(self, weight: torch.Tensor) -> None:
        """``weight``: the layer's ``gate_up_proj``; dtype and expert count must fit."""
        if weight.dtype != self.hp_dtype:
            raise ConversionError(f"layer {self.name!r}: weight dtype {weight.dtype} differs from the dtype its scales "
                                  f"were computed in ({self.hp_dtype}); recompute scales for this model")
        if weight.dim() != 3 or weight.shape[0] != self.num_experts:
            raise ConversionError(f"layer {self.name!r}: scales for {self.num_experts} experts, weight of shape "
                                  f"{list(weight.shape)}")

    def quantize_matrix(self, m: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FP8 data [E, out, in], dequant scale ([E] or [E, out, 1]) and activation scales [E] of matrix ``m``.

        Expert by expert, exactly as ``LayerScales.quantize_weight`` quantizes one Linear weight.
        """
        ws = self.expert_weight_scales[m]
        if tuple(ws.shape[:1]) != (weight.shape[0],) or (ws.dim() == 2 and ws.shape[1] != weight.shape[1]):
            raise ConversionError(f"layer {self.name!r}: {MATRICES[m]} of shape {list(weight.shape)} does not fit its "
                                  f"scales {list(ws.shape)}")
        w = weight.detach()
        qdata = torch.empty(w.shape, dtype=self.format.dtype, device=w.device)
        for e in range(w.shape[0]):
            q_scale = inc_weight_quant_scale(ws[e]).reshape((-1, 1) if ws.dim() == 2 else ())
            qdata[e] = quantize_fp8_rows(w[e], q_scale, self.format.dtype, self.fp8_max)
        scale = ws.to(torch.float32, copy=True)
        scale = scale.unsqueeze(-1) if scale.dim() == 2 else scale
        act = inc_activation_scale(self.expert_input_scales[m]).to(w.device)
        return qdata, scale.to(w.device), act

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["experts"] = {
            MATRICES[m]: {"input_scales": self.expert_input_scales[m].tolist(),
                          "weight_scales": self.expert_weight_scales[m].tolist()}
            for m in range(len(MATRICES))
        }
        d["fallback"] = {str(e): FALLBACK_RULE for e in self.fallback}
        d["tokens"] = list(self.tokens)
        return d


def experts_layer_scales(stats: LayerStats, recipe: Recipe, hp_dtype: torch.dtype,
                         weights: tuple[torch.Tensor, ...]) -> ExpertsScales:
    """Per-expert scales from per-expert statistics and the experts' weights (``MATRICES`` order).

    Raises:
        CalibrationError: no per-expert statistics, no expert received a token, or a histogram
            activation method (percentile, mse), which has no per-expert histograms to work from.
    """
    fmt, wq, aq = recipe.layer_settings(stats.name)
    full = fullscale(fmt, recipe.quantization.target)
    stats.check_finite()
    if aq.scale_method.from_histogram:
        raise CalibrationError(f"layer {stats.name!r} (fused experts): activation scale method "
                               f"{aq.scale_method.value!r} is not available per expert; use a maxabs method or "
                               "exclude the layer")
    tokens = stats.expert_tokens
    if not tokens or len(stats.expert_input_amax) != len(MATRICES) or len(tokens) != weights[0].shape[0]:
        raise CalibrationError(f"layer {stats.name!r}: no per-expert statistics for its {weights[0].shape[0]} experts; "
                               "calibrate with inc_bridge")
    measured = [e for e, t in enumerate(tokens) if t > 0]
    if not measured:
        raise CalibrationError(f"layer {stats.name!r}: no expert received a calibration token")
    fallback = tuple(e for e, t in enumerate(tokens) if t == 0)
    input_scales, weight_scales = [], []
    for m, w in enumerate(weights):
        amax = list(stats.expert_input_amax[m])
        top = max(amax[e] for e in measured)
        amax = [a if tokens[e] > 0 else top for e, a in enumerate(amax)]
        input_scales.append(maxabs_scale(torch.tensor(amax, dtype=hp_dtype), full, ACTIVATION_BACKOFF, aq.scale_method))
        flat = w.detach().reshape(w.shape[0], w.shape[1], -1)
        per_row = torch.maximum(flat.amax(dim=2), flat.amin(dim=2).neg())  # [E, out], as weight_amax_per_channel
        w_amax = per_row.amax(dim=1) if wq.granularity is Granularity.PER_TENSOR else per_row
        weight_scales.append(maxabs_scale(w_amax.to(hp_dtype), full, WEIGHT_BACKOFF, wq.scale_method))
    return ExpertsScales(stats.name, Op.LINEAR, fmt, full, hp_dtype, (), None, tuple(input_scales),
                         tuple(weight_scales), fallback, tuple(tokens))

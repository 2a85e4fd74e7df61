"""What a model still holds in high precision after ``convert``, and why.

A conversion summary that counts only the layers inc_bridge knows hides the ones it does not:
GPT-2's ``Conv1D``, fused MoE expert parameters, ``nn.Conv1d``, ``nn.MultiheadAttention``'s
projections. ``float_matrices`` walks the model and lists every module that directly holds a float
parameter of two or more dimensions (a weight matrix, a conv kernel, stacked experts) and was not
converted, with the reason and its bytes, so a summary can say how much of the model stayed float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .nn._fp8_module import Fp8Module
from .opspecs import describe_registered, entry_for
from .tensor import Float8StaticTensor

UNSUPPORTED = "unsupported type"


@dataclass(frozen=True)
class FloatMatrix:
    """A module left in high precision: ``nbytes`` of float matrices under ``name``."""

    name: str
    module_type: str
    reason: str
    nbytes: int

    @property
    def unsupported(self) -> bool:
        return self.reason.startswith(UNSUPPORTED)


def _float_matrix_bytes(module: nn.Module) -> int:
    total, seen = 0, set()
    for p in module.parameters(recurse=False):
        if isinstance(p, Float8StaticTensor) or id(p) in seen:
            continue
        seen.add(id(p))  # a parameter registered twice in one module counts once
        if p.dim() >= 2 and p.is_floating_point() and p.element_size() > 1:
            total += p.numel() * p.element_size()
    return total


def matrix_bytes(module: nn.Module) -> tuple[int, int]:
    """(float bytes, FP8 bytes) of the weight matrices in ``module``'s subtree: every float
    parameter of two or more dimensions, and the one byte per element it takes in FP8."""
    float_bytes = elements = 0
    for p in module.parameters():
        if p.dim() >= 2 and p.is_floating_point() and p.element_size() > 1:
            float_bytes += p.numel() * p.element_size()
            elements += p.numel()
    return float_bytes, elements


def _kept_on_purpose(module: nn.Module) -> str | None:
    cls = type(module)
    return KEPT_ON_PURPOSE.get((cls.__module__, cls.__qualname__))


# Matrix-bearing types left in high precision by design, not for want of a converter.
_ROUTER = ("MoE router: kept in high precision on purpose (its [experts, hidden] logits pick the experts; "
           "FP8 rounding there changes which experts run)")
KEPT_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter"): _ROUTER,
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"): _ROUTER,
    ("transformers.models.olmoe.modeling_olmoe", "OlmoeTopKRouter"): _ROUTER,
}


def float_matrices(model: nn.Module, converted: Mapping[str, object] | set[str] = frozenset(),
                   skipped: Mapping[str, str] | None = None) -> list[FloatMatrix]:
    """Every module outside ``converted`` that holds a float weight matrix, with why it was kept.

    Args:
        model: a float or converted model.
        converted: names of converted layers (their subtrees are FP8 and not listed).
        skipped: layer name → the reason selection or tuning gave (kept as is).
    Returns:
        One ``FloatMatrix`` per module, in ``named_modules`` order. A tensor shared by several
        modules (tied weights) is counted at its first owner only.
    """
    skipped = skipped or {}
    done: list[str] = []
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if name in converted or isinstance(module, Fp8Module):
            done.append(name)
            continue
        if any(name.startswith(p + ".") for p in done if p):
            continue
        fresh = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        if not fresh or (nbytes := _float_matrix_bytes(module)) == 0:
            continue
        if name in skipped:
            reason = skipped[name]
        elif (on_purpose := _kept_on_purpose(module)) is not None:
            reason = on_purpose
        elif entry_for(module) is None:
            reason = f"{UNSUPPORTED}: no converter for {type(module).__name__} (converters: {describe_registered()})"
        else:
            reason = "not selected"
        found.append(FloatMatrix(name or "(root)", type(module).__name__, reason, nbytes))
    return found


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of modules that already hold FP8 weights (either form): such a model is not re-quantized."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Fp8Module) or any(
            isinstance(p, Float8StaticTensor) or p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            for p in module.parameters(recurse=False)
        ):
            names.append(name or "(root)")
    return names

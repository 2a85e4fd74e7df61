"""Fused MoE experts' layout: which classes they are and the parameter layout inc_bridge quantizes.

Plain facts, below the modules that use them (``nn/experts.py``, ``tensor_experts.py``) and the
observer that measures them (``experts.py``, which re-exports these names).
"""

from __future__ import annotations

import torch
from torch import nn

MATRICES = ("gate_up_proj", "down_proj")

# (module, class name) of transformers' experts classes with the standard layout and forward,
# each checked by tests/test_llm_coverage.py.
FUSED_EXPERTS: set[tuple[str, str]] = {
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
    ("transformers.models.olmoe.modeling_olmoe", "OlmoeExperts"),
}
SUPPORTED_IMPLEMENTATIONS = ("eager", "grouped_mm")


def register_fused_experts(cls: type[nn.Module]) -> type[nn.Module]:
    """Treat ``cls`` as a fused experts class (standard layout and forward); usable as a decorator."""
    FUSED_EXPERTS.add((cls.__module__, cls.__qualname__))
    return cls


def is_fused_experts_type(cls: type) -> bool:
    return (cls.__module__, cls.__qualname__) in FUSED_EXPERTS


def check_layout(module: nn.Module, name: str, error: type[Exception]) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused experts module; ``error`` if its layout is another."""
    gu, down = (getattr(module, m, None) for m in MATRICES)
    flags = {k: getattr(module, k, d) for k, d in (("is_transposed", False), ("has_bias", False), ("has_gate", True),
                                                    ("is_concatenated", True), ("has_post_expert_norm", False))}
    ok = (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
          and flags == {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                        "has_post_expert_norm": False})
    if ok:
        e, two_i, h = gu.shape
        ok = two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)
    if not ok:
        raise error(f"layer {name!r} ({type(module).__name__}): not the fused experts layout inc_bridge quantizes "
                    "(gate_up_proj [E, 2I, H], down_proj [E, H, I], no bias, not transposed)")
    return gu.shape[0], gu.shape[2], gu.shape[1] // 2

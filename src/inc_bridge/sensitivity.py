"""Per-layer sensitivity: each quantized layer's own output SQNR, with the float input fed to both.

One float forward on a calibration batch records every layer's input and output; each quantized
layer is then run on the *float* input, so a layer's number reflects its own quantization error,
not the error it inherited from the layers before it. Lower SQNR = more sensitive.

Both models run in eval mode, each module's own training flag restored afterwards: a forward in
train mode would update BatchNorm running statistics, and those tensors may be the user's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .batches import run_batch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref, err = reference.double(), (reference.double() - approx.double())
    signal, noise = float(ref.pow(2).sum()), float(err.pow(2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode for the block; each one's own flag restored after,
    also when the block raises (``model.train(flag)`` would overwrite submodules' own flags)."""
    flags = {id(m): (m, m.training) for model in models for m in model.modules()}
    try:
        for module, _ in flags.values():
            module.training = False
        yield
    finally:
        for module, flag in flags.values():
            module.training = flag


@torch.no_grad()
def layer_sqnr(float_model: nn.Module, qmodel: nn.Module, names: list[str], batch: Any) -> dict[str, float]:
    """SQNR in dB of each named layer's quantized output against its float output, same float input."""
    seen: dict[str, tuple[tuple, dict, Any]] = {}
    handles = []
    for name in names:
        def hook(module, args, kwargs, output, name=name):
            seen.setdefault(name, (args, kwargs, output))

        handles.append(float_model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    result = {}
    with eval_mode(float_model, qmodel):
        try:
            run_batch(float_model, batch)
        finally:
            for h in handles:
                h.remove()
        for name, (args, kwargs, output) in seen.items():
            approx = qmodel.get_submodule(name)(*args, **kwargs)
            if isinstance(output, torch.Tensor) and isinstance(approx, torch.Tensor):
                result[name] = sqnr_db(output, approx)
    return result

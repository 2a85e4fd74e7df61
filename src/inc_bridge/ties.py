"""Tied weights: layers that share one float weight share one FP8 weight after ``convert``.

A language model's input embedding and output head often hold the same ``nn.Parameter``. Each
converter quantizes its own layer, so without this step the tie would come apart into two FP8
copies (twice the memory, and a model that is no longer tied for anyone who saves or fine-tunes
it). The weight's FP8 data and scale depend only on the weight and the weight settings, so the
copies are equal and one of them can serve every layer:

* module form: the layers' ``qweight`` and ``weight_scale`` buffers become the same tensors (each
  layer keeps its own ``input_scale``);
* subclass form: the layers hold the same ``Float8StaticTensor`` parameter. It carries the static
  activation scale of the layer that quantizes its input (a weight-only embedding ignores it); two
  layers with *different* activation scales cannot hold one tensor, so they hold two tensors over
  the same FP8 data and scale instead (shared memory, not identity).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import ConversionError
from .tensor import Float8StaticTensor


def tied_groups(modules: Mapping[str, nn.Module], names: list[str]) -> list[list[str]]:
    """Groups of two or more of ``names`` whose modules hold the same ``weight`` tensor."""
    by_weight: dict[int, list[str]] = {}
    for name in names:
        weight = getattr(modules[name], "weight", None)
        if isinstance(weight, torch.Tensor):
            by_weight.setdefault(id(weight), []).append(name)
    return [group for group in by_weight.values() if len(group) > 1]


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def retie(groups: list[list[str]], get: Callable[[str], nn.Module]) -> None:
    """Make the converted layers of each group share one FP8 weight (see the module docstring).

    Raises:
        ConversionError: the layers of a group quantized their shared weight differently (other
            weight settings per layer), so no single FP8 weight serves them all.
    """
    for group in groups:
        layers = [get(name) for name in group]
        if all(isinstance(m._buffers.get("qweight"), torch.Tensor) for m in layers):
            _retie_module(group, layers)
        elif all(isinstance(m._parameters.get("weight"), Float8StaticTensor) for m in layers):
            _retie_subclass(group, layers)
        else:
            raise ConversionError(f"layers {group} share one weight but were converted to different forms")


def _check_same(group: list[str], pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    q0, s0 = pieces[0]
    for name, (q, s) in zip(group[1:], pieces[1:], strict=True):
        if not (_equal(q, q0) and _equal(s, s0)):
            raise ConversionError(
                f"layers {group[0]!r} and {name!r} share one weight, but their weight settings quantize it "
                "differently; give tied layers the same weight granularity and scale method"
            )


def _retie_module(group: list[str], layers: list[nn.Module]) -> None:
    _check_same(group, [(m.qweight, m.weight_scale) for m in layers])
    first = layers[0]
    for m in layers[1:]:
        m._buffers["qweight"] = first.qweight
        m._buffers["weight_scale"] = first.weight_scale


def _retie_subclass(group: list[str], layers: list[nn.Module]) -> None:
    weights: list[Float8StaticTensor] = [m.weight for m in layers]
    _check_same(group, [(w.qdata, w.scale) for w in weights])
    act_scales = [w.act_scale for w in weights if w.act_scale is not None]
    if all(_equal(a, act_scales[0]) for a in act_scales[1:]):
        # One tensor serves all: the one that carries the activation scale, if any layer has one.
        shared = next((m._parameters["weight"] for m, w in zip(layers, weights, strict=True) if w.act_scale is not None),
                      layers[0]._parameters["weight"])
        for m in layers:
            m._parameters["weight"] = shared
        return
    qdata, scale = weights[0].qdata, weights[0].scale
    for w in weights[1:]:
        w.qdata, w.scale = qdata, scale  # same FP8 bytes and scale objects; own activation scale

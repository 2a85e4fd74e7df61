"""The quantizable ops, one ``OpSpec`` per file, listed here in the order recipes show them.

Adding an op means adding one file that builds its ``OpSpec`` and one line in ``SPECS`` below
(see docs/kernels.md, "Adding an op"). Adding a float module type to an existing op is
``register_module_type``; types of packages inc_bridge must not import eagerly (transformers'
``Conv1D`` and fused MoE experts, ``hf_layers.py``) are recognised by a resolver
(``register_module_resolver``).

Lookups are by exact module type: a subclass of ``nn.Linear`` may use its weight in ways a swap
would break, so it is not quantized unless registered itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conv1d import CONV1D
from .conv2d import CONV2D
from .embedding import EMBEDDING
from .linear import LINEAR
from .matmul import MATMUL_SPEC
from .sdpa import SDPA_SPEC
from .spec import Builder, InPlaceKind, OpSpec

__all__ = ["SPECS", "Builder", "InPlaceKind", "ModuleEntry", "OpSpec", "describe_registered", "entry_for", "spec_named",
           "spec_of_quantized", "register_module_resolver", "register_module_type"]

SPECS: tuple[OpSpec, ...] = (LINEAR, CONV2D, CONV1D, EMBEDDING, SDPA_SPEC, MATMUL_SPEC)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight


@dataclass(frozen=True)
class ModuleEntry:
    """How one float module type becomes FP8: its op and the builders of the two forms.

    ``weight_of(module)`` is the layer's weight as [out, in, ...] (weight amax and per-channel
    scales run over dim 0; a transformers ``Conv1D`` stores [in, out] and gives a transposed view).
    ``observer(module, bins)``, when set, measures the layer's input during calibration in place of
    INC (INC 3.10 on CPU patches only Linear, Conv2d and EmbeddingBag); None: INC measures it.
    ``onnx_twin``: the export twin of the subclass form; None: the type does not export.
    """

    spec: OpSpec
    module_type: type[nn.Module]
    to_subclass: Builder
    to_module: Builder
    onnx_twin: Callable[[nn.Module], nn.Module] | None = None
    weight_of: Callable[[nn.Module], torch.Tensor] = _weight
    observer: Callable[[nn.Module, int], Any] | None = None


_BY_NAME: dict[str, OpSpec] = {s.name: s for s in SPECS}
_BY_QUANTIZED: dict[type[nn.Module], OpSpec] = {s.quantized_type: s for s in SPECS}
_ENTRIES: dict[type[nn.Module], ModuleEntry] = {
    t: ModuleEntry(s, t, s.to_subclass, s.to_module, s.onnx_twin) for s in SPECS for t in s.module_types
}


def spec_named(name: str) -> OpSpec:
    """The spec of the op a recipe calls ``name``; KeyError naming the known ops otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; ops: {', '.join(_BY_NAME)}") from None


# Functions that name the entry of a module type by its identity (module path and class name), for
# types of packages inc_bridge must not import eagerly (transformers); consulted on an exact miss.
_RESOLVERS: list[Callable[[type], ModuleEntry | None]] = []
_RESOLVED: dict[type, ModuleEntry] = {}  # types a resolver recognised


def entry_for(module: nn.Module) -> ModuleEntry | None:
    """How ``module`` (a float module, matched by exact type) is quantized; None if it is not quantizable."""
    cls = type(module)
    entry = _ENTRIES.get(cls) or _RESOLVED.get(cls)
    if entry is None and _RESOLVERS:
        entry = next((e for e in (resolve(cls) for resolve in _RESOLVERS) if e is not None), None)
        if entry is not None:
            _RESOLVED[cls] = entry
    return entry


def register_module_resolver(resolver: Callable[[type], ModuleEntry | None]) -> None:
    """Add a function that returns the ``ModuleEntry`` of a module type it recognises, else None.

    For classes of optional packages (transformers' ``Conv1D``, its fused MoE experts): recognised
    by module path and class name, so inc_bridge never imports the package itself. A type once
    recognised is remembered.
    """
    _RESOLVERS.append(resolver)


def spec_of_quantized(module: nn.Module) -> OpSpec | None:
    """The op of a module-form layer (``QuantizedLinear`` → linear ...), by exact type; else None."""
    return _BY_QUANTIZED.get(type(module))


def register_module_type(op: str, module_type: type[nn.Module], *, to_subclass: Builder, to_module: Builder,
                         onnx_twin: Callable[[nn.Module], nn.Module] | None = None,
                         weight_of: Callable[[nn.Module], torch.Tensor] = _weight,
                         observer: Callable[[nn.Module, int], Any] | None = None) -> None:
    """Quantize ``module_type`` as op ``op`` with these builders (``fn(module, scales, backend)``).

    Both builders must return layers that call the op's custom op (``spec.kernel``), and the
    module form one of the op's ``quantized_type`` (or a class registered for saving with
    ``serialization.register_module_class``). ``onnx_twin`` exports the subclass form of
    ``module_type`` (default: the op's own twin); ``weight_of`` and ``observer``: see ``ModuleEntry``.

    Raises:
        KeyError: ``op`` is not a known op.
        TypeError: ``module_type`` is registered already.
    """
    spec = spec_named(op)
    if module_type in _ENTRIES:
        raise TypeError(f"{module_type.__name__} is registered already (as {_ENTRIES[module_type].spec.name})")
    _ENTRIES[module_type] = ModuleEntry(spec, module_type, to_subclass, to_module, onnx_twin or spec.onnx_twin,
                                        weight_of, observer)


def describe_registered() -> str:
    """``op (ModuleType)`` for every quantizable module type, for error messages."""
    return ", ".join(f"{e.spec.name} ({t.__name__})" for t, e in _ENTRIES.items())

"""What ``save`` and ``load`` know how to rebuild: one registry per way a layer can be quantized.

* **Quantized module classes** (form "module"): each op spec's ``quantized_type`` (``QuantizedLinear``,
  ``QConv2d``, ...). A class takes part by implementing ``quant_config() -> dict`` (its constructor
  arguments as JSON values) and ``classmethod from_config(cfg, device)`` (an empty module that the
  saved tensors then fill); classes outside the specs call ``register_module_class``.
* **FP8 tensor subclasses** (form "subclass"): a parameter or buffer that is a registered
  ``TorchAOBaseTensor`` subclass (``Float8StaticTensor``) is saved flattened through the subclass's
  own ``__tensor_flatten__`` (``fc.weight.qdata``, ``fc.weight.scale``, ``fc.weight.act_scale`` when
  present) and rebuilt with ``__tensor_unflatten__``; its non-tensor attributes go to the manifest.
* **In-place kinds** (form "subclass" for layers without a weight): the module keeps its type and
  gains state, e.g. a captured ``SDPA`` with an ``input_scales`` buffer and an input-quantizing
  hook. An ``InPlaceKind`` (an op spec's ``in_place``, or one given to ``register_in_place_kind``)
  says how to read that state (``config``) and how to put it back on a copy of the skeleton's
  module (``restore``); the manifest records its name, the module's type picks the spec.

Classes are looked up by name only from these registries: loading never imports a name found in a
file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchao.utils import TorchAOBaseTensor

from .. import nn as qnn
from ..opspecs import SPECS, InPlaceKind, entry_for
from ..tensor import Float8StaticTensor
from ..tensor_experts import Float8ExpertsTensor
from ..tensor_kn import Float8StaticTensorKN

__all__ = ["InPlaceKind", "in_place_kind", "in_place_kind_of", "in_place_kinds", "module_classes", "register_in_place_kind",
           "register_module_class", "register_tensor_class", "tensor_classes"]

_MODULE_CLASSES: dict[str, type[nn.Module]] = {}
_TENSOR_CLASSES: dict[str, type[torch.Tensor]] = {}
_IN_PLACE_KINDS: dict[str, InPlaceKind] = {}  # registered outside the specs


def _implements_config_protocol(cls: type) -> bool:
    return callable(getattr(cls, "quant_config", None)) and callable(getattr(cls, "from_config", None))


def register_module_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make a quantized module class savable; usable as a class decorator.

    Raises:
        TypeError: ``cls`` lacks ``quant_config`` / ``from_config``, or another class has its name.
    """
    if not _implements_config_protocol(cls):
        raise TypeError(f"{cls.__name__} needs quant_config() and classmethod from_config(cfg, device) to be saved")
    other = _MODULE_CLASSES.setdefault(cls.__name__, cls)
    if other is not cls:
        raise TypeError(f"a different quantized module class named {cls.__name__!r} is registered already")
    return cls


def module_classes() -> dict[str, type[nn.Module]]:
    """Registered quantized module classes by name (``inc_bridge.nn``'s own included)."""
    return _MODULE_CLASSES


def register_tensor_class(cls: type[torch.Tensor]) -> type[torch.Tensor]:
    """Make a TorchAOBaseTensor subclass savable (it must declare its tensor data and attribute names)."""
    if not (issubclass(cls, TorchAOBaseTensor) and hasattr(cls, "tensor_data_names") and hasattr(cls, "tensor_attribute_names")):
        raise TypeError(f"{cls.__name__} is not a TorchAOBaseTensor subclass with tensor_data_names / tensor_attribute_names")
    other = _TENSOR_CLASSES.setdefault(cls.__name__, cls)
    if other is not cls:
        raise TypeError(f"a different tensor class named {cls.__name__!r} is registered already")
    return cls


def tensor_classes() -> dict[str, type[torch.Tensor]]:
    return _TENSOR_CLASSES


def register_in_place_kind(kind: InPlaceKind) -> InPlaceKind:
    other = _IN_PLACE_KINDS.setdefault(kind.name, kind)
    if other is not kind:
        raise TypeError(f"an in-place kind named {kind.name!r} is registered already")
    return kind


def in_place_kinds() -> dict[str, InPlaceKind]:
    """Every in-place kind by name: the specs' (attention: ``fp8_inputs``) and registered ones."""
    return {**{s.in_place.name: s.in_place for s in SPECS if s.in_place is not None}, **_IN_PLACE_KINDS}


def _kinds_for(module: nn.Module) -> list[InPlaceKind]:
    entry = entry_for(module)
    own = [entry.spec.in_place] if entry is not None and entry.spec.in_place is not None else []
    return own + [k for k in _IN_PLACE_KINDS.values() if isinstance(module, k.module_types)]


def in_place_kind(module: nn.Module, name: str) -> InPlaceKind | None:
    """The in-place kind called ``name`` (as a manifest records it) that applies to ``module``'s type."""
    return next((k for k in _kinds_for(module) if k.name == name), None)


def in_place_kind_of(module: nn.Module) -> tuple[InPlaceKind, dict[str, Any]] | None:
    """The in-place kind ``module`` was quantized with, and its config; None when it holds no such state."""
    for kind in _kinds_for(module):
        config = kind.config(module)
        if config is not None:
            return kind, config
    return None


# ---------------------------------------------------------------- built-in registrations

register_tensor_class(Float8StaticTensor)
register_tensor_class(Float8StaticTensorKN)
register_tensor_class(Float8ExpertsTensor)
# The module-form classes: every op spec's, and the others inc_bridge.nn exports (QConv1D, QExperts).
for _name in qnn.__all__:
    if _implements_config_protocol(_cls := getattr(qnn, _name)):
        register_module_class(_cls)

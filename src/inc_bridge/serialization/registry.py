"""What ``save`` and ``load`` know how to rebuild: one registry per way a layer can be quantized.

* **Quantized module classes** (form "module"): ``QuantizedLinear``, ``QConv2d``, ... A class takes
  part by implementing ``quant_config() -> dict`` (its constructor arguments as JSON values) and
  ``classmethod from_config(cfg, device)`` (an empty module that the saved tensors then fill). The
  classes ``inc_bridge.nn`` exports that implement both are registered on first use; other classes
  call ``register_module_class``.
* **FP8 tensor subclasses** (form "subclass"): a parameter or buffer that is a registered
  ``TorchAOBaseTensor`` subclass (``Float8StaticTensor``) is saved flattened through the subclass's
  own ``__tensor_flatten__`` (``fc.weight.qdata``, ``fc.weight.scale``, ``fc.weight.act_scale`` when
  present) and rebuilt with ``__tensor_unflatten__``; its non-tensor attributes go to the manifest.
* **In-place kinds** (form "subclass" for layers without a weight): the module keeps its type and
  gains state, e.g. a captured ``SDPA`` with an ``input_scales`` buffer and an input-quantizing
  hook. An ``InPlaceKind`` says how to read that state (``config``) and how to put it back on a
  copy of the skeleton's module (``restore``).

Classes are looked up by name only from these registries: loading never imports a name found in a
file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchao.utils import TorchAOBaseTensor

from ..activation import attach_input_quant
from ..formats import dtype_from_name, dtype_name
from ..nn.attention import SDPA, Matmul
from ..tensor import Float8StaticTensor
from ..tensor_experts import Float8ExpertsTensor
from ..tensor_kn import Float8StaticTensorKN

_MODULE_CLASSES: dict[str, type[nn.Module]] = {}
_TENSOR_CLASSES: dict[str, type[torch.Tensor]] = {}
_IN_PLACE_KINDS: dict[str, InPlaceKind] = {}


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
    from .. import nn as qnn

    for name in qnn.__all__:
        cls = getattr(qnn, name)
        if _implements_config_protocol(cls) and cls.__name__ not in _MODULE_CLASSES:
            register_module_class(cls)
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


@dataclass(frozen=True)
class InPlaceKind:
    """A quantization that adds state to a module of an unchanged type.

    ``config(module)`` returns the JSON config of a module quantized this way, or None when the
    module is not. ``restore(module, tensors, config)`` re-applies it to ``module`` (a copy of the
    skeleton's module, never the skeleton itself); ``tensors`` are the saved tensors of that module
    which the float module does not have (local name → tensor).
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    config: Callable[[nn.Module], dict[str, Any] | None]
    restore: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], None]


def register_in_place_kind(kind: InPlaceKind) -> InPlaceKind:
    other = _IN_PLACE_KINDS.setdefault(kind.name, kind)
    if other is not kind:
        raise TypeError(f"an in-place kind named {kind.name!r} is registered already")
    return kind


def in_place_kinds() -> dict[str, InPlaceKind]:
    return _IN_PLACE_KINDS


def in_place_kind_of(module: nn.Module) -> tuple[InPlaceKind, dict[str, Any]] | None:
    for kind in _IN_PLACE_KINDS.values():
        if isinstance(module, kind.module_types):
            config = kind.config(module)
            if config is not None:
                return kind, config
    return None


# ---------------------------------------------------------------- built-in registrations

register_tensor_class(Float8StaticTensor)
register_tensor_class(Float8StaticTensorKN)
register_tensor_class(Float8ExpertsTensor)


def _fp8_inputs_config(module: nn.Module) -> dict[str, Any] | None:
    fp8 = getattr(module, "_inc_bridge_fp8", None)  # set by activation.attach_input_quant
    if fp8 is None:
        return None
    fp8_dtype, fp8_max = fp8
    return {"fp8_dtype": dtype_name(fp8_dtype), "fp8_max": float(fp8_max)}


def _fp8_inputs_restore(module: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    if set(tensors) != {"input_scales"}:
        raise ValueError(f"expected exactly the tensor 'input_scales', got {sorted(tensors)}")
    attach_input_quant(module, tensors["input_scales"], dtype_from_name(config["fp8_dtype"]), float(config["fp8_max"]))


# Captured attention in the subclass form: static scales for q/k/v (SDPA) or both operands (Matmul).
register_in_place_kind(InPlaceKind("fp8_inputs", (SDPA, Matmul), _fp8_inputs_config, _fp8_inputs_restore))

"""What the ops' builders share: a cheap copy of a leaf module, an FP8 weight, input quantization."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..activation import attach_input_quant, input_quant_of
from ..formats import dtype_from_name, dtype_name
from ..sharing import shared_tensors, tensors_shared
from ..tensor import Float8StaticTensor
from .spec import InPlaceKind

if TYPE_CHECKING:
    from ..scales import LayerScales


def with_fp8_weight(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
    """A shallow copy of ``module`` whose weight is a Float8StaticTensor (the original is untouched)."""
    qdata, weight_scale = scales.quantize_weight(module.weight)
    weight = Float8StaticTensor(
        qdata, weight_scale, scales.fp8_max, backend, module.weight.dtype, act_scale=scales.activation_scale()
    )
    return leaf_copy(module, weight=new_parameter(weight))


def new_parameter(weight: Float8StaticTensor) -> nn.Parameter:
    """``nn.Parameter(weight, requires_grad=False)`` for a weight built just now.

    For a tensor subclass that call detaches (a dispatch round trip that cost more than the rest
    of a trial's conversion of the layer) and flags the result as a parameter; a new tensor has no
    autograd history to cut, so the flag alone gives the same tensor. Torch versions without the
    flag take the documented call.
    """
    weight._is_param = True  # type: ignore[attr-defined]
    return weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)  # type: ignore[return-value]


def leaf_copy(module: nn.Module, **params: nn.Parameter) -> nn.Module:
    """A copy of ``module`` sharing nothing mutable with it; ``params`` replace parameters by name.

    What ``copy.deepcopy`` gives for a leaf module (its own attribute, hook, parameter and buffer
    containers, copies of its tensors), at a fraction of the cost: autotune converts every layer
    once per trial. Modules with children take the deep copy. Under ``sharing_tensors()`` the
    tensors themselves are shared, not copied.
    """
    share = tensors_shared()
    if module._modules:
        memo = shared_tensors(module) if share else {}
        memo.update({id(module._parameters[k]): v for k, v in params.items()})  # the replacements win
        return copy.deepcopy(module, memo)
    new = object.__new__(type(module))
    new.__dict__.update({k: v.copy() if isinstance(v, (dict, set, list)) else v for k, v in vars(module).items()})
    for key, p in module._parameters.items():
        new._parameters[key] = params[key] if key in params else p if share else copy.deepcopy(p)
    for key, b in module._buffers.items():
        new._buffers[key] = b if share else copy.deepcopy(b)
    return new


Operands = Callable[[nn.Module], tuple[Any, ...]]  # module → its quantized inputs' positions (or names)


def input_quant_builder(positions: Operands, names: Operands):
    """The subclass form of an attention op: a copy of the captured module (same type) that quantizes
    its inputs at ``positions(module)`` (or passed by keyword as ``names(module)``)."""

    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return attach_input_quant(leaf_copy(module), scales.activation_scales(), scales.format.dtype, scales.fp8_max,
                                  positions(module), names(module), backend)

    return to_subclass


def _fp8_inputs_config(module: nn.Module) -> dict[str, Any] | None:
    iq = input_quant_of(module)
    if iq is None:
        return None
    return {"fp8_dtype": dtype_name(iq.fp8_dtype), "fp8_max": iq.fp8_max, "backend": iq.backend}


def fp8_inputs_kind(module_type: type[nn.Module], positions: Operands, names: Operands) -> InPlaceKind:
    """What saving records for subclass-form attention (``input_scales`` + format + backend), and how
    loading puts it back. Files written before the backend was recorded load with backend "auto"."""

    def restore(module: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        if set(tensors) != {"input_scales"}:
            raise ValueError(f"expected exactly the tensor 'input_scales', got {sorted(tensors)}")
        attach_input_quant(module, tensors["input_scales"], dtype_from_name(config["fp8_dtype"]), float(config["fp8_max"]),
                           positions(module), names(module), str(config.get("backend", "auto")))

    return InPlaceKind("fp8_inputs", (module_type,), _fp8_inputs_config, restore)

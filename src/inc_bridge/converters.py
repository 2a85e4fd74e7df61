"""Converter registry: how each float module type becomes FP8 in either form.

``@register_converter(nn.Linear, Op.LINEAR)`` on a class with two static methods:
``to_subclass(module, scales, backend)`` keeps the module and makes its weight a
``Float8StaticTensor``; ``to_module(module, scales, backend)`` returns a swapped quantized module.
Lookups are by exact type: a subclass of ``nn.Linear`` may use its weight in ways a swap would break.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .activation import attach_input_quant
from .nn import QConv2d, QEmbedding, QuantizedLinear
from .nn.attention import QSDPA, SDPA, Matmul, QMatmul
from .recipe import Op
from .scales import LayerScales
from .sharing import shared_tensors, tensors_shared
from .tensor import Float8StaticTensor


class _ConverterImpl(Protocol):
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module: ...

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module: ...


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight


@dataclass(frozen=True)
class Converter:
    """How one module type is quantized.

    ``weight_of(module)`` is the layer's weight as [out, in, ...] (weight amax and per-channel
    scales run over dim 0; a transformers ``Conv1D`` stores [in, out] and gives a transposed view).
    ``observer(module, bins)``, when set, measures the layer's input during calibration in place of
    INC (INC 3.10 on CPU patches only Linear, Conv2d and EmbeddingBag); None: INC measures it.
    """

    module_type: type[nn.Module]
    op: Op
    impl: type[_ConverterImpl]
    weight_of: Callable[[nn.Module], torch.Tensor] = _weight
    observer: Callable[[nn.Module, int], Any] | None = None


_CONVERTERS: dict[type[nn.Module], Converter] = {}
# Functions that name a converter for a module type by its identity (module and class name), for
# types of packages inc_bridge must not import eagerly (transformers); consulted on an exact miss.
_RESOLVERS: list[Callable[[type], Converter | None]] = []


def register_converter(module_type: type[nn.Module], op: Op, *,
                       weight_of: Callable[[nn.Module], torch.Tensor] = _weight,
                       observer: Callable[[nn.Module, int], Any] | None = None):
    """Class decorator registering the conversions of ``module_type`` under ``op`` (see ``Converter``)."""

    def decorator(impl: type[_ConverterImpl]) -> type[_ConverterImpl]:
        _CONVERTERS[module_type] = Converter(module_type, op, impl, weight_of, observer)
        return impl

    return decorator


def register_converter_resolver(resolver: Callable[[type], Converter | None]) -> None:
    """Add a function that returns the Converter of a module type it recognises, else None.

    For classes of optional packages (transformers' ``Conv1D``, its fused MoE experts): recognised
    by module path and class name, so inc_bridge never imports the package itself. A type once recognised
    is remembered.
    """
    _RESOLVERS.append(resolver)


_RESOLVED: dict[type, Converter] = {}  # types a resolver recognised


def converter_for(module: nn.Module) -> Converter | None:
    cls = type(module)
    conv = _CONVERTERS.get(cls) or _RESOLVED.get(cls)
    if conv is None and _RESOLVERS:
        conv = next((c for c in (resolve(cls) for resolve in _RESOLVERS) if c is not None), None)
        if conv is not None:
            _RESOLVED[cls] = conv
    return conv


def describe_registered() -> str:
    return ", ".join(f"{c.op.value} ({t.__name__})" for t, c in _CONVERTERS.items())


def _with_fp8_weight(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
    """A shallow copy of ``module`` whose weight is a Float8StaticTensor (the original is untouched)."""
    qdata, weight_scale = scales.quantize_weight(module.weight)
    weight = Float8StaticTensor(
        qdata, weight_scale, scales.fp8_max, backend, module.weight.dtype, act_scale=scales.activation_scale()
    )
    return _leaf_copy(module, weight=_new_parameter(weight))


def _new_parameter(weight: Float8StaticTensor) -> nn.Parameter:
    """``nn.Parameter(weight, requires_grad=False)`` for a weight built just now.

    For a tensor subclass that call detaches (a dispatch round trip that cost more than the rest
    of a trial's conversion of the layer) and flags the result as a parameter; a new tensor has no
    autograd history to cut, so the flag alone gives the same tensor. Torch versions without the
    flag take the documented call.
    """
    weight._is_param = True  # type: ignore[attr-defined]
    return weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)  # type: ignore[return-value]


def _leaf_copy(module: nn.Module, **params: nn.Parameter) -> nn.Module:
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


@register_converter(nn.Linear, Op.LINEAR)
class LinearConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return _with_fp8_weight(module, scales, backend)

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QuantizedLinear.from_float(module, scales, backend)  # type: ignore[arg-type]


@register_converter(nn.Conv2d, Op.CONV2D)
class Conv2dConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return _with_fp8_weight(module, scales, backend)

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QConv2d.from_float(module, scales, backend)  # type: ignore[arg-type]


@register_converter(nn.Embedding, Op.EMBEDDING)
class EmbeddingConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return _with_fp8_weight(module, scales, backend)

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QEmbedding.from_float(module, scales, backend)  # type: ignore[arg-type]


def _with_input_quant(module: nn.Module, scales: LayerScales) -> nn.Module:
    """A copy of a captured attention module that quantizes its inputs (its type is unchanged)."""
    return attach_input_quant(_leaf_copy(module), scales.activation_scales(), scales.format.dtype, scales.fp8_max)


@register_converter(SDPA, Op.SDPA)
class SdpaConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return _with_input_quant(module, scales)

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QSDPA.from_float(module, scales, backend)  # type: ignore[arg-type]


@register_converter(Matmul, Op.BMM)
class MatmulConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return _with_input_quant(module, scales)

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QMatmul.from_float(module, scales, backend)  # type: ignore[arg-type]

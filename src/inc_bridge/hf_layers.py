"""Converters for transformers' own layer types: GPT-2's ``Conv1D`` and fused MoE experts.

Both count as op ``linear`` (they are linear layers), so the default recipe quantizes them:

* ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b``, ``W`` [in, out]): subclass form keeps
  the module with a ``Float8StaticTensorKN`` weight, module form swaps in ``QConv1D``; per-channel
  scales are per output feature. INC 3.10 does not patch ``Conv1D``, so its input is measured by
  the bridge's ``InputObserver`` (the statistic INC uses: running max of ``|x|``).
* fused experts (``experts.FUSED_EXPERTS``): subclass form keeps the experts module with
  ``Float8ExpertsTensor`` weights, module form swaps in ``QExperts``; scales per expert
  (``experts_scales``), inputs measured per expert by ``experts.ExpertsObserver``.

transformers is never imported here: the classes are recognised by module path and class name
(``opspecs.register_module_resolver``), so only a model built with transformers can have them.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConversionError
from .experts import MATRICES, ExpertsObserver, check_layout, is_fused_experts_type
from .experts_scales import ExpertsScales
from .nn.conv1d import QConv1D, quantize_kn
from .nn.experts import QExperts
from .observers import InputObserver
from .opspecs import ModuleEntry, register_module_resolver, spec_named
from .opspecs._build import leaf_copy, new_parameter
from .scales import LayerScales
from .tensor_experts import Float8ExpertsTensor
from .tensor_kn import Float8StaticTensorKN

CONV1D = ("transformers.pytorch_utils", "Conv1D")


class Conv1DConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        qdata, scale = quantize_kn(module.weight, scales)
        weight = Float8StaticTensorKN(qdata, scale, scales.fp8_max, backend, module.weight.dtype,
                                      act_scale=scales.activation_scale())
        return leaf_copy(module, weight=new_parameter(weight))

    @staticmethod
    def to_module(module: nn.Module, scales: LayerScales, backend: str) -> nn.Module:
        return QConv1D.from_float(module, scales, backend)


class FusedExpertsConverter:
    @staticmethod
    def to_subclass(module: nn.Module, scales: ExpertsScales, backend: str) -> nn.Module:
        check_layout(module, scales.name, ConversionError)
        params = {}
        for m, name in enumerate(MATRICES):
            w = getattr(module, name)
            qdata, scale, act = scales.quantize_matrix(m, w)
            params[name] = new_parameter(Float8ExpertsTensor(qdata, scale, act, scales.fp8_max, backend, w.dtype))
        return leaf_copy(module, **params)

    @staticmethod
    def to_module(module: nn.Module, scales: ExpertsScales, backend: str) -> nn.Module:
        return QExperts.from_float(module, scales, backend)


def _conv1d_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.t()  # [in, out] -> the [out, in] a Linear would hold


def _experts_weight(module: nn.Module) -> torch.Tensor:
    return module.gate_up_proj


def _bridge_input_observer(module: nn.Module, bins: int) -> InputObserver:
    return InputObserver(module, (0,), bins)


def _experts_observer(module: nn.Module, bins: int) -> ExpertsObserver:
    return ExpertsObserver(module, bins)


def _resolve(cls: type) -> ModuleEntry | None:
    """Entries of op ``linear``; their ONNX twins are in ``onnx_llm`` (looked up by ``export_onnx``)."""
    if (cls.__module__, cls.__qualname__) == CONV1D:
        return ModuleEntry(spec_named("linear"), cls, Conv1DConverter.to_subclass, Conv1DConverter.to_module,
                           weight_of=_conv1d_weight, observer=_bridge_input_observer)
    if is_fused_experts_type(cls):
        return ModuleEntry(spec_named("linear"), cls, FusedExpertsConverter.to_subclass, FusedExpertsConverter.to_module,
                           weight_of=_experts_weight, observer=_experts_observer)
    return None


register_module_resolver(_resolve)

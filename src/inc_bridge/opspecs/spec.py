"""``OpSpec``: everything inc_bridge knows about one quantizable op, in one frozen value.

Each op has one file in this package (``linear.py``, ``conv2d.py``, ...) that builds its spec; the
package's ``__init__`` lists them. The rest of the code looks facts up here: the recipe's op
names, which module types an op replaces, which inputs get static scales, how each form is built,
which custom op runs it, its ONNX twin and what saving records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: builders call LayerScales' methods; scales sit above this layer
    from ..scales import LayerScales

# ``fn(module, scales, backend)``: the converted layer (a copy; the float module is never changed).
Builder = Callable[[nn.Module, "LayerScales", str], nn.Module]


@dataclass(frozen=True)
class InPlaceKind:
    """A subclass-form quantization that adds state to a module of an unchanged type (attention).

    ``config(module)`` returns the JSON config of a module quantized this way, or None when the
    module is not. ``restore(module, tensors, config)`` re-applies it to ``module`` (a copy of the
    skeleton's module, never the skeleton itself); ``tensors`` are the saved tensors of that module
    which the float module does not have (local name → tensor). ``name`` is what a saved manifest
    records.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    config: Callable[[nn.Module], dict[str, Any] | None]
    restore: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], None]


@dataclass(frozen=True)
class OpSpec:
    """One op: its recipe name, the modules it replaces, its two forms, kernel, ONNX twin and record.

    Attributes:
        name: the recipe's name for the op (``quantization.ops``).
        module_types: the float module types it replaces, matched by exact type (a subclass may use
            its weight in ways a swap would break). ``register_module_type`` adds more.
        quantized_type: the module-form class; saving records it by ``quant_config()``.
        has_weight: the layer has a weight to quantize (attention ops have none).
        n_inputs: how many activation inputs get a static scale (0 for an embedding's ids).
        input_positions: ``fn(module)`` → the positional arguments that get those scales, in order.
        to_subclass: builds the subclass form (the module keeps its type).
        to_module: builds the module form (a ``quantized_type`` instance).
        kernel: the custom op both forms call (``torch.ops.inc_bridge.<name>``).
        onnx_twin: ``fn(module)`` → the ONNX export twin of a layer quantized in either form.
        in_place: for ops whose subclass form keeps the module and adds state (no FP8 weight), what
            saving records and how loading restores it; None where a weight subclass carries it.
        bridge_observed: INC does not patch the op's module types, so calibration measures their
            inputs with the bridge's observer (INC's statistic) instead of reading INC's dump
            (``conv1d``: INC 3.10 has no ``Conv1d`` patch). Attention ops are always observed so.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    quantized_type: type[nn.Module]
    has_weight: bool
    n_inputs: int
    input_positions: Callable[[nn.Module], tuple[int, ...]]
    to_subclass: Builder
    to_module: Builder
    kernel: Any
    onnx_twin: Callable[[nn.Module], nn.Module]
    in_place: InPlaceKind | None = None
    bridge_observed: bool = False

    @property
    def weight_only(self) -> bool:
        """A weight but no activation scale (an embedding: its input is integer ids)."""
        return self.has_weight and self.n_inputs == 0

"""``QExperts``: the module form of a fused MoE experts layer (transformers 5's 3-D expert weights)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConversionError
from ..experts_layout import MATRICES, check_layout
from ..formats import dtype_name
from ..tensor_experts import Float8ExpertsTensor
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # annotation only: from_float calls its methods; scales sit above this layer
    from ..experts_scales import ExpertsScales

_PREFIX = {"gate_up_proj": "gate_up", "down_proj": "down"}
# What the float experts' forward reads from its module besides the weights.
_FLOAT_ATTRS = ("num_experts", "hidden_dim", "intermediate_dim", "config", "has_gate", "has_bias",
                "has_post_expert_norm", "is_transposed", "is_concatenated", "_is_expert_parallel")


class QExperts(Fp8Module):
    """FP8 experts: per matrix an FP8 ``<m>_qweight`` [E, out, in], a dequant ``<m>_scale`` ([E] or
    [E, out, 1]) and per-expert activation scales ``<m>_input_scale`` [E] (``m``: gate_up, down).

    ``gate_up_proj`` / ``down_proj`` read as ``Float8ExpertsTensor`` views of these buffers, and the
    forward is the float experts class's own (its ``eager`` or ``grouped_mm`` algorithm), taken
    from the float module this one replaces (``adopt``): so the module form computes exactly what
    the subclass form computes. ``inc_bridge.load`` calls ``adopt`` with the skeleton's module.
    """

    renamed_tensors = {m: f"{p}_qweight" for m, p in _PREFIX.items()}
    _fixed_dtype_buffers = tuple(f"{p}_{s}" for p in _PREFIX.values() for s in ("qweight", "scale", "input_scale"))

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, *, fp8_dtype: torch.dtype,
                 fp8_max: float, dtype: torch.dtype, per_channel: bool = False, backend: str = "emulated",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for key, v in (("num_experts", num_experts), ("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        shapes = {"gate_up": (num_experts, 2 * intermediate_dim, hidden_dim), "down": (num_experts, hidden_dim, intermediate_dim)}
        for p, shape in shapes.items():
            self.register_buffer(f"{p}_qweight", torch.zeros(shape, dtype=fp8_dtype, device=device))
            scale_shape = (num_experts, shape[1], 1) if per_channel else (num_experts,)
            self.register_buffer(f"{p}_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
            self.register_buffer(f"{p}_input_scale", torch.ones(num_experts, dtype=torch.float32, device=device))
        self._float_forward = None

    def _experts_tensor(self, matrix: str) -> Float8ExpertsTensor:
        p = _PREFIX[matrix]
        return Float8ExpertsTensor(self._buffers[f"{p}_qweight"], self._buffers[f"{p}_scale"],
                                   self._buffers[f"{p}_input_scale"], self.fp8_max, self.backend, self.dtype)

    @property
    def gate_up_proj(self) -> Float8ExpertsTensor:
        return self._experts_tensor("gate_up_proj")

    @property
    def down_proj(self) -> Float8ExpertsTensor:
        return self._experts_tensor("down_proj")

    def adopt(self, float_module: nn.Module) -> None:
        """Take the float experts module's algorithm: its forward, gate and activation, and the
        attributes they read (``config`` for the experts implementation, the layout flags)."""
        check_layout(float_module, type(float_module).__name__, ConversionError)
        cls = type(float_module)
        for attr in _FLOAT_ATTRS:
            if attr in float_module.__dict__:
                self.__dict__[attr] = float_module.__dict__[attr]
        self.act_fn = copy.deepcopy(float_module.act_fn)
        self._float_forward = cls.forward
        self._float_apply_gate = getattr(cls, "_apply_gate", None)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        return self._float_apply_gate(self, gate_up_out)

    def scale_buffers(self) -> dict[str, torch.Tensor]:
        return {n: self._buffers[n] for n in self._fixed_dtype_buffers if not n.endswith("_qweight")}

    @classmethod
    def from_float(cls, module: nn.Module, scales: ExpertsScales, backend: str = "emulated") -> QExperts:
        e, h, i = check_layout(module, scales.name, ConversionError)
        parts = [scales.quantize_matrix(m, getattr(module, name)) for m, name in enumerate(MATRICES)]
        q = cls(e, h, i, fp8_dtype=scales.format.dtype, fp8_max=scales.fp8_max, dtype=module.gate_up_proj.dtype,
                per_channel=parts[0][1].dim() == 3, backend=backend, device="meta")
        for name, (qdata, scale, act) in zip(MATRICES, parts, strict=True):
            p = _PREFIX[name]
            setattr(q, f"{p}_qweight", qdata)
            setattr(q, f"{p}_scale", scale)
            setattr(q, f"{p}_input_scale", act)
        q.adopt(module)
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {
            "num_experts": self.num_experts,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "fp8_dtype": dtype_name(self.gate_up_qweight.dtype),
            "fp8_max": self.fp8_max,
            "dtype": dtype_name(self.dtype),
            "per_channel": self.gate_up_scale.dim() == 3,
            "backend": self.backend,
        }

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._float_forward is None:
            raise ConversionError("QExperts has no experts algorithm yet: adopt(float_experts_module) first "
                                  "(inc_bridge.convert and inc_bridge.load do)")
        return self._float_forward(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.gate_up_scale.dim() == 3 else "per_tensor"
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"fp8={dtype_name(self.gate_up_qweight.dtype)}, weight={gran}, dtype={dtype_name(self.dtype)}, "
                f"backend={self.backend}")

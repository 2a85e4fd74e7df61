"""``QuantizedLinear``: the module form of an FP8 ``nn.Linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..formats import dtype_name
from ..kernels import ops as kernel_ops
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # only an annotation: from_float calls its methods; scales sit above this layer
    from ..scales import LayerScales


class QuantizedLinear(Fp8Module):
    """A Linear layer with an FP8 weight and a static FP8 activation scale.

    Buffers (all in ``state_dict()``): ``qweight`` (FP8, [out, in]), ``weight_scale`` (fp32, 0-d or
    [out, 1]), ``input_scale`` (fp32, 0-d). ``bias`` stays in the model's dtype. ``weight`` reads
    as a ``Float8StaticTensor`` in the model's dtype (see ``Fp8Module``).

    Example:
        >>> q = QuantizedLinear.from_float(nn.Linear(4, 8), layer_scales)   # doctest: +SKIP
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        fp8_dtype: torch.dtype,
        fp8_max: float,
        dtype: torch.dtype,
        per_channel: bool = False,
        backend: str = "emulated",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        self._register_fp8_weight((out_features, in_features), fp8_dtype, per_channel, device)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Linear, scales: LayerScales, backend: str = "emulated") -> QuantizedLinear:
        qweight, weight_scale = scales.quantize_weight(module.weight)
        q = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            fp8_dtype=scales.format.dtype,
            fp8_max=scales.fp8_max,
            dtype=module.weight.dtype,
            per_channel=weight_scale.dim() > 0,
            backend=backend,
            device="meta",
        )
        q.qweight = qweight
        q.weight_scale = weight_scale
        q.input_scale = scales.activation_scale().to(qweight.device)
        if module.bias is not None:
            q._take_bias(module.bias)
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "fp8_dtype": dtype_name(self.qweight.dtype),
            "fp8_max": self.fp8_max,
            "dtype": dtype_name(self.dtype),
            "per_channel": self.weight_scale.dim() > 0,
            "backend": self.backend,
        }


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_ops.linear(x, self.qweight, self.weight_scale, self.input_scale, self.bias, self.fp8_max,
                                 self.dtype, self.backend)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.weight_scale.dim() else "per_tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fp8={dtype_name(self.qweight.dtype)}, weight={gran}, input_scale={float(self.input_scale):.6g}, "
            f"dtype={dtype_name(self.dtype)}, backend={self.backend}"
        )

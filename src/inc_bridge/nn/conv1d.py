"""``QConv1D``: the module form of transformers' ``Conv1D`` (GPT-2's attention and MLP layers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..formats import dtype_name
from ..tensor_kn import Float8StaticTensorKN, nk_layout
from ._fp8_module import Fp8Module
from .linear import QuantizedLinear

if TYPE_CHECKING:  # annotation only: the functions call its methods; scales sit above this layer
    from ..scales import LayerScales


def quantize_kn(weight: torch.Tensor, scales: LayerScales) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 data [in, out] and its scale ([] or [1, out]) of a Conv1D weight [in, out].

    Quantized as the [out, in] Linear weight it is (scales per output feature), then laid back out
    as [in, out]: elementwise, so the FP8 values are those of the equivalent ``nn.Linear``. The data
    is the [in, out] view of a contiguous [out, in] matrix (``tensor_kn``: what the kernels take).
    """
    qdata, scale = scales.quantize_weight(weight.t())
    return qdata.contiguous().t(), (scale.t().contiguous() if scale.dim() else scale)


class QConv1D(Fp8Module):
    """A Conv1D with an FP8 weight [in, out] and a static FP8 activation scale.

    Buffers: ``qweight`` (FP8, [in_features, out_features], Conv1D's shape; in memory the contiguous
    [out, in] matrix of an ``nn.Linear``, laid out so again on the first call after a load), ``weight_scale``
    (fp32, [] or [1, out_features]), ``input_scale`` (fp32, 0-d). ``weight`` reads as a
    ``Float8StaticTensorKN``. Computes what the subclass form's ``Conv1D`` computes, op for op.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fp8_dtype: torch.dtype,
                 fp8_max: float, dtype: torch.dtype, per_channel: bool = False, backend: str = "emulated",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        self.register_buffer("qweight", torch.zeros((in_features, out_features), dtype=fp8_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones((1, out_features) if per_channel else (), device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> Float8StaticTensorKN:
        """The FP8 weight as model code expects it ([in, out], built on access over the buffers)."""
        if not self.qweight.t().is_contiguous() and not torch.compiler.is_compiling():
            # Loaded from a file (contiguous [in, out]): lay the buffer out as [out, in] once.
            self._buffers["qweight"] = nk_layout(self.qweight)
        return Float8StaticTensorKN(self.qweight, self.weight_scale, self.fp8_max, self.backend, self.dtype,
                                    act_scale=self.input_scale)

    @classmethod
    def from_float(cls, module: nn.Module, scales: LayerScales, backend: str = "emulated") -> QConv1D:
        qweight, weight_scale = quantize_kn(module.weight, scales)
        q = cls(module.nx, module.nf, module.bias is not None, fp8_dtype=scales.format.dtype, fp8_max=scales.fp8_max,
                dtype=module.weight.dtype, per_channel=weight_scale.dim() > 0, backend=backend, device="meta")
        q.qweight = qweight
        q.weight_scale = weight_scale
        q.input_scale = scales.activation_scale().to(qweight.device)
        if module.bias is not None:
            q._take_bias(module.bias)
        return q

    # The same constructor arguments as QuantizedLinear's, so the same JSON record.
    quant_config = QuantizedLinear.quant_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv1D.forward's own steps (2-D addmm, then the output shape), so both forms match bit for bit.
        size_out = x.size()[:-1] + (self.out_features,)
        return self.weight.linear(x.view(-1, x.size(-1)), self.bias).view(size_out)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.weight_scale.dim() else "per_tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8={dtype_name(self.qweight.dtype)}, weight={gran}, dtype={dtype_name(self.dtype)}, "
                f"backend={self.backend}")

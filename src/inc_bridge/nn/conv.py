"""``QConv2d``: the module form of an FP8 ``nn.Conv2d``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import dtype_name
from ..kernels import ops as kernel_ops
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # only an annotation: from_float calls its methods; scales sit above this layer
    from ..scales import LayerScales


class QConv2d(Fp8Module):
    """A Conv2d layer with an FP8 weight and a static FP8 activation scale.

    Buffers: ``qweight`` (FP8, [out, in/groups, kh, kw]), ``weight_scale`` (fp32, 0-d or
    [out, 1, 1, 1]), ``input_scale`` (fp32, 0-d); ``bias`` stays in the model's dtype; ``weight``
    reads as a ``Float8StaticTensor`` in the model's dtype (see ``Fp8Module``). Stride,
    padding (including string padding and non-zero padding modes), dilation and groups follow
    ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        fp8_dtype: torch.dtype,
        fp8_max: float,
        dtype: torch.dtype,
        per_channel: bool = False,
        backend: str = "emulated",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        # nn.Conv2d pads explicitly for non-"zeros" modes; keep its precomputed amounts.
        self._reversed_padding_repeated_twice: list[int] = []
        self._register_fp8_weight((out_channels, in_channels // groups, *self.kernel_size), fp8_dtype, per_channel, device)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Conv2d, scales: LayerScales, backend: str = "emulated") -> QConv2d:
        qweight, weight_scale = scales.quantize_weight(module.weight)
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            fp8_dtype=scales.format.dtype,
            fp8_max=scales.fp8_max,
            dtype=module.weight.dtype,
            per_channel=weight_scale.dim() > 0,
            backend=backend,
            device="meta",
        )
        q._reversed_padding_repeated_twice = list(module._reversed_padding_repeated_twice)
        q.qweight = qweight
        q.weight_scale = weight_scale
        q.input_scale = scales.activation_scale().to(qweight.device)
        if module.bias is not None:
            q._take_bias(module.bias)
        return q

    def quant_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON values; ``from_config`` turns them back into a module."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "fp8_dtype": dtype_name(self.qweight.dtype),
            "fp8_max": self.fp8_max,
            "dtype": dtype_name(self.dtype),
            "per_channel": self.weight_scale.dim() > 0,
            "backend": self.backend,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> QConv2d:
        """An empty module (zero FP8 data, unit scales) shaped by ``quant_config()``'s output.

        ``device="meta"`` allocates nothing; ``inc_bridge.load`` fills the tensors afterwards.
        """
        q = super().from_config(cfg, device)
        # nn.Conv2d derives its explicit padding amounts from the same arguments; a meta twin costs nothing.
        twin = nn.Conv2d(
            q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
            bias=False, padding_mode=q.padding_mode, device="meta",
        )
        q._reversed_padding_repeated_twice = list(twin._reversed_padding_repeated_twice)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: tuple[int, int] | str = self.padding
        if self.padding_mode != "zeros":  # same two steps as nn.Conv2d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        stride, padding, padding_mode, dilation = kernel_ops.conv2d_args(self.stride, padding, self.dilation)
        return kernel_ops.conv2d(x, self.qweight, self.weight_scale, self.input_scale, self.bias, self.fp8_max,
                                 self.dtype, self.backend, stride, padding, padding_mode, dilation, self.groups)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.weight_scale.dim() else "per_tensor"
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return (
            f"{s}, fp8={dtype_name(self.qweight.dtype)}, weight={gran}, input_scale={float(self.input_scale):.6g}, "
            f"dtype={dtype_name(self.dtype)}, backend={self.backend}"
        )

"""``QConv1d`` / ``QConv2d``: the module forms of an FP8 ``nn.Conv1d`` / ``nn.Conv2d``.

One concept, two spatial ranks: ``_QConvNd`` holds everything, each class names its float type,
its custom op (``inc_bridge::conv1d`` / ``conv2d``) and how that op takes its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import dtype_name
from ..kernels import ops as kernel_ops
from ._fp8_module import Fp8Module

if TYPE_CHECKING:  # only an annotation: from_float calls its methods; scales sit above this layer
    from ..scales import LayerScales


class _QConvNd(Fp8Module):
    """A conv layer with an FP8 weight and a static FP8 activation scale (``QConv1d``, ``QConv2d``).

    Buffers: ``qweight`` (FP8, [out, in/groups, *kernel_size]), ``weight_scale`` (fp32, 0-d or
    [out, 1, ...]), ``input_scale`` (fp32, 0-d); ``bias`` stays in the model's dtype; ``weight``
    reads as a ``Float8StaticTensor`` in the model's dtype (see ``Fp8Module``). Stride, padding
    (including string padding and non-zero padding modes), dilation and groups follow the float
    layer.
    """

    float_type: type[nn.Module]  # the float layer this class quantizes (nn.Conv1d / nn.Conv2d)
    config_dims: int  # spatial dims: the length of kernel_size, stride, padding and dilation
    _op: Callable[..., torch.Tensor]  # the custom op the forward calls
    _op_args: Callable[..., tuple[list[int], list[int], str, list[int]]]  # stride, padding, dilation → its arguments

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...] | None = None,
        padding: tuple[int, ...] | str | None = None,
        dilation: tuple[int, ...] | None = None,
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
        ones, zeros = (1,) * self.config_dims, (0,) * self.config_dims
        self.kernel_size = tuple(kernel_size)
        self.stride = ones if stride is None else tuple(stride)
        self.padding = zeros if padding is None else padding if isinstance(padding, str) else tuple(padding)
        self.dilation = ones if dilation is None else tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.fp8_max = float(fp8_max)
        self.dtype = dtype
        self.backend = backend
        # The float conv pads explicitly for non-"zeros" modes; keep its precomputed amounts.
        self._reversed_padding_repeated_twice: list[int] = []
        self._register_fp8_weight((out_channels, in_channels // groups, *self.kernel_size), fp8_dtype, per_channel, device)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Module, scales: LayerScales, backend: str = "emulated") -> _QConvNd:
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
    def from_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> _QConvNd:
        """An empty module (zero FP8 data, unit scales) shaped by ``quant_config()``'s output.

        ``device="meta"`` allocates nothing; ``inc_bridge.load`` fills the tensors afterwards.
        """
        q = super().from_config(cfg, device)
        # The float conv derives its explicit padding amounts from the same arguments; a meta twin costs nothing.
        twin = cls.float_type(
            q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
            bias=False, padding_mode=q.padding_mode, device="meta",
        )
        q._reversed_padding_repeated_twice = list(twin._reversed_padding_repeated_twice)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: tuple[int, ...] | str = self.padding
        if self.padding_mode != "zeros":  # same two steps as nn.Conv1d/2d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * self.config_dims
        stride, padding, padding_mode, dilation = self._op_args(self.stride, padding, self.dilation)
        return self._op(x, self.qweight, self.weight_scale, self.input_scale, self.bias, self.fp8_max,
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


class QConv2d(_QConvNd):
    """A Conv2d layer with an FP8 weight and a static FP8 activation scale (see ``_QConvNd``).

    Buffers: ``qweight`` (FP8, [out, in/groups, kh, kw]), ``weight_scale`` (fp32, 0-d or
    [out, 1, 1, 1]), ``input_scale`` (fp32, 0-d). Calls ``inc_bridge::conv2d``.
    """

    float_type = nn.Conv2d
    config_dims = 2
    _op = staticmethod(kernel_ops.conv2d)
    _op_args = staticmethod(kernel_ops.conv2d_args)


class QConv1d(_QConvNd):
    """A ``torch.nn.Conv1d`` layer with an FP8 weight and a static FP8 activation scale (see ``_QConvNd``).

    Buffers: ``qweight`` (FP8, [out, in/groups, k]), ``weight_scale`` (fp32, 0-d or [out, 1, 1]),
    ``input_scale`` (fp32, 0-d). Calls ``inc_bridge::conv1d``. Not to be confused with ``QConv1D``
    (transformers' ``Conv1D``, a linear layer).
    """

    float_type = nn.Conv1d
    config_dims = 1
    _op = staticmethod(kernel_ops.conv1d)
    _op_args = staticmethod(kernel_ops.conv1d_args)

"""``Float8StaticTensor``: an FP8 weight that carries its layer's static activation scale.

Built on torchao's ``TorchAOBaseTensor`` (flatten/unflatten, ``.to()``, ``detach``/``clone``,
``torch.compile`` support come from the base class). ``F.linear`` and ``F.conv2d`` with this weight
quantize the activation with the static scale and call the layer's kernel, so a model keeps its
structure: ``model.fc.weight`` is simply FP8 now. torchao 0.18's own ``PrototypeFloat8Tensor`` has a
static activation scale too, but no CPU conv2d and no exact INC numerics, hence this class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from .kernels import Fp8Params, get_kernel

__all__ = ["Float8StaticTensor"]


class Float8StaticTensor(TorchAOBaseTensor):
    """FP8 weight + dequantization scale + static activation scale.

    Attributes:
        qdata: FP8 data, same shape as the float weight.
        scale: fp32 dequantization scale, 0-d or per output channel ([N, 1] / [O, 1, 1, 1]).
        act_scale: fp32 0-d static scale for the layer's input activation.
        fp8_max: clamp bound when quantizing activations (the target's FP8 range).
        backend: kernel backend name (see ``inc_bridge.kernels``).
    """

    tensor_data_names = ["qdata", "scale", "act_scale"]
    tensor_attribute_names = ["fp8_max", "backend", "dtype"]

    def __new__(cls, qdata, scale, act_scale, fp8_max, backend, dtype):  # noqa: D102
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, act_scale, fp8_max, backend, dtype):  # noqa: D107
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.act_scale = act_scale
        self.fp8_max = float(fp8_max)
        self.backend = str(backend)

    def __repr__(self) -> str:
        gran = "per_tensor" if self.scale.dim() == 0 else "per_channel"
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, fp8={self.qdata.dtype}, weight={gran}, "
            f"act_scale={float(self.act_scale):.6g}, dtype={self.dtype}, backend={self.backend!r})"
        )

    @property
    def params(self) -> Fp8Params:
        return Fp8Params(self.qdata.dtype, self.fp8_max, self.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qdata.to(torch.float32) * self.scale).to(output_dtype or self.dtype)


implements_torch_function = Float8StaticTensor.implements_torch_function


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


@implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    x, w, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
    kernel = get_kernel("linear", w.backend)
    return kernel(x, w.qdata, w.scale, w.act_scale, bias, w.params)


@implements_torch_function(F.conv2d)
def _conv2d(func, types, args, kwargs):
    x, w = args[0], args[1]
    kernel = get_kernel("conv2d", w.backend)
    return kernel(
        x,
        w.qdata,
        w.scale,
        w.act_scale,
        _arg(args, kwargs, 2, "bias"),
        w.params,
        _arg(args, kwargs, 3, "stride", 1),
        _arg(args, kwargs, 4, "padding", 0),
        _arg(args, kwargs, 5, "dilation", 1),
        _arg(args, kwargs, 6, "groups", 1),
    )


# weights_only=True loading of a state_dict holding this tensor needs it allow-listed; registering
# a class is cheap and has no other effect.
torch.serialization.add_safe_globals([Float8StaticTensor])

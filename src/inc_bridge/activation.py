"""``Float8ActivationTensor``: an activation quantized with a static scale, for the subclass form.

In the subclass form attention keeps its module structure: a forward pre-hook on each captured
``SDPA`` / ``Matmul`` module turns its q/k/v (or both operands) into Float8ActivationTensors
(op ``inc_bridge::quantize``, with the backend the layer was converted with). The attention ops
register what ``F.scaled_dot_product_attention``, ``torch.matmul``, ``torch.bmm`` and
``torch.baddbmm`` do with them (``opspecs/sdpa.py``, ``opspecs/matmul.py``): call the same custom
op as the module form, ``inc_bridge::sdpa`` / ``inc_bridge::matmul``, with the FP8 data and
scales. Any other op that meets a Float8ActivationTensor dequantizes it first (op
``inc_bridge::dequantize``). Each op is one opaque node under ``torch.compile`` / ``torch.export``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from torchao.utils import TorchAOBaseTensor

from .compile_cache import stable_hash_for_caching
from .errors import ConversionError
from .fp8_checks import FP8_FORMATS, check_fp8_max
from .kernels import ops as kernel_ops
from .kernels.emulated import is_fp8
from .tensor import scale_text

__all__ = ["Float8ActivationTensor", "InputQuant", "attach_input_quant", "dequantized_call", "input_quant_of"]


class Float8ActivationTensor(TorchAOBaseTensor):
    """FP8 data + fp32 0-d scale; behaves as its dequantized value (dtype = the high-precision dtype)."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["dtype", "backend"]
    _stable_hash_for_caching = stable_hash_for_caching  # torch.compile: a stable key, no warning

    def __new__(cls, qdata, scale, dtype, backend="auto"):  # noqa: D102
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, strides=qdata.stride(), dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, dtype, backend="auto"):  # noqa: D107
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.backend = str(backend)

    @classmethod
    def from_hp(cls, x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float,
                backend: str = "auto") -> Float8ActivationTensor:
        """Quantize ``x`` with its static ``scale`` (op ``inc_bridge::quantize``; "auto": backend from the device)."""
        return cls(kernel_ops.quantize(x, scale, fp8_dtype, float(fp8_max), backend), scale, x.dtype, backend)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The high-precision value (op ``inc_bridge::dequantize``)."""
        return kernel_ops.dequantize(self.qdata, self.scale, output_dtype or self.dtype, self.backend)

    def __repr__(self) -> str:
        return (f"Float8ActivationTensor(shape={tuple(self.shape)}, fp8={self.qdata.dtype}, scale={scale_text(self.scale)}, "
                f"dtype={self.dtype}, backend={self.backend!r})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":  # .shape, .dtype, .device ... need no data
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        # The attention ops' own entries (registered by opspecs/sdpa.py and matmul.py) call their
        # custom op with the FP8 data; every other op dequantizes first.
        table = getattr(cls, "_TORCH_FN_TABLE", {}).get(cls, {})
        if func in table:
            return table[func](func, types, args, kwargs)
        return dequantized_call(func, args, kwargs)


def dequantized_call(func, args: tuple, kwargs: dict):
    """``func`` with every Float8ActivationTensor among its arguments dequantized first."""
    args, kwargs = tree_map_only(Float8ActivationTensor, lambda t: t.dequantize(), (args, kwargs))
    return func(*args, **kwargs)


@dataclass(frozen=True)
class InputQuant:
    """What a subclass-form attention module quantizes: which inputs, with which format and backend.

    ``positions`` are the positional arguments that get ``input_scales[i]`` in order; ``names`` the
    same inputs' keyword names (q/k/v may be passed by keyword). Set by ``attach_input_quant``.
    """

    fp8_dtype: torch.dtype
    fp8_max: float
    positions: tuple[int, ...]
    names: tuple[str, ...]
    backend: str


def _quantize_inputs_hook(module: nn.Module, args: tuple, kwargs: dict):
    args = list(args)
    scales = module.input_scales
    iq: InputQuant = module._inc_bridge_fp8
    slots = []  # (container, key) of each quantized input
    for i, pos in enumerate(iq.positions):
        if pos < len(args):
            slots.append((args, pos))
        elif i < len(iq.names) and iq.names[i] in kwargs:  # q/k/v passed by keyword
            slots.append((kwargs, iq.names[i]))
    # K/V from an FP8 KV cache arrive as FP8 codes made with these very scales (kv_cache.py): they
    # are wrapped as they are, in the dtype of the inputs given in high precision.
    hp = next((box[key].dtype for box, key in slots if not is_fp8(box[key])), None)
    for i, (box, key) in enumerate(slots):
        x = box[key]
        if not is_fp8(x):
            box[key] = Float8ActivationTensor.from_hp(x, scales[i], iq.fp8_dtype, iq.fp8_max, iq.backend)
        elif x.dtype != iq.fp8_dtype or hp is None:
            raise ConversionError(f"{type(module).__name__}: input {i} holds {x.dtype} codes; expected {iq.fp8_dtype} "
                                  "codes for keys/values beside a high-precision query")
        else:
            box[key] = Float8ActivationTensor(x, scales[i], hp, iq.backend)
    return tuple(args), kwargs


def attach_input_quant(module: nn.Module, input_scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float,
                       positions: tuple[int, ...], names: tuple[str, ...] = (), backend: str = "auto") -> nn.Module:
    """Make a captured SDPA / Matmul module quantize its inputs statically (subclass form).

    The module keeps its type; it gains an ``input_scales`` buffer (fp32, one per quantized input,
    the inputs at ``positions``), the ``InputQuant`` it was given and a forward pre-hook. Used by
    the attention ops' ``to_subclass`` and by loading a saved subclass-form model.
    """
    where = f"{type(module).__name__} input scales"
    count = len(positions)
    if (not isinstance(input_scales, torch.Tensor) or not input_scales.dtype.is_floating_point
            or tuple(input_scales.shape) != (count,)):
        got = f"{input_scales.dtype}{list(input_scales.shape)}" if isinstance(input_scales, torch.Tensor) else "no tensor"
        raise ConversionError(f"{where}: expected {count} float scales (one per quantized input), got {got}")
    if fp8_dtype not in FP8_FORMATS:
        raise ConversionError(f"{where}: {fp8_dtype} is not an FP8 format the kernels implement")
    check_fp8_max(fp8_max, fp8_dtype, where=where, error=ConversionError)
    module.register_buffer("input_scales", input_scales.to(torch.float32))
    module._inc_bridge_fp8 = InputQuant(fp8_dtype, float(fp8_max), tuple(positions), tuple(names), str(backend))
    module.register_forward_pre_hook(_quantize_inputs_hook, with_kwargs=True)
    return module


def input_quant_of(module: nn.Module) -> InputQuant | None:
    """The ``InputQuant`` of a module made to quantize its inputs by ``attach_input_quant``, else None."""
    iq = module.__dict__.get("_inc_bridge_fp8")
    return iq if isinstance(iq, InputQuant) and module._buffers.get("input_scales") is not None else None


torch.serialization.add_safe_globals([Float8ActivationTensor])

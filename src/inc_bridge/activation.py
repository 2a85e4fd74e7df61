"""``Float8ActivationTensor``: an activation quantized with a static scale, for the subclass form.

In the subclass form attention keeps its module structure: a forward pre-hook on each captured
``SDPA`` / ``Matmul`` module turns its q/k/v (or both operands) into Float8ActivationTensors, and
``F.scaled_dot_product_attention``, ``torch.matmul`` (any rank), ``torch.bmm`` and ``torch.baddbmm``
accept them. No FP8 attention kernel exists on CPU, so they dequantize first and run in high
precision; any other op that meets a Float8ActivationTensor also dequantizes it first. Quantizing
and dequantizing are the custom ops ``inc_bridge::quantize`` / ``dequantize`` with backend "auto":
the cpu backend's native conversions where the library is built (the same FP8 bytes and the same
values as the torch ops, which stay the reference; only NaN payloads may differ; several times
faster), one opaque node each under ``torch.compile`` / ``torch.export``.
"""

from __future__ import annotations

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

__all__ = ["Float8ActivationTensor", "attach_input_quant", "quantized_positions"]


class Float8ActivationTensor(TorchAOBaseTensor):
    """FP8 data + fp32 0-d scale; behaves as its dequantized value (dtype = the high-precision dtype)."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["dtype"]
    _stable_hash_for_caching = stable_hash_for_caching  # torch.compile: a stable key, no warning

    def __new__(cls, qdata, scale, dtype):  # noqa: D102
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, strides=qdata.stride(), dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, dtype):  # noqa: D107
        super().__init__()
        self.qdata = qdata
        self.scale = scale

    @classmethod
    def from_hp(cls, x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> Float8ActivationTensor:
        """Quantize ``x`` with its static ``scale`` (op ``inc_bridge::quantize``, backend from the device)."""
        return cls(kernel_ops.quantize(x, scale, fp8_dtype, float(fp8_max), "auto"), scale, x.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The high-precision value (op ``inc_bridge::dequantize``, backend from the device)."""
        return kernel_ops.dequantize(self.qdata, self.scale, output_dtype or self.dtype, "auto")

    def __repr__(self) -> str:
        return f"Float8ActivationTensor(shape={tuple(self.shape)}, fp8={self.qdata.dtype}, scale={scale_text(self.scale)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":  # .shape, .dtype, .device ... need no data
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        # Every op: dequantize first. Attention ops land here too (there is no CPU FP8 attention
        # kernel); a device backend with one would register it in this class's torch-function table.
        table = getattr(cls, "_TORCH_FN_TABLE", {}).get(cls, {})
        if func in table:
            return table[func](func, types, args, kwargs)
        args, kwargs = tree_map_only(Float8ActivationTensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


# Operand positions an FP8 input hook quantizes, per captured module type / matmul function.
_SDPA_POSITIONS = (0, 1, 2)
_SDPA_NAMES = ("query", "key", "value")


def quantized_positions(module: nn.Module) -> tuple[int, ...]:
    from .nn.attention import MATMUL_OPERANDS, SDPA

    if isinstance(module, SDPA):
        return _SDPA_POSITIONS
    return MATMUL_OPERANDS[module.fn]


def _quantize_inputs_hook(module: nn.Module, args: tuple, kwargs: dict):
    args = list(args)
    scales = module.input_scales
    fp8_dtype, fp8_max = module._inc_bridge_fp8
    slots = []  # (container, key) of each quantized input
    for pos in quantized_positions(module):
        if pos < len(args):
            slots.append((args, pos))
        elif pos < len(_SDPA_NAMES) and _SDPA_NAMES[pos] in kwargs:  # q/k/v passed by keyword
            slots.append((kwargs, _SDPA_NAMES[pos]))
    # K/V from an FP8 KV cache arrive as FP8 codes made with these very scales (kv_cache.py): they
    # are wrapped as they are, in the dtype of the inputs given in high precision.
    hp = next((box[key].dtype for box, key in slots if not is_fp8(box[key])), None)
    for i, (box, key) in enumerate(slots):
        x = box[key]
        if not is_fp8(x):
            box[key] = Float8ActivationTensor.from_hp(x, scales[i], fp8_dtype, fp8_max)
        elif x.dtype != fp8_dtype or hp is None:
            raise ConversionError(f"{type(module).__name__}: input {i} holds {x.dtype} codes; expected {fp8_dtype} "
                                  "codes for keys/values beside a high-precision query")
        else:
            box[key] = Float8ActivationTensor(x, scales[i], hp)
    return tuple(args), kwargs


def attach_input_quant(module: nn.Module, input_scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> nn.Module:
    """Make a captured SDPA / Matmul module quantize its inputs statically (subclass form).

    The module keeps its type; it gains an ``input_scales`` buffer (fp32, one per quantized input)
    and a forward pre-hook. Used by ``convert`` and by loading a saved subclass-form model.
    """
    where = f"{type(module).__name__} input scales"
    count = len(quantized_positions(module))
    if (not isinstance(input_scales, torch.Tensor) or not input_scales.dtype.is_floating_point
            or tuple(input_scales.shape) != (count,)):
        got = f"{input_scales.dtype}{list(input_scales.shape)}" if isinstance(input_scales, torch.Tensor) else "no tensor"
        raise ConversionError(f"{where}: expected {count} float scales (one per quantized input), got {got}")
    if fp8_dtype not in FP8_FORMATS:
        raise ConversionError(f"{where}: {fp8_dtype} is not an FP8 format the kernels implement")
    check_fp8_max(fp8_max, fp8_dtype, where=where, error=ConversionError)
    module.register_buffer("input_scales", input_scales.to(torch.float32))
    module._inc_bridge_fp8 = (fp8_dtype, float(fp8_max))
    module.register_forward_pre_hook(_quantize_inputs_hook, with_kwargs=True)
    return module


torch.serialization.add_safe_globals([Float8ActivationTensor])

"""Op ``bmm``: a captured activation × activation ``torch.matmul`` / ``bmm`` / ``baddbmm`` call site.

The float module is ``Matmul`` (``fn`` names the function). Both forms quantize the two operands
with op ``inc_bridge::quantize`` and call ``inc_bridge::matmul`` on the FP8 data: the module form
is ``QMatmul``; the subclass form keeps the ``Matmul`` module, whose pre-hook makes the operands
``Float8ActivationTensor``s, and ``torch.matmul`` / ``bmm`` / ``baddbmm`` on them (registered below)
call the op. ONNX: ``OnnxFp8Matmul``, the same function on the two quantize-dequantized operands
(``MatMul``; baddbmm adds its input, times ``beta`` and ``alpha`` when given). Saving records
``QMatmul``'s ``quant_config()`` or the in-place kind ``fp8_inputs``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..activation import Float8ActivationTensor, dequantized_call, input_quant_of
from ..errors import SerializationError
from ..kernels import ops as kernel_ops
from ..kernels.emulated import MATMUL_FUNCTIONS, MATMUL_OPERANDS
from ..nn.attention import Matmul, QMatmul
from ._build import fp8_inputs_kind, input_quant_builder
from ._onnx import OnnxTwin, qdq
from .spec import OpSpec

# The operands' keyword names, per function (the subclass form's hook quantizes them there too).
_NAMES = {"matmul": ("input", "other"), "bmm": ("input", "mat2"), "baddbmm": ("batch1", "batch2")}


def _fp8_call(fn: str):
    def implementation(func, types, args, kwargs):
        """Both operands FP8 (the subclass form's hook made them): the op; anything else: dequantize first."""
        try:
            a, b, addend, beta, alpha = kernel_ops.matmul_args(fn, args, kwargs)
        except NotImplementedError:
            return dequantized_call(func, args, kwargs)
        if not (isinstance(a, Float8ActivationTensor) and isinstance(b, Float8ActivationTensor)) or isinstance(
                addend, Float8ActivationTensor):
            return dequantized_call(func, args, kwargs)
        return kernel_ops.matmul(fn, a.qdata, b.qdata, a.scale, b.scale, addend, beta, alpha, a.dtype, a.backend)

    return implementation


for _fn, _funcs in {"matmul": (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__),
                    "bmm": (torch.bmm, torch.Tensor.bmm), "baddbmm": (torch.baddbmm,)}.items():
    Float8ActivationTensor.implements_torch_function(list(_funcs))(_fp8_call(_fn))


class OnnxFp8Matmul(OnnxTwin):
    """``fn(..., DQ(Q(a)), DQ(Q(b)), ...)`` for ``fn`` in matmul, bmm, baddbmm."""

    def __init__(self, fn: str, input_scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> None:
        super().__init__()
        if input_scales.shape != (2,):
            raise SerializationError(f"{fn} needs 2 operand scales, got shape {tuple(input_scales.shape)}")
        self.fn = fn
        for name, s in zip(("a_scale", "b_scale"), input_scales.detach().to(torch.float32), strict=True):
            self.register_buffer(name, s.clone())
        self.fp8_dtype, self.fp8_max = fp8_dtype, float(fp8_max)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        allowed = {"beta", "alpha"} if self.fn == "baddbmm" else set()
        if set(kwargs) - allowed:
            self.refuse(f"{self.fn} with keyword arguments {sorted(set(kwargs) - allowed)}")
            kwargs = {k: v for k, v in kwargs.items() if k in allowed}
        args = list(args)
        for pos, scale in zip(MATMUL_OPERANDS[self.fn], (self.a_scale, self.b_scale), strict=True):
            args[pos] = qdq(args[pos], scale, self.fp8_dtype, self.fp8_max)
        return MATMUL_FUNCTIONS[self.fn](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


def _onnx_twin(m: nn.Module) -> nn.Module:
    if isinstance(m, QMatmul):
        return OnnxFp8Matmul(m.fn, m.input_scales, m.fp8_dtype, m.fp8_max)
    iq = input_quant_of(m)
    if iq is None:
        raise SerializationError(f"{type(m).__name__} holds no static input scales (it is not quantized)")
    return OnnxFp8Matmul(m.fn, m.input_scales, iq.fp8_dtype, iq.fp8_max)


def _positions(module: nn.Module) -> tuple[int, ...]:
    return MATMUL_OPERANDS[module.fn]


def _names(module: nn.Module) -> tuple[str, ...]:
    return _NAMES[module.fn]


MATMUL_SPEC = OpSpec(
    name="bmm",
    module_types=(Matmul,),
    quantized_type=QMatmul,
    has_weight=False,
    n_inputs=2,
    input_positions=_positions,
    to_subclass=input_quant_builder(_positions, _names),
    to_module=QMatmul.from_float,
    kernel=kernel_ops.matmul,
    onnx_twin=_onnx_twin,
    in_place=fp8_inputs_kind(Matmul, _positions, _names),
)

"""Kernel registry: one implementation per (operation, backend).

Both conversion forms call kernels through this table, so the subclass form and the module form
run the same code and agree bit for bit. ``emulated`` is the exact reference: it quantizes and
dequantizes in plain torch ops exactly as INC's CPU QDQ model does and runs the matmul/conv in the
model's dtype. Device kernels (Xeon, CUDA, Gaudi) register under their own backend names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BackendUnavailableError
from .quant import dequantize_fp8, quant_dequant

KernelFn = Callable[..., torch.Tensor]
_KERNELS: dict[tuple[str, str], KernelFn] = {}

EMULATED = "emulated"


@dataclass(frozen=True)
class Fp8Params:
    """The static quantization parameters a kernel needs besides tensors."""

    fp8_dtype: torch.dtype
    fp8_max: float
    hp_dtype: torch.dtype


def register_kernel(op: str, backend: str) -> Callable[[KernelFn], KernelFn]:
    """Register ``fn`` as the kernel for ``op`` ("linear", "conv2d") on ``backend``."""

    def decorator(fn: KernelFn) -> KernelFn:
        _KERNELS[(op, backend)] = fn
        return fn

    return decorator


def registered_backends(op: str) -> list[str]:
    return sorted(b for (o, b) in _KERNELS if o == op)


def resolve_backend(backend: str) -> str:
    """Map "auto" to the best registered backend; check an explicit one exists."""
    if backend == "auto":
        return EMULATED
    known = sorted({b for (_, b) in _KERNELS})
    if backend not in known:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available in this build of inc_bridge "
            f"(no kernels registered for it); available: {', '.join(known)}"
        )
    return backend


def get_kernel(op: str, backend: str) -> KernelFn:
    try:
        return _KERNELS[(op, backend)]
    except KeyError:
        raise BackendUnavailableError(
            f"no {op!r} kernel for backend {backend!r}; registered for {op!r}: {', '.join(registered_backends(op))}"
        ) from None


@register_kernel("linear", EMULATED)
def linear_emulated(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """INC's PatchedLinear QDQ math: ``matmul(qdq(x), dequant(W)ᵀ) + bias``.

    The weight is dequantized into a contiguous [K, N] matrix because that is the layout INC keeps
    (it stores FP8 weights transposed); BLAS sums in a layout-dependent order, so the transposed
    view of an [N, K] matrix would differ in the last bit for some shapes. For the same reason the
    bias is added after the matmul instead of through ``addmm``.
    """
    xq = quant_dequant(x, input_scale, p.fp8_dtype, p.fp8_max, p.hp_dtype)
    scale_kn = weight_scale.t() if weight_scale.dim() == 2 else weight_scale
    w_kn = dequantize_fp8(qweight.t().contiguous(), scale_kn, p.hp_dtype)
    y = torch.matmul(xq, w_kn)
    return y + bias if bias is not None else y


@register_kernel("conv2d", EMULATED)
def conv2d_emulated(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """INC's PatchedConv2d QDQ math: ``conv2d(qdq(x), dequant(W), bias, ...)``."""
    xq = quant_dequant(x, input_scale, p.fp8_dtype, p.fp8_max, p.hp_dtype)
    w = dequantize_fp8(qweight, weight_scale, p.hp_dtype)
    return F.conv2d(xq, w, bias, stride, padding, dilation, groups)

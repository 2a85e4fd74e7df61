"""Kernel registry: one implementation per (operation, backend).

Both conversion forms call kernels through this table, so the subclass form and the module form
run the same code and agree bit for bit. Each backend lives in its own module of this package and
registers its kernels with ``@register_kernel(op, backend)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError

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

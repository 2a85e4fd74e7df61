"""FP8 kernels per operation and backend; importing this package registers every backend."""

from . import emulated  # noqa: F401  (registers the "emulated" kernels)
from .registry import (
    EMULATED,
    Fp8Params,
    KernelFn,
    get_kernel,
    register_kernel,
    registered_backends,
    resolve_backend,
)

__all__ = [
    "EMULATED",
    "Fp8Params",
    "KernelFn",
    "get_kernel",
    "register_kernel",
    "registered_backends",
    "resolve_backend",
]

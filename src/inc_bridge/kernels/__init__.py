"""FP8 kernels per operation and backend; importing this package registers every backend.

``emulated`` (exact reference, any device), ``cpu`` (native kernels, see cpu.py), ``cuda``
(``torch._scaled_mm``) and ``hpu`` (Gaudi's ``fp8_gemm_v2``). Importing a backend module only
registers it: availability checks run when asked for, so nothing heavy loads at import time.
Models call them through the custom ops ``torch.ops.inc_bridge.<op>`` defined in ``ops.py``.
"""

# Each backend module registers its backend and kernels; ops defines torch.ops.inc_bridge.*, which call them.
from . import cpu, cuda, emulated, hpu, ops  # noqa: F401
from .registry import (
    EMULATED,
    OPS,
    Availability,
    Fp8Params,
    KernelFn,
    available_backends,
    backend_availability,
    get_kernel,
    kernel_note,
    model_device,
    register_backend,
    register_kernel,
    registered_backends,
    resolve_backend,
)

__all__ = [
    "EMULATED",
    "OPS",
    "Availability",
    "Fp8Params",
    "KernelFn",
    "available_backends",
    "backend_availability",
    "get_kernel",
    "kernel_note",
    "model_device",
    "register_backend",
    "register_kernel",
    "registered_backends",
    "resolve_backend",
]

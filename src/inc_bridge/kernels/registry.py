"""Kernel registry: one implementation per (operation, backend), and which backends can run here.

Both conversion forms call kernels through this table, so the subclass form and the module form
run the same code and agree bit for bit. Each backend lives in its own module of this package: it
registers itself with ``register_backend`` (the device type its kernels serve, an availability
check) and its kernels with ``@register_kernel(op, backend)``, only for the ops it has something
faster for. ``get_kernel`` is the one place a backend without a kernel for an op falls back to the
``emulated`` kernel, so a lookup never misses for a registered backend. Models call the kernels
through the custom ops of ``ops.py`` (``torch.ops.inc_bridge.<op>``), which do this lookup.

``resolve_backend("auto", device)`` picks the first *available* backend for the device's type and
falls back to ``emulated``; an explicit backend that cannot run here raises
``BackendUnavailableError`` with the reason and the backends that can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import BackendUnavailableError

KernelFn = Callable[..., torch.Tensor]

EMULATED = "emulated"
OPS = ("linear", "conv2d", "conv1d", "embedding", "sdpa", "matmul", "quantize", "dequantize")


class Availability(NamedTuple):
    """Whether a backend can run in this process, and why (or why not), in words."""

    available: bool
    reason: str


@dataclass(frozen=True)
class Fp8Params:
    """The static quantization parameters a kernel needs besides tensors."""

    fp8_dtype: torch.dtype
    fp8_max: float
    hp_dtype: torch.dtype


@dataclass(frozen=True)
class _Backend:
    name: str
    device_type: str | None  # the tensors' device type its kernels serve; None: any device
    check: Callable[[], Availability]


_KERNELS: dict[tuple[str, str], KernelFn] = {}
_NOTES: dict[tuple[str, str], str] = {}
_BACKENDS: dict[str, _Backend] = {}


def register_backend(name: str, *, device_type: str | None, check: Callable[[], Availability]) -> None:
    """Declare a backend: the device type its kernels serve and its availability check.

    ``check`` is called each time availability is asked for (it must be cheap; cache expensive
    probes inside it), so a test can change what it sees.
    """
    _BACKENDS[name] = _Backend(name, device_type, check)


def register_kernel(op: str, backend: str, note: str = "") -> Callable[[KernelFn], KernelFn]:
    """Register ``fn`` as the kernel for ``op`` (one of ``OPS``) on ``backend``.

    ``note`` says in a few words what the kernel runs; ``inc-bridge doctor`` prints it.
    """
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; valid: {', '.join(OPS)}")

    def decorator(fn: KernelFn) -> KernelFn:
        _KERNELS[(op, backend)] = fn
        _NOTES[(op, backend)] = note or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return decorator


def registered_backends(op: str | None = None) -> list[str]:
    """Backends with kernels registered (for ``op``, or for any op), available here or not."""
    return sorted({b for (o, b) in _KERNELS if op is None or o == op})


def kernel_note(op: str, backend: str) -> str:
    """What the kernel for (op, backend) runs, in a few words ("" for an unknown backend or op).

    A registered backend without its own kernel for ``op`` runs the emulated one, and says so.
    """
    if (op, backend) in _NOTES:
        return _NOTES[(op, backend)]
    if backend in _BACKENDS and (op, EMULATED) in _NOTES:
        return f"emulated math on the backend's device ({_NOTES[(op, EMULATED)]})"
    return ""


def backend_availability(backend: str) -> Availability:
    """Whether ``backend`` can run in this process, and the reason in words."""
    spec = _BACKENDS.get(backend)
    if spec is None:
        return Availability(False, f"no backend of that name is registered (known: {', '.join(sorted(_BACKENDS))})")
    return spec.check()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The available backends in the order ``auto`` tries them for ``device`` (default: cpu).

    Backends that serve the device's type come first, then the device-independent ones
    (``emulated``), which are always last.
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    specific = [b for b in _BACKENDS.values() if b.device_type == device_type]
    generic = [b for b in _BACKENDS.values() if b.device_type is None]
    return [b.name for b in specific + generic if b.check().available]


def _all_available() -> list[str]:
    return sorted(name for name in _BACKENDS if backend_availability(name).available)


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Map "auto" to the best available backend for ``device``; check an explicit one can run.

    Args:
        backend: "auto" or a backend name ("emulated", "cpu", "cuda", "hpu").
        device: where the model's tensors are (default: cpu). Only "auto" depends on it: an
            explicit backend is accepted when it is available in this process, whatever the
            device (its kernels run the emulated math on tensors of another device).
    Returns:
        The backend name the kernels will be looked up with.
    Raises:
        BackendUnavailableError: the backend is unknown or cannot run here; the message says why
            and lists the backends that are available.

    Example:
        >>> resolve_backend("auto", "cpu")   # "cpu" when the native kernels are built # doctest: +SKIP
        'cpu'
    """
    if backend == "auto":
        candidates = available_backends(device)
        return candidates[0] if candidates else EMULATED
    if backend not in _BACKENDS:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available: no kernels are registered for it; "
            f"available here: {', '.join(_all_available())}"
        )
    ok, reason = backend_availability(backend)
    if not ok:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available here: {reason}; available here: {', '.join(_all_available())}"
        )
    return backend


def get_kernel(op: str, backend: str) -> KernelFn:
    """The kernel for ``op`` on ``backend``; the emulated kernel where the backend has none.

    This is the one place that fallback happens: a backend registers only the ops it runs
    differently, and its other ops run the emulated math (on whatever device the tensors are).

    Args:
        op: one of ``OPS``.
        backend: a registered backend name ("auto" is resolved by the caller, see ``ops.kernel_for``).
    Returns:
        The kernel function (its arguments are those of the emulated kernel for ``op``).
    Raises:
        BackendUnavailableError: ``backend`` is not registered, or ``op`` has no kernel at all; the
            message names what is registered.

    Example:
        >>> get_kernel("conv2d", "cuda") is get_kernel("conv2d", "emulated")  # doctest: +SKIP
        True
    """
    kernel = _KERNELS.get((op, backend))
    if kernel is not None:
        return kernel
    if backend in _BACKENDS and (op, EMULATED) in _KERNELS:
        return _KERNELS[(op, EMULATED)]
    raise BackendUnavailableError(
        f"no {op!r} kernel for backend {backend!r}; registered for {op!r}: {', '.join(registered_backends(op))}; "
        f"registered backends: {', '.join(sorted(_BACKENDS))}"
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (cpu for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")

"""``Float8StaticTensorKN``: an FP8 weight stored [in, out], as transformers' ``Conv1D`` keeps it.

GPT-2's attention and MLP layers are ``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with
``W`` of shape [in, out] (``torch.addmm(bias, x, W)``). The FP8 weight keeps that shape and layout,
so a saved model has the float checkpoint's shapes, and ``Conv1D.forward`` runs unchanged:
``torch.addmm`` / ``torch.mm`` / ``torch.matmul`` with this weight call the ``linear`` kernel op on
the transposed view ([out, in]). Per-channel scales are per *output* feature: shaped [1, out].

The FP8 codes lie in memory as an ``nn.Linear`` weight does, [out, in] contiguous: ``qdata`` is
the [in, out] *view* of that storage (strides ``(1, in)``), so ``qdata.t()`` is the contiguous
[out, in] matrix every backend's ``linear`` kernel takes (the cpu backend's native GEMV included),
and a layer computes what the equivalent ``nn.Linear`` computes. Saved files hold ``qdata`` as the
contiguous [in, out] tensor it reads as (the format is unchanged); built from such data, the tensor
lays it out as [out, in] once (``nk_layout``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConversionError, SerializationError
from .fp8_checks import check_scale_values, check_weight_parts
from .kernels import ops as kernel_ops
from .tensor import Float8StaticTensor

__all__ = ["Float8StaticTensorKN", "nk_layout"]


def nk_layout(qdata: torch.Tensor) -> torch.Tensor:
    """``qdata`` [in, out] as the view of a contiguous [out, in] matrix (a copy only when it is not one)."""
    return qdata if qdata.dim() != 2 or qdata.t().is_contiguous() else qdata.t().contiguous().t()


def _as_nk(qdata, scale):
    """The [out, in] view of the parts (what the linear kernel op takes)."""
    return qdata.t(), (scale.t() if isinstance(scale, torch.Tensor) and scale.dim() == 2 else scale)


def _check_kn(qdata, scale, act_scale, fp8_max, dtype, where: str, error) -> None:
    if not isinstance(qdata, torch.Tensor) or qdata.dim() != 2:
        got = list(qdata.shape) if isinstance(qdata, torch.Tensor) else type(qdata).__name__
        raise error(f"{where}: qdata must be a 2-D [in, out] FP8 tensor, got {got}")
    if isinstance(scale, torch.Tensor) and scale.dim() not in (0, 2):
        raise error(f"{where}: scale must be [] or [1, out], got {list(scale.shape)}")
    qt, st = _as_nk(qdata, scale)
    check_weight_parts(qt, st, act_scale, fp8_max=fp8_max, hp_dtype=dtype, where=where, error=error)


class Float8StaticTensorKN(Float8StaticTensor):
    """FP8 weight [in, out] + dequantization scale ([] or [1, out]) + static activation scale.

    Everything else as ``Float8StaticTensor`` (a subclass, so ``isinstance`` checks for an FP8
    weight hold); ``F.linear`` with it is refused, as its layout is not Linear's.
    """

    def __new__(cls, qdata, scale, fp8_max, backend, dtype, act_scale=None):  # noqa: D102
        _check_kn(qdata, scale, act_scale, fp8_max, dtype, cls.__name__, ConversionError)
        if act_scale is None:
            raise ConversionError(f"{cls.__name__}: a Conv1D weight needs its static activation scale")
        if not isinstance(backend, str):
            raise ConversionError(f"{cls.__name__}: backend must be a backend name, got {type(backend).__name__}")
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, fp8_max, backend, dtype, act_scale=None):  # noqa: D107
        super().__init__(nk_layout(qdata), scale, fp8_max, backend, dtype, act_scale=act_scale)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W + bias`` with ``x`` quantized by the static scale (the ``linear`` kernel op)."""
        qweight, scale = _as_nk(self.qdata, self.scale)
        return kernel_ops.linear(x, qweight, scale, self.act_scale, bias, self.fp8_max, self.dtype, self.backend)


_STATE_KEYS = frozenset({"qdata", "scale", "act_scale", "fp8_max", "backend", "_is_param"})


def _checked_setstate(self: Float8StaticTensorKN, state) -> None:
    """``torch.load``: check the parts against each other and the wrapper before setting them."""
    where = "Float8StaticTensorKN in a torch.load()ed file"
    dict_state, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    if not isinstance(dict_state, dict) or slots or set(dict_state) - _STATE_KEYS or not (
            {"qdata", "scale", "fp8_max", "backend", "act_scale"} <= set(dict_state)):
        raise SerializationError(f"{where}: malformed state")
    qdata, scale, act_scale = dict_state["qdata"], dict_state["scale"], dict_state["act_scale"]
    _check_kn(qdata, scale, act_scale, dict_state["fp8_max"], self.dtype, where, SerializationError)
    if tuple(self.shape) != tuple(qdata.shape) or not isinstance(dict_state["backend"], str):
        raise SerializationError(f"{where}: its shape or backend does not fit its data")
    check_scale_values(scale, where=f"{where} (scale)", error=SerializationError)
    check_scale_values(act_scale, where=f"{where} (act_scale)", error=SerializationError)
    torch._utils._set_obj_state(self, {**dict_state, "qdata": nk_layout(qdata), "fp8_max": float(dict_state["fp8_max"])})


Float8StaticTensorKN.__setstate__ = _checked_setstate  # type: ignore[method-assign]

implements = Float8StaticTensorKN.implements
implements_torch_function = Float8StaticTensorKN.implements_torch_function


@implements(torch.ops.aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    """As ``Float8StaticTensor``: ``.to(device)`` moves the FP8 data, ``.to(dtype)`` changes the compute dtype."""
    self = args[0]
    device = kwargs.get("device") or self.device
    dtype = kwargs.get("dtype") or self.dtype
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise TypeError(f"a Float8StaticTensorKN computes in a high-precision float dtype, not {dtype}")
    return Float8StaticTensorKN(self.qdata.to(device), self.scale.to(device), self.fp8_max, self.backend, dtype,
                                act_scale=self.act_scale.to(device))


@implements_torch_function(torch.addmm)
def _addmm(func, types, args, kwargs):
    bias, x, w = args[0], args[1], args[2]
    if not isinstance(w, Float8StaticTensorKN) or isinstance(x, Float8StaticTensorKN) or isinstance(bias, Float8StaticTensorKN):
        raise NotImplementedError("torch.addmm with an FP8 Conv1D weight: only addmm(bias, x, weight) is supported")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
        raise NotImplementedError("torch.addmm with an FP8 Conv1D weight: beta and alpha must be 1")
    return w.linear(x, bias)


@implements_torch_function([torch.mm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _mm(func, types, args, kwargs):
    x, w = args[0], args[1]
    if not isinstance(w, Float8StaticTensorKN) or isinstance(x, Float8StaticTensorKN):
        raise NotImplementedError(f"{getattr(func, '__name__', func)} with an FP8 Conv1D weight: only x @ weight is supported")
    return w.linear(x, None)


@implements_torch_function([F.linear, F.conv1d, F.conv2d, F.embedding])
def _refused(func, types, args, kwargs):
    raise NotImplementedError(
        f"{func.__name__} with a Float8StaticTensorKN: this weight is stored [in, out] (transformers Conv1D); "
        "use x @ weight or torch.addmm(bias, x, weight)"
    )


torch.serialization.add_safe_globals([Float8StaticTensorKN])

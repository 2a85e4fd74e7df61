"""``Float8StaticTensor``: an FP8 weight that carries its layer's static activation scale.

Built on torchao's ``TorchAOBaseTensor`` (flatten/unflatten, ``.to()``, ``detach``/``clone``,
``torch.compile`` support come from the base class). ``F.linear`` and ``F.conv2d`` with this weight
call the op's custom op, which quantizes the activation with the static scale (each op's entry is
registered by its spec, ``opspecs/<op>.py``), so a model keeps its
structure: ``model.fc.weight`` is simply FP8 now. torchao 0.18's own ``PrototypeFloat8Tensor`` has a
static activation scale too, but no CPU conv2d and no exact INC numerics, hence this class.
"""

from __future__ import annotations

import torch
from torchao.utils import TorchAOBaseTensor

from .compile_cache import stable_hash_for_caching
from .errors import ConversionError, SerializationError
from .fp8_checks import check_scale_values, check_weight_parts

__all__ = ["Float8StaticTensor"]


class Float8StaticTensor(TorchAOBaseTensor):
    """FP8 weight + dequantization scale + static activation scale.

    Attributes:
        qdata: FP8 data, same shape as the float weight.
        scale: fp32 dequantization scale, 0-d or per output channel ([N, 1] / [O, 1, 1, 1]).
        act_scale: fp32 0-d static scale for the layer's input activation; None for weight-only
            layers (an embedding's input is integer ids).
        fp8_max: clamp bound when quantizing activations (the target's FP8 range).
        backend: kernel backend name (see ``inc_bridge.kernels``).
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["fp8_max", "backend", "dtype"]
    _stable_hash_for_caching = stable_hash_for_caching  # torch.compile: a stable key, no warning
    optional_tensor_data_names = ["act_scale"]  # None for weight-only layers (embeddings)

    def __new__(cls, qdata, scale, fp8_max, backend, dtype, act_scale=None):  # noqa: D102
        # Checked here, before any tensor exists: every construction path (convert, unflatten in
        # ``inc_bridge.load`` and tracing, ``.to()``, detach/clone) comes through.
        check_weight_parts(qdata, scale, act_scale, fp8_max=fp8_max, hp_dtype=dtype, where=cls.__name__,
                           error=ConversionError)
        if not isinstance(backend, str):
            raise ConversionError(f"{cls.__name__}: backend must be a backend name, got {type(backend).__name__}")
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, fp8_max, backend, dtype, act_scale=None):  # noqa: D107
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
            f"act_scale={'none' if self.act_scale is None else scale_text(self.act_scale)}, "
            f"dtype={self.dtype}, backend={self.backend!r})"
        )

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qdata.to(torch.float32) * self.scale).to(output_dtype or self.dtype)


def scale_text(t: torch.Tensor) -> str:
    """A 0-d scale's value for a repr; "traced" for a fake or meta tensor, whose value cannot be read
    (torch.compile's structured logs repr the subclass while tracing)."""
    if type(t) is not torch.Tensor or t.is_meta:
        return "traced"
    return f"{float(t):.6g}"


_STATE_KEYS = frozenset({"qdata", "scale", "act_scale", "fp8_max", "backend", "_is_param"})


def _checked_setstate(self: Float8StaticTensor, state) -> None:
    """``torch.load`` (weights_only included) rebuilds the wrapper, then hands its attributes here.

    torchao's default sets whatever the file holds; a scale that does not fit the data would
    then reach the C kernels. Check the parts against each other and against the wrapper's own
    shape and dtype (both come from the file too), and their values, before setting anything.
    """
    where = "Float8StaticTensor in a torch.load()ed file"
    dict_state, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    if not isinstance(dict_state, dict) or slots:
        raise SerializationError(f"{where}: malformed state ({type(state).__name__})")
    unknown = sorted(str(k) for k in set(dict_state) - _STATE_KEYS)
    missing = sorted({"qdata", "scale", "fp8_max", "backend"} - set(dict_state))
    if unknown or missing:
        raise SerializationError(f"{where}: " + (f"unknown attributes {unknown[:5]}" if unknown else f"missing {missing}"))
    qdata, scale, act_scale = dict_state["qdata"], dict_state["scale"], dict_state.get("act_scale")
    check_weight_parts(qdata, scale, act_scale, fp8_max=dict_state["fp8_max"], hp_dtype=self.dtype, where=where,
                       error=SerializationError)
    if tuple(self.shape) != tuple(qdata.shape):
        raise SerializationError(f"{where}: its shape {list(self.shape)} differs from its qdata's {list(qdata.shape)}")
    if not isinstance(dict_state["backend"], str):
        raise SerializationError(f"{where}: backend must be a backend name, got {type(dict_state['backend']).__name__}")
    check_scale_values(scale, where=f"{where} (scale)", error=SerializationError)
    if act_scale is not None:
        check_scale_values(act_scale, where=f"{where} (act_scale)", error=SerializationError)
    torch._utils._set_obj_state(self, {**dict_state, "act_scale": act_scale, "fp8_max": float(dict_state["fp8_max"])})


# TorchAOBaseTensor.__init_subclass__ installs its own unchecked __setstate__ after the class body
# runs, so the checked one is set here.
Float8StaticTensor.__setstate__ = _checked_setstate  # type: ignore[method-assign]

implements = Float8StaticTensor.implements
implements_torch_function = Float8StaticTensor.implements_torch_function


@implements(torch.ops.aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    """``.to(device)`` moves the FP8 data; ``.to(dtype)`` changes only the high-precision dtype.

    The FP8 bytes and fp32 scales are never cast: ``model.to(torch.bfloat16)`` of a quantized model
    keeps its weights FP8 and makes the layers compute in bf16.
    """
    self = args[0]
    device = kwargs.get("device") or self.device
    dtype = kwargs.get("dtype") or self.dtype
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise TypeError(f"a Float8StaticTensor computes in a high-precision float dtype, not {dtype}")
    return Float8StaticTensor(
        self.qdata.to(device),
        self.scale.to(device),
        self.fp8_max,
        self.backend,
        dtype,
        act_scale=None if self.act_scale is None else self.act_scale.to(device),
    )



def call_arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """Argument ``index`` / ``name`` of an intercepted call (for the ops' torch-function entries)."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def need_act_scale(w: Float8StaticTensor, op: str) -> None:
    """Refuse a weight-only Float8StaticTensor where ``op`` needs a static activation scale."""
    if w.act_scale is None:
        raise ConversionError(f"a {op} weight needs a static activation scale; this Float8StaticTensor has none "
                              "(only embedding weights are weight-only)")


# What F.linear, F.conv2d and F.embedding do with this weight is registered by each op's spec
# (``opspecs/linear.py`` ...): unwrap it into plain tensors and call the op's custom op.


# weights_only=True loading of a state_dict holding this tensor needs it allow-listed; registering
# a class is cheap and has no other effect.
torch.serialization.add_safe_globals([Float8StaticTensor])

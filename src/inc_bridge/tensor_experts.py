"""``Float8ExpertsTensor``: the stacked FP8 weights of a fused MoE experts layer, scales per expert.

transformers 5 keeps a MoE layer's experts as 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]). In the subclass form each becomes one of these: FP8 ``qdata`` of the same
shape, a dequantization ``scale`` per expert ([E], or [E, out, 1] per channel) and a static
activation scale per expert ([E], measured on the tokens routed to that expert). The experts
module keeps its own forward; the two ways transformers runs it are supported:

* ``eager``: ``weight[e]`` is expert ``e``'s ``Float8StaticTensor`` (its scales, its activation
  scale), and ``F.linear`` with it runs the ``linear`` kernel op;
* ``grouped_mm``: ``F.grouped_mm(x, weight.transpose(-2, -1), offs=...)`` (and, under
  ``torch.compile``, transformers' ``grouped_mm_fallback`` op) runs the ``grouped_linear`` kernel
  op: each expert's ``linear`` kernel on that expert's rows, one opaque op for the compiler.

``batched_mm`` (a per-token gather of whole expert matrices) is refused with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConversionError, SerializationError
from .fp8_checks import FP8_FORMATS, check_fp8_max, check_hp_dtype, check_scale_values
from .kernels import ops as kernel_ops
from .tensor import Float8StaticTensor

__all__ = ["Float8ExpertsTensor"]

# transformers' own grouped_mm stand-in (a custom op; what its experts call under torch.compile for
# non-bf16 weights), matched by name: transformers registers it only once imported.
_TRANSFORMERS_GROUPED_MM = "transformers::grouped_mm_fallback"


def check_experts_parts(qdata, scale, act_scale, fp8_max, dtype, *, where: str, error) -> None:
    """qdata FP8 [E, out, in]; scale fp32 [E] or [E, out, 1]; act_scale fp32 [E]; one device."""
    if not isinstance(qdata, torch.Tensor) or qdata.dtype not in FP8_FORMATS or qdata.dim() != 3:
        raise error(f"{where}: qdata must be a 3-D FP8 tensor [experts, out, in]")
    e, rows = qdata.shape[0], qdata.shape[1]
    for part, shapes in (("scale", [(e,), (e, rows, 1)]), ("act_scale", [(e,)])):
        t = scale if part == "scale" else act_scale
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) not in shapes:
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise error(f"{where}: {part} must be fp32 of shape {' or '.join(str(list(s)) for s in shapes)}, got {got}")
        if t.device != qdata.device:
            raise error(f"{where}: qdata and {part} are on different devices")
    check_fp8_max(fp8_max, qdata.dtype, where=where, error=error)
    check_hp_dtype(dtype, where=where, error=error)


class Float8ExpertsTensor(Float8StaticTensor):
    """FP8 expert weights [E, out, in] with per-expert weight and activation scales.

    ``transposed`` marks the [E, in, out] view ``weight.transpose(-2, -1)`` gives (the data is not
    moved); only that view goes into ``F.grouped_mm``.
    """

    tensor_data_names = ["qdata", "scale", "act_scale"]
    optional_tensor_data_names: list[str] = []
    tensor_attribute_names = ["fp8_max", "backend", "dtype", "transposed"]

    def __new__(cls, qdata, scale, act_scale, fp8_max, backend, dtype, transposed=False):  # noqa: D102
        check_experts_parts(qdata, scale, act_scale, fp8_max, dtype, where=cls.__name__, error=ConversionError)
        if not isinstance(backend, str):
            raise ConversionError(f"{cls.__name__}: backend must be a backend name, got {type(backend).__name__}")
        e, rows, cols = qdata.shape
        shape = (e, cols, rows) if transposed else (e, rows, cols)
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, act_scale, fp8_max, backend, dtype, transposed=False):  # noqa: D107
        self.qdata = qdata
        self.scale = scale
        self.act_scale = act_scale
        self.fp8_max = float(fp8_max)
        self.backend = str(backend)
        self.transposed = bool(transposed)

    # transformers' grouped_mm_fallback reaches the tensor at the torch-function level (eager,
    # torch.export) or at dispatch (dynamo's fake tensors): both run the grouped_linear op.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        if _is_transformers_grouped_mm(func):
            return _grouped_mm_fallback(args, kwargs or {})
        return super().__torch_function__(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        if _is_transformers_grouped_mm(func):
            return _grouped_mm_fallback(args, kwargs or {})
        return super().__torch_dispatch__(func, types, args, kwargs)

    @property
    def num_experts(self) -> int:
        return self.qdata.shape[0]

    def expert(self, e: int) -> Float8StaticTensor:
        """Expert ``e``'s weight [out, in]: its FP8 data, its scale and its activation scale."""
        return Float8StaticTensor(self.qdata[e], self.scale[e], self.fp8_max, self.backend, self.dtype,
                                  act_scale=self.act_scale[e])

    def expert_linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight[e])`` with expert ``e``'s static activation scale (the ``linear`` op)."""
        return kernel_ops.linear(x, self.qdata[e], self.scale[e], self.act_scale[e], None, self.fp8_max, self.dtype,
                                 self.backend)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        scale = self.scale.reshape(-1, 1, 1) if self.scale.dim() == 1 else self.scale
        w = (self.qdata.to(torch.float32) * scale).to(output_dtype or self.dtype)
        return w.transpose(-2, -1) if self.transposed else w

    def __repr__(self) -> str:
        gran = "per_tensor" if self.scale.dim() == 1 else "per_channel"
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, experts={self.num_experts}, fp8={self.qdata.dtype}, "
                f"weight={gran}, dtype={self.dtype}, backend={self.backend!r}"
                + (", transposed" if self.transposed else "") + ")")


def _checked_setstate(self: Float8ExpertsTensor, state) -> None:
    """``torch.load``: the parts must fit each other and the wrapper, scales finite and positive."""
    where = "Float8ExpertsTensor in a torch.load()ed file"
    dict_state, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    keys = {"qdata", "scale", "act_scale", "fp8_max", "backend", "transposed"}
    if not isinstance(dict_state, dict) or slots or not keys <= set(dict_state) <= keys | {"_is_param"}:
        raise SerializationError(f"{where}: malformed state")
    qdata = dict_state["qdata"]
    check_experts_parts(qdata, dict_state["scale"], dict_state["act_scale"], dict_state["fp8_max"], self.dtype,
                        where=where, error=SerializationError)
    e, rows, cols = qdata.shape
    if tuple(self.shape) != ((e, cols, rows) if dict_state["transposed"] else (e, rows, cols)):
        raise SerializationError(f"{where}: its shape does not fit its data")
    check_scale_values(dict_state["scale"], where=f"{where} (scale)", error=SerializationError)
    check_scale_values(dict_state["act_scale"], where=f"{where} (act_scale)", error=SerializationError)
    torch._utils._set_obj_state(self, {**dict_state, "fp8_max": float(dict_state["fp8_max"])})


Float8ExpertsTensor.__setstate__ = _checked_setstate  # type: ignore[method-assign]

implements = Float8ExpertsTensor.implements
implements_torch_function = Float8ExpertsTensor.implements_torch_function


@implements(torch.ops.aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    """``.to(device)`` moves the FP8 data and scales; ``.to(dtype)`` changes only the compute dtype."""
    self = args[0]
    device = kwargs.get("device") or self.device
    dtype = kwargs.get("dtype") or self.dtype
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise TypeError(f"a Float8ExpertsTensor computes in a high-precision float dtype, not {dtype}")
    return Float8ExpertsTensor(self.qdata.to(device), self.scale.to(device), self.act_scale.to(device), self.fp8_max,
                               self.backend, dtype, self.transposed)


def _expert_index(index) -> int | None:
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point() and index.dtype != torch.bool:
        return int(index)
    return None


@implements_torch_function(torch.Tensor.__getitem__)
def _getitem(func, types, args, kwargs):
    self, index = args[0], args[1]
    e = _expert_index(index)
    if e is None or self.transposed:
        raise NotImplementedError(
            "a fused FP8 experts weight can be indexed by one expert (weight[e], transformers' eager experts) or "
            "used whole in F.grouped_mm (grouped_mm); a per-token gather (batched_mm) is not supported: call "
            "model.set_experts_implementation('grouped_mm') or ('eager')"
        )
    return self.expert(e)


@implements_torch_function([torch.Tensor.transpose, torch.transpose])
def _transpose(func, types, args, kwargs):
    self, d0, d1 = args[0], args[1], args[2]
    if {d0 % 3, d1 % 3} != {1, 2}:
        raise NotImplementedError("a fused FP8 experts weight transposes only its last two dimensions")
    return Float8ExpertsTensor(self.qdata, self.scale, self.act_scale, self.fp8_max, self.backend, self.dtype,
                               not self.transposed)


def _grouped(x: torch.Tensor, w: Float8ExpertsTensor, offs: torch.Tensor | None) -> torch.Tensor:
    """``grouped_mm(x, w, offs)`` (w = [E, in, out] view): expert ``e``'s linear on rows offs[e-1]:offs[e]
    (the ``grouped_linear`` kernel op)."""
    if not isinstance(w, Float8ExpertsTensor) or not w.transposed or isinstance(x, Float8ExpertsTensor) or offs is None \
            or x.dim() != 2:
        raise NotImplementedError("grouped_mm with a fused FP8 experts weight: only grouped_mm(x2d, weight.transpose(-2, -1), "
                                  "offs=...) (transformers' grouped_mm experts) is supported")
    return kernel_ops.grouped_linear(x, w.qdata, w.scale, w.act_scale, offs, w.fp8_max, w.dtype, w.backend)


def _is_transformers_grouped_mm(func) -> bool:
    name = getattr(func, "_qualified_op_name", None) or getattr(getattr(func, "_schema", None), "name", None)
    return name == _TRANSFORMERS_GROUPED_MM


def _grouped_mm_fallback(args, kwargs) -> torch.Tensor:
    return _grouped(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None))


@implements_torch_function([F.grouped_mm, torch._grouped_mm])
def _grouped_mm(func, types, args, kwargs):
    if kwargs.get("bias") is not None or kwargs.get("out_dtype") is not None:
        raise NotImplementedError("grouped_mm with a fused FP8 experts weight: no bias or out_dtype")
    return _grouped(args[0], args[1], kwargs.get("offs", args[2] if len(args) > 2 else None))


@implements_torch_function([F.linear, F.conv1d, F.conv2d, F.embedding, torch.bmm, torch.matmul, torch.Tensor.matmul])
def _refused(func, types, args, kwargs):
    raise NotImplementedError(
        f"{getattr(func, '__name__', func)} with a fused FP8 experts weight: index one expert (weight[e]) or use "
        "F.grouped_mm; transformers' 'eager' and 'grouped_mm' experts implementations are supported"
    )


torch.serialization.add_safe_globals([Float8ExpertsTensor])

"""``export_onnx``: a quantized model → an ONNX model with real FP8 QDQ.

Each quantized layer is swapped, in a copy of the model, for an *export twin* that computes the
same thing with ONNX's own ops, emitted through ``torch.onnx.ops.symbolic``:

* the weight is an FP8 initializer (FLOAT8E4M3FN / FLOAT8E5M2) feeding ``DequantizeLinear``
  (per tensor, or per axis for per-channel scales);
* the input goes through ``QuantizeLinear`` → ``DequantizeLinear`` with the layer's static scale.

The rest of the model is exported by ``torch.onnx.export(dynamo=True)`` as usual. Twins are found in
a registry keyed by module type, ``@register_onnx_export(QuantizedLinear)``; a quantized layer whose
type has no twin is refused with its name. Linear, Conv2d and Embedding twins live here, attention
twins (SDPA, matmul / bmm / baddbmm) in ``onnx_attention``. Both forms export: a subclass-form
``nn.Linear`` whose weight is a ``Float8StaticTensor`` gets the same twin as a ``QuantizedLinear``,
a captured ``SDPA`` with static input scales the same twin as a ``QSDPA``.

Why ``QuantizeLinear`` carries ``output_dtype`` rather than an FP8 zero point: onnxruntime 1.32's
graph optimizer drops a ``Relu`` feeding a ``QuantizeLinear`` whose zero point is 0 (right for
uint8, wrong for FP8), which changes results under the default session options.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SerializationError
from .nn import QConv2d, QEmbedding, QuantizedLinear
from .nn._fp8_module import Fp8Module
from .tensor import Float8StaticTensor

MIN_OPSET = 21  # QuantizeLinear's output_dtype attribute and FP8 in the standard ops
_ONNX_FP8 = {torch.float8_e4m3fn: 17, torch.float8_e5m2: 19}  # onnx.TensorProto.FLOAT8E4M3FN / FLOAT8E5M2

ExportFn = Callable[[nn.Module], nn.Module]
_EXPORTERS: dict[type[nn.Module], ExportFn] = {}


def register_onnx_export(module_type: type[nn.Module]) -> Callable[[ExportFn], ExportFn]:
    """Register ``fn(module) -> nn.Module``: the export twin of a quantized ``module_type`` layer.

    For float module types (subclass form) ``fn`` is called only when the module holds quantized
    state; it may raise ``SerializationError`` for a variant it cannot export.
    """

    def decorator(fn: ExportFn) -> ExportFn:
        _EXPORTERS[module_type] = fn
        return fn

    return decorator


# ---------------------------------------------------------------- QDQ building blocks


def _onnx_op(op: str, inputs: tuple[torch.Tensor, ...], attrs: dict[str, int], dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=dtype, shape=shape, version=MIN_OPSET)


def qdq(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """``QuantizeLinear`` → ``DequantizeLinear`` with a static fp32 scale, in fp32, back to ``x``'s dtype.

    Matches ``quant.quant_dequant``: divide, clamp to ±fp8_max, round to FP8, multiply. ONNX
    saturates at the FP8 type's own maximum, so a smaller target range (Gaudi2's 240) adds a Clip.
    """
    x32 = x.to(torch.float32)
    if fp8_max < torch.finfo(fp8_dtype).max:
        bound = scale * fp8_max
        x32 = torch.clamp(x32, -bound, bound)
    q = _onnx_op("QuantizeLinear", (x32, scale), {"output_dtype": _ONNX_FP8[fp8_dtype], "saturate": 1}, fp8_dtype, x.shape)
    return _onnx_op("DequantizeLinear", (q, scale), {}, torch.float32, x.shape).to(x.dtype)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """``DequantizeLinear`` of an FP8 initializer: per tensor (0-d scale) or per ``axis``."""
    attrs = {"axis": axis} if scale.dim() else {}
    return _onnx_op("DequantizeLinear", (qweight, scale.reshape(-1) if scale.dim() > 1 else scale), attrs, torch.float32,
                    qweight.shape).to(dtype)


# ---------------------------------------------------------------- export twins: Linear, Conv2d, Embedding


class OnnxTwin(nn.Module):
    """Base of the export twins: records calls it cannot express, for ``export_onnx`` to report by layer.

    A twin that meets such a call (attention dropout, say) notes it with ``refuse`` and still returns
    a result, and ``export_onnx`` raises once tracing is over, naming every refused layer at once
    rather than the first one torch.export's error would surface through its own traceback.
    """

    layer_name, layer_type = "?", "?"  # the quantized layer it stands for; set by export_onnx

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[str] = []

    def refuse(self, what: str) -> None:
        if what not in self.refused:
            self.refused.append(what)


class OnnxFp8Linear(OnnxTwin):
    """``y = DQ(Q(x)) @ DQ(W)ᵀ + b``; the FP8 weight is the layer's own [out, in] tensor, not a
    transposed copy, so layers that share it (tied weights) export one initializer."""

    def __init__(self, qweight, weight_scale, input_scale, bias, fp8_max: float, dtype: torch.dtype) -> None:
        super().__init__()
        if input_scale is None:
            raise SerializationError("a linear layer without an activation scale cannot be exported")
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp8_max, self.dtype = fp8_max, dtype
        self.out_features, self.in_features = qweight.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized [out, in] weight in the model's dtype, for model code that reads ``.weight``
        (its dtype or shape); traced only where read."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = qdq(x, self.input_scale, self.qweight.dtype, self.fp8_max)
        y = torch.matmul(xq, self.weight.t())
        return y + self.bias if self.bias is not None else y


class OnnxFp8Conv2d(OnnxTwin):
    """``y = conv2d(DQ(Q(x)), DQ(W), b)`` with ``nn.Conv2d``'s stride, padding (and padding modes), dilation, groups."""

    def __init__(self, qweight, weight_scale, input_scale, bias, fp8_max: float, dtype: torch.dtype, conv) -> None:
        super().__init__()
        if input_scale is None:
            raise SerializationError("a conv2d layer without an activation scale cannot be exported")
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fp8_max, self.dtype = fp8_max, dtype
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.pad = list(conv._reversed_padding_repeated_twice)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype, for model code that reads ``.weight`` (ViT
        casts its pixel values to its dtype); traced only where read."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # same two steps as nn.Conv2d._conv_forward
            x = F.pad(x, self.pad, mode=self.padding_mode)
            padding = (0, 0)
        xq = qdq(x, self.input_scale, self.qweight.dtype, self.fp8_max)
        w = dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)
        return F.conv2d(xq, w, self.bias, self.stride, padding, self.dilation, self.groups)


class OnnxFp8Embedding(OnnxTwin):
    """``Gather(DQ(W), ids)``: the FP8 table is dequantized (per tensor, or per row: axis 0), then rows gathered.

    The kernel gathers FP8 rows first, but ONNX's ``Gather`` (opset 13, still current) does not take
    FP8 tensors; dequantization is elementwise, so gathering afterwards gives the same values.
    """

    def __init__(self, qweight, weight_scale, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1) if weight_scale.dim() else weight_scale)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table in the model's dtype, for model code that reads ``.weight``."""
        return dequantize_weight(self.qweight, self.weight_scale, 0, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _subclass_weight(module: nn.Module) -> Float8StaticTensor:
    w = module.weight
    if not isinstance(w, Float8StaticTensor):
        raise SerializationError(f"{type(module).__name__} weight is a {type(w).__name__}, not a Float8StaticTensor")
    return w


@register_onnx_export(QuantizedLinear)
def _export_quantized_linear(m: QuantizedLinear) -> nn.Module:
    return OnnxFp8Linear(m.qweight, m.weight_scale, m.input_scale, m.bias, m.fp8_max, m.dtype)


@register_onnx_export(nn.Linear)
def _export_subclass_linear(m: nn.Linear) -> nn.Module:
    w = _subclass_weight(m)
    return OnnxFp8Linear(w.qdata, w.scale, w.act_scale, m.bias, w.fp8_max, w.dtype)


@register_onnx_export(QConv2d)
def _export_qconv2d(m: QConv2d) -> nn.Module:
    return OnnxFp8Conv2d(m.qweight, m.weight_scale, m.input_scale, m.bias, m.fp8_max, m.dtype, m)


@register_onnx_export(nn.Conv2d)
def _export_subclass_conv2d(m: nn.Conv2d) -> nn.Module:
    w = _subclass_weight(m)
    return OnnxFp8Conv2d(w.qdata, w.scale, w.act_scale, m.bias, w.fp8_max, w.dtype, m)


@register_onnx_export(QEmbedding)
def _export_qembedding(m: QEmbedding) -> nn.Module:
    return OnnxFp8Embedding(m.qweight, m.weight_scale, m.dtype, m.padding_idx)


@register_onnx_export(nn.Embedding)
def _export_subclass_embedding(m: nn.Embedding) -> nn.Module:
    if m.max_norm is not None:
        raise SerializationError("nn.Embedding with max_norm renormalises its weight; it cannot be exported in FP8")
    w = _subclass_weight(m)
    return OnnxFp8Embedding(w.qdata, w.scale, w.dtype, m.padding_idx)


# ---------------------------------------------------------------- export


def export_onnx(
    qmodel: nn.Module,
    example_inputs: Any,
    path: Path | str,
    *,
    opset: int = MIN_OPSET,
    dynamic_shapes: Any = None,
) -> Path:
    """Export a quantized model (either form) to ONNX with FP8 weights and static activation QDQ.

    The model is exported in eval mode from a copy (``qmodel`` is not changed). By default every
    dimension of every input tensor is dynamic where the model allows it (``torch.export.Dim.AUTO``):
    batch and sequence length (or image size) may differ from the example's; feature sizes must not,
    even where the graph leaves them symbolic. Give example inputs with batch and sequence larger
    than 1 (torch.export fixes dimensions of size 0 or 1). A bf16 model is exported computing in fp32
    (its FP8 weights stay FP8): ONNX lacks bf16 for some ops and onnxruntime's CPU kernels for most;
    the exported graph takes fp32 inputs. Hugging Face decoders are exported with ``use_cache=False``
    (logits only), without the caller setting it.

    Args:
        qmodel: from ``inc_bridge.convert`` / ``quantize`` / ``load``.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
        path: the ``.onnx`` file to write (a single file: models up to 2 GB).
        opset: ONNX opset, at least 21.
        dynamic_shapes: overrides the default, in ``torch.onnx.export``'s format.
    Returns:
        ``path`` as a Path.
    Raises:
        SerializationError: a quantized layer has no ONNX export (the message names it), the
            exporter fails, or the result does not pass ``onnx.checker`` with its FP8 intact.

    Example:
        >>> ib.export_onnx(qmodel, torch.randn(2, 3, 32, 32), "out/model.onnx")   # doctest: +SKIP
    """
    if opset < MIN_OPSET:
        raise SerializationError(f"FP8 QDQ export needs opset {MIN_OPSET} or newer, got {opset}")
    path = Path(path)
    if _holds_bf16(qmodel):
        # ONNX lacks bfloat16 for some ops (Conv) and onnxruntime's CPU kernels lack it for most: the
        # graph computes in fp32 (FP8 weights stay FP8). Converted on a copy; the caller's model is kept.
        qmodel = copy.deepcopy(qmodel).float()
        example_inputs = _bf16_to_float(example_inputs)
    export_model, twins = _export_copy(qmodel)
    # Non-strict torch.export puts module attributes back after tracing (shallow copies), so hold on
    # to the twins' refusal lists themselves, which the traced forwards append to.
    refusals = [(t.layer_name, t.layer_type, t.refused) for t in twins if isinstance(t, OnnxTwin)]
    args, kwargs = _split_inputs(example_inputs)
    if dynamic_shapes is None:
        dynamic_shapes = _auto_dynamic(args, kwargs)
    try:
        program = torch.onnx.export(
            export_model, args, kwargs=kwargs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            verbose=False, optimize=True,
        )
        proto = program.model_proto
    except Exception as exc:
        _raise_refused(refusals, path)
        root = exc
        while root.__cause__ is not None:  # the exporter's wrapper says "see the stack above": say what failed
            root = root.__cause__
        raise SerializationError(
            f"{path}: torch.onnx.export failed{_failing_twin(exc)}: {type(root).__name__}: {root}"
        ) from exc
    _raise_refused(refusals, path)
    _check_fp8_graph(proto, twins, path)
    _write_atomic(proto, path)
    return path


def _holds_bf16(model: nn.Module) -> bool:
    return any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers()))


def _bf16_to_float(inputs: Any) -> Any:
    """Example inputs with bf16 tensors as fp32 (nested tuples, lists and dicts; other values as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.float() if inputs.dtype == torch.bfloat16 else inputs
    if isinstance(inputs, dict):
        return {k: _bf16_to_float(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_bf16_to_float(v) for v in inputs)
    return inputs


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding quantized state: a quantized module class, an FP8 tensor subclass parameter or
    buffer, or an in-place quantization (captured attention)."""
    from .serialization import registry

    classes = set(registry.module_classes().values())
    found = {}
    for name, m in model.named_modules():
        own = [*m._parameters.values(), *m._buffers.values()]
        if (
            type(m) in classes
            or isinstance(m, Fp8Module)
            or any(t is not None and type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer) for t in own)
            or registry.in_place_kind_of(m) is not None
        ):
            found[name] = m
    return found


def _export_copy(qmodel: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    from . import onnx_attention  # noqa: F401  (registers the attention twins)

    memo: dict[int, Any] = {}
    for name, module in quantized_layers(qmodel).items():
        fn = _EXPORTERS.get(type(module))
        if fn is None:
            raise SerializationError(
                f"layer {name!r} ({type(module).__name__}) has no ONNX export; exportable: "
                f"{', '.join(sorted(t.__name__ for t in _EXPORTERS))}"
            )
        try:
            twin = fn(module)
        except SerializationError as exc:
            raise SerializationError(f"layer {name!r} ({type(module).__name__}): {exc}") from None
        if isinstance(twin, OnnxTwin):
            twin.layer_name, twin.layer_type = name, type(module).__name__
        memo[id(module)] = twin
    twins = list(memo.values())  # deepcopy fills the memo with everything it copies
    # The twins share the FP8 tensors; everything else is deep-copied so qmodel stays untouched.
    export_model = copy.deepcopy(qmodel, memo)
    _without_kv_cache(export_model)
    return export_model.eval(), twins


def _without_kv_cache(model: nn.Module) -> None:
    """Hugging Face models: export logits only, without the key/value cache object among the outputs.

    A decoder's ``config.use_cache`` is True by default, and torch.export cannot return transformers'
    ``DynamicCache``; the copy being exported gets ``use_cache=False`` (the caller's model keeps its own).
    Every submodule's config: an encoder-decoder (T5) gives its decoder stack a config of its own.
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def _failing_twin(exc: BaseException) -> str:
    """`` in layer 'name' (Type)`` when the innermost twin on the failing call stack is known, else ''.

    torch.export's own message points into the exporter; naming the quantized layer whose export
    twin was running tells the user which layer to exclude or report.
    """
    found = ""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the exporter wraps the original error
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, OnnxTwin):
                found = f" in layer {owner.layer_name!r} ({owner.layer_type})"
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return found


def _raise_refused(refusals: list[tuple[str, str, list[str]]], path: Path) -> None:
    """Raise for the calls twins could not express while the model was traced, naming each layer."""
    refused = [f"layer {name!r} ({kind}): cannot export {what}" for name, kind, whats in refusals for what in whats]
    if refused:
        raise SerializationError(f"{path}: {'; '.join(refused)}")


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _auto_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
    def spec(v: Any) -> Any:
        return {i: torch.export.Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(v) for v in args)


def _check_fp8_graph(proto: Any, twins: list[nn.Module], path: Path) -> None:
    import onnx

    fp8_inits = [t for t in proto.graph.initializer if t.data_type in _ONNX_FP8.values()]
    ops = {n.op_type for n in proto.graph.node}
    with_weights = [t for t in twins if any(b.dtype in _ONNX_FP8 for b in t.buffers())]
    if with_weights and (not fp8_inits or "DequantizeLinear" not in ops):
        raise SerializationError(f"{path}: the exported graph lost its FP8 weights (folded by the exporter)")
    if len(with_weights) < len(twins) and "QuantizeLinear" not in ops:  # attention twins: activations only
        raise SerializationError(f"{path}: the exported graph lost its activation QuantizeLinear nodes")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SerializationError(f"{path}: the exported model fails onnx.checker: {exc}") from None


def _write_atomic(proto: Any, path: Path) -> None:
    import onnx

    from .safe_io import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp made it 0600; follow the umask as open() does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""``export_onnx``: a quantized model → an ONNX model with real FP8 QDQ.

Each quantized layer is swapped, in a copy of the model, for an *export twin* that computes the
same thing with ONNX's own ops, emitted through ``torch.onnx.ops.symbolic``:

* the weight is an FP8 initializer (FLOAT8E4M3FN / FLOAT8E5M2) feeding ``DequantizeLinear``
  (per tensor, or per axis for per-channel scales);
* the input goes through ``QuantizeLinear`` → ``DequantizeLinear`` with the layer's static scale.

The rest of the model is exported by ``torch.onnx.export(dynamo=True)`` as usual. Each op's twin is
its spec's ``onnx_twin`` (``opspecs/<op>.py``, QDQ building blocks in ``opspecs/_onnx.py``); a
quantized layer of a type no spec knows is refused with its name. Both forms export: a
subclass-form ``nn.Linear`` whose weight is a ``Float8StaticTensor`` gets the same twin as a
``QuantizedLinear``, a captured ``SDPA`` with static input scales the same twin as a ``QSDPA``.

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
from torch import nn

from .errors import SerializationError
from .nn._fp8_module import Fp8Module
from .onnx_llm import MODULE_TWINS, TENSOR_TWINS
from .opspecs import SPECS, entry_for, spec_of_quantized
from .opspecs._onnx import MIN_OPSET, ONNX_FP8, OnnxTwin
from .safe_io import current_umask

__all__ = ["MIN_OPSET", "export_onnx", "quantized_layers"]


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


def _twin_of(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The ONNX twin builder for a layer quantized in either form (None for a type no spec knows)."""
    spec = spec_of_quantized(module)
    if spec is not None:
        return spec.onnx_twin
    entry = entry_for(module)
    if entry is not None and entry.onnx_twin is not None:
        return entry.onnx_twin
    # transformers' Conv1D and fused experts (onnx_llm): the module form by class, the subclass
    # form by the FP8 tensor type the float module holds.
    twin = MODULE_TWINS.get(type(module))
    held = (type(t) for t in module._parameters.values() if t is not None)
    return twin or next((TENSOR_TWINS[t] for t in held if t in TENSOR_TWINS), None)


def _in_place(module: nn.Module) -> bool:
    entry = entry_for(module)
    return entry is not None and entry.spec.in_place is not None and entry.spec.in_place.config(module) is not None


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding quantized state: a quantized module class, an FP8 tensor subclass parameter or
    buffer, or an in-place quantization (captured attention)."""
    found = {}
    for name, m in model.named_modules():
        own = [*m._parameters.values(), *m._buffers.values()]
        if (
            isinstance(m, Fp8Module)
            or any(t is not None and type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer) for t in own)
            or _in_place(m)
        ):
            found[name] = m
    return found


def _export_copy(qmodel: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    memo: dict[int, Any] = {}
    for name, module in quantized_layers(qmodel).items():
        fn = _twin_of(module)
        if fn is None:
            exportable = [t.__name__ for s in SPECS for t in (s.quantized_type, *s.module_types)]
            raise SerializationError(
                f"layer {name!r} ({type(module).__name__}) has no ONNX export; exportable: {', '.join(sorted(exportable))}"
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

    fp8_inits = [t for t in proto.graph.initializer if t.data_type in ONNX_FP8.values()]
    ops = {n.op_type for n in proto.graph.node}
    with_weights = [t for t in twins if any(b.dtype in ONNX_FP8 for b in t.buffers())]
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

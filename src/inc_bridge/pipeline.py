"""The user-facing steps that walk a model: ``compute_scales`` and ``quantize``."""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .calibrate import CalibData, calibrate, check_calib_data
from .capture import capture_attention, captured_sites
from .convert import check_not_quantized, conversion_result, convert
from .coverage import float_matrices
from .errors import CalibrationError, ConversionError
from .experts import MATRICES, is_fused_experts_type, sibling_expert_stats
from .experts_scales import experts_layer_scales
from .formats import SUPPORTED_HP_DTYPES, dtype_from_name
from .measurements import LayerStats, Measurements
from .opspecs import entry_for
from .recipe import Op, Recipe, resolve_recipe
from .scales import LayerScales, ScaleSet, layer_scales, weight_memo
from .select import Selection, matches, select_layers


def compute_scales(
    measurements: Measurements,
    recipe: Recipe | Path | str | None = None,
    *,
    model: nn.Module | None = None,
) -> ScaleSet:
    """Turn raw measurements into one LayerScales per selected layer.

    Args:
        measurements: from ``calibrate`` or ``load_inc_measurements``.
        recipe: format, target range, granularity, scale methods and layer selection.
        model: the float model. With it, layers are selected from the model and weight amax is read
            from the weights themselves (as INC does at convert time); without it, from the
            measurements, which must then know each layer's kind and dtype.
    Returns:
        ScaleSet.
    Raises:
        CalibrationError: a selected layer has no measurements, or statistics are NaN/Inf.

    Example:
        >>> scales = compute_scales(meas, recipe, model=model)   # doctest: +SKIP
    """
    recipe = resolve_recipe(recipe)
    if model is not None:
        return model_scales(measurements, recipe, select_layers(model, recipe.quantization), dict(model.named_modules()))
    q = recipe.quantization
    layers: dict[str, LayerScales] = {}
    skipped = {}
    for name, stats in measurements.layers.items():
        if stats.kind not in {o.value for o in Op if o.is_layer} or stats.dtype is None:
            raise CalibrationError(
                f"layer {name!r}: the measurements do not record its kind and dtype (INC dumps do not); "
                "pass model= to compute_scales"
            )
        op = Op(stats.kind)
        why = _excluded(name, op, recipe)
        if why:
            skipped[name] = why
            continue
        layers[name] = layer_scales(stats, op, recipe, dtype_from_name(stats.dtype))
    return ScaleSet(layers=layers, skipped=skipped, format=q.format, target=q.target)


def model_scales(measurements: Measurements, recipe: Recipe, selection: Selection,
                 modules: dict[str, nn.Module]) -> ScaleSet:
    """``compute_scales`` with the model's layers already selected (autotune selects once per run)."""
    layers: dict[str, LayerScales] = {}
    notes: dict[str, str] = {}
    for name, op in selection.selected.items():
        stats = measurements.layers.get(name)
        if stats is None and op.weight_only:  # INC does not measure embeddings; the weight suffices
            stats = LayerStats(name=name, kind=op.value)
        if stats is None and (sibling := sibling_expert_stats(name, measurements.layers)) is not None:
            stats, notes[name] = sibling  # an expert Linear no calibration token reached
        if stats is None:
            raise CalibrationError(
                f"layer {name!r} is selected for quantization but has no measurements (it did not run during "
                f"calibration, or the measurements are for another model); measured: {_few(measurements.names)}"
            )
        if not op.has_weight:  # captured attention: the dtype its inputs had during calibration
            layers[name] = layer_scales(stats, op, recipe, _stats_dtype(stats))
            continue
        module = modules[name]
        weight = entry_for(module).weight_of(module)  # [out, in, ...] (a Conv1D's transposed view)
        if weight.dtype not in SUPPORTED_HP_DTYPES:
            raise CalibrationError(f"layer {name!r}: weight dtype {weight.dtype} is not float32 or bfloat16")
        if is_fused_experts_type(type(module)):  # scales per expert, from the tokens each expert received
            layers[name] = experts_layer_scales(stats, recipe, weight.dtype, tuple(getattr(module, m) for m in MATRICES))
            continue
        layers[name] = layer_scales(stats, op, recipe, weight.dtype, weight=weight)
    q = recipe.quantization
    return ScaleSet(layers=layers, skipped=dict(selection.skipped), format=q.format, target=q.target, notes=notes)


def _stats_dtype(stats: LayerStats):
    dtype = dtype_from_name(stats.dtype) if stats.dtype else None
    if dtype not in SUPPORTED_HP_DTYPES:
        raise CalibrationError(f"layer {stats.name!r}: measured in dtype {stats.dtype}, not float32 or bfloat16")
    return dtype


def _excluded(name: str, op: Op, recipe: Recipe) -> str | None:
    q = recipe.quantization
    if op not in q.ops:
        return f"op {op.value!r} not in quantization.ops"
    if q.include and not any(matches(name, s) for s in q.include):
        return "not matched by quantization.include"
    hit = next((s for s in q.exclude if matches(name, s)), None)
    return f"excluded by {hit!r}" if hit else None


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "") if names else "none"


@weight_memo()  # calibrate and compute_scales share the weights' amax within this call only
def quantize(
    model: nn.Module,
    calib_data: CalibData,
    recipe: Recipe | Path | str | None = None,
    *,
    workdir: Path | str | None = None,
    strict: bool = False,
    **convert_kwargs: Any,
) -> nn.Module:
    """``calibrate`` + ``compute_scales`` + ``convert`` in one call.

    ``form`` and ``backend`` default to the recipe's; ``convert_kwargs`` override them. When the
    recipe quantizes attention (``sdpa`` / ``bmm``) and ``model`` is not captured yet, a copy of it
    is captured first, with the first calibration batch as the example input. Calibration always
    runs in eval mode; a model in train mode gets a warning, and the quantized model is returned
    in eval mode (FP8 models are for inference; ``model`` itself keeps its mode).

    Args:
        strict: raise instead of leaving a module that holds a weight matrix in float because
            inc_bridge has no converter for its type (``conversion_result(q).summary()`` lists them
            otherwise).
    Raises:
        ConversionError: the model is already quantized, or ``strict`` and a matrix-bearing module is
            of an unsupported type.
        CalibrationError: see ``calibrate``.

    Example:
        >>> qmodel = quantize(model, calib_batches)   # doctest: +SKIP
    """
    check_calib_data(calib_data)  # before _peek below iterates it
    recipe = resolve_recipe(recipe)
    check_not_quantized(model)
    if strict:
        sel = select_layers(model, recipe.quantization)
        exclude = recipe.quantization.exclude
        unsupported = [f for f in float_matrices(model, sel.selected, sel.skipped)
                       if f.unsupported and not any(matches(f.name, s) for s in exclude)]
        if unsupported:
            shown = ", ".join(f"{f.name} ({f.module_type})" for f in unsupported[:5])
            raise ConversionError(
                f"strict=True: {len(unsupported)} module(s) hold weight matrices of a type inc_bridge cannot "
                f"quantize and would stay float: {shown}{' ...' if len(unsupported) > 5 else ''}; "
                "exclude them in the recipe's quantization.exclude to accept that, or pass strict=False"
            )
    if model.training:
        warnings.warn(
            "inc_bridge.quantize: the model is in train mode; it is calibrated in eval mode and the quantized "
            "model is returned in eval mode (call model.eval() first to silence this)",
            UserWarning, stacklevel=2,
        )
    kwargs: dict[str, Any] = {"form": recipe.form, "backend": recipe.backend,
                              "kv_cache": Op.KV_CACHE in recipe.quantization.ops, **convert_kwargs}
    if {Op.SDPA, Op.BMM} & set(recipe.quantization.ops) and not captured_sites(model):
        # Attention must be captured before calibration; do it on a copy, never on the caller's model.
        calib_data, example = _peek(calib_data)
        model = capture_attention(copy.deepcopy(model), example)
        kwargs["inplace"] = True
    measurements = calibrate(model, calib_data, recipe, workdir=workdir)
    scales = compute_scales(measurements, recipe, model=model)
    qmodel = convert(model, scales, **kwargs)
    conversion_result(qmodel).recipe = recipe  # ib.save records it
    return qmodel.eval()


def _peek(calib_data: CalibData) -> tuple[CalibData, Any]:
    """The first calibration batch (as capture's example input), without losing it."""
    if callable(calib_data):
        return calib_data, None
    iterator = iter(calib_data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("calib_data yielded no batches; calibration needs at least one") from None
    return itertools.chain([first], iterator), first

"""``autotune``: calibrate once, try whole-model settings, then fall back layer by layer.

The float baseline is evaluated once and the model is calibrated once; each trial only recomputes
scales from the stored statistics (amax and histograms) and converts. When no whole-model setting
meets the tolerance, layers are ranked by their own output SQNR (``sensitivity``) and the most
sensitive are kept in high precision: 1, 2, 4, ... layers until the metric is within tolerance,
then a bisection for the fewest. Every trial is appended to ``output_dir/trials.jsonl`` as it
finishes, so ``resume=True`` continues an interrupted run without redoing finished trials.

The user's model is never run or changed: every forward (baseline, calibration, trials, per-layer
SQNR) runs on autotune's own module objects in eval mode, which share the model's tensors but not
its training flags, so a model in train mode keeps its BatchNorm statistics. ``trials.jsonl`` is
data: its first line fingerprints the model, recipe, tolerance and calibration data, a resumed run
must match it, and the tolerance flags of recorded trials are recomputed, never trusted.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import numbers
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibrate import CalibData, calibrate
from .capture import capture_attention, captured_sites
from .convert import conversion_result, convert, structural_copy, swapped_in
from .coverage import float_matrices
from .errors import CalibrationError, RecipeError
from .formats import dtype_name
from .measurements import Measurements
from .pipeline import _peek, model_scales
from .recipe import (
    Granularity,
    Locked,
    LockedLayer,
    Op,
    Recipe,
    ScaleMethod,
    Sensitivity,
    Tolerance,
    resolve_callable,
    resolve_recipe,
)
from .report import LayerRow, Report, TrialRecord
from .run_fingerprint import calibration_digest, run_fingerprint
from .safe_io import MiB, read_bytes, shorten
from .scales import ScaleSet, counts_tensor, drop_quantized_weights
from .scales import weight_memo as _weight_memo
from .select import select_layers
from .sensitivity import eval_mode, layer_sqnr
from .trial_log import TrialLog, trial_key

MAX_MEASUREMENTS_BYTES = 1024 * MiB


@dataclass
class TuneResult:
    """The tuned model, its report, the locked recipe that rebuilds it, and the measurements."""

    model: nn.Module
    report: Report
    recipe: Recipe
    measurements: Measurements


@_weight_memo()  # the run's memo of weight amax, scales and FP8 weights; forgotten when it returns
def autotune(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float] | None = None,
    *,
    calib_data: CalibData | None = None,
    recipe: Recipe | Path | str | None = None,
    tolerable_loss: float | dict[str, float] | None = None,
    max_trials: int | None = None,
    output_dir: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Find the FP8 model that keeps ``eval_fn`` within tolerance of the float model.

    Args:
        model: the float model; never modified (its training flags included: autotune evaluates
            and calibrates in eval mode, on module objects of its own sharing the model's tensors).
        eval_fn: ``eval_fn(model) -> float``; defaults to the recipe's ``evaluation.fn``. It must
            return a finite real number (an int, a float or a one-element tensor); anything else
            is a failed trial (for the float model: a RecipeError). It should not change the model
            it is given (e.g. train it).
        calib_data: calibration batches or ``run_fn``; defaults to the recipe's ``calibration.source``.
        recipe: base settings, search space (``tuning.search_space``) and tolerance.
        tolerable_loss: overrides the recipe: a float is a relative loss (0.01 = 1 %), or
            ``{"absolute": 0.5}`` / ``{"relative": 0.01}``.
        max_trials: overrides ``tuning.max_trials`` (whole-model and fallback trials together).
        output_dir: where ``trials.jsonl``, ``measurements.json``, ``locked_recipe.yaml`` and
            ``report/`` go; None keeps everything in memory.
        resume: continue the run recorded in ``output_dir`` without redoing finished trials; the
            recorded run must be of the same model weights, recipe (``max_trials`` and ``timeout_s``
            may differ), tolerance and calibration data.
        progress: show progress bars (on stderr); False for scripts.
    Returns:
        TuneResult(model, report, recipe, measurements); ``report.goal_met`` says whether the
        tolerance was met (if not, the best trial is returned). ``result.model`` shares the
        parameters of the layers it keeps in high precision with ``model`` (no second copy), and
        its modules have the training flags of ``model``'s.
    Raises:
        RecipeError: no eval function or calibration data given nor named by the recipe; the float
            model's metric is not a finite real number.
        SerializationError: ``resume=True`` and ``trials.jsonl`` is malformed, unreadable or records
            a run of another model, recipe, tolerance or calibration set.

    Example:
        >>> result = autotune(model, eval_fn, calib_data=batches, tolerable_loss={"absolute": 0.5})  # doctest: +SKIP
    """
    started = time.monotonic()
    timings = {"total": 0.0, "baseline": 0.0, "calibration": 0.0, "trials": 0.0, "sensitivity": 0.0, "finish": 0.0}
    recipe = resolve_recipe(recipe)
    recipe = _with_overrides(recipe, tolerable_loss, max_trials)
    eval_fn = eval_fn or _from_recipe(recipe.evaluation.fn, "evaluation.fn")
    if calib_data is None:
        source = _from_recipe(recipe.calibration.source, "calibration.source")
        calib_data = source()
    given, num_batches = calib_data, recipe.calibration.num_batches
    if num_batches and not callable(calib_data):
        calib_data = itertools.islice(calib_data, num_batches)
    tol, hib = recipe.tuning.tolerable_loss, recipe.evaluation.higher_is_better

    view = _eval_view(model)
    work, first_batch, calib_data = _prepare_model(view, calib_data, recipe)
    out = Path(output_dir) if output_dir is not None else None
    fingerprint = run_fingerprint(model, recipe, calibration_digest(given, num_batches, first_batch))
    log = TrialLog(out / "trials.jsonl" if out else None, resume, fingerprint)
    scratch = structural_copy(work)  # what every trial converts in place and restores (no copy per trial)
    selection, modules = select_layers(scratch, recipe.quantization), dict(scratch.named_modules())
    swap = functools.partial(swapped_in, scratch, form=recipe.form, backend=recipe.backend, modules=modules)
    computed: dict[str, ScaleSet] = {}
    weights_for: list[tuple] = []  # the weight setting whose FP8 weights are memoised

    def scales_of(config: dict[str, Any]) -> ScaleSet:
        """Whole-model scales of one setting (the layers are selected once per run), asked for
        right before converting with them."""
        _one_weight_setting(weights_for, config)
        key = trial_key(config, [])
        if key not in computed:
            computed[key] = model_scales(measurements, _recipe_for(recipe, config), selection, modules)
        return computed[key]

    baseline_event = log.first("baseline")
    if baseline_event is None:
        t0 = time.monotonic()
        baseline = _baseline(eval_fn(view))
        timings["baseline"] = time.monotonic() - t0
        log.append("baseline", metric=baseline)
    else:
        baseline = baseline_event["metric"]  # checked finite when the log was read
    threshold = _threshold(baseline, tol, hib)

    t0 = time.monotonic()
    measurements = _measurements(work, calib_data, recipe, out, log, progress)
    timings["calibration"] = time.monotonic() - t0
    done = log.finished_trials()
    trials: list[TrialRecord] = []
    bar = _progress(progress, recipe.tuning.max_trials)

    def trial(config: dict[str, Any], fallback: list[str], sensitivity: dict[str, float], method: str = "sqnr") -> TrialRecord:
        key = trial_key(config, fallback)
        if key in done:
            record = done[key]
            record.within_tolerance = _within(record.metric, threshold, hib) if record.status == "ok" else False
        else:
            record = _run_trial(len(trials), swap, eval_fn, scales_of, config, fallback, sensitivity, method,
                                baseline, threshold, hib)
            timings["trials"] += record.duration_s
            log.append("trial", **record.__dict__)
        record.index = len(trials)
        trials.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(metric=record.metric, ok=record.within_tolerance)
        return record

    def budget_left() -> bool:
        timeout = recipe.tuning.timeout_s
        return len(trials) < recipe.tuning.max_trials and (timeout is None or time.monotonic() - started < timeout)

    for config in _search_space(recipe):
        if not budget_left():
            break
        if trial(config, [], {}).within_tolerance:
            break
    fallback_notes: list[str] = []
    if not any(t.within_tolerance for t in trials) and recipe.tuning.layer_fallback and budget_left():
        fallback_notes = _layer_fallback(trial, budget_left, trials, log, work, swap, recipe, scales_of,
                                         first_batch, eval_fn, timings)
    if bar is not None:
        bar.close()
    finishing = time.monotonic()

    chosen = _choose(trials, hib)
    config = chosen.config if chosen else _search_space(recipe)[0]
    fallback = chosen.fallback if chosen else []
    event = dict(log.last("sensitivity") or {})
    sensitivity, method = event.get("sqnr", {}), event.get("method", "sqnr")
    tuned_recipe = _recipe_for(recipe, config)
    scales = _without(scales_of(config), fallback, sensitivity, method)
    # the scratch copy is done with trials: it becomes the result (same as converting a copy of work)
    qmodel = convert(scratch, scales, form=recipe.form, backend=recipe.backend, inplace=True,
                     kv_cache=Op.KV_CACHE in recipe.quantization.ops)
    drop_quantized_weights()  # the result holds its own; the memo would keep them alive with the float weights
    final_sqnr = layer_sqnr(work, qmodel, list(scales.layers), _one_example(first_batch)) if first_batch is not None else {}
    _same_modes(qmodel, model)  # trials ran in eval mode; the result has the user's flags
    report = _report(work, tuned_recipe, measurements, scales, trials, chosen, baseline, threshold, tol, hib,
                     final_sqnr, fallback_notes)
    timings["finish"] = time.monotonic() - finishing
    timings["total"] = time.monotonic() - started
    report.timings = timings
    locked = _locked(tuned_recipe, scales, work is not view, chosen, baseline)
    conversion_result(qmodel).recipe = locked  # ib.save records it
    if out is not None:
        locked.save(out / "locked_recipe.yaml")
        report.save(out / "report")
    return TuneResult(model=qmodel, report=report, recipe=locked, measurements=measurements)


def apply_recipe(model: nn.Module, recipe: Recipe | Path | str, *, example_inputs: Any = None) -> nn.Module:
    """Rebuild a tuned model from a locked recipe: no calibration data, no INC.

    Outputs are ``torch.equal`` to ``autotune``'s ``result.model``. Attention captured during
    tuning is captured again (Hugging Face models need no ``example_inputs``).

    Raises:
        RecipeError: the recipe has no ``locked`` section (only autotune writes one).
    """
    recipe = resolve_recipe(recipe)
    if recipe.locked is None:
        raise RecipeError("locked: this recipe has no locked section; apply_recipe needs a recipe written by autotune")
    work, inplace = model, False
    if recipe.locked.captured_attention and not captured_sites(model):
        work, inplace = copy.deepcopy(model), True
        with eval_mode(work):  # the discovery forward must not update the copy's BatchNorm statistics
            capture_attention(work, example_inputs)
    scales = ScaleSet(layers={}, skipped={**recipe.locked.skipped, **recipe.locked.fallback},
                      format=recipe.quantization.format, target=recipe.quantization.target)
    from .scales import LayerScales

    for name, layer in recipe.locked.scales.items():
        dtype = getattr(torch, layer.hp_dtype)
        weight = None if layer.weight_scale is None else torch.tensor(layer.weight_scale, dtype=dtype)
        scales.layers[name] = LayerScales(
            name, layer.kind, layer.format, layer.fp8_max, dtype,
            tuple(torch.tensor(v, dtype=dtype) for v in layer.input_scales), weight,
        )
    qmodel = convert(work, scales, form=recipe.form, backend=recipe.backend, inplace=inplace,
                     kv_cache=Op.KV_CACHE in recipe.quantization.ops)
    conversion_result(qmodel).recipe = recipe
    return qmodel


# ---------------------------------------------------------------------------------------- steps


def _from_recipe(ref: str | None, key: str) -> Callable:
    if ref is None:
        raise RecipeError(f"{key}: missing; pass it to autotune or name a callable 'package.module:function' in the recipe")
    return resolve_callable(ref, key)


def _with_overrides(recipe: Recipe, tolerable_loss: float | dict | None, max_trials: int | None) -> Recipe:
    tuning = recipe.tuning
    if tolerable_loss is not None:
        tol = Tolerance(relative=float(tolerable_loss)) if isinstance(tolerable_loss, (int, float)) else Tolerance(**tolerable_loss)
        tuning = tuning.model_copy(update={"tolerable_loss": tol})
    if max_trials is not None:
        tuning = tuning.model_copy(update={"max_trials": int(max_trials)})
    return recipe.model_copy(update={"tuning": tuning})


def _eval_view(model: nn.Module) -> nn.Module:
    """The model as autotune runs it: module objects of its own in eval mode, the model's tensors.

    Nothing autotune runs touches the user's modules, so their training flags never change (not
    even for a moment, which another thread would see), and no forward updates BatchNorm statistics.
    A model already entirely in eval mode is its own view (nothing to protect; no copy to pay for).
    """
    if not any(m.training for m in model.modules()):
        return model
    return structural_copy(model).eval()


def _same_modes(target: nn.Module, source: nn.Module) -> None:
    """Give ``target``'s modules the training flags of ``source``'s modules of the same name
    (converted layers and captured attention modules take their parent's)."""
    flags = {name: m.training for name, m in source.named_modules()}
    target.train(source.training)
    for name, module in target.named_modules():
        if name in flags:
            module.training = flags[name]


def _metric(value: Any) -> float:
    """``eval_fn``'s result as a float; ValueError saying what it returned when that is not a
    finite real number (an infinite metric would pass every tolerance; a string or a bool is a bug)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"eval_fn returned a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; "
                             "expected a real number (a float, an int or a one-element tensor)")
        value = value.detach().cpu().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"eval_fn returned a {type(value).__name__} ({shorten(value, 60)}); "
                         "expected a real number (a float, an int or a one-element tensor)")
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        number = math.inf
    if math.isnan(number):
        raise ValueError("eval_fn returned NaN")
    if not math.isfinite(number):
        raise ValueError(f"eval_fn returned {shorten(value, 60)}; expected a finite number")
    return number


def _baseline(value: Any) -> float:
    try:
        return _metric(value)
    except ValueError as exc:
        raise RecipeError(f"evaluation.fn / eval_fn on the float model (the baseline): {exc}; the tolerance "
                          "threshold needs a finite baseline") from None


def _within(metric: float | None, threshold: float, hib: bool) -> bool:
    return metric is not None and (metric >= threshold if hib else metric <= threshold)


def _prepare_model(model: nn.Module, calib_data: CalibData, recipe: Recipe) -> tuple[nn.Module, Any, CalibData]:
    """The model trials convert (a captured copy when attention is tuned) and one calibration batch."""
    calib_data, first = _peek(calib_data)
    if {Op.SDPA, Op.BMM} & set(recipe.quantization.ops) and not captured_sites(model):
        return capture_attention(structural_copy(model), first), first, calib_data
    return model, first, calib_data


def _measurements(work, calib_data, recipe, out: Path | None, log: TrialLog, progress: bool) -> Measurements:
    """Calibrate, or reuse ``measurements.json`` when resuming a run whose log recorded that very
    file (its sha256); a file of another run, or one saved after the log's last line, is redone."""
    import hashlib

    path = out / "measurements.json" if out else None
    recorded = log.last("measurements") if log.resumed else None
    if recorded is not None and path is not None and os.path.lexists(path):
        raw = read_bytes(path, max_bytes=MAX_MEASUREMENTS_BYTES, error=CalibrationError, what="measurements",
                         within=out)
        if hashlib.sha256(raw).hexdigest() == recorded["sha256"]:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CalibrationError(f"{path}: measurements are not UTF-8 text") from None
            return Measurements.from_json(text, origin=str(path))
    if progress and not callable(calib_data):
        from tqdm.auto import tqdm

        calib_data = tqdm(calib_data, desc="calibrating", unit="batch", leave=False)
    measurements = calibrate(work, calib_data, recipe)
    if path is not None:
        measurements.save(path)
        digest = hashlib.sha256(read_bytes(path, max_bytes=MAX_MEASUREMENTS_BYTES, error=CalibrationError,
                                           what="measurements")).hexdigest()
        log.append("measurements", sha256=digest)
    return measurements


def _progress(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="autotune trials", unit="trial")


def _threshold(baseline: float, tol: Tolerance, higher_is_better: bool) -> float:
    allowed = tol.absolute if tol.absolute is not None else abs(baseline) * float(tol.relative)
    threshold = baseline - allowed if higher_is_better else baseline + allowed
    if not math.isfinite(threshold):
        raise RecipeError(f"tuning.tolerable_loss: {shorten(tol.model_dump(exclude_none=True), 80)} with baseline "
                          f"{baseline:.6g} gives a threshold of {threshold}; expected a finite tolerance")
    return threshold


def _search_space(recipe: Recipe) -> list[dict[str, Any]]:
    """Whole-model settings in order: the recipe's own first, then the others with its weight
    setting, then the rest of the product (whose weight settings come in runs, activation innermost),
    so the trials of one weight setting run one after the other."""
    q, s = recipe.quantization, recipe.tuning.search_space
    axes = {
        "format": [v.value for v in (s.format or (q.format,))],
        "weight_granularity": [v.value for v in (s.weight_granularity or (q.weight.granularity,))],
        "weight_scale_method": [v.value for v in (s.weight_scale_method or (q.weight.scale_method,))],
        "activation_scale_method": [v.value for v in (s.activation_scale_method or (q.activation.scale_method,))],
    }
    own = {"format": q.format.value, "weight_granularity": q.weight.granularity.value,
           "weight_scale_method": q.weight.scale_method.value, "activation_scale_method": q.activation.scale_method.value}
    configs = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    rest = [c for c in configs if c != own]
    return [own] + sorted(rest, key=lambda c: _weight_setting(c) != _weight_setting(own))  # stable: runs stay


def _recipe_for(recipe: Recipe, config: dict[str, Any]) -> Recipe:
    q = recipe.quantization
    weight = q.weight.model_copy(update={"granularity": Granularity(config["weight_granularity"]),
                                         "scale_method": ScaleMethod(config["weight_scale_method"])})
    activation = q.activation.model_copy(update={"scale_method": ScaleMethod(config["activation_scale_method"])})
    from .formats import FP8Format

    quant = q.model_copy(update={"format": FP8Format(config["format"]), "weight": weight, "activation": activation})
    return recipe.model_copy(update={"quantization": quant})


def _without(scales: ScaleSet, fallback: list[str], sensitivity: dict[str, float], method: str = "sqnr") -> ScaleSet:
    """The scale set with ``fallback`` layers left in high precision, each with its reason."""
    ranked = sorted(sensitivity, key=sensitivity.get)
    skipped = dict(scales.skipped)
    for name in fallback:
        rank = ranked.index(name) + 1 if name in ranked else None
        value = sensitivity.get(name, math.nan)
        why = f"own output SQNR {value:.1f} dB" if method == "sqnr" else f"metric gain {-value:.4g} when kept in high precision"
        skipped[name] = f"fallback: sensitivity rank {rank} of {len(ranked)} ({why})"
    layers = {n: ls for n, ls in scales.layers.items() if n not in fallback}
    return ScaleSet(layers=layers, skipped=skipped, format=scales.format, target=scales.target)


def _weight_setting(config: dict[str, Any]) -> tuple[str, str, str]:
    """What a setting's FP8 weights depend on."""
    return config["format"], config["weight_granularity"], config["weight_scale_method"]


def _one_weight_setting(current: list[tuple], config: dict[str, Any]) -> None:
    """Drop the memoised FP8 weights when ``config`` needs other ones (trials of one weight setting
    run one after the other), so tuning holds at most one FP8 copy of the weights besides the float
    model. Layer fallback and the final model may go back to an earlier setting: one more pass."""
    setting = _weight_setting(config)
    if current and current[0] != setting:
        drop_quantized_weights()
    current[:] = [setting]


def _run_trial(index, swap, eval_fn, scales_of, config, fallback, sensitivity, method, baseline, threshold,
               hib) -> TrialRecord:
    """Run one trial on the scratch copy (``swap(scales)`` converts it for the evaluation, then
    restores it); returns its record."""
    record = TrialRecord(index=index, config=config, fallback=list(fallback))
    t0 = time.monotonic()
    try:
        scales = _without(scales_of(config), fallback, sensitivity, method)
        with swap(scales) as qmodel:
            metric = _metric(eval_fn(qmodel))
        record.metric = metric
        record.within_tolerance = _within(metric, threshold, hib)
    except Exception as exc:  # recorded with the trial and reported; the run goes on
        record.status = "error"
        record.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    record.duration_s = time.monotonic() - t0
    return record


def _layer_fallback(trial, budget_left, trials, log, work, swap, recipe, scales_of, batch, eval_fn,
                    timings: dict[str, float]) -> list[str]:
    """Keep the most sensitive layers in high precision: exponential search, then bisection."""
    hib = recipe.evaluation.higher_is_better
    best = _choose(trials, hib)
    if best is None:
        return ["layer fallback skipped: every whole-model trial failed"]
    config = best.config
    event = log.last("sensitivity")
    scales = scales_of(config)
    if event is None or event["config"] != config or set(event["sqnr"]) != set(scales.layers):
        t0 = time.monotonic()
        with swap(scales) as qmodel:
            sqnr = layer_sqnr(work, qmodel, list(scales.layers), batch)
        score = {k: (v if math.isfinite(v) else 1e9) for k, v in sqnr.items()}
        if recipe.tuning.sensitivity is Sensitivity.METRIC:
            # leave one out: the metric with only this layer in high precision; a bigger gain = more
            # sensitive, so the score (lower = more sensitive) is the negated gain
            for name in scales.layers:
                with swap(_without(scales, [name], {})) as one:
                    value = eval_fn(one)
                try:
                    gain = _metric(value) - best.metric
                except ValueError:
                    gain = -math.inf  # no usable metric: ranked least sensitive
                score[name] = -(gain if hib else -gain) if math.isfinite(gain) else 1e9
        log.append("sensitivity", config=config, method=recipe.tuning.sensitivity.value, sqnr=score)
        timings["sensitivity"] = time.monotonic() - t0
        event = log.last("sensitivity")
    sensitivity: dict[str, float] = event["sqnr"]
    method = event.get("method", "sqnr")
    order = sorted(sensitivity, key=sensitivity.get)
    lo, hi, k = 0, None, 1
    while hi is None and budget_left():
        k = min(k, len(order))
        if trial(config, order[:k], sensitivity, method).within_tolerance:
            hi = k
        elif k == len(order):
            break
        else:
            lo, k = k, k * 2
    while hi is not None and hi - lo > 1 and budget_left():
        mid = (lo + hi) // 2
        if trial(config, order[:mid], sensitivity, method).within_tolerance:
            hi = mid
        else:
            lo = mid
    if hi is None and budget_left():
        outcome = f"no fallback met the tolerance, not even all {len(order)} layers in high precision"
    elif hi is None:
        outcome = f"stopped before any fallback met the tolerance: {_stop_reason(recipe, trials)}"
    elif hi - lo > 1:
        outcome = (f"{hi} kept in high precision ({_stop_reason(recipe, trials)} before the bisection finished; "
                   "fewer may suffice)")
    else:
        outcome = f"{hi} kept in high precision"
    ranked_by = "own output SQNR" if method == "sqnr" else "leave-one-out metric gain"
    return [f"layer fallback ranked {len(order)} layers by {ranked_by}; {outcome}"]


def _stop_reason(recipe: Recipe, trials: list[TrialRecord]) -> str:
    """Which budget ended the search (called once the budget is spent)."""
    if len(trials) >= recipe.tuning.max_trials:
        return f"tuning.max_trials ({recipe.tuning.max_trials}) reached"
    return f"tuning.timeout_s ({recipe.tuning.timeout_s:g} s) reached"


def _choose(trials: list[TrialRecord], hib: bool) -> TrialRecord | None:
    ok = [t for t in trials if t.status == "ok" and t.metric is not None]
    within = [t for t in ok if t.within_tolerance]
    if within:
        return min(within, key=lambda t: (len(t.fallback), t.index))
    if not ok:
        return None
    return max(ok, key=lambda t: t.metric if hib else -t.metric)


def _locked(recipe: Recipe, scales: ScaleSet, captured: bool, chosen: TrialRecord | None, baseline: float) -> Recipe:
    layers = {}
    for name, ls in scales.layers.items():
        w = ls.weight_scale
        layers[name] = LockedLayer(
            kind=ls.kind, format=ls.format, fp8_max=ls.fp8_max, hp_dtype=dtype_name(ls.hp_dtype),
            input_scales=tuple(float(s) for s in ls.input_scales),
            weight_scale=None if w is None else (float(w) if w.dim() == 0 else tuple(w.tolist())),
        )
    fallback = {n: why for n, why in scales.skipped.items() if why.startswith("fallback")}
    skipped = {n: why for n, why in scales.skipped.items() if n not in fallback}
    locked = Locked(scales=layers, fallback=fallback, skipped=skipped, captured_attention=captured,
                    trial=None if chosen is None else chosen.index,
                    metric=None if chosen is None else chosen.metric, baseline=baseline)
    return recipe.model_copy(update={"locked": locked})


def _saturation(stats, scales) -> float | None:
    fractions = []
    for i, hist in enumerate(stats.input_hist):
        counts = counts_tensor(hist["counts"])
        if i >= len(scales.input_scales) or counts.sum() == 0:
            continue
        clip = float(scales.input_scales[i]) * scales.fp8_max
        lower = torch.arange(counts.numel(), dtype=torch.float64) * (hist["range"] / counts.numel())
        fractions.append(float(counts[lower >= clip].sum() / counts.sum()))
    return max(fractions) if fractions else None


def _report(work, recipe, measurements, scales, trials, chosen, baseline, threshold, tol, hib, sqnr, notes) -> Report:
    import torchao

    from . import __version__, _inc

    rows = []
    for name, ls in scales.layers.items():
        stats = measurements.layers.get(name)
        fmt, wq, aq = recipe.layer_settings(name)
        w = ls.weight_scale
        rows.append(LayerRow(
            name=name, kind=ls.kind.value, quantized=True, source=stats.source.value if stats else None,
            format=fmt.value, granularity=ls.granularity.value if ls.kind.has_weight else None,
            weight_scale_method=wq.scale_method.value if ls.kind.has_weight else None,
            activation_scale_method=None if ls.kind.weight_only else aq.scale_method.value,
            input_amax=list(stats.input_amax) if stats else [], weight_amax=stats.weight_amax if stats else None,
            input_scales=[float(s) for s in ls.input_scales],
            weight_scale_min=None if w is None else float(w.min()), weight_scale_max=None if w is None else float(w.max()),
            saturation=_saturation(stats, ls) if stats else None, sqnr_db=_finite(sqnr.get(name)),
        ))
    for name, why in scales.skipped.items():
        stats = measurements.layers.get(name)
        rows.append(LayerRow(name=name, kind=stats.kind if stats else "-", quantized=False,
                             source=stats.source.value if stats else None, fallback_reason=why,
                             input_amax=list(stats.input_amax) if stats else [],
                             weight_amax=stats.weight_amax if stats else None))
    environment = {
        "python": platform.python_version(), "torch": torch.__version__, "torchao": torchao.__version__,
        "neural_compressor": _inc.inc_version(), "inc_bridge": __version__, "form": recipe.form.value,
        "backend": recipe.backend.value, "device": "cpu", "platform": platform.platform(),
    }
    kind = "absolute" if tol.absolute is not None else "relative"
    value = tol.absolute if tol.absolute is not None else tol.relative
    float_left = [{"name": f.name, "type": f.module_type, "reason": f.reason, "bytes": f.nbytes}
                  for f in float_matrices(work, scales.layers, scales.skipped)]
    return Report(
        baseline_metric=baseline, higher_is_better=hib,
        tolerance={"kind": kind, "value": value, "threshold": threshold},
        goal_met=bool(chosen and chosen.within_tolerance), chosen_trial=None if chosen is None else chosen.index,
        trials=trials, layers=rows, environment=environment,
        final_metric=None if chosen is None else chosen.metric, notes=notes, float_left=float_left,
    )


def _one_example(batch: Any) -> Any:
    """The first example of a batch (every tensor sliced to ``[:1]``) when all share a batch size.

    The report's per-layer SQNR needs one example, not a whole batch; anything else is left as is.
    """
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch.values()) if isinstance(batch, dict) \
        else list(batch) if isinstance(batch, (tuple, list)) else []
    sizes = {t.shape[0] for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1 or next(iter(sizes)) < 2:
        return batch

    def first(t: Any) -> Any:
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    if isinstance(batch, torch.Tensor):
        return first(batch)
    if isinstance(batch, dict):
        return {k: first(v) for k, v in batch.items()}
    return type(batch)(first(t) for t in batch)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None




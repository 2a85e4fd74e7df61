"""``autotune``: calibrate once, try whole-model settings, then fall back layer by layer.

The float baseline is evaluated once and the model is calibrated once; each trial only recomputes
scales from the stored statistics (amax and histograms) and converts. When no whole-model setting
meets the tolerance, layers are ranked (``tuning.sensitivity``: each layer's own output SQNR, or
the metric with only that layer kept in high precision) and the most sensitive are kept in high
precision: 1, 2, 4, ... layers until the metric is within tolerance, then a bisection for the
fewest. Every trial is appended to ``output_dir/trials.jsonl`` as it finishes, so ``resume=True``
continues an interrupted run without redoing finished trials.

``autotune`` resolves its arguments and hands them to ``_Tuner``, one run whose state is spelled
out in ``__init__`` and whose steps are its methods, in the order ``_Tuner.run`` calls them.

The user's model is never run or changed: every forward (baseline, calibration, trials, per-layer
SQNR) runs on autotune's own module objects in eval mode, which share the model's tensors but not
its training flags, so a model in train mode keeps its BatchNorm statistics. ``trials.jsonl`` is
data: its first line fingerprints the model, recipe, tolerance and calibration data, a resumed run
must match it, and the tolerance flags of recorded trials are recomputed, never trusted.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import os
import platform
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _inc
from ._version import __version__
from .calibrate import CalibData, calibrate
from .capture import capture_attention, captured_sites
from .convert import conversion_result, convert, structural_copy, swapped_in
from .coverage import float_matrices
from .errors import CalibrationError, RecipeError
from .experts_scales import ExpertsScales
from .formats import FP8Format, dtype_name
from .measurements import Measurements
from .pipeline import _peek, model_scales
from .recipe import (
    Granularity,
    Locked,
    LockedExperts,
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
from .scales import LayerScales, ScaleSet, counts_tensor, drop_quantized_weights
from .scales import weight_memo as _weight_memo
from .select import Selection, select_layers
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
            recorded run must be of the same model weights, recipe (``max_trials``, ``timeout_s``
            and ``report.formats`` may differ), tolerance and calibration data.
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
    recipe = _with_overrides(resolve_recipe(recipe), tolerable_loss, max_trials)
    eval_fn = eval_fn or _from_recipe(recipe.evaluation.fn, "evaluation.fn")
    if calib_data is None:
        calib_data = _from_recipe(recipe.calibration.source, "calibration.source")()
    out = Path(output_dir) if output_dir is not None else None
    tuner = _Tuner(model, eval_fn, calib_data, recipe, out, resume=resume, progress=progress, started=started)
    return tuner.run()


class _Tuner:
    """One autotune run. Its state is spelled out here, and ``run`` reads as the list of steps:

    ``prepare`` (the eval-mode view, the captured copy, the trial log, the scratch copy) →
    ``evaluate_baseline`` → ``calibrate`` → ``whole_model_trials`` → ``layer_fallback`` (when no
    whole-model setting met the tolerance: ``rank_layers``, then ``search_fallback``) → ``finish``
    (the chosen model, report and locked recipe) → ``save``. ``trial`` runs one trial, or takes it
    from ``trials.jsonl`` when resuming.
    """

    def __init__(self, model: nn.Module, eval_fn: Callable[[nn.Module], Any], calib_data: CalibData, recipe: Recipe,
                 out: Path | None, *, resume: bool, progress: bool, started: float) -> None:
        self.model, self.eval_fn, self.recipe, self.out = model, eval_fn, recipe, out
        self.resume, self.progress, self.started = resume, progress, started
        self.timings = dict.fromkeys(("total", "baseline", "calibration", "trials", "sensitivity", "finish"), 0.0)
        self.tol, self.hib = recipe.tuning.tolerable_loss, recipe.evaluation.higher_is_better
        # the calibration data as given (the fingerprint hashes it) and as calibration reads it
        self.given, self.num_batches = calib_data, recipe.calibration.num_batches
        self.calib_data: CalibData = calib_data
        if self.num_batches and not callable(calib_data):
            self.calib_data = itertools.islice(calib_data, self.num_batches)
        # set by prepare
        self.view: nn.Module  # the model in eval mode (itself when it already is)
        self.work: nn.Module  # what calibration and the float references run: the view, or its captured copy
        self.first_batch: Any = None
        self.log: TrialLog
        self.scratch: nn.Module  # what every trial converts in place and restores (no copy per trial)
        self.selection: Selection  # the layers the recipe selects, selected once per run
        self.modules: dict[str, nn.Module] = {}
        # set by evaluate_baseline and calibrate
        self.baseline = math.nan
        self.threshold = math.nan
        self.measurements: Measurements
        # the trials
        self.computed: dict[str, ScaleSet] = {}  # whole-model scales by setting
        self.weight_setting: tuple[str, str, str] | None = None  # whose FP8 weights the memo holds
        self.done: dict[str, TrialRecord] = {}  # finished trials of a resumed run, by trial_key
        self.trials: list[TrialRecord] = []
        self.notes: list[str] = []
        self.bar: Any = None

    def run(self) -> TuneResult:
        self.prepare()
        self.evaluate_baseline()
        self.calibrate()
        self.bar = _progress(self.progress, self.recipe.tuning.max_trials)
        self.whole_model_trials()
        if not any(t.within_tolerance for t in self.trials) and self.recipe.tuning.layer_fallback and self.budget_left():
            self.layer_fallback()
        if self.bar is not None:
            self.bar.close()
        result = self.finish()
        self.save(result)
        return result

    # ------------------------------------------------------------------------------------ steps

    def prepare(self) -> None:
        """The eval-mode view, the captured copy and first batch, the trial log, the scratch copy."""
        recipe = self.recipe
        self.view = _eval_view(self.model)
        self.work, self.first_batch, self.calib_data = _prepare_model(self.view, self.calib_data, recipe)
        fingerprint = run_fingerprint(self.model, recipe, calibration_digest(self.given, self.num_batches, self.first_batch))
        self.log = TrialLog(self.out / "trials.jsonl" if self.out else None, self.resume, fingerprint)
        self.scratch = structural_copy(self.work)
        self.selection, self.modules = select_layers(self.scratch, recipe.quantization), dict(self.scratch.named_modules())

    def evaluate_baseline(self) -> None:
        """The float model's metric (or the resumed run's) and the threshold it gives."""
        event = self.log.first("baseline")
        if event is None:
            t0 = time.monotonic()
            self.baseline = _baseline(self.eval_fn(self.view))
            self.timings["baseline"] = time.monotonic() - t0
            self.log.append("baseline", metric=self.baseline)
        else:
            self.baseline = event["metric"]  # checked finite when the log was read
        self.threshold = _threshold(self.baseline, self.tol, self.hib)

    def calibrate(self) -> None:
        """Calibrate once, or reuse ``measurements.json`` when resuming a run whose log recorded
        that very file (its sha256); a file of another run, or one saved after the log's last line,
        is redone."""
        import hashlib

        t0 = time.monotonic()
        out, log = self.out, self.log
        path = out / "measurements.json" if out else None
        recorded = log.last("measurements") if log.resumed else None
        measurements = None
        if recorded is not None and path is not None and os.path.lexists(path):
            raw = read_bytes(path, max_bytes=MAX_MEASUREMENTS_BYTES, error=CalibrationError, what="measurements",
                             within=out)
            if hashlib.sha256(raw).hexdigest() == recorded["sha256"]:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise CalibrationError(f"{path}: measurements are not UTF-8 text") from None
                measurements = Measurements.from_json(text, origin=str(path))
        if measurements is None:
            calib_data = self.calib_data
            if self.progress and not callable(calib_data):
                from tqdm.auto import tqdm

                calib_data = tqdm(calib_data, desc="calibrating", unit="batch", leave=False)
            measurements = calibrate(self.work, calib_data, self.recipe)
            if path is not None:
                measurements.save(path)
                digest = hashlib.sha256(read_bytes(path, max_bytes=MAX_MEASUREMENTS_BYTES, error=CalibrationError,
                                                   what="measurements")).hexdigest()
                log.append("measurements", sha256=digest)
        self.measurements = measurements
        self.timings["calibration"] = time.monotonic() - t0
        self.done = log.finished_trials()

    def whole_model_trials(self) -> None:
        """The search space in order, until a setting is within tolerance or the budget is spent."""
        for config in _search_space(self.recipe):
            if not self.budget_left():
                break
            if self.trial(config, [], {}).within_tolerance:
                break

    def layer_fallback(self) -> None:
        """Keep the most sensitive layers of the best setting in high precision."""
        best = _choose(self.trials, self.hib)
        if best is None:
            self.notes.append("layer fallback skipped: every whole-model trial failed")
            return
        sensitivity, method = self.rank_layers(best)
        self.notes.append(self.search_fallback(best.config, sensitivity, method))

    def rank_layers(self, best: TrialRecord) -> tuple[dict[str, float], str]:
        """Each quantized layer's sensitivity score (lower = more sensitive) under ``best``'s
        setting, and how it was measured; taken from the log when a resumed run ranked them."""
        config, recipe = best.config, self.recipe
        event = self.log.last("sensitivity")
        scales = self.scales_of(config)
        if event is None or event["config"] != config or set(event["sqnr"]) != set(scales.layers):
            t0 = time.monotonic()
            with self.swap(scales) as qmodel:
                sqnr = layer_sqnr(self.work, qmodel, list(scales.layers), self.first_batch)
            score = {k: (v if math.isfinite(v) else 1e9) for k, v in sqnr.items()}
            if recipe.tuning.sensitivity is Sensitivity.METRIC:
                # leave one out: the metric with only this layer in high precision; a bigger gain =
                # more sensitive, so the score (lower = more sensitive) is the negated gain
                for name in scales.layers:
                    with self.swap(_without(scales, [name], {})) as one:
                        value = self.eval_fn(one)
                    try:
                        gain = _metric(value) - best.metric
                    except ValueError:
                        gain = -math.inf  # no usable metric: ranked least sensitive
                    score[name] = -(gain if self.hib else -gain) if math.isfinite(gain) else 1e9
            self.log.append("sensitivity", config=config, method=recipe.tuning.sensitivity.value, sqnr=score)
            self.timings["sensitivity"] = time.monotonic() - t0
            event = self.log.last("sensitivity")
        return event["sqnr"], event.get("method", "sqnr")

    def search_fallback(self, config: dict[str, Any], sensitivity: dict[str, float], method: str) -> str:
        """1, 2, 4, ... of the most sensitive layers in high precision until the metric is within
        tolerance, then a bisection for the fewest; returns the report's note on the outcome."""
        order = sorted(sensitivity, key=sensitivity.get)
        lo, hi, k = 0, None, 1
        while hi is None and self.budget_left():
            k = min(k, len(order))
            if self.trial(config, order[:k], sensitivity, method).within_tolerance:
                hi = k
            elif k == len(order):
                break
            else:
                lo, k = k, k * 2
        while hi is not None and hi - lo > 1 and self.budget_left():
            mid = (lo + hi) // 2
            if self.trial(config, order[:mid], sensitivity, method).within_tolerance:
                hi = mid
            else:
                lo = mid
        if hi is None and self.budget_left():
            outcome = f"no fallback met the tolerance, not even all {len(order)} layers in high precision"
        elif hi is None:
            outcome = f"stopped before any fallback met the tolerance: {self.stop_reason()}"
        elif hi - lo > 1:
            outcome = f"{hi} kept in high precision ({self.stop_reason()} before the bisection finished; fewer may suffice)"
        else:
            outcome = f"{hi} kept in high precision"
        ranked_by = "own output SQNR" if method == "sqnr" else "leave-one-out metric gain"
        return f"layer fallback ranked {len(order)} layers by {ranked_by}; {outcome}"

    def finish(self) -> TuneResult:
        """Convert the scratch copy with the chosen trial's scales; the report and locked recipe."""
        finishing = time.monotonic()
        recipe = self.recipe
        chosen = _choose(self.trials, self.hib)
        config = chosen.config if chosen else _search_space(recipe)[0]
        fallback = chosen.fallback if chosen else []
        event = dict(self.log.last("sensitivity") or {})
        sensitivity, method = event.get("sqnr", {}), event.get("method", "sqnr")
        tuned_recipe = _recipe_for(recipe, config)
        scales = _without(self.scales_of(config), fallback, sensitivity, method)
        # the scratch copy is done with trials: it becomes the result (same as converting a copy of work)
        qmodel = convert(self.scratch, scales, form=recipe.form, backend=recipe.backend, inplace=True,
                         kv_cache=Op.KV_CACHE in recipe.quantization.ops)
        drop_quantized_weights()  # the result holds its own; the memo would keep them alive with the float weights
        final_sqnr = (layer_sqnr(self.work, qmodel, list(scales.layers), _one_example(self.first_batch))
                      if self.first_batch is not None else {})
        _same_modes(qmodel, self.model)  # trials ran in eval mode; the result has the user's flags
        report = self.build_report(tuned_recipe, scales, chosen, final_sqnr)
        self.timings["finish"] = time.monotonic() - finishing
        self.timings["total"] = time.monotonic() - self.started
        report.timings = self.timings
        locked = _locked(tuned_recipe, scales, self.work is not self.view, chosen, self.baseline)
        conversion_result(qmodel).recipe = locked  # ib.save records it
        return TuneResult(model=qmodel, report=report, recipe=locked, measurements=self.measurements)

    def save(self, result: TuneResult) -> None:
        """``locked_recipe.yaml`` and ``report/`` (the formats ``report.formats`` lists) in ``output_dir``."""
        if self.out is not None:
            result.recipe.save(self.out / "locked_recipe.yaml")
            result.report.save(self.out / "report", formats=self.recipe.report.formats)

    # ----------------------------------------------------------------------------------- trials

    def trial(self, config: dict[str, Any], fallback: list[str], sensitivity: dict[str, float],
              method: str = "sqnr") -> TrialRecord:
        """One trial: run it, or take its record from the resumed log (its tolerance flag
        recomputed, never trusted); logged, counted and shown on the progress bar."""
        key = trial_key(config, fallback)
        record = self.done.get(key)
        if record is not None:
            record.within_tolerance = _within(record.metric, self.threshold, self.hib) if record.status == "ok" else False
        else:
            record = self.run_trial(config, fallback, sensitivity, method)
            self.timings["trials"] += record.duration_s
            self.log.append("trial", **record.__dict__)
        record.index = len(self.trials)
        self.trials.append(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(metric=record.metric, ok=record.within_tolerance)
        return record

    def run_trial(self, config: dict[str, Any], fallback: list[str], sensitivity: dict[str, float],
                  method: str) -> TrialRecord:
        """Convert the scratch copy for the evaluation (restored afterwards) and evaluate it; an
        exception or a metric that is not a finite number is recorded, and the run goes on."""
        record = TrialRecord(index=len(self.trials), config=config, fallback=list(fallback))
        t0 = time.monotonic()
        try:
            scales = _without(self.scales_of(config), fallback, sensitivity, method)
            with self.swap(scales) as qmodel:
                metric = _metric(self.eval_fn(qmodel))
            record.metric = metric
            record.within_tolerance = _within(metric, self.threshold, self.hib)
        except Exception as exc:  # recorded with the trial and reported; the run goes on
            record.status = "error"
            record.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        record.duration_s = time.monotonic() - t0
        return record

    def scales_of(self, config: dict[str, Any]) -> ScaleSet:
        """Whole-model scales of one setting (the layers are selected once per run), asked for
        right before converting with them.

        The memoised FP8 weights are dropped when ``config`` needs other ones (trials of one weight
        setting run one after the other), so tuning holds at most one FP8 copy of the weights
        besides the float model. Layer fallback and the final model may go back to an earlier
        setting: one more pass.
        """
        setting = _weight_setting(config)
        if self.weight_setting is not None and self.weight_setting != setting:
            drop_quantized_weights()
        self.weight_setting = setting
        key = trial_key(config, [])
        if key not in self.computed:
            self.computed[key] = model_scales(self.measurements, _recipe_for(self.recipe, config), self.selection,
                                              self.modules)
        return self.computed[key]

    def swap(self, scales: ScaleSet) -> AbstractContextManager[nn.Module]:
        """The scratch copy converted with ``scales`` for the block, then restored."""
        return swapped_in(self.scratch, scales, form=self.recipe.form, backend=self.recipe.backend, modules=self.modules)

    def budget_left(self) -> bool:
        timeout = self.recipe.tuning.timeout_s
        return len(self.trials) < self.recipe.tuning.max_trials and (
            timeout is None or time.monotonic() - self.started < timeout)

    def stop_reason(self) -> str:
        """Which budget ended the search (asked once the budget is spent)."""
        tuning = self.recipe.tuning
        if len(self.trials) >= tuning.max_trials:
            return f"tuning.max_trials ({tuning.max_trials}) reached"
        return f"tuning.timeout_s ({tuning.timeout_s:g} s) reached"

    # ----------------------------------------------------------------------------------- report

    def build_report(self, recipe: Recipe, scales: ScaleSet, chosen: TrialRecord | None,
                     sqnr: dict[str, float]) -> Report:
        """The run's report: one row per layer of the result, every trial, the environment."""
        import torchao

        measurements, tol = self.measurements, self.tol
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
                weight_scale_min=None if w is None else float(w.min()),
                weight_scale_max=None if w is None else float(w.max()),
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
                      for f in float_matrices(self.work, scales.layers, scales.skipped)]
        return Report(
            baseline_metric=self.baseline, higher_is_better=self.hib,
            tolerance={"kind": kind, "value": value, "threshold": self.threshold},
            goal_met=bool(chosen and chosen.within_tolerance), chosen_trial=None if chosen is None else chosen.index,
            trials=self.trials, layers=rows, environment=environment,
            final_metric=None if chosen is None else chosen.metric, notes=self.notes, float_left=float_left,
        )


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
    for name, layer in recipe.locked.scales.items():
        dtype = getattr(torch, layer.hp_dtype)
        if layer.experts is not None:
            scales.layers[name] = _experts_scales(name, layer, dtype)
            continue
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
    notes = {n: why for n, why in scales.notes.items() if n in layers}  # e.g. experts no calibration token reached
    return ScaleSet(layers=layers, skipped=skipped, format=scales.format, target=scales.target, notes=notes)


def _weight_setting(config: dict[str, Any]) -> tuple[str, str, str]:
    """What a setting's FP8 weights depend on."""
    return config["format"], config["weight_granularity"], config["weight_scale_method"]


def _choose(trials: list[TrialRecord], hib: bool) -> TrialRecord | None:
    ok = [t for t in trials if t.status == "ok" and t.metric is not None]
    within = [t for t in ok if t.within_tolerance]
    if within:
        return min(within, key=lambda t: (len(t.fallback), t.index))
    if not ok:
        return None
    return max(ok, key=lambda t: t.metric if hib else -t.metric)


def _experts_scales(name: str, layer: LockedLayer, dtype: torch.dtype) -> ExpertsScales:
    """A locked experts layer's ``ExpertsScales`` (the values ``_locked_experts`` wrote, exactly)."""
    ex = layer.experts
    return ExpertsScales(name, layer.kind, layer.format, layer.fp8_max, dtype, (), None,
                         tuple(torch.tensor(v, dtype=dtype) for v in ex.input_scales),
                         tuple(torch.tensor(v, dtype=dtype) for v in ex.weight_scales), ex.fallback, ex.tokens)


def _locked_experts(ls: ExpertsScales) -> LockedExperts:
    return LockedExperts(input_scales=tuple(tuple(t.tolist()) for t in ls.expert_input_scales),
                         weight_scales=tuple(tuple(tuple(r) if isinstance(r, list) else r for r in t.tolist())
                                             for t in ls.expert_weight_scales),
                         fallback=tuple(ls.fallback), tokens=tuple(ls.tokens))


def _locked(recipe: Recipe, scales: ScaleSet, captured: bool, chosen: TrialRecord | None, baseline: float) -> Recipe:
    layers = {}
    for name, ls in scales.layers.items():
        if isinstance(ls, ExpertsScales):
            layers[name] = LockedLayer(kind=ls.kind, format=ls.format, fp8_max=ls.fp8_max,
                                       hp_dtype=dtype_name(ls.hp_dtype), experts=_locked_experts(ls))
            continue
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




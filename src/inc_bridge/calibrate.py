"""``calibrate``: drive INC's FP8 measurement over calibration data and return raw Measurements.

INC's ``prepare`` patches the model it is given in place. To leave the caller's model untouched
without holding a second copy of its weights, INC gets a *structural* copy: new module objects that
share every parameter and buffer with the original (a deep copy whose memo maps each tensor to
itself). INC's dump files go to ``workdir`` or to a temporary directory that is removed afterwards.

Threads: calibrations may run in several threads at once. INC's part (prepare, the calibration
forwards through INC's patched copy, finalize) is serialized under ``_inc``'s lock, because INC keeps
module-level registries and patches shared state; layer selection, reading the dump and building the
Measurements run in parallel. No process-wide state (``tempfile.tempdir``, logger levels) is changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from . import _inc, scratch
from .batches import run_batch
from .convert import structural_copy
from .errors import CalibrationError
from .formats import SUPPORTED_HP_DTYPES, dtype_name
from .inc_files import read_local_dump
from .measurements import LayerStats, Measurements, Source
from .observers import InputObserver, merge_histograms
from .opspecs import ModuleEntry, entry_for
from .recipe import Recipe, resolve_recipe
from .scales import weight_amax_per_channel
from .select import select_layers

CalibData = Union[Iterable[Any], Callable[[nn.Module], Any]]  # noqa: UP007 - runtime alias on 3.10


def calibrate(
    model: nn.Module,
    calib_data: CalibData,
    recipe: Recipe | Path | str | None = None,
    *,
    workdir: Path | str | None = None,
) -> Measurements:
    """Measure ``model`` on ``calib_data`` with INC and return raw per-layer statistics.

    Args:
        model: fp32 or bf16 model; left unchanged (same module types, same parameter tensors).
        calib_data: an iterable of batches (a tensor, a tuple/list of positional arguments, or a
            dict of keyword arguments) or a callable ``run_fn(model)`` that runs the forwards itself.
        recipe: selects the layers to measure (``quantization.ops/include/exclude``) and the format.
        workdir: where INC's dump files go; by default a temporary directory, removed afterwards.
            INC moves dumps it finds there from an earlier run into a ``backup_measure_*`` folder.
    Returns:
        Measurements of every selected layer that ran during calibration.
    Raises:
        CalibrationError: ``calib_data`` that is neither an iterable nor a callable (``None``), no
            batches, a batch of an unsupported type, a failing forward, or NaN/Inf statistics (the
            message names the layer).
        ConversionError: the recipe names a module that cannot be quantized.

    Example:
        >>> meas = calibrate(model, [torch.randn(8, 16) for _ in range(4)])   # doctest: +SKIP
    """
    check_calib_data(calib_data)
    recipe = resolve_recipe(recipe)
    selection = select_layers(model, recipe.quantization)
    if not selection.selected:
        why = "; ".join(f"{name}: {reason}" for name, reason in list(selection.skipped.items())[:3])
        raise CalibrationError(
            "nothing to calibrate: the recipe selects no layer of this model "
            f"({len(selection.skipped)} quantizable layer{'' if len(selection.skipped) == 1 else 's'} skipped"
            + (f": {why}{' ...' if len(selection.skipped) > 3 else ''}" if why else "") + ")"
        )
    modules = dict(model.named_modules())
    entries = {n: entry_for(modules[n]) for n in selection.selected}
    weighted = {n: op for n, op in selection.selected.items() if op.has_weight}
    hp_dtype = _hp_dtype(modules, weighted, entries) if weighted else None
    fmt = recipe.quantization.format
    bins = recipe.calibration.histogram_bins
    observers: dict[str, Any] = {}
    # Weighted layers INC does not patch (transformers' Conv1D, fused experts: an observer of their own;
    # nn.Conv1d: the bridge's InputObserver) are measured by the bridge.
    own_observer = {n for n in weighted if entries[n] is not None
                    and (entries[n].observer is not None or entries[n].spec.bridge_observed)}
    inc_measures = hp_dtype is not None and bool(set(weighted) - own_observer)

    def run_observed(prepared: nn.Module) -> int:
        # INC has patched `prepared` by now; our observers sit on the same (patched) modules.
        for name, op in selection.selected.items():
            if not op.weight_only:
                module = prepared.get_submodule(name)
                if name in own_observer and entries[name].observer is not None:
                    observers[name] = entries[name].observer(module, bins)
                else:
                    observers[name] = InputObserver(module, op.spec.input_positions(module), bins)
        return run(prepared)

    run = _runner(calib_data)
    scratch.remove_stale()  # directories of earlier calibrations that were killed
    with _workdir(workdir) as wd, _inc.inc_session() as private:
        shadow = structural_copy(model).eval()
        try:
            if inc_measures:
                config = _inc.fp8_config(wd, hp_dtype, fmt, config_dir=private)
                num_batches = _inc.measure(shadow, run_observed, config)
            else:  # only layers the bridge measures (captured attention, Conv1D, Conv1d, experts): nothing for INC
                num_batches = run_observed(shadow)
        finally:
            _dismantle(shadow)
            del shadow
        raw = read_local_dump(wd) if inc_measures else Measurements(layers={})
    # What this process saw: name -> (input amax, input histograms, dtype); weight-only layers need none.
    seen: dict[str, tuple[tuple[float, ...], tuple[dict, ...], str | None]] = {}
    own_stats: dict[str, LayerStats] = {}  # layers whose observer gives complete statistics (fused experts)
    for name, op in selection.selected.items():
        if op.weight_only:
            continue
        bridge = not op.has_weight or name in own_observer
        if hasattr(observers[name], "layer_stats"):
            stats = observers[name].layer_stats(name, op.value)
            if stats is not None:
                own_stats[name] = stats
            continue
        amax = observers[name].input_amax() if bridge else (
            raw.layers[name].input_amax if name in raw.layers else ())
        if amax:  # a layer that never ran is reported by compute_scales, by name
            dtype = observers[name].dtype if bridge else hp_dtype
            seen[name] = (amax, observers[name].histograms(), dtype_name(dtype))
    observers.clear()
    if _distributed():
        seen, num_batches = _merge_across_ranks(seen, num_batches)
    layers: dict[str, LayerStats] = {}
    for name, op in selection.selected.items():
        if name in own_stats:
            own_stats[name].check_finite()
            layers[name] = own_stats[name]
            continue
        if name not in seen and not op.weight_only:
            continue
        amax, hists, dtype = seen.get(name, ((), (), dtype_name(hp_dtype) if hp_dtype else None))
        bridge = not op.has_weight or name in own_observer
        stats = LayerStats(name=name, kind=op.value, input_amax=amax, dtype=dtype, input_hist=hists,
                           source=Source.BRIDGE if bridge else Source.INC)
        if op.has_weight:
            per_channel = weight_amax_per_channel(entries[name].weight_of(modules[name]))  # for compute_scales
            stats = dataclasses.replace(stats, weight_amax=float(per_channel.max()),
                                        weight_amax_per_channel=tuple(per_channel.tolist()))
        stats.check_finite()
        layers[name] = stats
    return Measurements(
        layers=layers,
        inc_version=_inc.inc_version(),
        inc_config=_inc.config_record(hp_dtype, fmt) if inc_measures else {},
        num_batches=num_batches if num_batches >= 0 else None,
        ranks=tuple(range(torch.distributed.get_world_size())) if _distributed() else (),
    )


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _merge_across_ranks(seen: dict, num_batches: int) -> tuple[dict, int]:
    """Every rank gets the statistics of all ranks' data: max of amax, sums of (aligned) histograms.

    Each rank calibrated on its own shard; the result equals one process calibrating on all shards.
    """
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (seen, num_batches))
    merged: dict = {}
    for name in sorted({n for part, _ in gathered for n in part}):
        parts = [part[name] for part, _ in gathered if name in part]
        amax = tuple(float(torch.stack([torch.tensor(p[0][i]) for p in parts]).max()) if not any(
            math.isnan(p[0][i]) for p in parts) else math.nan for i in range(len(parts[0][0])))
        hists = tuple(merge_histograms([p[1][i] for p in parts if len(p[1]) > i]) for i in range(len(parts[0][1])))
        merged[name] = (amax, hists, parts[0][2])
    counts = [n for _, n in gathered]
    return merged, (-1 if any(n < 0 for n in counts) else sum(counts))


def _hp_dtype(modules: Mapping[str, nn.Module], selected: Mapping[str, object],
              entries: Mapping[str, ModuleEntry | None]) -> torch.dtype:
    dtypes = {entries[name].weight_of(modules[name]).dtype for name in selected}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_HP_DTYPES:
        raise CalibrationError(
            f"the selected layers have weight dtypes {sorted(map(str, dtypes))}; inc_bridge calibrates models "
            "whose quantized layers are all float32 or all bfloat16"
        )
    return dtypes.pop()


def _dismantle(shadow: nn.Module) -> None:
    """Break the reference cycles INC's patched modules form (each holds its parent and methods
    bound to itself), so the copy, and every float weight it shares, is freed as soon as we drop it
    rather than at the next full ``gc.collect()``, which takes 0.2 s once transformers is imported."""
    for module in list(shadow.modules()):
        module.__dict__.clear()


@contextlib.contextmanager
def _workdir(workdir: Path | str | None) -> Iterator[Path]:
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with scratch.private_dir("calib") as tmp:
        yield tmp


def check_calib_data(calib_data: Any) -> None:
    """Refuse what cannot be calibration data (``None``, a number) before anything else runs.

    Raises:
        CalibrationError: saying what ``calib_data`` may be.
    """
    if calib_data is None or not (callable(calib_data) or isinstance(calib_data, Iterable)):
        raise CalibrationError(
            f"calib_data must be an iterable of batches (tensors, tuples of positional arguments or dicts of "
            f"keyword arguments) or a callable run_fn(model), got {type(calib_data).__name__}"
        )


def _runner(calib_data: CalibData) -> Callable[[nn.Module], int]:
    """A function that runs the calibration forwards and returns the batch count (-1 if unknown)."""

    def run(model: nn.Module) -> int:
        with torch.no_grad():
            if callable(calib_data) and not isinstance(calib_data, (torch.Tensor, Mapping, nn.Module)):
                try:
                    calib_data(model)
                except Exception as exc:
                    raise CalibrationError(f"calibration run_fn failed: {type(exc).__name__}: {exc}") from exc
                return -1
            if isinstance(calib_data, (torch.Tensor, Mapping, str)):
                raise CalibrationError(
                    f"calib_data must be an iterable of batches or a callable, got a single {type(calib_data).__name__}; "
                    "wrap one batch in a list"
                )
            n = 0
            for n, batch in enumerate(calib_data, start=1):
                try:
                    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
                        raise CalibrationError(
                            f"calibration batch {n - 1}: expected a tensor, a tuple of arguments or a dict of "
                            f"keyword arguments, got {type(batch).__name__}"
                        )
                    run_batch(model, batch)
                except CalibrationError:
                    raise
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration forward failed on batch {n - 1}: {type(exc).__name__}: {exc}"
                    ) from exc
            if n == 0:
                raise CalibrationError("calib_data yielded no batches; calibration needs at least one")
            return n

    return run

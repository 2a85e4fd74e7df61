"""The one place that speaks INC: its config strings, its prepare/convert calls, its quirks.

Everything else in inc_bridge uses enums and dataclasses. INC 3.10 on CPU measures FP8 only in QDQ
mode (``use_qdq=True, measure_on_hpu=False``); its ``autotune`` crashes for FP8, so the bridge drives
measurement itself. INC is imported lazily: it is heavy and logs on import.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import FP8Format
from .recipe import Granularity, ScaleMethod

_HP_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_FORMAT = {FP8Format.E4M3: "E4M3", FP8Format.E5M2: "E5M2"}
# The observer is independent of the scale method: measuring with any maxabs method records the
# same raw amax values, from which we recompute every method ourselves.
MEASURE_SCALE_METHOD = "maxabs_arbitrary"


@functools.cache
def inc_version() -> str:
    """The installed INC distribution's version (read from its metadata once per process)."""
    for dist in ("neural-compressor-pt", "neural-compressor"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def inc_scale_method(weight_method: ScaleMethod, weight_granularity: Granularity, act_method: ScaleMethod) -> str | None:
    """INC's name for a (weight, activation) scale-method pair, or None where INC has none."""
    if weight_granularity is Granularity.PER_TENSOR and weight_method is act_method:
        return weight_method.value
    if (weight_granularity, weight_method, act_method) == (
        Granularity.PER_CHANNEL, ScaleMethod.MAXABS_POW2, ScaleMethod.MAXABS_POW2
    ):
        return "act_maxabs_pow2_weights_pcs_maxabs_pow2"
    return None


def fp8_config(dump_dir: Path, hp_dtype: torch.dtype, fmt: FP8Format, scale_method: str = MEASURE_SCALE_METHOD) -> Any:
    """INC's FP8Config for CPU QDQ with dumps under ``dump_dir``.

    ``hp_dtype`` is set to the model's dtype: INC's default bf16 on an fp32 model breaks its own
    Conv2d ("Input type (BFloat16) and bias type (float)") and changes the rounding of scales.
    """
    from neural_compressor.torch.quantization import FP8Config

    if hp_dtype not in _HP_DTYPE:
        raise ValueError(f"INC supports hp_dtype float32 or bfloat16, got {hp_dtype}")
    return FP8Config(
        use_qdq=True,
        measure_on_hpu=False,
        scale_method=scale_method,
        dump_stats_path=str(dump_dir / "measure"),
        hp_dtype=_HP_DTYPE[hp_dtype],
        fp8_config=_FORMAT[fmt],
    )


def config_record(hp_dtype: torch.dtype, fmt: FP8Format) -> dict[str, Any]:
    """The INC options a measurement used, as plain JSON data."""
    return {
        "use_qdq": True,
        "measure_on_hpu": False,
        "scale_method": MEASURE_SCALE_METHOD,
        "observer": "maxabs",
        "hp_dtype": _HP_DTYPE[hp_dtype],
        "fp8_config": _FORMAT[fmt],
    }


@contextlib.contextmanager
def inc_session(lean_observer: bool = True) -> Iterator[None]:
    """Run INC calls with its stray temporary files contained and its logging quieted.

    INC writes its config to ``tempfile.NamedTemporaryFile(delete=False)`` on every ``prepare`` and
    never removes it; pointing ``tempfile`` at a private directory that we remove afterwards keeps
    them out of the system temp dir and out of the caller's workdir. INC logs each step at
    INFO/WARNING; we keep only its errors. ``lean_observer``: see ``_lean_maxabs_observer``.
    """
    from neural_compressor.common.utils.logger import Logger

    Logger()  # INC configures its logger (level INFO) on first use; do it now so our level holds
    saved_tempdir = tempfile.tempdir
    loggers = [logging.getLogger(n) for n in ("neural_compressor", "INC")]
    saved_levels = [lg.level for lg in loggers]
    private = tempfile.TemporaryDirectory(prefix="inc_bridge_inc_")
    tempfile.tempdir = private.name
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with _lean_maxabs_observer() if lean_observer else contextlib.nullcontext():
            yield
    finally:
        tempfile.tempdir = saved_tempdir
        private.cleanup()
        for lg, level in zip(loggers, saved_levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _global_state_restored() -> Iterator[None]:
    """Undo what INC adds to its module-level registries during one prepare/convert.

    INC records every patched module in ``patching_common.parent_child_mod_dict``,
    ``model_configs.IMOD_DICT`` and ``save_files.gmod_list`` and never clears them, which keeps each
    model INC saw (and so its weights) alive for the life of the process and lets one run's entries
    leak into the next.
    """
    from neural_compressor.torch.algorithms.fp8_quant import model_configs
    from neural_compressor.torch.algorithms.fp8_quant._core import patching_common
    from neural_compressor.torch.algorithms.fp8_quant._core.save_measure import save_files

    registries = (patching_common.parent_child_mod_dict, model_configs.IMOD_DICT)
    keys = [set(r) for r in registries]
    n_mods = len(save_files.gmod_list)
    try:
        yield
    finally:
        for registry, before in zip(registries, keys, strict=True):
            for key in set(registry) - before:
                del registry[key]
        del save_files.gmod_list[n_mods:]


@contextlib.contextmanager
def _lean_maxabs_observer() -> Iterator[None]:
    """INC's "maxabs" observer, computing ``max(|x|)`` as ``max(max(x), -min(x))``: the same value
    (NaN and Inf included) without an |x|-sized temporary per weight and per input.

    INC measures every Linear weight with ``torch.max(torch.abs(w))`` at prepare; on a 1B model those
    temporaries fragment the heap by about 0.7× the model's bytes. Registered through INC's own
    ``register_observer`` extension point for the duration of our calls only, then restored.
    """
    from neural_compressor.torch.algorithms.fp8_quant import observer as inc_observer

    base = inc_observer.OBSERVER_TYPES["maxabs"]

    class LeanMaxAbsObserver(base):  # type: ignore[misc, valid-type]
        def update_state(self, x):
            x = x.detach()
            amax = torch.maximum(torch.max(x), torch.min(x).neg())
            self.state.copy_(torch.maximum(amax, self.state))

    inc_observer.OBSERVER_TYPES["maxabs"] = LeanMaxAbsObserver
    try:
        yield
    finally:
        inc_observer.OBSERVER_TYPES["maxabs"] = base


def measure(model: nn.Module, run: Callable[[nn.Module], int], config: Any) -> int:
    """INC prepare → ``run(prepared)`` → finalize_calibration. Patches ``model`` in place.

    Returns the number of batches ``run`` reports (-1: unknown, a user's run function).
    """
    from neural_compressor.torch.quantization import finalize_calibration, prepare

    with _global_state_restored():
        prepared = prepare(model, config)
        n = run(prepared)
        if n != 0:
            finalize_calibration(prepared)
    return n


def inc_qdq_model(model: nn.Module, batches: Iterable[Any], hp_dtype: torch.dtype,
                  scale_method: str = MEASURE_SCALE_METHOD, *, dump_dir: Path | None = None,
                  lean_observer: bool = True) -> nn.Module:
    """INC's own FP8 QDQ model of a deep copy of ``model`` (E4M3): prepare, calibrate on
    ``batches``, finalize, convert. What the bridge is compared with in tests and benchmarks;
    ``lean_observer=False`` runs INC exactly as shipped. Dumps go to ``dump_dir`` or a temporary
    directory."""
    from neural_compressor.torch.quantization import finalize_calibration, prepare

    from .batches import run_batch

    model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="inc_bridge_inc_") as tmp, inc_session(lean_observer=lean_observer):
        config = fp8_config(Path(dump_dir or tmp), hp_dtype, FP8Format.E4M3, scale_method)
        prepared = prepare(model, config)
        with torch.no_grad():
            for batch in batches:
                run_batch(prepared, batch)
        finalize_calibration(prepared)
        return convert_qdq(prepared, config)


def convert_qdq(model: nn.Module, config: Any) -> nn.Module:
    """INC's own ``convert`` of a prepared, calibrated model: the reference QDQ model."""
    from neural_compressor.torch.quantization import convert

    with _global_state_restored():
        return convert(model, config)

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
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import scratch
from .batches import run_batch
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


def fp8_config(dump_dir: Path, hp_dtype: torch.dtype, fmt: FP8Format, scale_method: str = MEASURE_SCALE_METHOD,
               *, config_dir: Path) -> Any:
    """INC's FP8Config for CPU QDQ with dumps under ``dump_dir`` and its JSON copy in ``config_dir``.

    ``hp_dtype`` is set to the model's dtype: INC's default bf16 on an fp32 model breaks its own
    Conv2d ("Input type (BFloat16) and bias type (float)") and changes the rounding of scales.
    INC writes the config to a ``tempfile.NamedTemporaryFile`` it never removes unless ``json_file``
    is set; we write it ourselves into ``config_dir`` (an ``inc_session``'s private directory).
    """
    from neural_compressor.torch.quantization import FP8Config

    if hp_dtype not in _HP_DTYPE:
        raise ValueError(f"INC supports hp_dtype float32 or bfloat16, got {hp_dtype}")
    config = FP8Config(
        use_qdq=True,
        measure_on_hpu=False,
        scale_method=scale_method,
        dump_stats_path=str(dump_dir / "measure"),
        hp_dtype=_HP_DTYPE[hp_dtype],
        fp8_config=_FORMAT[fmt],
    )
    fd, json_file = tempfile.mkstemp(dir=config_dir, prefix="fp8_config_", suffix=".json")
    os.close(fd)
    config.to_json_file(json_file)
    config.json_file = json_file
    return config


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


# INC keeps module-level registries, patches classes and reads one process-wide logger; its
# prepare/calibrate/finalize/convert are not thread-safe. Every INC call of inc_bridge runs inside
# ``inc_session``, which holds this lock: INC work is serialized, everything else runs in parallel.
_LOCK = threading.RLock()
_QUIET_THREADS: set[int] = set()  # threads inside an inc_session: INC's records below ERROR dropped
_SESSION_DIR: list[Path] = []  # the private directory of the session holding _LOCK (innermost last)
_LOGGER_MODULE = "neural_compressor.torch.algorithms.fp8_quant.utils.logger"


class _QuietInSession(logging.Filter):
    """Drops INC's INFO/WARNING records emitted by threads inside an inc_session (others untouched)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.thread not in _QUIET_THREADS


_QUIET = _QuietInSession()


def import_inc() -> None:
    """Import INC's torch parts once, keeping its log file out of ``$HOME``.

    INC's FP8 logger opens ``$HABANA_LOGS/inc_log.txt`` (default ``~/.habana_logs``) when it is
    first imported and appends every message to it. When inc_bridge is the first to import INC and
    the user has not set ``HABANA_LOGS``, the import runs with ``HABANA_LOGS`` pointed at a private
    directory (restored right after, under the INC lock), and that file handler is closed and
    removed. INC's INFO/WARNING records from the importing thread are dropped as in a session
    ("Auto detect accelerator" on import says nothing a user can act on). A user who set
    ``HABANA_LOGS``, or imported INC first, keeps INC's log file as configured.
    """
    with _LOCK:
        thread = threading.get_ident()
        nested = thread in _QUIET_THREADS
        _QUIET_THREADS.add(thread)  # INC logs warnings while its modules import ("Auto detect accelerator")
        try:
            from neural_compressor.common.utils.logger import Logger

            Logger()  # INC sets up its console logger on first use; filter it before INC's torch parts import
            _quiet_inc_loggers()
            fresh = _LOGGER_MODULE not in sys.modules and "HABANA_LOGS" not in os.environ
            if fresh:
                with scratch.private_dir("log") as logs:
                    os.environ["HABANA_LOGS"] = str(logs)
                    try:
                        import neural_compressor.torch.quantization  # noqa: F401
                    finally:
                        del os.environ["HABANA_LOGS"]
                    inc_logger = logging.getLogger("INC")
                    for handler in list(inc_logger.handlers):
                        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(logs):
                            inc_logger.removeHandler(handler)
                            handler.close()
            else:
                import neural_compressor.torch.quantization  # noqa: F401
            _quiet_inc_loggers()  # and the handlers INC's torch parts added
        finally:
            if not nested:
                _QUIET_THREADS.discard(thread)


def _quiet_inc_loggers() -> None:
    for name in ("neural_compressor", "INC"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _QUIET not in target.filters:
                target.addFilter(_QUIET)


class _ConfinedTempfile:
    """Stands in for the ``tempfile`` module inside INC's ``fp8_quant.common`` during a session:
    ``update_mode`` writes its config with ``NamedTemporaryFile(delete=False)`` and never removes it;
    here it lands in the session's private directory, which is removed with the session."""

    def __getattr__(self, name: str) -> Any:
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - tempfile's name
        kwargs["dir"] = str(_SESSION_DIR[-1])
        return tempfile.NamedTemporaryFile(*args, **kwargs)


@contextlib.contextmanager
def inc_session(lean_observer: bool = True) -> Iterator[Path]:
    """Run INC calls serialized, with its stray files confined and its logging quieted.

    Yields a private directory for INC's config files (``fp8_config(config_dir=...)``), removed
    afterwards. No process-wide state changes: ``tempfile.tempdir`` is never touched; INC's own
    ``fp8_quant.common.tempfile`` attribute (its one other use of ``tempfile``) is pointed at the
    private directory while the lock is held, and INC's INFO/WARNING records from this thread are
    dropped by a filter that leaves other threads' records alone. ``lean_observer``: see
    ``_lean_maxabs_observer``.
    """
    import_inc()
    from neural_compressor.torch.algorithms.fp8_quant import common as inc_common

    thread = threading.get_ident()
    with _LOCK, scratch.private_dir("inc") as private:
        saved_tempfile = inc_common.tempfile
        nested = thread in _QUIET_THREADS
        _SESSION_DIR.append(private)
        _QUIET_THREADS.add(thread)
        inc_common.tempfile = _ConfinedTempfile()
        try:
            with _lean_maxabs_observer() if lean_observer else contextlib.nullcontext():
                yield private
        finally:
            inc_common.tempfile = saved_tempfile
            _SESSION_DIR.pop()
            if not nested:
                _QUIET_THREADS.discard(thread)


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


    model = copy.deepcopy(model)
    with inc_session(lean_observer=lean_observer) as private:
        config = fp8_config(Path(dump_dir or private), hp_dtype, FP8Format.E4M3, scale_method, config_dir=private)
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


def quantize_from_dump(model: nn.Module, dump_stats_path: Path, hp_dtype: torch.dtype,
                       scale_method: str = MEASURE_SCALE_METHOD) -> nn.Module:
    """INC's QUANTIZE mode on a deep copy of ``model`` (E4M3, CPU QDQ): no calibration, the scales
    come from the measurement file INC finds for ``dump_stats_path`` (its ``.npz``). INC writes its
    computed scales next to it (``..._hooks_maxabs_<METHOD>.json/.npz``)."""
    from neural_compressor.torch.quantization import FP8Config, convert

    if hp_dtype not in _HP_DTYPE:
        raise ValueError(f"INC supports hp_dtype float32 or bfloat16, got {hp_dtype}")
    model = copy.deepcopy(model)
    with inc_session() as private:
        config = FP8Config(
            mode="QUANTIZE",
            use_qdq=True,
            measure_on_hpu=False,
            scale_method=scale_method,
            dump_stats_path=str(dump_stats_path),
            hp_dtype=_HP_DTYPE[hp_dtype],
            fp8_config=_FORMAT[FP8Format.E4M3],
        )
        fd, json_file = tempfile.mkstemp(dir=private, prefix="fp8_config_", suffix=".json")
        os.close(fd)
        config.to_json_file(json_file)
        config.json_file = json_file
        with _global_state_restored():
            return convert(model, config)


def npz_from_json_dump(json_dir: Path, out_dir: Path) -> None:
    """INC's own script turning measurement JSON files into the ``.npz`` twins its QUANTIZE mode loads
    (``fp8_quant/scripts/postprocessing_vllm_measurements.py``): the reference the tests hold
    ``export_inc_measurements``' own npz against. Writes every measurement JSON of ``json_dir`` and
    its npz to ``out_dir``."""
    with inc_session():
        from neural_compressor.torch.algorithms.fp8_quant.scripts import (
            postprocessing_vllm_measurements as script,
        )

        script.main(["--measurements", str(json_dir), "--out", str(out_dir), "--keep-orig"])

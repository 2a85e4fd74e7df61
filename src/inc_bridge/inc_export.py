"""Writing Measurements as INC's own DynamicRange measurement files, for INC's QUANTIZE mode.

INC 3.10 names its files after ``dump_stats_path`` (a folder plus a file prefix):
``<dump_stats_path>_hooks_maxabs.json`` / ``.npz`` hold the raw amax per node (Mode
"DynamicRange": ``inputs`` as ``[[amax]]`` per input, ``params.weight`` as ``[[amax]]``) and
``<dump_stats_path>_hooks_maxabs_mod_list.json`` lists the patched modules. In QUANTIZE mode INC
loads **only the .npz twin** (``_core/measure.py: load_measurements``, ``np.load(allow_pickle=True)``),
so inc_bridge writes it too, as INC does (``np.savez`` of the same dictionary with float32 arrays).
Writing that pickle is safe; reading one is INC's choice (inc_bridge's own reader, ``inc_npz``,
never builds objects from it). The JSON twin is the same data in plain text.

INC computes weight scales from the weight itself at convert time; the weight amax in the file is
what INC's own measurement records, and inc_bridge writes it so the file reads back completely.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from . import safe_io
from .errors import CalibrationError, SerializationError
from .measurements import LayerStats, Measurements, Source

_OBSERVER = "maxabs"  # the only observer whose statistics Measurements hold
# Layer kinds INC patches on CPU (Linear, Conv2d) with their number of quantized inputs; "unknown" is a
# node read from an INC dump, which INC measured and so can represent as it was.
_INC_KINDS = {"linear": 1, "conv2d": 1}
_FROM_INC_DUMP = "unknown"


def export_inc_measurements(measurements: Measurements, dump_stats_path: Path | str) -> list[Path]:
    """Write ``measurements`` as INC's DynamicRange measurement file and module list.

    Why: a model measured with inc_bridge (also by a distributed calibration, whose Measurements
    hold the statistics of all ranks) can then be quantized by INC itself, e.g. in a Gaudi serving
    stack, with the scales inc_bridge's ``convert`` gives.

    Args:
        measurements: raw statistics from ``ib.calibrate`` (merged over ranks when distributed) or
            ``ib.load_inc_measurements`` of a DynamicRange dump.
        dump_stats_path: the value INC's ``FP8Config(dump_stats_path=...)`` gets: a folder (created
            if missing) and a file prefix, e.g. ``"out/measure"``.
    Returns:
        The files written: ``<dump_stats_path>_hooks_maxabs.json``, its ``.npz`` twin (what INC's
        QUANTIZE mode reads) and ``<dump_stats_path>_hooks_maxabs_mod_list.json``. One file set without a rank suffix and
        with ``GlobalRank``/``LocalRank`` null: the statistics are already merged over ranks and
        every rank quantizes with the same scales (INC processes with a world size above one then
        need ``seperate_measure_files: False``; see docs/inc_interop.md).
    Raises:
        CalibrationError: naming the layer, for what INC's file cannot hold: captured attention
            (``sdpa``/``bmm``) and ``embedding`` layers (INC patches only Linear and Conv2d on CPU),
            finished scales from an INC "Scale" dump (no amax), a weighted layer without a
            per-tensor weight amax, a layer without input statistics or with the wrong number of
            inputs, NaN/Inf values; or no layers at all.
        SerializationError: INC scale files for this prefix already exist (``<prefix>_hooks_maxabs_<METHOD>``:
            INC would reuse them instead of the new statistics), or a file cannot be written.

    Example:
        >>> meas = ib.calibrate(model, batches)                                  # doctest: +SKIP
        >>> ib.export_inc_measurements(meas, "hqt_output/measure")               # doctest: +SKIP
        [PosixPath('hqt_output/measure_hooks_maxabs.json'), PosixPath('hqt_output/measure_hooks_maxabs.npz'), PosixPath('hqt_output/measure_hooks_maxabs_mod_list.json')]
    """
    if not measurements.layers:
        raise CalibrationError("export_inc_measurements: the measurements have no layers")
    nodes = {name: _node(stats) for name, stats in measurements.layers.items()}
    prefix = Path(dump_stats_path)
    if not prefix.name:
        raise SerializationError(f"export_inc_measurements: dump_stats_path {str(prefix)!r} needs a file prefix, "
                                 "e.g. 'hqt_output/measure'")
    base = f"{prefix.name}_hooks_{_OBSERVER}"
    folder = prefix.parent
    _refuse_stale_npz(folder, base)
    document = {"GlobalRank": None, "LocalRank": None, "Mode": "DynamicRange", "Nodes": nodes}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = [
            safe_io.write_atomic(folder / f"{base}.json", json.dumps(document, indent=4, allow_nan=False)),
            safe_io.write_atomic(folder / f"{base}.npz", _npz_bytes(document)),
            safe_io.write_atomic(folder / f"{base}_mod_list.json", json.dumps(list(nodes), indent=4)),
        ]
    except OSError as exc:
        raise SerializationError(f"export_inc_measurements: cannot write to {folder}: {exc}") from exc
    return written


def _node(stats: LayerStats) -> dict:
    """One DynamicRange node: ``{"inputs": [[[amax]], ...], "params": {"weight": [[amax]]}}``."""
    shown = safe_io.shorten(repr(stats.name), 80)
    stats.check_finite(" (export_inc_measurements)")
    if stats.inc_scales is not None:
        raise CalibrationError(
            f"layer {shown}: holds finished scales from an INC 'Scale' dump, not amax values; INC's "
            "DynamicRange file needs the raw amax (load the dump's measure_hooks_maxabs file instead)"
        )
    if stats.source is Source.BRIDGE or (stats.kind not in _INC_KINDS and stats.kind != _FROM_INC_DUMP):
        raise CalibrationError(
            f"layer {shown}: kind {stats.kind!r} is not a layer INC patches on CPU (it patches "
            f"{sorted(_INC_KINDS)}); exclude it from the recipe before calibrating, or drop it from the "
            "measurements"
        )
    want = _INC_KINDS.get(stats.kind)
    if not stats.input_amax or (want is not None and len(stats.input_amax) != want):
        raise CalibrationError(
            f"layer {shown}: has {len(stats.input_amax)} input amax value(s); INC's {stats.kind} node needs "
            f"{want or 'at least 1'} (a layer that never ran in calibration has none)"
        )
    node: dict = {"inputs": [[[float(a)]] for a in stats.input_amax]}
    if stats.weight_amax is None:
        if stats.kind in _INC_KINDS or stats.weight_amax_per_channel is not None:
            what = "only per-channel weight amax" if stats.weight_amax_per_channel is not None else "no weight amax"
            raise CalibrationError(
                f"layer {shown}: has {what}; INC's DynamicRange node stores one per-tensor weight amax "
                "(params.weight)"
            )
    else:
        if stats.weight_amax_per_channel is not None and max(stats.weight_amax_per_channel) != stats.weight_amax:
            raise CalibrationError(
                f"layer {shown}: weight amax {stats.weight_amax} is not the maximum of its per-channel amax "
                f"({max(stats.weight_amax_per_channel)}); the statistics do not describe one weight"
            )
        node["params"] = {"weight": [[float(stats.weight_amax)]]}
    return node


def _npz_bytes(document: dict) -> bytes:
    """The ``.npz`` INC's ``save_npz`` writes for ``document``: ``np.savez`` of the dictionary, every
    value list as a float32 array (INC's list-to-numpy format function, from fp32 tensors)."""
    import numpy as np

    def arrays(value):
        if isinstance(value, dict):
            return {k: arrays(v) for k, v in value.items()}
        return np.array(value, dtype=np.float32)

    nodes = {name: {"inputs": [arrays(i) for i in node["inputs"]], **({"params": arrays(node["params"])}
                                                                        if "params" in node else {})}
             for name, node in document["Nodes"].items()}
    buffer = io.BytesIO()
    np.savez(buffer, {**document, "Nodes": nodes})
    return buffer.getvalue()


def _refuse_stale_npz(folder: Path, base: str) -> None:
    """INC's QUANTIZE mode reuses ``<base>_<METHOD>.json/.npz`` scale files when present: one next to a
    new export would silently replace inc_bridge's statistics with an earlier run's scales."""
    if not folder.is_dir():
        return
    stale = sorted(p.name for p in folder.iterdir()
                   if p.suffix in (".npz", ".json") and p.stem.startswith(f"{base}_") and p.stem != f"{base}_mod_list")
    if stale:
        raise SerializationError(
            f"export_inc_measurements: {folder} already holds INC scale file(s) {stale[:3]} for this prefix; INC's "
            "QUANTIZE mode would reuse them instead of the exported statistics. Export to an empty folder or "
            "remove them"
        )

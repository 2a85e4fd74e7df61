"""Reading INC's measurement dump files (``measure_hooks_maxabs*.json`` / ``.npz``).

INC writes, per run, a DynamicRange file (raw amax per node: ``inputs`` as ``[[amax]]`` and
``params.weight``) and, after ``convert``, a Scale file named after the scale method (finished
scales). Both come as JSON and as ``.npz``. Both are untrusted data: read with size caps, JSON with a
depth bound, the ``.npz`` through ``inc_npz`` (which never lets the file build a numpy object), and
every field is checked for type, shape and value before it becomes a Measurements.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import safe_io
from .errors import CalibrationError
from .inc_npz import MAX_NPZ_BYTES, read_npz
from .measurements import LayerStats, Measurements, Source

MAX_DUMP_BYTES = MAX_NPZ_BYTES  # the JSON twin of an npz dump is about as large
_DYNAMIC_RANGE = "DynamicRange"
_SCALE = "Scale"
# <prefix>_hooks_maxabs[_<METHOD>][_<local_rank>_<world_size>].(json|npz)
_FILE_RE = re.compile(r"^(?P<prefix>.*)_hooks_maxabs(?:_(?P<method>[A-Z][A-Z0-9_]*?))?(?:_(?P<rank>\d+)_(?P<world>\d+))?$")


def load_inc_measurements(path: Path | str) -> Measurements:
    """Read INC's own measurement dump, e.g. one made on Gaudi, into Measurements.

    Args:
        path: a dump file (``.json`` or ``.npz``) or the directory INC wrote to. In a directory the
            DynamicRange file (raw amax) is preferred; a Scale-mode file is used when it is the only
            one, and its finished scales are then used as they are.
    Returns:
        Measurements with ``source = inc_dump`` for every layer.
    Per-rank dumps (``..._hooks_maxabs_<rank>_<world>.json``, written by multi-card runs) are merged
    into one Measurements as optimum-habana's unify step does: the maximum of each amax (or scale)
    over the ranks. ``Measurements.ranks`` lists the ranks found.

    Raises:
        CalibrationError: no dump file, an unreadable or malformed file (the message names the file
            and what is wrong), NaN/Inf values, missing ranks, or ranks whose layer sets differ (the
            message names the layers).

    Example:
        >>> meas = load_inc_measurements("hqt_output")   # doctest: +SKIP
    """
    path = Path(path)
    files = _pick_files(path, all_ranks=True)
    within = path if path.is_dir() else None
    parts = [_parse(_read_any(f, within), f) for f in files.values()]
    if len(parts) == 1:
        return parts[0]
    return _merge_ranks(parts, list(files), path)


def read_local_dump(path: Path) -> Measurements:
    """The one DynamicRange dump INC wrote in ``path`` for this process (any rank suffix)."""
    files = _pick_files(Path(path), all_ranks=False)
    file = next(iter(files.values()))
    return _parse(_read_any(file, Path(path)), file)


def _pick_files(path: Path, all_ranks: bool) -> dict[int, Path]:
    """rank → file (rank 0 for a single-card dump)."""
    if path.exists() and not path.is_dir():  # a FIFO or device is refused when read, not hung on
        return {0: path}
    if not path.is_dir():
        raise CalibrationError(f"{path}: no such file or directory with INC measurement dumps")
    found: dict[tuple[str | None, str | None], list[Path]] = {}
    for f in sorted(path.iterdir()):
        if f.suffix not in (".json", ".npz"):
            continue
        m = _FILE_RE.match(f.stem)
        if not m or f.stem.endswith("_mod_list"):
            continue
        found.setdefault((m["method"], m["rank"]), []).append(f)
    if not found:
        raise CalibrationError(
            f"{path}: no INC measurement file found (expected '<prefix>_hooks_maxabs.json' or '.npz' "
            "as written by INC's finalize_calibration)"
        )
    # DynamicRange (raw amax, no method in the name) is preferred over Scale-mode files.
    methods = {m for (m, _) in found}
    method = None if None in methods else sorted(methods)[0]
    by_rank = {r: files for (m, r), files in found.items() if m == method}

    def best(files: list[Path]) -> Path:  # JSON is plain data; prefer it over the pickled npz
        return next((f for f in files if f.suffix == ".json"), files[0])

    if None in by_rank:
        return {0: best(by_rank[None])}
    picked = {int(r): best(files) for r, files in by_rank.items()}
    if not all_ranks:
        return dict([min(picked.items())])
    worlds = {int(_FILE_RE.match(f.stem)["world"]) for f in picked.values()}
    if len(worlds) != 1 or set(picked) != set(range(next(iter(worlds)))):
        raise CalibrationError(
            f"{path}: per-rank INC dumps are incomplete: found ranks {sorted(picked)} of world size(s) "
            f"{sorted(worlds)}"
        )
    return dict(sorted(picked.items()))


def _merge_ranks(parts: list[Measurements], ranks: list[int], path: Path) -> Measurements:
    names = [set(p.layers) for p in parts]
    union = set().union(*names)
    for rank, have in zip(ranks, names, strict=True):
        if have != union:
            missing = sorted(union - have)
            raise CalibrationError(
                f"{path}: rank {rank} lacks layers the other ranks measured: "
                + ", ".join(safe_io.shorten(n, 80) for n in missing[:10])
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            )
    layers = {}
    for name in parts[0].layers:
        per_rank = [p.layers[name] for p in parts]
        first = per_rank[0]
        shown = safe_io.shorten(repr(name), 80)
        if len({s.inc_scales is None for s in per_rank}) != 1:
            raise CalibrationError(f"{path}: layer {shown} has raw amax on some ranks and finished scales on others")
        if first.inc_scales is not None:
            given = [s.inc_scales for s in per_rank]
            layers[name] = LayerStats(name=name, kind=first.kind, source=Source.INC_DUMP,
                                      inc_scales=_merge_scales(given, shown, path))
            continue
        if len({len(s.input_amax) for s in per_rank}) != 1:
            raise CalibrationError(f"{path}: layer {shown} has a different number of inputs on different ranks")
        weights = [s.weight_amax for s in per_rank if s.weight_amax is not None]
        layers[name] = LayerStats(
            name=name,
            kind=first.kind,
            input_amax=tuple(max(v) for v in zip(*(s.input_amax for s in per_rank), strict=True)),
            weight_amax=max(weights) if weights else None,
            source=Source.INC_DUMP,
        )
    config = dict(parts[0].inc_config)
    config.pop("local_rank", None)
    config["files"] = [p.inc_config.get("file") for p in parts]
    return Measurements(layers=layers, inc_config=config, ranks=tuple(ranks))


def _merge_scales(given: list[dict[str, Any]], shown: str, path: Path) -> dict[str, Any]:
    """The maximum of each finished scale over the ranks, which must agree on the scales' shapes."""
    inputs = [g["inputs"] for g in given]
    weights = [g["weight"] for g in given]
    if len({len(i) for i in inputs}) != 1:
        raise CalibrationError(f"{path}: layer {shown} has a different number of input scales on different ranks")
    kinds = {None if w is None else len(w) if isinstance(w, list) else "tensor" for w in weights}
    if len(kinds) != 1:
        raise CalibrationError(
            f"{path}: layer {shown} has weight scales of different shapes on different ranks "
            f"({', '.join(sorted(map(str, kinds)))}: none, per-tensor or per-channel lengths)"
        )
    weight = (
        [max(v) for v in zip(*weights, strict=True)] if isinstance(weights[0], list)
        else None if weights[0] is None else max(weights)
    )
    return {"inputs": [max(v) for v in zip(*inputs, strict=True)], "weight": weight}


def _read_any(file: Path, within: Path | None = None) -> dict[str, Any]:
    """A dump file's top-level mapping, read with a size cap (FIFOs, devices and links out refused)."""
    if file.suffix == ".npz":
        if within is not None:
            safe_io.check_within(file, within, CalibrationError)
        data = read_npz(file)
    else:
        text = safe_io.read_bytes(file, max_bytes=MAX_DUMP_BYTES, error=CalibrationError,
                                  what="INC measurement file", within=within)
        # INC's json.dump writes NaN/Infinity for a layer that saw them: read them, refuse them by layer
        data = safe_io.loads_json(text, origin=f"{file}: cannot read INC measurement file", error=CalibrationError,
                                  nonfinite=True)
    if not isinstance(data, dict):
        raise CalibrationError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _numbers(value: Any, file: Path, where: str) -> np.ndarray:
    """INC's amax or scale value (a number, nested lists [[a]] or an array) as a flat float64 array."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "fiu":
        raise CalibrationError(f"{file}: {where}: expected numbers, got {safe_io.shorten(value)}")
    if arr.size == 0:
        raise CalibrationError(f"{file}: {where}: empty measurement")
    return arr.astype(np.float64).reshape(-1)


def _amax(value: Any, file: Path, where: str) -> float:
    """INC's scale code takes the max of all values it stored for one tensor."""
    return float(_numbers(value, file, where).max())


def _parse(data: dict[str, Any], file: Path) -> Measurements:
    mode = data.get("Mode")
    nodes = data.get("Nodes")
    if mode not in (_DYNAMIC_RANGE, _SCALE):
        raise CalibrationError(f"{file}: unknown or missing 'Mode' {safe_io.shorten(mode)} (expected DynamicRange or Scale)")
    if not isinstance(nodes, dict):
        raise CalibrationError(f"{file}: 'Nodes' must be a mapping of layer names, got {type(nodes).__name__}")
    layers: dict[str, LayerStats] = {}
    for name, node in nodes.items():
        if not isinstance(name, str):
            raise CalibrationError(f"{file}: 'Nodes' keys must be layer names, got {safe_io.shorten(name)}")
        shown = safe_io.shorten(repr(name), 80)
        if not isinstance(node, dict):
            raise CalibrationError(f"{file}: node {shown}: must be a mapping, got {type(node).__name__}")
        inputs = node.get("inputs", [])
        if not isinstance(inputs, (list, tuple)):
            raise CalibrationError(f"{file}: node {shown}: 'inputs' must be a list")
        params = node.get("params", {})
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise CalibrationError(f"{file}: node {shown}: 'params' must be a mapping")
        if mode == _DYNAMIC_RANGE:
            input_amax = tuple(_amax(v, file, f"node {shown} input {i}") for i, v in enumerate(inputs))
            weight = params.get("weight")
            stats = LayerStats(
                name=name,
                kind="unknown",
                input_amax=input_amax,
                weight_amax=None if weight is None else _amax(weight, file, f"node {shown} weight"),
                source=Source.INC_DUMP,
            )
        else:
            stats = LayerStats(
                name=name,
                kind="unknown",
                source=Source.INC_DUMP,
                inc_scales=_scale_node(shown, inputs, params, file),
            )
        stats.check_finite(f" in {file}")
        layers[name] = stats
    if not layers:
        raise CalibrationError(f"{file}: the dump has no measured layers")
    m = _FILE_RE.match(file.stem)
    method = m["method"] if m and m["method"] else None
    ranks = {k: data.get(k) for k in ("GlobalRank", "LocalRank")}
    for key, rank in ranks.items():
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise CalibrationError(f"{file}: '{key}' must be an integer or null, got {safe_io.shorten(rank)}")
    return Measurements(
        layers=layers,
        inc_config={"mode": mode, "scale_method": method, "file": file.name,
                    "global_rank": ranks["GlobalRank"], "local_rank": ranks["LocalRank"]},
    )


def _scale_node(shown: str, inputs: Any, params: dict[str, Any], file: Path) -> dict[str, Any]:
    """A Scale-mode node's finished scales: positive and finite (INC never writes a zero scale)."""
    in_scales = [_amax(v, file, f"node {shown} input {i} scale") for i, v in enumerate(inputs)]
    weight = params.get("weight")
    if isinstance(weight, dict):  # per-channel: {"0": [N out-channel scales], "1": [K ones]}
        out_ch = weight.get("0", weight.get(0))
        if out_ch is None:
            raise CalibrationError(f"{file}: node {shown}: per-channel weight scale lacks key '0'")
        w: Any = _numbers(out_ch, file, f"node {shown} per-channel weight scale").tolist()
    elif weight is None:
        w = None
    else:
        w = _amax(weight, file, f"node {shown} weight scale")
    for v in in_scales + (w if isinstance(w, list) else [w] if w is not None else []):
        if not math.isfinite(v) or v <= 0:
            raise CalibrationError(f"{file}: node {shown}: scale {v} is not a positive finite number")
    return {"inputs": in_scales, "weight": w}

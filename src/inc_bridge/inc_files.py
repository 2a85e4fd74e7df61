"""Reading INC's measurement dump files (``measure_hooks_maxabs*.json`` / ``.npz``).

INC writes, per run, a DynamicRange file (raw amax per node: ``inputs`` as ``[[amax]]`` and
``params.weight``) and, after ``convert``, a Scale file named after the scale method (finished
scales). Both come as JSON and as ``.npz``. The ``.npz`` holds a pickled object array; we never hand
it to ``pickle`` unrestricted: only numpy's own array-rebuilding classes may be loaded.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CalibrationError
from .measurements import LayerStats, Measurements, Source

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
    Raises:
        CalibrationError: no dump file, an unreadable or malformed file (the message names the file
            and what is wrong), per-rank files (merging them is a later feature), or NaN/Inf values.

    Example:
        >>> meas = load_inc_measurements("hqt_output")   # doctest: +SKIP
    """
    path = Path(path)
    file = _pick_file(path)
    data = _read_any(file)
    return _parse(data, file)


def _pick_file(path: Path) -> Path:
    if path.is_file():
        return path
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
    ranks = sorted({r for (_, r) in found if r is not None})
    if ranks:
        raise CalibrationError(
            f"{path}: found per-rank INC dumps (ranks {', '.join(ranks)}); merging multi-rank measurements "
            "is not supported yet: pass one rank's file"
        )
    key = (None, None) if (None, None) in found else sorted(found, key=str)[0]
    files = found[key]
    # JSON is plain data; prefer it over the pickled npz when both exist.
    return next((f for f in files if f.suffix == ".json"), files[0])


def _read_any(file: Path) -> dict[str, Any]:
    try:
        if file.suffix == ".npz":
            data = _read_npz(file)
        else:
            data = json.loads(file.read_text(encoding="utf-8"))
    except CalibrationError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise CalibrationError(f"{file}: cannot read INC measurement file: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an INC measurement file")


def _read_npz(file: Path) -> Any:
    with zipfile.ZipFile(file) as zf:
        names = zf.namelist()
        if "arr_0.npy" not in names:
            raise CalibrationError(f"{file}: expected 'arr_0.npy' inside the npz, found {names}")
        raw = io.BytesIO(zf.read("arr_0.npy"))
    version = np.lib.format.read_magic(raw)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise CalibrationError(f"{file}: unsupported .npy format version {version} inside the npz")
    shape, _, dtype = readers[version](raw)
    if not dtype.hasobject:
        raise CalibrationError(f"{file}: expected INC's pickled dict inside the npz, got a {dtype} array")
    arr = _NumpyOnlyUnpickler(raw).load()
    if shape != () or not isinstance(arr, np.ndarray):
        raise CalibrationError(f"{file}: expected a single pickled dict inside the npz")
    return arr.item()


def _amax(value: Any, file: Path, where: str) -> float:
    """INC stores amax as nested lists ([[a]]) or arrays; its scale code takes the max of all of them."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CalibrationError(f"{file}: {where}: expected numbers, got {value!r}") from None
    if arr.size == 0:
        raise CalibrationError(f"{file}: {where}: empty measurement")
    return float(arr.max())


def _parse(data: dict[str, Any], file: Path) -> Measurements:
    mode = data.get("Mode")
    nodes = data.get("Nodes")
    if mode not in (_DYNAMIC_RANGE, _SCALE):
        raise CalibrationError(f"{file}: unknown or missing 'Mode' {mode!r} (expected DynamicRange or Scale)")
    if not isinstance(nodes, dict):
        raise CalibrationError(f"{file}: 'Nodes' must be a mapping of layer names, got {type(nodes).__name__}")
    layers: dict[str, LayerStats] = {}
    for name, node in nodes.items():
        if not isinstance(node, dict):
            raise CalibrationError(f"{file}: node {name!r} must be a mapping, got {type(node).__name__}")
        inputs = node.get("inputs", [])
        if not isinstance(inputs, (list, tuple)):
            raise CalibrationError(f"{file}: node {name!r}: 'inputs' must be a list")
        params = node.get("params", {}) or {}
        if not isinstance(params, dict):
            raise CalibrationError(f"{file}: node {name!r}: 'params' must be a mapping")
        if mode == _DYNAMIC_RANGE:
            input_amax = tuple(_amax(v, file, f"node {name!r} input {i}") for i, v in enumerate(inputs))
            weight = params.get("weight")
            stats = LayerStats(
                name=name,
                kind="unknown",
                input_amax=input_amax,
                weight_amax=None if weight is None else _amax(weight, file, f"node {name!r} weight"),
                source=Source.INC_DUMP,
            )
        else:
            stats = LayerStats(
                name=name,
                kind="unknown",
                source=Source.INC_DUMP,
                inc_scales=_scale_node(name, inputs, params, file),
            )
        stats.check_finite(f" in {file}")
        layers[name] = stats
    if not layers:
        raise CalibrationError(f"{file}: the dump has no measured layers")
    m = _FILE_RE.match(file.stem)
    method = m["method"] if m and m["method"] else None
    return Measurements(
        layers=layers,
        inc_config={"mode": mode, "scale_method": method, "file": file.name,
                    "global_rank": data.get("GlobalRank"), "local_rank": data.get("LocalRank")},
    )


def _scale_node(name: str, inputs: Any, params: dict[str, Any], file: Path) -> dict[str, Any]:
    in_scales = [_amax(v, file, f"node {name!r} input {i} scale") for i, v in enumerate(inputs)]
    weight = params.get("weight")
    if isinstance(weight, dict):  # per-channel: {"0": [N out-channel scales], "1": [K ones]}
        out_ch = weight.get("0", weight.get(0))
        if out_ch is None:
            raise CalibrationError(f"{file}: node {name!r}: per-channel weight scale lacks key '0'")
        w: Any = [float(v) for v in np.asarray(out_ch, dtype=np.float64).reshape(-1)]
    elif weight is None:
        w = None
    else:
        w = _amax(weight, file, f"node {name!r} weight scale")
    for v in in_scales + (w if isinstance(w, list) else [w] if w is not None else []):
        if not math.isfinite(v) or v <= 0:
            raise CalibrationError(f"{file}: node {name!r}: scale {v} is not a positive finite number")
    return {"inputs": in_scales, "weight": w}

"""Raw per-layer calibration statistics.

Measurements are kept raw (amax of every input and of the weight, per tensor and per output
channel) so that any scale method, format or target range can be recomputed later without running
calibration again. They serialize to JSON losslessly: every amax is a float32 or bfloat16 value,
which a JSON double holds exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import CalibrationError
from .safe_io import MiB, loads_json, read_bytes, shorten, write_atomic

MEASUREMENTS_FORMAT_VERSION = 1
MAX_MEASUREMENTS_BYTES = 256 * MiB  # per-channel amax and histograms of the largest models fit easily


class Source(str, Enum):
    """Who measured a layer."""

    INC = "inc"  # INC's observers, driven by ib.calibrate
    BRIDGE = "bridge"  # inc_bridge's own observer (captured attention inputs, which INC cannot measure on CPU)
    INC_DUMP = "inc_dump"  # read from INC's dump files (any INC run, e.g. on Gaudi)


@dataclass(frozen=True)
class LayerStats:
    """What calibration saw for one layer.

    ``input_amax`` has one entry per quantized input. ``weight_amax_per_channel`` is per output
    channel (dim 0 of the weight). ``inc_scales`` is set only for INC "Scale"-mode dumps, which carry
    finished scales instead of amax values.
    """

    name: str
    kind: str
    input_amax: tuple[float, ...] = ()
    weight_amax: float | None = None
    weight_amax_per_channel: tuple[float, ...] | None = None
    dtype: str | None = None
    source: Source = Source.INC
    inc_scales: dict[str, Any] | None = None
    input_hist: tuple[dict[str, Any], ...] = ()  # per input: {"range": R, "counts": [...]} of |x| over [0, R)
    # Fused MoE experts (``experts``): tokens routed to each expert, and per matrix (gate_up_proj,
    # down_proj) the amax of each expert's input rows (0 for an expert that got no tokens).
    expert_tokens: tuple[int, ...] = ()
    expert_input_amax: tuple[tuple[float, ...], ...] = ()

    def check_finite(self, where: str = "") -> None:
        """Raise CalibrationError naming this layer if a statistic is NaN or infinite.

        The statistics never change (frozen), so a passed check is remembered: autotune asks for
        every layer on every trial.
        """
        if self.__dict__.get("_finite"):
            return
        values = [*self.input_amax, *(() if self.weight_amax is None else (self.weight_amax,)),
                  *(self.weight_amax_per_channel or ()), *(v for amax in self.expert_input_amax for v in amax)]
        if not all(map(math.isfinite, values)):
            bad = [v for v in values if not math.isfinite(v)]
            raise CalibrationError(
                f"layer {shorten(repr(self.name), 80)}{where}: statistics are not finite ({bad[0]}); the "
                "calibration data produced NaN or Inf values in this layer's inputs or weights"
            )
        if any(v < 0 for v in values):
            raise CalibrationError(
                f"layer {shorten(repr(self.name), 80)}{where}: amax {min(values)} is negative; an amax is a "
                "max(|x|), 0 or more"
            )
        object.__setattr__(self, "_finite", True)


@dataclass
class Measurements:
    """Per-layer statistics plus where they came from (INC version and configuration)."""

    layers: dict[str, LayerStats]
    inc_version: str | None = None
    inc_config: dict[str, Any] = field(default_factory=dict)
    num_batches: int | None = None
    ranks: tuple[int, ...] = ()

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for name, stats in self.layers.items():
            d = asdict(stats)
            d["source"] = stats.source.value
            layers[name] = d
        return {
            "format_version": MEASUREMENTS_FORMAT_VERSION,
            "inc_version": self.inc_version,
            "inc_config": self.inc_config,
            "num_batches": self.num_batches,
            "ranks": list(self.ranks),
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "measurements") -> Measurements:
        """Measurements from ``to_dict``'s data, every field checked: a file is untrusted input.

        Amax values must be finite and >= 0 (0 is an all-zero input or weight; compute_scales gives
        it the smallest scale), INC's finished scales finite and > 0, histogram counts finite and >= 0.

        Raises:
            CalibrationError: naming ``origin``, the layer and the field, with what was expected.
        """
        if not isinstance(data, dict):
            raise CalibrationError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != MEASUREMENTS_FORMAT_VERSION or isinstance(version, bool):
            raise CalibrationError(
                f"{origin}: measurements format_version {shorten(version)} is not supported "
                f"(this inc_bridge reads {MEASUREMENTS_FORMAT_VERSION})"
            )
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, dict):
            raise CalibrationError(f"{origin}: 'layers' must be a mapping of layer name to statistics")
        layers = {name: _layer_from_dict(name, d, origin) for name, d in raw_layers.items()}
        inc_version = data.get("inc_version")
        inc_config = data.get("inc_config") or {}
        num_batches = data.get("num_batches")
        ranks = data.get("ranks") or []
        if inc_version is not None and not isinstance(inc_version, str):
            raise CalibrationError(f"{origin}: 'inc_version' must be a string or null, got {shorten(inc_version)}")
        if not isinstance(inc_config, dict):
            raise CalibrationError(f"{origin}: 'inc_config' must be a mapping, got {type(inc_config).__name__}")
        if num_batches is not None and not (_is_int(num_batches) and num_batches >= 0):
            raise CalibrationError(f"{origin}: 'num_batches' must be a non-negative integer or null, "
                                   f"got {shorten(num_batches)}")
        if not isinstance(ranks, (list, tuple)) or not all(_is_int(r) and r >= 0 for r in ranks):
            raise CalibrationError(f"{origin}: 'ranks' must be a list of non-negative integers, got {shorten(ranks)}")
        return cls(layers=layers, inc_version=inc_version, inc_config=dict(inc_config),
                   num_batches=num_batches, ranks=tuple(ranks))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str = "measurements") -> Measurements:
        data = loads_json(text, origin=origin, error=CalibrationError)
        if not isinstance(data, dict):
            raise CalibrationError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, origin=origin)

    def save(self, path: Path | str) -> Path:
        """Write JSON to ``path`` atomically (a uniquely named sibling renamed into place: two savers
        never share a temporary file, and a crash leaves the old file or the new one)."""
        return write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> Measurements:
        """Read a ``save``d file: a regular file of at most MAX_MEASUREMENTS_BYTES, checked field by field."""
        path = Path(path)
        raw = read_bytes(path, max_bytes=MAX_MEASUREMENTS_BYTES, error=CalibrationError, what="measurements file")
        return cls.from_json(raw, origin=str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _floats(value: Any, where: str, *, positive: bool = False) -> tuple[float, ...]:
    """A list of finite numbers, each >= 0 (``positive``: > 0); CalibrationError naming ``where``."""
    bound = "> 0" if positive else ">= 0"
    if not isinstance(value, (list, tuple)):
        raise CalibrationError(f"{where}: expected a list of finite numbers {bound}, got {shorten(value)}")
    for v in value:
        if not _is_number(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise CalibrationError(f"{where}: expected finite numbers {bound}, got {shorten(v)}")
    return tuple(float(v) for v in value)


def _optional_float(value: Any, where: str, *, positive: bool = False) -> float | None:
    return None if value is None else _floats([value], where, positive=positive)[0]


def _layer_from_dict(name: Any, d: Any, origin: str) -> LayerStats:
    where = f"{origin}: layer {shorten(repr(name), 80)}"
    if not isinstance(d, dict):
        raise CalibrationError(f"{where}: expected a mapping of statistics, got {type(d).__name__}")
    unknown = set(d) - _LAYER_FIELDS
    if unknown:
        raise CalibrationError(f"{where}: unknown fields {shorten(sorted(map(str, unknown)))}")
    if d.get("name") != name:
        raise CalibrationError(f"{where}: 'name' must repeat the layer name, got {shorten(d.get('name'))}")
    kind, dtype = d.get("kind"), d.get("dtype")
    if not isinstance(kind, str):
        raise CalibrationError(f"{where}: 'kind' must be a string, got {shorten(kind)}")
    if dtype is not None and not isinstance(dtype, str):
        raise CalibrationError(f"{where}: 'dtype' must be a string or null, got {shorten(dtype)}")
    try:
        source = Source(d.get("source", Source.INC.value))
    except ValueError:
        raise CalibrationError(f"{where}: 'source' must be one of {[s.value for s in Source]}, "
                               f"got {shorten(d.get('source'))}") from None
    per_ch = d.get("weight_amax_per_channel")
    hists = d.get("input_hist") or []
    if not isinstance(hists, (list, tuple)):
        raise CalibrationError(f"{where}: 'input_hist' must be a list of histograms")
    return LayerStats(
        name=name,
        kind=kind,
        input_amax=_floats(d.get("input_amax", []), f"{where}: 'input_amax'"),
        weight_amax=_optional_float(d.get("weight_amax"), f"{where}: 'weight_amax'"),
        weight_amax_per_channel=None if per_ch is None else _floats(per_ch, f"{where}: 'weight_amax_per_channel'"),
        dtype=dtype,
        source=source,
        inc_scales=_inc_scales(d.get("inc_scales"), f"{where}: 'inc_scales'"),
        input_hist=tuple(_histogram(h, f"{where}: 'input_hist'[{i}]") for i, h in enumerate(hists)),
        **_expert_fields(d, where),
    )


def _expert_fields(d: dict[str, Any], where: str) -> dict[str, Any]:
    """``expert_tokens`` (non-negative integers) and ``expert_input_amax`` (one list per matrix, one
    finite amax >= 0 per expert), consistent with each other."""
    tokens, amax = d.get("expert_tokens") or [], d.get("expert_input_amax") or []
    if not isinstance(tokens, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise CalibrationError(f"{where}: 'expert_tokens' must be a list of non-negative integers, got {shorten(tokens)}")
    if not isinstance(amax, (list, tuple)):
        raise CalibrationError(f"{where}: 'expert_input_amax' must be a list of lists, got {shorten(amax)}")
    per_matrix = tuple(_floats(a, f"{where}: 'expert_input_amax'[{i}]") for i, a in enumerate(amax))
    if any(len(a) != len(tokens) for a in per_matrix) or bool(per_matrix) != bool(tokens):
        raise CalibrationError(f"{where}: 'expert_input_amax' must hold one amax per expert of 'expert_tokens'")
    return {"expert_tokens": tuple(tokens), "expert_input_amax": per_matrix}


def _inc_scales(value: Any, where: str) -> dict[str, Any] | None:
    """INC's finished scales: {"inputs": [s, ...], "weight": s | [s per channel] | null}, each > 0."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"inputs", "weight"}:
        raise CalibrationError(f"{where}: expected {{'inputs': [...], 'weight': ...}}, got {shorten(value)}")
    weight = value["weight"]
    if isinstance(weight, (list, tuple)):
        weight = list(_floats(weight, f"{where}['weight']", positive=True))
    else:
        weight = _optional_float(weight, f"{where}['weight']", positive=True)
    return {"inputs": list(_floats(value["inputs"], f"{where}['inputs']", positive=True)), "weight": weight}


def _histogram(value: Any, where: str) -> dict[str, Any]:
    """{"range": R, "counts": [...]}: R finite and > 0 when there are counts, counts finite and >= 0."""
    if not isinstance(value, dict) or set(value) != {"range", "counts"}:
        raise CalibrationError(f"{where}: expected {{'range': R, 'counts': [...]}}, got {shorten(value)}")
    counts = _floats(value["counts"], f"{where}['counts']")
    hist_range = _optional_float(value["range"], f"{where}['range']", positive=bool(counts))
    if hist_range is None:
        raise CalibrationError(f"{where}['range']: expected a finite number, got null")
    return {"range": hist_range, "counts": list(counts)}


_LAYER_FIELDS = frozenset(f.name for f in fields(LayerStats))

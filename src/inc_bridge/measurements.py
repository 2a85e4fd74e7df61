"""Raw per-layer calibration statistics.

Measurements are kept raw (amax of every input and of the weight, per tensor and per output
channel) so that any scale method, format or target range can be recomputed later without running
calibration again. They serialize to JSON losslessly: every amax is a float32 or bfloat16 value,
which a JSON double holds exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import CalibrationError

MEASUREMENTS_FORMAT_VERSION = 1


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

    def check_finite(self, where: str = "") -> None:
        """Raise CalibrationError naming this layer if a statistic is NaN or infinite.

        The statistics never change (frozen), so a passed check is remembered: autotune asks for
        every layer on every trial.
        """
        if self.__dict__.get("_finite"):
            return
        values = [*self.input_amax, *(() if self.weight_amax is None else (self.weight_amax,)),
                  *(self.weight_amax_per_channel or ())]
        if not all(map(math.isfinite, values)):
            bad = [v for v in values if not math.isfinite(v)]
            raise CalibrationError(
                f"layer {self.name!r}{where}: statistics are not finite ({bad[0]}); the calibration data "
                "produced NaN or Inf values in this layer's inputs or weights"
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
        try:
            version = data.get("format_version")
            if version != MEASUREMENTS_FORMAT_VERSION:
                raise CalibrationError(
                    f"{origin}: measurements format_version {version!r} is not supported "
                    f"(this inc_bridge reads {MEASUREMENTS_FORMAT_VERSION})"
                )
            layers = {}
            for name, d in data["layers"].items():
                per_ch = d.get("weight_amax_per_channel")
                layers[name] = LayerStats(
                    name=str(d["name"]),
                    kind=str(d["kind"]),
                    input_amax=tuple(float(v) for v in d.get("input_amax", ())),
                    weight_amax=None if d.get("weight_amax") is None else float(d["weight_amax"]),
                    weight_amax_per_channel=None if per_ch is None else tuple(float(v) for v in per_ch),
                    dtype=d.get("dtype"),
                    source=Source(d.get("source", Source.INC.value)),
                    inc_scales=d.get("inc_scales"),
                    input_hist=tuple(d.get("input_hist") or ()),
                )
            return cls(
                layers=layers,
                inc_version=data.get("inc_version"),
                inc_config=dict(data.get("inc_config") or {}),
                num_batches=data.get("num_batches"),
                ranks=tuple(data.get("ranks") or ()),
            )
        except CalibrationError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"{origin}: malformed measurements: {type(exc).__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, *, origin: str = "measurements") -> Measurements:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{origin}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CalibrationError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, origin=origin)

    def save(self, path: Path | str) -> Path:
        """Write JSON to ``path`` (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Measurements:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CalibrationError(f"{path}: cannot read measurements: {exc.strerror or exc}") from None
        return cls.from_json(text, origin=str(path))

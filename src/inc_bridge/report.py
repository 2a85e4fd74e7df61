"""Tuning reports: a versioned JSON document, rendered to Markdown and self-contained HTML.

``Report`` is plain data (it round-trips through ``report.json``); ``report_render`` turns it into
``report.md``, ``report.html`` (plots embedded as images) and the plot files themselves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import SerializationError
from .safe_io import write_atomic

REPORT_SCHEMA_VERSION = 2  # 2 added ``timings``; version 1 reports read with none


@dataclass
class TrialRecord:
    """One autotune trial: the settings tried, the layers kept in high precision, the outcome."""

    index: int
    config: dict[str, Any]
    fallback: list[str] = field(default_factory=list)
    metric: float | None = None
    within_tolerance: bool = False
    status: str = "ok"  # "ok" | "error"
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class LayerRow:
    """One layer of the chosen model (quantized or kept in high precision)."""

    name: str
    kind: str
    quantized: bool
    source: str | None = None  # who measured it: "inc" | "bridge" | "inc_dump"
    format: str | None = None
    granularity: str | None = None
    weight_scale_method: str | None = None
    activation_scale_method: str | None = None
    input_amax: list[float] = field(default_factory=list)
    weight_amax: float | None = None
    input_scales: list[float] = field(default_factory=list)
    weight_scale_min: float | None = None
    weight_scale_max: float | None = None
    saturation: float | None = None  # fraction of calibration inputs beyond the FP8 range
    sqnr_db: float | None = None  # the layer's own output SQNR, float input fed to both versions
    fallback_reason: str | None = None


@dataclass
class Report:
    baseline_metric: float
    higher_is_better: bool
    tolerance: dict[str, Any]  # {"kind": "relative"|"absolute", "value": x, "threshold": metric bound}
    goal_met: bool
    chosen_trial: int | None
    trials: list[TrialRecord]
    layers: list[LayerRow]
    environment: dict[str, Any]
    final_metric: float | None = None
    notes: list[str] = field(default_factory=list)
    # wall seconds of this run by phase: total, baseline (float evaluation), calibration, trials
    # (conversions + evaluations), sensitivity (layer fallback's ranking), finish (final model,
    # per-layer SQNR, report); a resumed run counts only what it did itself
    timings: dict[str, float] = field(default_factory=dict)
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "report") -> Report:
        try:
            version = data.get("schema_version")
            if version not in (1, REPORT_SCHEMA_VERSION):
                raise SerializationError(
                    f"{origin}: report schema_version {version!r} is not supported (this inc_bridge reads "
                    f"{REPORT_SCHEMA_VERSION})"
                )
            fields = {**data, "schema_version": REPORT_SCHEMA_VERSION}
            fields["trials"] = [TrialRecord(**t) for t in data["trials"]]
            fields["layers"] = [LayerRow(**row) for row in data["layers"]]
            return cls(**fields)
        except SerializationError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise SerializationError(f"{origin}: malformed report: {type(exc).__name__}: {exc}") from None

    @classmethod
    def load(cls, directory: Path | str) -> Report:
        path = Path(directory) / "report.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SerializationError(f"{path}: cannot read report: {exc}") from None
        return cls.from_dict(data, origin=str(path))

    def save(self, directory: Path | str) -> Path:
        """Write report.json, report.md, report.html and the plots into ``directory``.

        Each file is written to a temporary name and renamed into place, so a crash never leaves a
        half-written report file.
        """
        from .report_render import render_html, render_markdown, render_plots

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        plots = render_plots(self)
        files = {
            "report.json": json.dumps(self.to_dict(), indent=1),
            "report.md": render_markdown(self),
            "report.html": render_html(self, plots),
            **{f"{name}.svg": svg for name, svg in plots.items()},
        }
        for name, text in files.items():
            write_atomic(directory / name, text)
        return directory

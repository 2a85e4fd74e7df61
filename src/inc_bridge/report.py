"""Tuning reports: a versioned JSON document, rendered to Markdown and self-contained HTML.

``Report`` is plain data (it round-trips through ``report.json``); ``report_render`` turns it into
``report.md``, ``report.html`` (plots embedded as images) and the plot files themselves.
``ReportFormat`` names what ``Report.save`` can write; a recipe's ``report.formats`` lists them.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import RecipeError, SerializationError
from .report_formats import ALL_REPORT_FORMATS, ReportFormat
from .report_render import render_html, render_markdown, render_plots
from .safe_io import MiB, loads_json, read_text, shorten, write_atomic

MAX_REPORT_BYTES = 64 * MiB  # thousands of trials and layers fit in a few MB
_T = TypeVar("_T")

REPORT_SCHEMA_VERSION = 3  # 2 added ``timings``, 3 ``float_left``; older reports read with none




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
    # every module of the result still holding a float weight matrix (quantizable or not):
    # {"name", "type", "reason", "bytes"}, as ``conversion_result(model).float_left``
    float_left: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "report") -> Report:
        """A report from parsed JSON; every field is checked against its type (the renderers
        trust them), so a malformed file is a SerializationError naming the field."""
        if not isinstance(data, dict):
            raise SerializationError(f"{origin}: malformed report: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version not in (1, 2, REPORT_SCHEMA_VERSION) or isinstance(version, bool):
            raise SerializationError(
                f"{origin}: report schema_version {shorten(version)} is not supported (this inc_bridge reads "
                f"{REPORT_SCHEMA_VERSION})"
            )
        values = {**data, "schema_version": REPORT_SCHEMA_VERSION}
        for key, record in (("trials", TrialRecord), ("layers", LayerRow)):
            items = values.get(key)
            if not isinstance(items, list):
                raise SerializationError(f"{origin}: malformed report: {key}: expected a list, got {type(items).__name__}")
            values[key] = [typed_record(record, item, f"{origin}: malformed report: {key}[{i}]")
                           for i, item in enumerate(items)]
        report = typed_record(cls, values, f"{origin}: malformed report")
        threshold = report.tolerance.get("threshold")
        if threshold is not None:
            report.tolerance["threshold"] = _check(threshold, float, f"{origin}: malformed report: tolerance.threshold")
        return report

    @classmethod
    def load(cls, directory: Path | str) -> Report:
        """Read ``directory/report.json`` (a regular file of at most 64 MiB, depth-bounded JSON)."""
        path = Path(directory) / "report.json"
        text = read_text(path, max_bytes=MAX_REPORT_BYTES, error=SerializationError, what="report")
        data = loads_json(text, origin=str(path), error=SerializationError)
        return cls.from_dict(data, origin=str(path))

    def save(self, directory: Path | str, formats: Iterable[ReportFormat | str] = ALL_REPORT_FORMATS) -> Path:
        """Write the listed formats into ``directory``: ``report.json``, ``report.md``,
        ``report.html`` and the plots (``<stem>.svg``); all of them by default.

        Each file is written to a temporary name and renamed into place, so a crash never leaves a
        half-written report file. Without ``plots``, ``report.md`` links no plot files (it would
        link files that are not there); ``report.html`` embeds its plots either way.

        Raises:
            RecipeError: a format that is not one of json, md, html, plots.

        Example:
            >>> report.save("out/report", formats=["json", "html"])  # doctest: +SKIP
        """
        wanted = report_formats(formats)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        linked = ReportFormat.PLOTS in wanted
        plots = render_plots(self) if linked or ReportFormat.HTML in wanted else {}
        files = {}
        if ReportFormat.JSON in wanted:
            files["report.json"] = json.dumps(self.to_dict(), indent=1)
        if ReportFormat.MD in wanted:
            files["report.md"] = render_markdown(self, linked_plots=linked)
        if ReportFormat.HTML in wanted:
            files["report.html"] = render_html(self, plots)
        if linked:
            files.update({f"{name}.svg": svg for name, svg in plots.items()})
        for name, text in files.items():
            write_atomic(directory / name, text)
        return directory


def report_formats(formats: Iterable[ReportFormat | str]) -> frozenset[ReportFormat]:
    """``formats`` as ReportFormat members; RecipeError naming the valid ones for anything else."""
    if isinstance(formats, (str, ReportFormat)):
        formats = [formats]  # one name, not its letters
    wanted = set()
    for name in formats:
        try:
            wanted.add(ReportFormat(name.lower() if isinstance(name, str) else name))
        except ValueError:
            valid = ", ".join(f.value for f in ReportFormat)
            raise RecipeError(f"report.formats: {shorten(name, 40)} is not a report format; valid: {valid}") from None
    return frozenset(wanted)


# ------------------------------------------------------------------------- reading records back


def typed_record(cls: type[_T], data: Any, where: str) -> _T:
    """``cls(**data)`` for a dataclass, after checking every value against the field's annotation.

    Reports and trial logs are read back from files anyone can edit: a string metric or a list
    where an object belongs must be a SerializationError here, not a TypeError in a renderer.
    Unknown and missing required fields are refused too.
    """
    if not isinstance(data, dict):
        raise SerializationError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SerializationError(f"{where}: unknown field {shorten(unknown[0])}; expected {sorted(known)}")
    missing = [n for n, f in known.items() if n not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SerializationError(f"{where}: missing field {missing[0]!r}")
    return cls(**{k: _check(v, hints[k], f"{where}: {k}") for k, v in data.items()})


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it has type ``hint`` (ints become floats where a float belongs), else raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not isinstance(value, (bool, int, float))):
        return value  # Any, or a record already built (a report's trials and layers)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg, where)
            except SerializationError:
                continue
        raise SerializationError(f"{where}: expected {_name(hint)}, got {_got(value)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise SerializationError(f"{where}: expected a finite number, got {shorten(value)}")
    elif hint in (int, str, bool):
        if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
            return value
    elif origin is list and isinstance(value, list):
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {k: _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    raise SerializationError(f"{where}: expected {_name(hint)}, got {_got(value)}")


def _name(hint: Any) -> str:
    plain = typing.get_origin(hint) is None and getattr(hint, "__name__", None)
    return plain or str(hint).replace("typing.", "")


def _got(value: Any) -> str:
    return f"{type(value).__name__} {shorten(value, 60)}"

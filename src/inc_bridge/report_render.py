"""Render a ``Report`` as SVG plots, Markdown and one self-contained HTML page.

Everything here builds strings and does no I/O: ``Report.save`` decides where the text goes. The
plots are hand-written SVG so a report needs no plotting library and opens anywhere. Markdown and
HTML are built from the same tables (``_summary``, ``_trials_table``, ``_layers_table``) so the two
documents cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: report.py imports this module to render itself
    from .report import LayerRow, Report, TrialRecord

TITLE = "inc_bridge tuning report"

# File stem -> plot title; also the order of the plots in the HTML page.
PLOT_TITLES = {
    "layer_sqnr": "Per-layer output SQNR",
    "trial_metric": "Metric per trial",
    "amax_scale": "Activation amax and input scale per layer",
}

# ---------------------------------------------------------------------------------------------
# Text: compact numbers and escaping
# ---------------------------------------------------------------------------------------------

# Characters XML 1.0 cannot carry at all (an ANSI colour code in an error message would otherwise
# make the SVG unparseable), plus lone surrogates, which cannot be written as UTF-8.
_UNWRITABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _UNWRITABLE.sub("", str(text))


def _esc(text: Any) -> str:
    """Escape text for SVG and HTML (element content and quoted attributes alike)."""
    return html.escape(_clean(text))


def _num(value: float | None) -> str:
    """A value with the digits that matter; ``-`` for a missing value.

    Four significant digits hide what a tolerance is about (a 0.99998 threshold printed as "1"), so
    a float prints as its shortest exact form when that is short (0.99998) and with six significant
    digits otherwise (0.963889).
    """
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    short = repr(float(value))
    return short if len(short) <= 9 and "e" not in short else f"{value:.6g}"


def _nums(values: Iterable[float]) -> str:
    return ", ".join(_num(v) for v in values) or "-"


def _span(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return "-"
    return _num(lo) if lo == hi else f"{_num(lo)} – {_num(hi)}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{_num(fraction * 100)}%"


def _value(value: Any) -> str:
    """A config or environment value as short text: strings as-is, numbers compact, the rest as JSON."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------------------------------------
# Content shared by Markdown and HTML
# ---------------------------------------------------------------------------------------------


class _Code(str):
    """A table cell holding an identifier (a layer name), set as code in both documents."""


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: frozenset[int]  # right-aligned columns
    row_classes: list[str]  # HTML only: "chosen", "error", "fallback" or ""


def _summary(report: Report) -> list[tuple[str, str]]:
    tol = report.tolerance
    better = "higher" if report.higher_is_better else "lower"
    bound = "lowest" if report.higher_is_better else "highest"
    fp8 = sum(layer.quantized for layer in report.layers)
    return [
        ("Baseline metric", f"{_num(report.baseline_metric)} ({better} is better)"),
        ("Tolerance", f"{tol.get('kind', '-')} {_value(tol.get('value'))}"),
        ("Threshold", f"{_num(tol.get('threshold'))} ({bound} acceptable metric)"),
        ("Final metric", _num(report.final_metric)),
        ("Goal met", _yes_no(report.goal_met)),
        ("Chosen trial", "none" if report.chosen_trial is None else str(report.chosen_trial)),
        ("Layers", f"{fp8} in FP8, {len(report.layers) - fp8} kept in high precision"),
        *([("Time", _timings(report.timings))] if report.timings else []),
    ]


def _timings(timings: dict[str, float]) -> str:
    parts = [f"{key} {value:.2f} s" for key, value in timings.items() if key != "total" and value > 0]
    return f"{timings.get('total', 0.0):.2f} s" + (f" ({', '.join(parts)})" if parts else "")


def _config(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_value(value)}" for key, value in config.items()) or "-"


def _trials_table(report: Report) -> _Table:
    headers = ["#", "Config", "Fallback layers", "Metric", "Within tolerance", "Status", "Time (s)"]
    rows, classes = [], []
    for trial in report.trials:
        chosen = trial.index == report.chosen_trial
        status = trial.status if trial.error is None else f"{trial.status}: {trial.error}"
        rows.append([
            f"{trial.index} (chosen)" if chosen else str(trial.index),
            _config(trial.config),
            str(len(trial.fallback)),
            _num(trial.metric),
            _yes_no(trial.within_tolerance),
            status,
            _num(trial.duration_s),
        ])
        classes.append("chosen" if chosen else "error" if trial.status == "error" else "")
    return _Table(headers, rows, frozenset({0, 2, 3, 6}), classes)


_LAYER_HEADERS = [
    "Layer", "Kind", "Quantized", "Format", "Granularity", "Weight scale method",
    "Activation scale method", "Input amax", "Weight amax", "Input scales", "Weight scale min – max",
    "Saturation", "SQNR (dB)", "Measured by", "Fallback reason",
]  # fmt: skip


def _layer_cells(layer: LayerRow) -> list[str]:
    return [
        _Code(layer.name),
        layer.kind,
        _yes_no(layer.quantized),
        layer.format or "-",
        layer.granularity or "-",
        layer.weight_scale_method or "-",
        layer.activation_scale_method or "-",
        _nums(layer.input_amax),
        _num(layer.weight_amax),
        _nums(layer.input_scales),
        _span(layer.weight_scale_min, layer.weight_scale_max),
        _percent(layer.saturation),
        _num(layer.sqnr_db),
        layer.source or "-",
        layer.fallback_reason or "-",
    ]


def _layers_table(report: Report) -> _Table:
    rows = [_layer_cells(layer) for layer in report.layers]
    classes = ["" if layer.quantized else "fallback" for layer in report.layers]
    return _Table(_LAYER_HEADERS, rows, frozenset({7, 8, 9, 10, 11, 12}), classes)


def _float_left_table(report: Report) -> _Table:
    rows = [[_Code(str(f.get("name", "?"))), str(f.get("type", "?")), _value(f.get("bytes")), str(f.get("reason", ""))]
            for f in report.float_left]
    return _Table(["Module", "Type", "Bytes", "Why it stays in float"], rows, frozenset({2}), [""] * len(rows))


def _float_left_heading(report: Report) -> str:
    total = sum(f.get("bytes", 0) for f in report.float_left if isinstance(f.get("bytes"), int))
    n = len(report.float_left)
    return f"Left in high precision ({n} module{'' if n == 1 else 's'} with weight matrices, {total} bytes)"


def _environment(report: Report) -> list[tuple[str, str]]:
    return [(str(key), _value(value)) for key, value in report.environment.items()]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*<>&|\[\]])")


def _md(text: Any) -> str:
    """Free text for Markdown: one line, with the characters that would start markup escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(_clean(text).split()))


def _md_cell(cell: str) -> str:
    if isinstance(cell, _Code) and "`" not in cell:
        # A code span shows `<` and `&` literally; only the table's `|` needs escaping (GFM).
        return "`" + " ".join(_clean(cell).split()).replace("|", "\\|") + "`"
    return _md(cell)


def _md_table(table: _Table) -> list[str]:
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.headers))]
    lines = ["| " + " | ".join(_md(h) for h in table.headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _md_items(items: list[tuple[str, str]]) -> list[str]:
    return [f"- **{_md(key)}:** {_md(value)}" for key, value in items]


def render_markdown(report: Report, *, linked_plots: bool = True) -> str:
    """Render the report as a Markdown document (GitHub-flavoured tables).

    The plots are linked as the ``<stem>.svg`` files ``Report.save`` writes next to ``report.md``.

    Args:
        report: the report to render.
        linked_plots: link the plot files; False when they are not written (the report's formats
            leave out ``plots``), so the document links nothing missing.

    Returns:
        The Markdown text, ending with a newline.

    Example:
        >>> Path("report.md").write_text(render_markdown(report))  # doctest: +SKIP
    """
    trials = _trials_table(report)
    layers = _layers_table(report)
    lines = [f"# {TITLE}", "", "## Summary", "", *_md_items(_summary(report)), "", "## Plots", ""]
    if linked_plots:
        lines += [f"![{_md(title)}]({stem}.svg)" for stem, title in PLOT_TITLES.items()]
    else:
        lines += ["_Plot files not written (`report.formats` leaves out `plots`); `report.html` embeds them._"]
    lines += ["", "## Trials", "", *(_md_table(trials) if trials.rows else ["_No trials._"])]
    lines += ["", "## Layers", "", *(_md_table(layers) if layers.rows else ["_No layers._"])]
    left = _float_left_table(report)
    lines += ["", f"## {_float_left_heading(report)}", "", *(_md_table(left) if left.rows else ["_None._"])]
    lines += ["", "## Notes", "", *([f"- {_md(note)}" for note in report.notes] or ["_None._"])]
    lines += ["", "## Environment", "", *(_md_items(_environment(report)) or ["_Not recorded._"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { margin: 0; background: #f4f5f7; color: #1f2328;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1440px; margin: 0 auto; padding: 28px 36px 48px; background: #fff; }
h1 { font-size: 1.8em; margin: 0 0 .4em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .6em; padding-bottom: .25em; border-bottom: 1px solid #d8dee4; }
.status { display: inline-block; padding: .3em .9em; border-radius: 6px; font-weight: 600; }
.met { background: #e6f4ea; color: #1a6b32; border: 1px solid #a6d8b4; }
.missed { background: #fdecea; color: #a3231a; border: 1px solid #f1b0aa; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8dee4; padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: #f0f2f5; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.chosen td { background: #eaf2ff; font-weight: 600; }
tr.error td { color: #a3231a; }
tr.fallback td { color: #6e7781; }
table.layers td:first-child { white-space: nowrap; }
table.layers td:last-child { min-width: 18em; }
table.kv th { background: none; font-weight: 600; white-space: nowrap; }
td.met { color: #1a6b32; font-weight: 700; }
td.missed { color: #a3231a; font-weight: 700; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f3f4f6;
       padding: 0 3px; border-radius: 3px; }
figure { margin: 0 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e7eb; border-radius: 4px; }
figcaption { color: #57606a; font-size: 13px; }
.empty { color: #57606a; font-style: italic; }
"""


def _html_cell(cell: str, numeric: bool) -> str:
    text = f"<code>{_esc(cell)}</code>" if isinstance(cell, _Code) else _esc(cell)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def _html_table(table: _Table, css_class: str, empty: str) -> str:
    if not table.rows:
        return f'<p class="empty">{_esc(empty)}</p>'
    head = "".join(f"<th>{_esc(h)}</th>" for h in table.headers)
    rows = []
    for row, cls in zip(table.rows, table.row_classes, strict=True):
        cells = "".join(_html_cell(cell, i in table.numeric) for i, cell in enumerate(row))
        rows.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    body = "\n".join(rows)
    return f'<div class="scroll"><table class="{css_class}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _html_items(items: list[tuple[str, str]], empty: str, classes: dict[str, str] | None = None) -> str:
    """A key/value table; ``classes`` gives the value cell of some keys a CSS class."""
    if not items:
        return f'<p class="empty">{_esc(empty)}</p>'
    rows = []
    for key, value in items:
        cls = (classes or {}).get(key)
        td = f'<td class="{cls}">' if cls else "<td>"
        rows.append(f"<tr><th>{_esc(key)}</th>{td}{_esc(value)}</td></tr>")
    return '<table class="kv">\n' + "\n".join(rows) + "\n</table>"


def _html_figure(stem: str, svg: str) -> str:
    title = PLOT_TITLES.get(stem, stem)
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (
        f'<figure><img src="data:image/svg+xml;base64,{data}" alt="{_esc(title)} (plot)">'
        f"<figcaption>{_esc(title)} — <code>{_esc(stem)}.svg</code></figcaption></figure>"
    )


def render_html(report: Report, plots: dict[str, str]) -> str:
    """Render the report as one self-contained HTML5 page (inline CSS, plots as data URIs).

    Args:
        report: the report to render.
        plots: SVG documents keyed by file stem, as returned by ``render_plots``.

    Returns:
        The HTML text.

    Example:
        >>> page = render_html(report, render_plots(report))  # doctest: +SKIP
    """
    status = "met" if report.goal_met else "missed"
    notes = "".join(f"<li>{_esc(note)}</li>" for note in report.notes)
    figures = [_html_figure(stem, svg) for stem, svg in plots.items()]
    body = [
        f"<h1>{_esc(TITLE)}</h1>",
        f'<p><span class="status {status}">Goal {status}</span>&nbsp; final metric '
        f"{_esc(_num(report.final_metric))}, threshold {_esc(_num(report.tolerance.get('threshold')))}, "
        f"baseline {_esc(_num(report.baseline_metric))}</p>",
        "<h2>Summary</h2>", _html_items(_summary(report), "", {"Goal met": status}),
        "<h2>Plots</h2>", *(figures or ['<p class="empty">No plots.</p>']),
        "<h2>Trials</h2>", _html_table(_trials_table(report), "trials", "No trials."),
        "<h2>Layers</h2>", _html_table(_layers_table(report), "layers", "No layers."),
        f"<h2>{_esc(_float_left_heading(report))}</h2>", _html_table(_float_left_table(report), "float-left", "None."),
        "<h2>Notes</h2>", f"<ul>{notes}</ul>" if notes else '<p class="empty">None.</p>',
        "<h2>Environment</h2>", _html_items(_environment(report), "Not recorded."),
    ]  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(TITLE)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------
# SVG primitives
# ---------------------------------------------------------------------------------------------

_FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
_CHAR_W = 7.0  # rough width of a 12 px character: enough to lay labels out without overlap
_ROW_H = 22  # one layer per row in the per-layer charts
_PLOT_W = 520  # width of the plotting area
_TOP, _BOTTOM = 66, 50  # room for title + legend above, tick labels + axis title below
_MAX_LABEL = 48  # longer layer names are shortened from the left (the end is the distinctive part)
_BLUE, _ORANGE, _GREEN, _RED, _GREY, _INK = "#3b6ea8", "#e08a00", "#2e7d32", "#c62828", "#8c959f", "#24292f"


def _f(v: float) -> str:
    return f"{v:.1f}"


def _tip(tip: str | None) -> str:
    return f"<title>{_esc(tip)}</title>" if tip else ""


def _shape(tag: str, attrs: str, tip: str | None = None) -> str:
    return f"<{tag} {attrs}>{_tip(tip)}</{tag}>" if tip else f"<{tag} {attrs}/>"


def _text(x: float, y: float, text: str, *, anchor: str = "start", size: int = 12,
          color: str = _INK, bold: bool = False, tip: str | None = None) -> str:  # fmt: skip
    weight = ' font-weight="bold"' if bold else ""
    return (
        f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}" font-size="{size}" fill="{color}"{weight}>'
        f"{_esc(text)}{_tip(tip)}</text>"
    )


def _line(x1: float, y1: float, x2: float, y2: float, color: str, *, width: float = 1,
          dash: str | None = None) -> str:  # fmt: skip
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" stroke="{color}" '
        f'stroke-width="{width}"{dashed}/>'
    )


def _rect(x: float, y: float, w: float, h: float, color: str, tip: str | None = None) -> str:
    return _shape("rect", f'x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(h)}" fill="{color}"', tip)


def _dot(x: float, y: float, color: str, tip: str | None = None) -> str:
    return _shape("circle", f'cx="{_f(x)}" cy="{_f(y)}" r="4.5" fill="{color}"', tip)


def _ring(x: float, y: float, color: str = _INK, tip: str | None = None) -> str:
    attrs = f'cx="{_f(x)}" cy="{_f(y)}" r="8" fill="none" stroke="{color}" stroke-width="1.5"'
    return _shape("circle", attrs, tip)


def _square(x: float, y: float, color: str, tip: str | None = None) -> str:
    return _rect(x - 4, y - 4, 8, 8, color, tip)


def _cross(x: float, y: float, color: str, tip: str | None = None) -> str:
    d = f"M{_f(x - 5)} {_f(y - 5)}L{_f(x + 5)} {_f(y + 5)}M{_f(x - 5)} {_f(y + 5)}L{_f(x + 5)} {_f(y - 5)}"
    return _shape("path", f'd="{d}" stroke="{color}" stroke-width="2.5"', tip)


def _dash(x: float, y: float, color: str, dash: str | None = None) -> str:
    return _line(x - 9, y, x + 9, y, color, width=2, dash=dash)


_Marker = Callable[[float, float], str]


def _legend(entries: list[tuple[_Marker, str]], x: float, y: float) -> list[str]:
    out = []
    for marker, label in entries:
        out += [marker(x + 9, y - 4), _text(x + 24, y, label)]
        x += 24 + len(label) * _CHAR_W + 20
    return out


def _svg_document(width: float, height: float, title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" height="{_f(height)}" '
        f'viewBox="0 0 {_f(width)} {_f(height)}" font-family="{_FONT}">\n'
        f"<title>{_esc(title)}</title>\n"
        f'<rect width="100%" height="100%" fill="white"/>\n'
        f"{_text(width / 2, 26, title, anchor='middle', size=16, bold=True)}\n" + "\n".join(body) + "\n</svg>\n"
    )


def _no_data_svg(title: str) -> str:
    return _svg_document(520, 110, title, [_text(260, 70, "no data", anchor="middle", size=14, color=_GREY)])


# ---------------------------------------------------------------------------------------------
# Axes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """A value range mapped onto pixels. On a log axis ``lo``/``hi`` are decades (powers of ten)."""

    lo: float
    hi: float
    step: float  # tick spacing, in value units (linear) or decades (log)
    log: bool

    def frac(self, value: float) -> float:
        if math.isnan(value):
            return 0.0
        if self.log:
            value = math.log10(value) if value > 0 else -math.inf
        return min(max((value - self.lo) / (self.hi - self.lo), 0.0), 1.0)

    def pos(self, value: float, start: float, end: float) -> float:
        return start + self.frac(value) * (end - start)

    def ticks(self) -> list[float]:
        first, last = round(self.lo / self.step), round(self.hi / self.step)
        return [k * self.step for k in range(first, last + 1)]  # k * step keeps 0 exactly 0

    def labelled_ticks(self) -> list[tuple[float, str]]:
        if not self.log:
            return [(t, _num(t)) for t in self.ticks()]
        return [(10.0**e, _num(10.0**e) if -3 <= e <= 3 else f"1e{e:.0f}") for e in self.ticks()]


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _linear_axis(values: Iterable[float | None], pad: float = 0.0) -> _Axis:
    finite = _finite(values)
    lo, hi = min(finite, default=0.0), max(finite, default=1.0)
    if lo == hi:
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    lo, hi = lo - pad * (hi - lo), hi + pad * (hi - lo)
    step = _nice_step((hi - lo) / 5)
    return _Axis(math.floor(lo / step) * step, math.ceil(hi / step) * step, step, log=False)


def _log_axis(values: Iterable[float | None]) -> _Axis:
    positive = [v for v in _finite(values) if v > 0] or [1.0]
    lo = math.floor(math.log10(min(positive)))
    hi = max(math.ceil(math.log10(max(positive))), lo + 1)
    step = math.ceil((hi - lo) / 10)  # a tick every decade unless there are more than ten
    return _Axis(math.floor(lo / step) * step, math.ceil(hi / step) * step, step, log=True)


def _auto_axis(values: Iterable[float | None], pad: float = 0.0) -> _Axis:
    """Log scale when every value is positive and they span two decades or more, else linear."""
    finite = _finite(values)
    if finite and min(finite) > 0 and max(finite) >= 100 * min(finite):
        return _log_axis(finite)
    return _linear_axis(finite, pad)


def _x_axis(axis: _Axis, left: float, right: float, top: float, bottom: float, title: str) -> list[str]:
    out = []
    for value, label in axis.labelled_ticks():
        x = axis.pos(value, left, right)
        out += [_line(x, top, x, bottom, "#e5e7eb"), _text(x, bottom + 16, label, anchor="middle")]
    out.append(_line(left, bottom, right, bottom, "#57606a"))
    out.append(_text((left + right) / 2, bottom + 38, title, anchor="middle", bold=True))
    return out


def _y_axis(axis: _Axis, left: float, right: float, top: float, bottom: float, title: str) -> list[str]:
    out = []
    for value, label in axis.labelled_ticks():
        y = axis.pos(value, bottom, top)
        out += [_line(left, y, right, y, "#e5e7eb"), _text(left - 6, y + 4, label, anchor="end")]
    out.append(_line(left, top, left, bottom, "#57606a"))
    mid = (top + bottom) / 2
    out.append(
        f'<text x="16" y="{_f(mid)}" text-anchor="middle" font-size="12" font-weight="bold" fill="{_INK}" '
        f'transform="rotate(-90 16 {_f(mid)})">{_esc(title)}</text>'
    )
    return out


@dataclass(frozen=True)
class _Rows:
    """Layout of a chart with one row per layer: names on the left, values along the x axis."""

    names: list[str]
    right_margin: float = 80

    @property
    def left(self) -> float:
        return min(max(len(name) for name in self.names), _MAX_LABEL) * _CHAR_W + 20

    @property
    def right(self) -> float:
        return self.left + _PLOT_W

    @property
    def bottom(self) -> float:
        return _TOP + len(self.names) * _ROW_H

    def y(self, i: int) -> float:
        return _TOP + (i + 0.5) * _ROW_H

    def label(self, i: int) -> str:
        name = self.names[i]
        short = name if len(name) <= _MAX_LABEL else "…" + name[-(_MAX_LABEL - 1) :]
        return _text(self.left - 8, self.y(i) + 4, short, anchor="end", tip=name)

    def document(self, title: str, body: list[str]) -> str:
        return _svg_document(self.right + self.right_margin, self.bottom + _BOTTOM, title, body)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _sqnr_row(layer: LayerRow, axis: _Axis, rows: _Rows, i: int) -> list[str]:
    y, zero = rows.y(i), axis.pos(0.0, rows.left, rows.right)
    if layer.sqnr_db is not None and not math.isnan(layer.sqnr_db):
        end = axis.pos(layer.sqnr_db, rows.left, rows.right)
        label = f"{_num(layer.sqnr_db)} dB"
        bar = _rect(min(zero, end), y - 7, abs(end - zero), 14, _BLUE, tip=f"{layer.name}: {label}")
        return [bar, _text(max(zero, end) + 5, y + 4, label, size=11)]
    if not layer.quantized:
        reason = f"kept in high precision: {layer.fallback_reason or 'no reason recorded'}"
        short = reason if len(reason) <= 64 else reason[:63] + "…"
        return [_square(zero + 8, y, _GREY), _text(zero + 18, y + 4, short, size=11, color=_GREY, tip=reason)]
    return [_text(zero + 6, y + 4, "not measured", size=11, color=_GREY)]


def _layer_sqnr_svg(layers: list[LayerRow]) -> str:
    title = PLOT_TITLES["layer_sqnr"]
    values = [layer.sqnr_db for layer in layers if layer.sqnr_db is not None]
    if not values:
        return _no_data_svg(title)
    axis = _linear_axis([0.0, *values])
    rows = _Rows([layer.name for layer in layers])
    body = _x_axis(axis, rows.left, rows.right, _TOP, rows.bottom, "SQNR (dB), higher is better")
    body += _legend([(lambda x, y: _square(x, y, _BLUE), "quantized (FP8)"),
                     (lambda x, y: _square(x, y, _GREY), "kept in high precision")], rows.left, 50)  # fmt: skip
    for i, layer in enumerate(layers):
        body += [rows.label(i), *_sqnr_row(layer, axis, rows, i)]
    return rows.document(title, body)


def _has_metric(trial: TrialRecord) -> bool:
    return trial.status == "ok" and trial.metric is not None and not math.isnan(trial.metric)


def _trial_marker(trial: TrialRecord, x: float, y: float) -> str:
    if not _has_metric(trial):  # drawn at the bottom of the plot, with the error as its tooltip
        return _cross(x, y, _RED, tip=f"trial {trial.index}: {trial.status}: {trial.error or 'no metric'}")
    tip = f"trial {trial.index}: metric {_num(trial.metric)}"
    return _dot(x, y, _GREEN if trial.within_tolerance else _ORANGE, tip=tip)


def _trial_metric_svg(report: Report) -> str:
    title = PLOT_TITLES["trial_metric"]
    if not report.trials:
        return _no_data_svg(title)
    threshold = report.tolerance.get("threshold")
    metrics = [t.metric for t in report.trials if _has_metric(t)]
    axis = _auto_axis([report.baseline_metric, threshold, *metrics], pad=0.08)
    left, right, top, bottom = 76.0, 756.0, float(_TOP), _TOP + 300.0
    body = _y_axis(axis, left, right, top, bottom, "metric" + (" (log scale)" if axis.log else ""))
    body += _legend([
        (lambda x, y: _dot(x, y, _GREEN), "within tol."), (lambda x, y: _dot(x, y, _ORANGE), "outside tol."),
        (lambda x, y: _cross(x, y, _RED), "error"), (lambda x, y: _ring(x, y), "chosen"),
        (lambda x, y: _dash(x, y, _INK), f"baseline {_num(report.baseline_metric)}"),
        (lambda x, y: _dash(x, y, _RED, "6 4"), f"threshold {_num(threshold)}"),
    ], 12, 50)  # fmt: skip
    for level, color, dash in ((report.baseline_metric, _INK, None), (threshold, _RED, "6 4")):
        if level is not None and math.isfinite(level):
            y = axis.pos(level, bottom, top)
            body.append(_line(left, y, right, y, color, width=1.5, dash=dash))
    slot = (right - left) / len(report.trials)
    every = math.ceil(len(report.trials) / 20)  # at most ~20 tick labels
    for i, trial in enumerate(report.trials):
        x = left + (i + 0.5) * slot
        y = axis.pos(trial.metric, bottom, top) if _has_metric(trial) else bottom - 10
        body.append(_trial_marker(trial, x, y))
        if trial.index == report.chosen_trial:
            body.append(_ring(x, y))
        if i % every == 0:
            body.append(_text(x, bottom + 16, str(trial.index), anchor="middle"))
    body.append(_line(left, bottom, right, bottom, "#57606a"))
    body.append(_text((left + right) / 2, bottom + 38, "trial", anchor="middle", bold=True))
    return _svg_document(right + 20, bottom + _BOTTOM, title, body)


def _positive(values: Iterable[float]) -> list[float]:
    return [v for v in _finite(values) if v > 0]


def _amax_scale_svg(layers: list[LayerRow]) -> str:
    title = PLOT_TITLES["amax_scale"]
    shown = [layer for layer in layers if _positive(layer.input_amax) or _positive(layer.input_scales)]
    if not shown:
        return _no_data_svg(title)
    axis = _log_axis([v for layer in shown for v in (*layer.input_amax, *layer.input_scales)])
    rows = _Rows([layer.name for layer in shown], right_margin=30)
    body = _x_axis(axis, rows.left, rows.right, _TOP, rows.bottom, "value (log scale)")
    body += _legend([(lambda x, y: _dot(x, y, _BLUE), "input amax"),
                     (lambda x, y: _square(x, y, _ORANGE), "input scale")], rows.left, 50)  # fmt: skip

    def x(value: float) -> float:
        return axis.pos(value, rows.left, rows.right)

    for i, layer in enumerate(shown):
        y = rows.y(i)
        body.append(rows.label(i))
        body += [_dot(x(v), y, _BLUE, tip=f"amax {_num(v)}") for v in _positive(layer.input_amax)]
        body += [_square(x(v), y, _ORANGE, tip=f"scale {_num(v)}") for v in _positive(layer.input_scales)]
    return rows.document(title, body)


def render_plots(report: Report) -> dict[str, str]:
    """Draw the report's plots as standalone SVG documents.

    Args:
        report: the report to plot.

    Returns:
        ``{"layer_sqnr": svg, "trial_metric": svg, "amax_scale": svg}``; a plot without data is a
        small SVG saying "no data".

    Example:
        >>> for stem, svg in render_plots(report).items():  # doctest: +SKIP
        ...     Path(f"{stem}.svg").write_text(svg)
    """
    return {
        "layer_sqnr": _layer_sqnr_svg(report.layers),
        "trial_metric": _trial_metric_svg(report),
        "amax_scale": _amax_scale_svg(report.layers),
    }

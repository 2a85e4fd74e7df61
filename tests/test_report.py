"""Tuning reports: JSON round trip, rendered Markdown/HTML/SVG, and the errors a bad report.json raises."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch

import inc_bridge as ib
from inc_bridge.report import LayerRow, Report, TrialRecord
from inc_bridge.report_render import render_html, render_markdown, render_plots

ODD_NAME = "blocks.0.<odd>&|name"
PLOT_STEMS = {"layer_sqnr", "trial_metric", "amax_scale"}
SVG_NS = "{http://www.w3.org/2000/svg}"


def make_report() -> Report:
    trials = [
        TrialRecord(0, {"scale_method": "maxabs_arbitrary", "granularity": "per_tensor"}, [], 0.7412, False,
                    duration_s=12.5),
        TrialRecord(1, {"scale_method": "maxabs_pow2", "exclude": ["lm_head"]}, ["lm_head"], 0.8101, True,
                    duration_s=11.0),
        TrialRecord(2, {"scale_method": "act_maxabs_pow2"}, [], None, False, "error",
                    "RuntimeError: CUDA out of memory | retry <later>", 0.4),
    ]  # fmt: skip
    layers = [
        LayerRow("encoder.layer.0.attention.self.query", "Linear", True, "inc", "E4M3", "per_tensor",
                 "maxabs_pow2", "maxabs_pow2", [3.5], 0.42, [0.0078125], 0.0009765625, 0.0009765625,
                 0.0, 31.72),
        LayerRow(ODD_NAME, "Conv2d", True, "bridge", "E4M3", "per_channel", "maxabs_arbitrary",
                 "maxabs_arbitrary", [120.0, 0.003], 2.0, [0.2679, 6.7e-6], 1.2e-4, 4.5e-3, 0.0125, 18.03),
        LayerRow("lm_head", "Linear", False, fallback_reason="SQNR 9.1 dB below 20 dB | kept in bf16"),
    ]  # fmt: skip
    return Report(
        baseline_metric=0.8123,
        higher_is_better=True,
        tolerance={"kind": "relative", "value": 0.01, "threshold": 0.804177},
        goal_met=True,
        chosen_trial=1,
        trials=trials,
        layers=layers,
        environment={"torch": "2.4.0", "device": "cpu", "fp8_max": 448.0},
        final_metric=0.8101,
        notes=["lm_head kept in bf16 & never quantized"],
    )


def empty_report() -> Report:
    return Report(0.5, False, {"kind": "absolute", "value": 0.1, "threshold": 0.6}, False, None, [], [], {})


class _PageParser(HTMLParser):
    """Collects the images and the text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse_html(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


def svg_texts(svg: str) -> str:
    return " ".join("".join(el.itertext()) for el in ET.fromstring(svg).iter(f"{SVG_NS}text"))


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_save_writes_every_file_and_round_trips(tmp_path):
    report = make_report()
    assert report.save(tmp_path) == tmp_path
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"report.json", "report.md", "report.html", *(f"{stem}.svg" for stem in PLOT_STEMS)}
    loaded = Report.load(tmp_path)
    assert loaded.to_dict() == report.to_dict()
    assert loaded == report


def test_saved_svgs_parse_and_html_embeds_them(tmp_path):
    make_report().save(tmp_path)
    svgs = {stem: (tmp_path / f"{stem}.svg").read_text(encoding="utf-8") for stem in PLOT_STEMS}
    for svg in svgs.values():
        assert ET.fromstring(svg).tag == f"{SVG_NS}svg"
    page = parse_html((tmp_path / "report.html").read_text(encoding="utf-8"))
    prefix = "data:image/svg+xml;base64,"
    embedded = {base64.b64decode(img["src"][len(prefix):]).decode() for img in page.images
                if img["src"].startswith(prefix)}  # fmt: skip
    assert embedded == set(svgs.values())
    assert all(img["alt"] for img in page.images)


def test_plots_show_the_data():
    plots = render_plots(make_report())
    assert set(plots) == PLOT_STEMS
    sqnr = svg_texts(plots["layer_sqnr"])
    assert ODD_NAME in sqnr and "31.72 dB" in sqnr and "kept in high precision" in sqnr
    assert "<odd>" not in plots["layer_sqnr"]  # escaped in the document, unescaped once parsed
    trial = svg_texts(plots["trial_metric"])
    assert "baseline 0.8123" in trial and "threshold 0.804177" in trial and "error" in trial
    assert "CUDA out of memory" in "".join(ET.fromstring(plots["trial_metric"]).itertext())  # error tooltip
    amax = svg_texts(plots["amax_scale"])
    assert "1e-6" in amax and "0.001" in amax and "1000" in amax  # log axis: 6.7e-6 .. 120 in decades


def test_markdown_content_and_escaping():
    md = render_markdown(make_report())
    assert md.startswith("# ")
    assert "`blocks.0.<odd>&\\|name`" in md and ODD_NAME not in md
    assert "SQNR 9.1 dB below 20 dB \\| kept in bf16" in md
    assert "RuntimeError: CUDA out of memory \\| retry \\<later\\>" in md
    assert "**Baseline metric:** 0.8123" in md and "**Threshold:** 0.804177" in md
    assert "**Goal met:** yes" in md and "**Chosen trial:** 1" in md
    assert "2 in FP8, 1 kept in high precision" in md
    assert 'scale_method=maxabs_pow2, exclude=\\["lm_head"\\]' in md
    assert "- **torch:** 2.4.0" in md and "lm_head kept in bf16 \\& never quantized" in md
    for stem in PLOT_STEMS:
        assert f"({stem}.svg)" in md


def test_markdown_tables_have_a_cell_per_column():
    md = render_markdown(make_report())
    tables = re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.MULTILINE)
    assert len(tables) == 2
    for table in tables:
        counts = {unescaped_pipes(line) for line in table.splitlines()}
        assert len(counts) == 1, table
    layer_header = tables[1].splitlines()[0]
    assert unescaped_pipes(layer_header) - 1 == 15  # every LayerRow field has a column


def test_html_content_and_escaping():
    report = make_report()
    page = render_html(report, render_plots(report))
    assert page.startswith("<!DOCTYPE html>")
    assert "blocks.0.&lt;odd&gt;&amp;|name" in page and "<odd>" not in page
    assert 'class="status met"' in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained
    text = " ".join(parse_html(page).text)
    for expected in (ODD_NAME, "SQNR 9.1 dB below 20 dB | kept in bf16", "CUDA out of memory | retry <later>",
                     "0.8123", "0.804177", "lm_head kept in bf16 & never quantized", "2.4.0"):  # fmt: skip
        assert expected in text


def test_goal_missed_is_marked_red():
    report = make_report()
    report.goal_met = False
    page = render_html(report, {})
    assert 'class="status missed"' in page and "No plots." in page


def test_empty_report_renders(tmp_path):
    report = empty_report()
    plots = render_plots(report)
    assert set(plots) == PLOT_STEMS
    for svg in plots.values():
        assert "no data" in svg_texts(svg)
    assert "_No trials._" in render_markdown(report) and "_No layers._" in render_markdown(report)
    report.save(tmp_path)
    assert Report.load(tmp_path) == report
    assert len(parse_html((tmp_path / "report.html").read_text(encoding="utf-8")).images) == 3


def test_odd_values_still_render():
    """Infinite SQNR, NaN metrics, zero amax and control characters must not break the documents."""
    report = make_report()
    report.layers[0].sqnr_db = float("inf")
    report.layers[1].input_amax = [0.0, float("nan")]
    report.trials[0].metric = float("nan")
    report.trials[2].error = "\x1b[31mboom\x1b[0m\ntraceback line"
    report.tolerance = {}
    for svg in render_plots(report).values():
        ET.fromstring(svg)
    md = render_markdown(report)
    assert "\x1b" not in md and "[31mboom" in md.replace("\\", "")
    assert "**Threshold:** -" in md


def test_metrics_spanning_decades_use_a_log_axis():
    report = make_report()
    report.baseline_metric, report.tolerance["threshold"] = 12.0, 13.0
    for trial, metric in zip(report.trials, (15.0, 12.5, 2400.0), strict=True):
        trial.metric, trial.status = metric, "ok"
    texts = svg_texts(render_plots(report)["trial_metric"])
    assert "(log scale)" in texts and "1000" in texts


def test_newer_schema_version_is_rejected_and_version_1_still_reads(tmp_path):
    data = make_report().to_dict()
    data["schema_version"] = 4
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ib.SerializationError, match="schema_version 4"):
        Report.load(tmp_path)
    old = {k: v for k, v in make_report().to_dict().items() if k != "timings"}  # written before timings
    (tmp_path / "report.json").write_text(json.dumps({**old, "schema_version": 1}))
    assert Report.load(tmp_path).timings == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "malformed"),
        ('{"schema_version": 1}', "malformed"),
        (json.dumps({**make_report().to_dict(), "trials": [{"index": 0, "bogus": 1}]}), "malformed"),
        (json.dumps({**make_report().to_dict(), "extra": 1}), "malformed"),
    ],
)
def test_malformed_report_json_is_rejected(tmp_path, text, match):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(ib.SerializationError, match=match):
        Report.load(tmp_path)


def test_missing_report_is_a_serialization_error(tmp_path):
    with pytest.raises(ib.SerializationError, match="cannot read"):
        Report.load(tmp_path)


# ------------------------------------------------------------------------------ report.formats

FILES = {"json": {"report.json"}, "md": {"report.md"}, "html": {"report.html"},
         "plots": {f"{stem}.svg" for stem in PLOT_STEMS}}


@pytest.mark.parametrize("formats", [["json"], ["md"], ["html"], ["plots"], ["json", "html"], ["md", "plots"],
                                     ["HTML", "Json"]])
def test_save_writes_only_the_listed_formats(tmp_path, formats):
    make_report().save(tmp_path, formats=formats)
    assert {p.name for p in tmp_path.iterdir()} == set().union(*(FILES[f.lower()] for f in formats))


def test_markdown_links_plots_only_when_they_are_written(tmp_path):
    make_report().save(tmp_path / "with", formats=["md", "plots"])
    make_report().save(tmp_path / "without", formats=["md", "html"])
    linked = (tmp_path / "with" / "report.md").read_text(encoding="utf-8")
    alone = (tmp_path / "without" / "report.md").read_text(encoding="utf-8")
    assert all(f"({stem}.svg)" in linked and (tmp_path / "with" / f"{stem}.svg").is_file() for stem in PLOT_STEMS)
    assert ".svg)" not in alone and "leaves out `plots`" in alone
    # the HTML page embeds its plots whether or not the files are written
    assert len(parse_html((tmp_path / "without" / "report.html").read_text(encoding="utf-8")).images) == 3
    # everything else in the document is the same
    assert [ln for ln in linked.splitlines() if ".svg)" not in ln] == \
           [ln for ln in alone.splitlines() if "leaves out `plots`" not in ln]


@pytest.mark.parametrize("formats", [["pdf"], ["json", "svg"], "yaml"])
def test_save_rejects_an_unknown_format_and_writes_nothing(tmp_path, formats):
    with pytest.raises(ib.RecipeError, match=r"report\.formats: .* is not a report format; valid: json, md, html, plots"):
        make_report().save(tmp_path / "out", formats=formats)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("formats, match", [
    (["pdf"], r"report\.formats\.0: 'pdf' is not valid; input should be 'json', 'md', 'html' or 'plots'"),
    ([], r"report\.formats: .*list at least one of json, md, html, plots"),
    (["md", "json", "md"], r"report\.formats: .*md listed more than once"),
    ("json", r"report\.formats: Input should be a valid tuple"),
])
def test_recipe_report_formats_are_validated(formats, match):
    with pytest.raises(ib.RecipeError, match=match):
        ib.Recipe.model_validate({"report": {"formats": formats}})


def test_recipe_report_formats_default_is_every_format():
    assert [f.value for f in ib.Recipe().report.formats] == ["json", "md", "html", "plots"]
    assert [f.value for f in ib.Recipe.model_validate({"report": {"formats": ["HTML"]}}).report.formats] == ["html"]


def test_autotune_writes_the_recipe_report_formats(tmp_path):
    from tests.models import LinearNet, linear_batches

    torch.manual_seed(0)
    model, batches = LinearNet(), linear_batches(1)
    recipe = ib.Recipe.model_validate({"tuning": {"search_space": {}, "layer_fallback": False},
                                       "report": {"formats": ["json", "md"]}})
    result = ib.autotune(model, lambda m: 0.0, calib_data=batches, recipe=recipe, tolerable_loss={"absolute": 1.0},
                         output_dir=tmp_path, progress=False)
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.json", "report.md"}
    assert Report.load(tmp_path / "report") == result.report
    # resuming with other formats is the same run (the formats are not part of its fingerprint)
    again = recipe.model_copy(update={"report": ib.Recipe.model_validate({"report": {"formats": ["html"]}}).report})
    ib.autotune(model, lambda m: 0.0, calib_data=batches, recipe=again, tolerable_loss={"absolute": 1.0},
                output_dir=tmp_path, resume=True, progress=False)
    assert (tmp_path / "report" / "report.html").is_file()
    events = [json.loads(line)["type"] for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert events.count("trial") == 1  # the finished trial was not run again

"""issue 14, autotune slice: the user's model, metrics, resume fingerprints, trial logs and reports.

Each test reproduces an input the probe found and asserts the clean outcome: the model (parameters,
buffers and training flags) unchanged, only IncBridgeError escaping, no stray files.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import inc_bridge as ib
from inc_bridge.report import Report
from inc_bridge.sensitivity import eval_mode
from tests.models import LinearNet, linear_batches

REPO = Path(__file__).resolve().parent.parent
ONE_TRIAL = ib.Recipe.model_validate({"tuning": {"search_space": {}, "layer_fallback": False}})
LOOSE = {"absolute": 1e6}


class BNNet(nn.Module):
    """Linear layers around a BatchNorm: a forward in train mode changes its running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.bn = nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor], flags: dict[str, bool]) -> bool:
    now = model.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[n], state[n]) for n in state)
            and {n: m.training for n, m in model.named_modules()} == flags)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LinearNet()
    batches = linear_batches(1)
    with torch.no_grad():
        reference = model(batches[0])

    def closeness(m: nn.Module) -> float:  # 0 for the float model, below 0 for a quantized one
        with torch.no_grad():
            return -float((m(batches[0]) - reference).pow(2).mean())

    return model, batches, closeness


def _run(tiny, out=None, **kwargs):
    model, batches, closeness = tiny
    args = dict(calib_data=batches, recipe=ONE_TRIAL, tolerable_loss=LOOSE, progress=False, output_dir=out)
    return ib.autotune(model, kwargs.pop("eval_fn", closeness), **{**args, **kwargs})


# ---------------------------------------------------------------- 5: a train-mode model stays as it was


def test_autotune_leaves_a_train_mode_batchnorm_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = BNNet().train()
    model.drop.eval()  # mixed flags: each module's own flag must survive, not just the root's
    batches = [torch.randn(8, 32) for _ in range(2)]
    state, flags = _state(model), {n: m.training for n, m in model.named_modules()}

    def metric(m: nn.Module) -> float:  # runs the model it is given as it is; changes nothing itself
        with torch.no_grad():
            return float(m(batches[0]).std())

    # tolerance 0 misses: layer fallback runs the per-layer SQNR forwards and fallback trials
    result = ib.autotune(model, metric, calib_data=batches, tolerable_loss={"absolute": 0.0},
                         output_dir=tmp_path, progress=False)
    assert any(t.fallback for t in result.report.trials), "layer fallback (SQNR forwards) must have run"
    assert _unchanged(model, state, flags)
    assert {n: m.training for n, m in result.model.named_modules() if n in flags} == flags
    assert {p.name for p in tmp_path.iterdir()} == {"trials.jsonl", "measurements.json", "locked_recipe.yaml", "report"}


def test_eval_mode_restores_each_flag_when_the_block_raises():
    model = BNNet().train()
    model.bn.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert {n: m.training for n, m in model.named_modules()} == flags


# ------------------------------------------------------- 6: non-finite or wrong-typed metrics


@pytest.mark.parametrize(
    ("bad", "hib", "match"),
    [
        (math.inf, True, "eval_fn returned inf"),
        (-math.inf, False, "eval_fn returned -inf"),
        (math.nan, True, "eval_fn returned NaN"),
        ("0.9", True, "eval_fn returned a str"),
        (True, True, "eval_fn returned a bool"),
        (torch.tensor([1.0, 2.0]), True, "tensor of shape \\(2,\\)"),
        (10**400, True, "expected a finite number"),
    ],
)
def test_non_finite_or_wrong_typed_trial_metric_is_a_trial_error(tiny, bad, hib, match):
    model, _, _ = tiny
    state, flags = _state(model), {n: m.training for n, m in model.named_modules()}
    calls = []

    def metric(m):
        calls.append(1)
        return 1.0 if len(calls) == 1 else bad  # a finite baseline, then the bad trial metric

    recipe = ONE_TRIAL.model_copy(update={"evaluation": ib.Recipe().evaluation.model_copy(update={"higher_is_better": hib})})
    result = _run(tiny, eval_fn=metric, recipe=recipe)
    (trial,) = result.report.trials
    assert trial.status == "error" and not trial.within_tolerance and trial.metric is None
    assert re.search(match, trial.error.splitlines()[0])
    assert not result.report.goal_met and result.report.final_metric is None
    assert _unchanged(model, state, flags)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", None, torch.ones(3), False, 10**400])
def test_non_finite_or_wrong_typed_baseline_raises(tiny, tmp_path, bad):
    model, _, _ = tiny
    state, flags = _state(model), {n: m.training for n, m in model.named_modules()}
    with pytest.raises(ib.RecipeError, match=r"baseline\): eval_fn returned"):
        _run(tiny, tmp_path, eval_fn=lambda m: bad)
    assert _unchanged(model, state, flags)
    assert {p.name for p in tmp_path.iterdir()} == {"trials.jsonl"}  # the run's fingerprint line only


def test_infinite_threshold_raises(tiny):
    with pytest.raises(ib.RecipeError, match="tuning.tolerable_loss.*finite"):
        _run(tiny, eval_fn=lambda m: 1e308, tolerable_loss=10.0)


# ----------------------------------------------------- 7: resume checks the run's fingerprint


def test_resume_refuses_a_run_of_another_model_recipe_tolerance_or_calibration(tiny, tmp_path):
    model, batches, closeness = tiny
    _run(tiny, tmp_path)
    log = (tmp_path / "trials.jsonl").read_bytes()
    other = LinearNet()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.fc2.weight[0, 0] += 1.0  # one weight changed
    e5m2 = ib.Recipe.model_validate({**ONE_TRIAL.model_dump(mode="json"), "quantization": {"format": "e5m2"}})
    cases = [
        ({"model": other}, "another model weights"),
        ({"tolerable_loss": {"absolute": 0.5}}, "another tolerance"),
        ({"recipe": e5m2}, "another recipe"),
        ({"calib_data": linear_batches(1, seed=2)}, "another calibration data"),
        ({"calib_data": lambda m: m(batches[0])}, "another calibration data"),
    ]
    for change, match in cases:
        args = dict(calib_data=batches, recipe=ONE_TRIAL, tolerable_loss=LOOSE, progress=False, output_dir=tmp_path,
                    resume=True)
        target = change.pop("model", model)
        with pytest.raises(ib.SerializationError, match=f"trials.jsonl: records a run of {match}"):
            ib.autotune(target, closeness, **{**args, **change})
        assert (tmp_path / "trials.jsonl").read_bytes() == log  # the refused log is left as it was
    # what may change between a run and its continuation: the budget
    resumed = ib.autotune(model, closeness, calib_data=batches, recipe=ONE_TRIAL, tolerable_loss=LOOSE,
                          progress=False, output_dir=tmp_path, resume=True, max_trials=3)
    assert resumed.report.goal_met


def test_resume_refuses_a_log_without_fingerprint(tiny, tmp_path):
    (tmp_path / "trials.jsonl").write_text('{"type": "baseline", "metric": 0.0}\n')
    with pytest.raises(ib.SerializationError, match="has no run fingerprint"):
        _run(tiny, tmp_path, resume=True)


def test_resume_recomputes_tolerance_flags_and_redoes_foreign_measurements(tiny, tmp_path):
    model, batches, closeness = tiny
    tight = {"absolute": 0.0}  # every quantized model is worse than the float one
    first = _run(tiny, tmp_path, tolerable_loss=tight)
    assert not first.report.goal_met
    path = tmp_path / "trials.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for e in events:
        if e["type"] == "trial":
            e["within_tolerance"] = True  # an edited (or older) log claims success
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "measurements.json").write_text('{"not": "these measurements"}')
    calls = []
    resumed = _run(tiny, tmp_path, tolerable_loss=tight, resume=True, eval_fn=lambda m: calls.append(1) or closeness(m))
    assert not calls  # nothing re-evaluated: the recorded metric is reused ...
    assert [t.metric for t in resumed.report.trials] == [t.metric for t in first.report.trials]
    assert not any(t.within_tolerance for t in resumed.report.trials) and not resumed.report.goal_met  # ... the flag not
    assert ib.Measurements.load(tmp_path / "measurements.json").layers.keys() == first.measurements.layers.keys()


# ---------------------------------------------------------- 12: malformed trials.jsonl and report.json


@pytest.fixture(scope="module")
def recorded(tiny):
    """The first three lines (fingerprint, baseline, measurements) of a real run's log, and its
    measurements.json: a log up to those lines resumes without calibrating again."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(tiny, tmp)
        lines = Path(tmp, "trials.jsonl").read_bytes().splitlines(keepends=True)
        assert [json.loads(line)["type"] for line in lines[:3]] == ["run", "baseline", "measurements"]
        return b"".join(lines[:3]), Path(tmp, "measurements.json").read_bytes()


def _header(recorded, out: Path) -> bytes:
    """Put the recorded run's measurements.json in ``out``; its log's first three lines."""
    (out / "measurements.json").write_bytes(recorded[1])
    return recorded[0]


TRIAL = {"type": "trial", "index": 0, "config": {"format": "e4m3"}, "fallback": [], "metric": 0.5,
         "within_tolerance": False, "status": "ok", "error": None, "duration_s": 0.1}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "line 4: JSON nested too deeply"),
        (json.dumps({**TRIAL, "metric": "0.5"}).encode(), "line 4: metric: expected"),
        (json.dumps({k: v for k, v in TRIAL.items() if k != "config"}).encode(), "line 4: missing field 'config'"),
        (json.dumps([TRIAL]).encode(), "line 4: expected a JSON object, got list"),
        (json.dumps({**TRIAL, "config": ["e4m3"]}).encode(), "line 4: config: expected"),
        (json.dumps({**TRIAL, "fallback": "fc1"}).encode(), "line 4: fallback: expected"),
        (json.dumps({**TRIAL, "status": "ok", "metric": None}).encode(), "line 4: a trial with status 'ok' has no metric"),
        (b'{"type": "baseline", "metric": "0.9"}', "line 4: metric: expected int or float, got str"),
        (b'{"type": "baseline", "metric": NaN}', "line 4: not valid JSON"),
        (b'{"type": "baseline", "metric": 1e999}', "line 4: metric: expected a finite number"),
        (b'{"type": "sensitivity", "config": {}, "method": "sqnr", "sqnr": {"fc1": "low"}}', "line 4: sqnr.fc1"),
        (b'{"type": "rm -rf"}', "line 4: unknown event type"),
        (b'{"type": "baseline", "metric": 1.0, "\xff": 1}', "line 4: not UTF-8"),
    ],
)
def test_malformed_trial_log_line_is_a_serialization_error(tiny, recorded, tmp_path, line, match):
    model, _, _ = tiny
    state, flags = _state(model), {n: m.training for n, m in model.named_modules()}
    log = _header(recorded, tmp_path) + line + b"\n" + json.dumps(TRIAL).encode() + b"\n"
    (tmp_path / "trials.jsonl").write_bytes(log)
    with pytest.raises(ib.SerializationError, match=f"trials.jsonl: {match}"):
        _run(tiny, tmp_path, resume=True)
    assert (tmp_path / "trials.jsonl").read_bytes() == log
    assert _unchanged(model, state, flags)


def test_a_last_line_cut_short_is_ignored_and_cut(tiny, recorded, tmp_path):
    header = _header(recorded, tmp_path)
    (tmp_path / "trials.jsonl").write_bytes(header + json.dumps(TRIAL).encode()[:40])  # a crash mid-write
    result = _run(tiny, tmp_path, resume=True)
    assert [t.status for t in result.report.trials] == ["ok"]
    lines = (tmp_path / "trials.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # every line whole again


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"baseline_metric": "0.9"}, "baseline_metric: expected float"),
        ({"trials": [{**{k: v for k, v in TRIAL.items() if k != "type"}, "metric": "0.5"}]}, r"trials\[0\]: metric"),
        ({"trials": {"0": {}}}, "trials: expected a list"),
        ({"layers": [["fc1"]]}, r"layers\[0\]: expected a JSON object"),
        ({"tolerance": {"threshold": "high"}}, "tolerance.threshold: expected float"),
        ({"final_metric": 10**400}, "final_metric: expected"),
        ({"schema_version": True}, None),
        ({"goal_met": 1}, "goal_met: expected bool"),
        ({"notes": "x" * 100_000}, r"notes: expected list\[str\], got str x{20}"),
    ],
)
def test_malformed_report_json_is_a_serialization_error(tmp_path, change, match):
    from tests.test_report import make_report

    text = json.dumps({**make_report().to_dict(), **change})
    (tmp_path / "report.json").write_text(text)
    match = f"malformed report: {match}" if match else "report schema_version True is not supported"
    with pytest.raises(ib.SerializationError, match=f"report.json: {match}") as info:
        Report.load(tmp_path)
    assert len(str(info.value)) < 1000  # the input is never repeated whole


def test_deep_report_json_is_a_serialization_error(tmp_path):
    (tmp_path / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ib.SerializationError, match="report.json: JSON nested too deeply"):
        Report.load(tmp_path)


FIFO_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import inc_bridge as ib
    from inc_bridge.report import Report
    from tests.models import LinearNet, linear_batches
    out = sys.argv[1]
    os.mkfifo(os.path.join(out, "trials.jsonl"))
    os.mkfifo(os.path.join(out, "report.json"))
    recipe = ib.Recipe.model_validate({"tuning": {"search_space": {}, "layer_fallback": False}})
    for load in (lambda: ib.autotune(LinearNet(), lambda m: 1.0, calib_data=linear_batches(1), recipe=recipe,
                                     output_dir=out, resume=True, progress=False),
                 lambda: Report.load(out)):
        try:
            load()
        except ib.SerializationError as exc:
            print("refused:", str(exc).split(": ", 1)[1])
""")


def test_fifo_trial_log_and_report_are_refused_without_hanging(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert refused == ["refused: trial log is not a regular file (a directory, FIFO or device); refusing to read it",
                       "refused: report is not a regular file (a directory, FIFO or device); refusing to read it"]


# ------------------------------------------------ property: crafted trials.jsonl, resume=True

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=8)
_trial_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["trial", "baseline", "sensitivity", "measurements", "run", "other"])},
    optional={k: _json | st.just(v) for k, v in {**TRIAL, "method": "sqnr", "sqnr": {"fc1": 1.0}, "sha256": "0",
                                                 "fingerprint": {}}.items() if k != "type"},
)
_lines = st.lists(
    st.one_of(_trial_like.map(lambda e: json.dumps(e).encode()), _json.map(lambda v: json.dumps(v).encode()),
              st.binary(max_size=40)),
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_lines, newline_at_end=st.booleans())
def test_crafted_trial_logs_raise_only_inc_bridge_errors(tiny, recorded, lines, newline_at_end):
    model, _, _ = tiny
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        header = _header(recorded, out)
        body = b"\n".join(line.replace(b"\n", b" ") for line in lines)
        (out / "trials.jsonl").write_bytes(header + body + (b"\n" if newline_at_end and body else b""))
        state = _state(model)
        try:
            result = _run(tiny, out, resume=True)
        except ib.IncBridgeError:
            pass
        else:
            assert all(t.metric is None or math.isfinite(t.metric) for t in result.report.trials)
        assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items())

"""autotune on the digits CNN: tolerance, layer fallback, locked replay, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import inc_bridge as ib
from inc_bridge.demo import DigitsCNN, accuracy, load_digits_tensors, train

RECIPES = Path(ib.__file__).parent / "recipes"
MAXABS_ONLY = ib.Recipe.model_validate({"tuning": {"search_space": {}}})


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train, epochs=6)
    calib = list(x_train[:512].split(64))
    return model, calib, (lambda m: accuracy(m, x_test, y_test)), x_test


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_meets_half_point_tolerance_and_replays_exactly(digits, tmp_path):
    model, calib, evaluate, x = digits
    before = _params(model)
    result = ib.autotune(model, evaluate, calib_data=calib, tolerable_loss={"absolute": 0.5}, output_dir=tmp_path,
                         progress=False)
    r = result.report
    assert r.goal_met and r.final_metric >= r.baseline_metric - 0.5
    assert r.final_metric == pytest.approx(evaluate(result.model))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # float model untouched
    assert {p.name for p in tmp_path.iterdir()} == {"trials.jsonl", "measurements.json", "locked_recipe.yaml", "report"}
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.json", "report.md", "report.html"}
    # locked recipe: in memory and from the YAML file, no calibration data
    for locked in (result.recipe, ib.load_recipe(tmp_path / "locked_recipe.yaml")):
        replay = ib.apply_recipe(model, locked)
        with torch.no_grad():
            assert torch.equal(replay(x), result.model(x))


def test_tight_tolerance_falls_back_layer_by_layer(digits, tmp_path):
    model, calib, evaluate, x = digits
    result = ib.autotune(model, evaluate, calib_data=calib, recipe=MAXABS_ONLY, tolerable_loss={"absolute": 0.0},
                         output_dir=tmp_path, progress=False)
    r = result.report
    fallen = [row for row in r.layers if row.fallback_reason and row.fallback_reason.startswith("fallback")]
    assert r.goal_met and fallen, "a zero tolerance the whole-model trial misses must trigger layer fallback"
    assert all("sensitivity rank" in row.fallback_reason and "SQNR" in row.fallback_reason for row in fallen)
    assert any(t.fallback for t in r.trials) and not r.trials[0].fallback
    md = (tmp_path / "report" / "report.md").read_text()
    assert all(row.name in md for row in fallen)
    # where the time went, by phase: each part measured, none beyond the whole
    t = r.timings
    assert set(t) == {"total", "baseline", "calibration", "trials", "sensitivity", "finish"}
    assert all(t[k] > 0 for k in t) and sum(v for k, v in t.items() if k != "total") <= t["total"]
    assert t["trials"] == pytest.approx(sum(trial.duration_s for trial in r.trials))
    assert f"{t['total']:.2f} s (baseline" in md
    assert set(result.recipe.locked.fallback) == {row.name for row in fallen}
    conv = ib.conversion_result(result.model)
    assert set(conv.skipped) >= {row.name for row in fallen}
    replay = ib.apply_recipe(model, result.recipe)
    with torch.no_grad():
        assert torch.equal(replay(x), result.model(x))


def test_tuning_holds_one_fp8_copy_of_the_weights(digits):
    """Trials of one weight setting run together; the memoised FP8 weights of the previous setting
    are dropped when the next begins, and none are left behind (the result holds its own)."""
    from inc_bridge import scales as scales_module

    model, calib, evaluate, x = digits
    weighted = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    memoised = []
    ib.clear_caches()  # FP8 weights other tests' conversions of this model left memoised

    def counting(m):
        memoised.append(len(scales_module.active_memo().quantized))
        return evaluate(m) + (1.0 if len(memoised) == 1 else 0.0)  # a baseline no trial reaches: all 4 run

    space = {"weight_granularity": ["per_tensor", "per_channel"], "activation_scale_method": ["maxabs_arbitrary", "mse"]}
    # the recipe's own setting (tried first) is per-channel MSE: the other per-channel trial comes next
    recipe = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"},
                                                        "activation": {"scale_method": "mse"}},
                                       "tuning": {"search_space": space, "layer_fallback": False}})
    result = ib.autotune(model, counting, calib_data=calib, recipe=recipe, tolerable_loss={"absolute": 0.0},
                         progress=False)
    order = [(t.config["weight_granularity"], t.config["activation_scale_method"]) for t in result.report.trials]
    assert order == [("per_channel", "mse"), ("per_channel", "maxabs_arbitrary"), ("per_tensor", "maxabs_arbitrary"),
                     ("per_tensor", "mse")]
    assert memoised[1:] == [weighted] * 4  # not 2 x weighted after the switch
    assert scales_module.active_memo() is None  # the run's memo ended with it
    with torch.no_grad():
        assert torch.equal(ib.apply_recipe(model, result.recipe)(x), result.model(x))


def test_resume_after_interruption(digits, tmp_path):
    model, calib, evaluate, x = digits
    recipe = ib.Recipe.model_validate({"tuning": {"search_space": {"activation_scale_method": ["maxabs_arbitrary", "percentile", "mse"]}}})
    kwargs = dict(calib_data=calib, recipe=recipe, tolerable_loss={"absolute": 0.0}, progress=False)
    reference = ib.autotune(model, evaluate, **kwargs, output_dir=tmp_path / "ref")

    calls = []

    def interrupted(m):
        calls.append(1)
        if len(calls) == 3:  # baseline, trial 0, then Ctrl-C during trial 1
            raise KeyboardInterrupt
        return evaluate(m)

    with pytest.raises(KeyboardInterrupt):
        ib.autotune(model, interrupted, **kwargs, output_dir=tmp_path / "run")
    lines = (tmp_path / "run" / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["run", "baseline", "measurements", "trial"]

    counted = []

    def counting(m):
        counted.append(1)
        return evaluate(m)

    resumed = ib.autotune(model, counting, **kwargs, output_dir=tmp_path / "run", resume=True)
    assert len(counted) == len(reference.report.trials) - 1  # neither the baseline nor trial 0 ran again
    assert [(t.config, t.fallback, t.metric) for t in resumed.report.trials] == \
           [(t.config, t.fallback, t.metric) for t in reference.report.trials]
    with torch.no_grad():
        assert torch.equal(resumed.model(x), reference.model(x))


def test_eval_errors_are_recorded_not_swallowed(digits, tmp_path):
    model, calib, evaluate, _ = digits
    recipe = ib.Recipe.model_validate({"tuning": {"layer_fallback": False, "search_space": {"activation_scale_method": ["maxabs_arbitrary", "percentile"]}}})
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("metric server unavailable")
        return float("nan") if len(calls) == 3 else evaluate(m)

    result = ib.autotune(model, flaky, calib_data=calib, recipe=recipe, tolerable_loss={"absolute": 0.0},
                         output_dir=tmp_path, progress=False)
    statuses = [(t.status, (t.error or "").splitlines()[0] if t.error else None) for t in result.report.trials]
    assert statuses == [("error", "ValueError: metric server unavailable"), ("error", "ValueError: eval_fn returned NaN")]
    assert not result.report.goal_met
    assert "metric server unavailable" in (tmp_path / "report" / "report.md").read_text()


def test_relative_tolerance_float_and_max_trials(digits):
    model, calib, evaluate, _ = digits
    recipe = ib.Recipe.model_validate({"tuning": {"search_space": {"activation_scale_method": ["maxabs_arbitrary", "percentile", "mse"]}}})
    result = ib.autotune(model, evaluate, calib_data=calib, recipe=recipe, tolerable_loss=0.0, max_trials=2,
                         progress=False)
    assert len(result.report.trials) <= 2
    assert result.report.tolerance["kind"] == "relative"


def test_recipe_callables_and_missing_eval(digits):
    model, calib, _, _ = digits
    with pytest.raises(ib.RecipeError, match="evaluation.fn: missing"):
        ib.autotune(model, calib_data=calib, progress=False)
    bad = ib.Recipe.model_validate({"evaluation": {"fn": "inc_bridge.demo:no_such_function"}})
    with pytest.raises(ib.RecipeError, match="evaluation.fn: cannot load 'inc_bridge.demo:no_such_function'"):
        ib.autotune(model, calib_data=calib, recipe=bad, progress=False)
    with pytest.raises(ib.RecipeError, match="calibration.source: missing"):
        ib.autotune(model, lambda m: 1.0, progress=False)


def test_apply_recipe_needs_a_locked_recipe(digits):
    with pytest.raises(ib.RecipeError, match="no locked section"):
        ib.apply_recipe(digits[0], ib.Recipe())


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = ib.load_recipe(path)
    assert ib.Recipe.model_validate(recipe.model_dump(mode="json")) == recipe


def test_the_shipped_recipe_set():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert names == {"fp8_e4m3_static.yaml", "fp8_e4m3_per_channel.yaml", "fp8_attention.yaml", "gaudi2.yaml",
                     "gaudi3.yaml", "xeon.yaml", "cuda.yaml", "demo_digits.yaml", "demo_minilm.yaml"}
    assert ib.load_recipe(RECIPES / "fp8_e4m3_static.yaml") == ib.Recipe()
    gaudi2 = ib.load_recipe(RECIPES / "gaudi2.yaml").quantization
    assert gaudi2.target.value == "gaudi2" and gaudi2.weight.scale_method.value == "maxabs_pow2"


@pytest.mark.parametrize(
    "data,match",
    [
        ({"tuning": {"tolerable_los": 0.1}}, r"tuning\.tolerable_los: unknown key"),
        ({"tuning": {"max_trials": "many"}}, r"tuning\.max_trials: Input should be a valid integer"),
        ({"quantization": {"overrides": [{"match": "re:[", "weight": {}}]}}, r"invalid regular expression"),
        ({"evaluation": {"fn": "not a callable"}}, r"evaluation\.fn: .*'package\.module:function'"),
        ({"tuning": {"search_space": {"weight_scale_method": ["percentile"]}}}, r"activation scale method"),
        ({"quantization": {"activation": {"percentile": 120}}}, r"quantization\.activation\.percentile"),
    ],
)
def test_malformed_tuning_recipes(data, match):
    with pytest.raises(ib.RecipeError, match=match):
        ib.Recipe.model_validate(data)


@pytest.mark.slow
def test_minilm_demo_recipe(tmp_path):
    """demo_minilm.yaml: Linear + attention in FP8, goal cosine >= 0.999 vs fp32."""
    from inc_bridge.examples import minilm

    result = ib.autotune(minilm.model(), recipe=ib.load_recipe(RECIPES / "demo_minilm.yaml"), output_dir=tmp_path,
                         progress=False)
    r = result.report
    whole = [t for t in r.trials if not t.fallback]
    tried = {(t.config["weight_granularity"], t.config["activation_scale_method"]) for t in whole}
    assert tried == {(g, a) for g in ("per_tensor", "per_channel") for a in ("maxabs_arbitrary", "percentile", "mse")}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "percentile" in md and "mse" in md and "per_channel" in md
    best_whole = max(whole, key=lambda t: t.metric)
    kept = [row.name for row in r.layers if row.fallback_reason and row.fallback_reason.startswith("fallback")]
    fp8 = [row.name for row in r.layers if row.quantized]
    print(f"\nMiniLM autotune: whole-model trials {[(t.config['weight_granularity'], t.config['activation_scale_method'], round(t.metric, 5)) for t in whole]}")
    print(f"best whole-model {best_whole.metric:.5f}; final {r.final_metric:.5f} with {len(fp8)} layers in FP8, "
          f"{len(kept)} kept in high precision: {kept}")
    assert r.goal_met and r.final_metric >= 0.999
    assert any(row.kind == "sdpa" for row in r.layers if row.quantized)  # attention is (partly) in FP8
    assert all(row.source in ("inc", "bridge") for row in r.layers if row.quantized)


def test_convert_can_share_unconverted_parameters():
    from .models import ToyNet, toy_batches

    model = ToyNet()
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["conv2d"]}})
    scales = ib.compute_scales(ib.calibrate(model, toy_batches(), recipe), recipe, model=model)
    shared = ib.convert(model, scales, share_unconverted=True)
    copied = ib.convert(model, scales)
    assert shared.proj.weight is model.proj.weight and copied.proj.weight is not model.proj.weight
    assert isinstance(shared.conv1.weight, ib.Float8StaticTensor)
    x = toy_batches(1, seed=2)[0]
    assert torch.equal(shared(x), copied(x))


def test_metric_sensitivity_ranks_layers_by_leave_one_out_gain(tmp_path):
    """``tuning.sensitivity: metric``: each layer's score is minus the metric gained by keeping only
    that layer in high precision (the same number ``ib.quantize`` with that layer excluded gives), the
    fallback keeps the layers with the biggest gain first, and an evaluation without a finite metric
    ranks its layer least sensitive."""
    from tests.models import LinearNet, linear_batches

    torch.manual_seed(0)
    model, batches = LinearNet().eval(), linear_batches(2)
    with torch.no_grad():
        reference = model(batches[0])

    def closeness(m):  # 0 for the float model, below 0 for a quantized one
        if type(m.fc1.weight) is torch.nn.Parameter and isinstance(m.fc3.weight, ib.Float8StaticTensor):
            return float("nan")  # fc1 alone in high precision: no usable metric
        with torch.no_grad():
            return -float((m(batches[0]) - reference).pow(2).mean())

    recipe = ib.Recipe.model_validate({"tuning": {"search_space": {}, "sensitivity": "metric"}})
    result = ib.autotune(model, closeness, calib_data=batches, recipe=recipe, tolerable_loss={"absolute": 0.0},
                         output_dir=tmp_path, progress=False)
    events = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    ranking = next(e for e in events if e["type"] == "sensitivity")
    assert ranking["method"] == "metric" and set(ranking["sqnr"]) == {"fc1", "fc2", "fc3"}
    best = result.report.trials[0].metric
    for name in ("fc2", "fc3"):
        alone = ib.Recipe.model_validate({"quantization": {"exclude": [name]}})
        gain = closeness(ib.quantize(model, batches, alone)) - best
        assert ranking["sqnr"][name] == -gain
    assert ranking["sqnr"]["fc1"] == 1e9  # NaN metric: least sensitive
    r = result.report
    order = sorted(ranking["sqnr"], key=ranking["sqnr"].get)
    assert order[-1] == "fc1" and r.goal_met
    kept = [row for row in r.layers if row.fallback_reason and row.fallback_reason.startswith("fallback")]
    assert kept and all("metric gain" in row.fallback_reason for row in kept)
    assert {row.name for row in kept} == set(order[:len(kept)])
    assert any("leave-one-out metric gain" in note for note in r.notes)


def test_autotune_result_keeps_the_scale_notes():
    """An expert Linear no calibration token reached takes its siblings' scales with a note
    (``ScaleSet.notes``); the tuned model's conversion summary shows it as ``ib.quantize``'s does."""

    class ListMoE(torch.nn.Module):  # top-1 routing over a ModuleList of experts
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(16, 3)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            choice, out = self.gate(x).argmax(-1), torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                if (rows := choice == e).any():
                    out[rows] = expert(x[rows])
            return out

    torch.manual_seed(0)
    model = ListMoE().eval()
    with torch.no_grad():  # expert 2 never gets a token
        model.gate.bias.copy_(torch.tensor([0.0, 0.0, -1e4]))
    batches = [torch.randn(8, 16) for _ in range(2)]
    result = ib.autotune(model, lambda m: 0.0, calib_data=batches, recipe=MAXABS_ONLY, tolerable_loss={"absolute": 1.0},
                         progress=False)
    assert result.report.goal_met
    assert "note experts.2: no calibration tokens" in ib.conversion_result(result.model).summary()

"""Cost of autotune's calibrate-once design against calibrating for every trial (INC's approach).

Run from the repository root:

    .venv/bin/python benchmarks/tuning_cost.py            # all-MiniLM-L6-v2, Linear + attention
    .venv/bin/python benchmarks/tuning_cost.py --digits   # the small digits CNN (seconds)

Both ways try the same 6 whole-model settings (weight granularity × 3 activation scale methods);
the tolerance is set out of reach so all 6 run. Printed per run: the wall time of ``ib.autotune``,
the time of its one calibration and of its baseline and trial evaluations, a calibration timed on
its own, and the same 6 trials done INC's way, each calibrating from scratch; then the median run
with the ratio to INC's way and the check against the target: autotune <= (1 calibration + the
evaluations) × 1.10.

There are ``--repeats`` runs (default 5), each on a fresh copy of the model with the library's
caches cleared, so every run pays what a first run on a model pays (once-per-process costs,
imports and the like, are paid by a one-trial warm-up run before; in a process's first run they
add about 0.05 s). The target is checked within each run: the run's wall time against the
calibration and the evaluations *of that run* (the calibration as the report's ``timings`` record
it, the evaluations timed around ``eval_fn``), so the machine's run-to-run noise (here evaluations
varied by up to 40 % between runs) falls on both sides alike. The verdict is on the median run.
Each timed part starts after ``gc.collect()``: with transformers loaded the process holds ~410k
objects, and a full collection (0.2-0.3 s here) comes whenever enough survivors pile up, from
whatever ran before; without it one run in a few took such a pause inside autotune or inside its
calibration at random.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import sys
import time

import torch

import inc_bridge as ib

SPACE = {"weight_granularity": ["per_tensor", "per_channel"],
         "activation_scale_method": ["maxabs_arbitrary", "percentile", "mse"]}


def setup(digits: bool):
    if digits:
        from inc_bridge.demo import digits_accuracy, digits_calibration, digits_model

        return digits_model(), digits_calibration(), digits_accuracy, ["linear", "conv2d"], "digits CNN"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from inc_bridge.examples import minilm

    model = minilm.model()
    ib.capture_attention(model)
    return model, minilm.calibration_batches(), minilm.embedding_cosine, ["linear", "sdpa"], "all-MiniLM-L6-v2"


def incs_way(model, calib, recipe, evaluate) -> float:
    """Seconds for the same 6 trials done as INC's tuning loop does them: each calibrates again."""
    t0 = time.perf_counter()
    for granularity, method in itertools.product(SPACE["weight_granularity"], SPACE["activation_scale_method"]):
        data = recipe.model_dump(mode="json", exclude_none=True)
        data["quantization"]["weight"]["granularity"] = granularity
        data["quantization"]["activation"]["scale_method"] = method
        trial_recipe = ib.Recipe.model_validate(data)
        measurements = ib.calibrate(model, calib, trial_recipe)
        qmodel = ib.convert(model, ib.compute_scales(measurements, trial_recipe, model=model), form=recipe.form)
        evaluate(qmodel)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--digits", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="runs (autotune, a calibration alone, INC's way); the median run is judged")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, calib, evaluate, ops, name = setup(args.digits)
    recipe = ib.Recipe.model_validate({
        "quantization": {"ops": ops},
        "tuning": {"max_trials": 6, "layer_fallback": False, "search_space": SPACE,
                   "tolerable_loss": {"absolute": 0.0}},
    })
    eval_times: list[float] = []

    def timed_eval(m):
        t = time.perf_counter()
        # the baseline is lifted by 1 so that no trial reaches it: all 6 trials run
        value = evaluate(m) + (1.0 if not eval_times else 0.0)
        eval_times.append(time.perf_counter() - t)
        return value

    # warm-up: INC's first import (it probes the CPU in a subprocess, ~1 s), lazy imports, the
    # reference embeddings and other once-per-process set-up (platform and package-version probes
    # for the report, oneDNN's first kernels for new shapes) are paid once here, not by whichever
    # run happens to go first: a one-trial autotune on a throwaway copy
    evaluate(model)
    one_trial = recipe.model_copy(update={"tuning": recipe.tuning.model_copy(update={"max_trials": 1})})
    ib.autotune(copy.deepcopy(model), evaluate, calib_data=calib[:1], recipe=one_trial, progress=False)
    runs = []
    for _ in range(args.repeats):
        # every run is a first run: a fresh copy (new weight tensors) and no memoised FP8 weights,
        # weight amax values or histogram clips from the run before
        fresh = copy.deepcopy(model)
        ib.clear_caches()
        eval_times.clear()
        gc.collect()  # see the module docstring
        t0 = time.perf_counter()
        result = ib.autotune(fresh, timed_eval, calib_data=calib, recipe=recipe, progress=False)
        ours = time.perf_counter() - t0
        assert len(result.report.trials) == 6, f"expected 6 trials, ran {len(result.report.trials)}"
        evals, inner_calibration = sum(eval_times), result.report.timings["calibration"]
        del result
        gc.collect()
        t0 = time.perf_counter()
        ib.calibrate(fresh, calib, recipe)
        alone = time.perf_counter() - t0
        ib.clear_caches()
        gc.collect()
        runs.append((ours, inner_calibration, evals, alone, incs_way(fresh, calib, recipe, evaluate)))

    print(f"{name}: 6 trials ({', '.join(sorted(SPACE))}), form {recipe.form.value}, backend {recipe.backend.value}")
    ratios = []
    for k, (t, c, e, alone, inc) in enumerate(runs, 1):
        ratios.append(t / (c + e))
        print(f"  run {k}: autotune {t:.2f} s = calibration {c:.2f} s + baseline and 6 trial evaluations {e:.2f} s "
              f"+ {t - c - e:.3f} s; x{ratios[-1]:.3f} of calibration + evaluations (a calibration alone: {alone:.2f} s; "
              f"INC's way {inc:.2f} s)")
    median = sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]
    ours, one_calibration, evals, alone, per_trial_calibration = runs[median]
    budget = (one_calibration + evals) * 1.10
    print(f"  median run (run {median + 1}):")
    print(f"  autotune (calibrate once)              {ours:8.2f} s")
    print(f"    one calibration                      {one_calibration:8.2f} s")
    print(f"    baseline + 6 trial evaluations       {evals:8.2f} s")
    print(f"  6 trials each calibrating from scratch {per_trial_calibration:8.2f} s")
    vs_inc = sorted(r[0] / r[4] for r in runs)[len(runs) // 2]
    print(f"  ratio autotune / per-trial calibration {vs_inc:8.2f}x (median over the runs, each run's own pair)")
    passed = sum(r <= 1.10 for r in ratios)
    verdict = "PASS" if ours <= budget else "FAIL"
    print(f"  {verdict}: autotune {ours:.2f} s vs target <= (1 calibration + evaluations) x 1.10 = {budget:.2f} s "
          f"(x{ratios[median]:.3f}; {passed} of {len(runs)} runs within x1.10; with the calibration timed alone "
          f"instead: x{ours / (alone + evals):.3f})")


if __name__ == "__main__":
    sys.exit(main())

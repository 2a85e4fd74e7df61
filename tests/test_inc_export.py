"""export_inc_measurements: INC's QUANTIZE mode quantizes from inc_bridge's measurements, bit for bit.

INC 3.10's QUANTIZE mode loads only the ``.npz`` twin of the measurement JSON (a pickle); inc_bridge
writes both, and INC converts a fresh copy of the model with ``FP8Config(mode="QUANTIZE",
dump_stats_path=...)`` straight from the export.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import inc_bridge as ib
from inc_bridge import _inc
from inc_bridge.measurements import LayerStats, Measurements, Source

from .models import LinearNet, ToyNet, inc_reference, linear_batches, toy_batches

DTYPES = [torch.float32, torch.bfloat16]
POW2 = {"weight": {"scale_method": "maxabs_pow2"}, "activation": {"scale_method": "maxabs_pow2"}}
PCS_POW2 = {"weight": {"granularity": "per_channel", "scale_method": "maxabs_pow2"},
            "activation": {"scale_method": "maxabs_pow2"}}
# (INC scale method, recipe quantization section); INC's per-channel method fails on Conv2d (DESIGN.md)
METHODS = {"maxabs_arbitrary": {}, "maxabs_pow2": POW2, "act_maxabs_pow2_weights_pcs_maxabs_pow2": PCS_POW2}
MODELS = {"toynet": (ToyNet, toy_batches), "linearnet": (LinearNet, linear_batches)}
CASES = [(m, s) for m in MODELS for s in METHODS if not (m == "toynet" and s.startswith("act_"))]


def _inc_quantize(model, exported_dir, tmp_path, dtype, method):
    """INC's QUANTIZE-mode convert of a fresh copy, reading the export as it is."""
    return _inc.quantize_from_dump(model, exported_dir / "measure", dtype, method)


def _assert_same_outputs(a, b, batches):
    with torch.no_grad():
        for x in batches:
            assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(("model_name", "method"), CASES)
def test_inc_quantizes_from_export_like_ib_convert(tmp_path, model_name, method, dtype):
    make_model, make_batches = MODELS[model_name]
    model = make_model().to(dtype).eval()
    batches = make_batches(dtype=dtype)
    recipe = ib.Recipe.model_validate({"quantization": METHODS[method]})
    meas = ib.calibrate(model, batches, recipe)
    written = ib.export_inc_measurements(meas, tmp_path / "exp" / "measure")
    assert [p.name for p in written] == ["measure_hooks_maxabs.json", "measure_hooks_maxabs.npz",
                                         "measure_hooks_maxabs_mod_list.json"]
    assert json.loads(written[2].read_text()) == meas.names

    from_export = _inc_quantize(model, tmp_path / "exp", tmp_path, dtype, method)
    ours = ib.convert(model, ib.compute_scales(meas, recipe, model=model), form="module")
    fresh = make_batches(n=3, dtype=dtype, seed=7)
    _assert_same_outputs(from_export, ours, fresh)
    # and INC's own prepare → calibrate → convert of the same data gives the same model, same scales
    reference = inc_reference(model, batches, dtype, method)
    _assert_same_outputs(from_export, reference, fresh)
    for name in meas.names:
        a, b = from_export.get_submodule(name), reference.get_submodule(name)
        assert a.quant_input.scale == b.quant_input.scale, name
        assert torch.equal(torch.as_tensor(a.dequant_weights.scale), torch.as_tensor(b.dequant_weights.scale)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_export_reads_back_as_the_same_statistics(tmp_path, dtype):
    model = ToyNet().to(dtype).eval()
    meas = ib.calibrate(model, toy_batches(dtype=dtype))
    ib.export_inc_measurements(meas, tmp_path / "measure")
    back = ib.load_inc_measurements(tmp_path)
    assert back.names == meas.names
    for name in meas.names:
        assert back[name].input_amax == meas[name].input_amax, name
        assert back[name].weight_amax == meas[name].weight_amax, name
    # INC's own measurement file of the same calibration holds the same numbers
    ib.calibrate(model, toy_batches(dtype=dtype), workdir=tmp_path / "inc_run")
    ours = json.loads((tmp_path / "measure_hooks_maxabs.json").read_text())
    incs = json.loads((tmp_path / "inc_run" / "measure_hooks_maxabs.json").read_text())
    assert ours == {k: incs[k] for k in ("GlobalRank", "LocalRank", "Mode", "Nodes")}


def test_merged_two_rank_measurements_export(tmp_path):
    """Two ranks' INC dumps (each calibrated on its own shard), merged by load_inc_measurements, export
    to one file from which INC quantizes exactly like single-process calibration on all the data."""
    model = ToyNet().eval()
    data = [b * (1 + 2 * (i % 2)) for i, b in enumerate(toy_batches(n=6, seed=3))]
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for rank in (0, 1):
        ib.calibrate(model, data[rank::2], workdir=tmp_path / f"r{rank}")
        shutil.copy(tmp_path / f"r{rank}" / "measure_hooks_maxabs.json", ranks / f"measure_hooks_maxabs_{rank}_2.json")
    merged = ib.load_inc_measurements(ranks)
    single = ib.calibrate(model, data)
    assert merged.ranks == (0, 1)
    assert all(merged[n].input_amax == single[n].input_amax for n in single.names)
    assert any(ib.calibrate(model, data[0::2])[n].input_amax != single[n].input_amax for n in single.names)

    ib.export_inc_measurements(merged, tmp_path / "exp" / "measure")
    from_export = _inc_quantize(model, tmp_path / "exp", tmp_path, torch.float32, "maxabs_arbitrary")
    recipe = ib.default_recipe()
    ours = ib.convert(model, ib.compute_scales(single, recipe, model=model), form="module")
    _assert_same_outputs(from_export, ours, toy_batches(n=3, seed=7))


def _stats(**kw) -> LayerStats:
    base = {"name": "fc", "kind": "linear", "input_amax": (1.5,), "weight_amax": 0.5}
    return LayerStats(**{**base, **kw})


@pytest.mark.parametrize(("stats", "match"), [
    (_stats(name="attn", kind="sdpa", input_amax=(1.0, 2.0, 3.0), weight_amax=None, source=Source.BRIDGE),
     r"layer 'attn': kind 'sdpa' is not a layer INC patches on CPU"),
    (_stats(name="emb", kind="embedding", input_amax=()), r"layer 'emb': kind 'embedding'"),
    (_stats(input_amax=(), weight_amax=None, inc_scales={"inputs": [0.1], "weight": 0.01}),
     r"layer 'fc': holds finished scales from an INC 'Scale' dump"),
    (_stats(weight_amax=None), r"layer 'fc': has no weight amax"),
    (_stats(weight_amax=None, weight_amax_per_channel=(0.5, 0.25)), r"layer 'fc': has only per-channel weight amax"),
    (_stats(weight_amax_per_channel=(0.4, 0.25)), r"layer 'fc': weight amax 0.5 is not the maximum"),
    (_stats(input_amax=()), r"layer 'fc': has 0 input amax"),
    (_stats(input_amax=(1.0, 2.0)), r"layer 'fc': has 2 input amax"),
    (_stats(input_amax=(float("nan"),)), r"layer 'fc'.*not finite"),
], ids=["sdpa", "embedding", "scale-dump", "no-weight", "per-channel-only", "inconsistent", "never-ran",
        "two-inputs", "nan"])
def test_refuses_what_inc_cannot_represent(tmp_path, stats, match):
    meas = Measurements(layers={"ok": _stats(name="ok"), stats.name: stats})
    with pytest.raises(ib.CalibrationError, match=match):
        ib.export_inc_measurements(meas, tmp_path / "measure")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_refuses_empty_measurements_and_a_stale_npz(tmp_path):
    with pytest.raises(ib.CalibrationError, match="no layers"):
        ib.export_inc_measurements(Measurements(layers={}), tmp_path / "measure")
    meas = Measurements(layers={"fc": _stats()})
    (tmp_path / "measure_hooks_maxabs_MAXABS_ARBITRARY.npz").write_bytes(b"")
    with pytest.raises(ib.SerializationError, match=r"would reuse them instead"):
        ib.export_inc_measurements(meas, tmp_path / "measure")
    # another prefix in the same folder is fine, and a second export replaces the first
    ib.export_inc_measurements(meas, tmp_path / "other")
    written = ib.export_inc_measurements(Measurements(layers={"fc": _stats(input_amax=(2.0,))}), tmp_path / "other")
    assert json.loads(written[0].read_text())["Nodes"] == {"fc": {"inputs": [[[2.0]]], "params": {"weight": [[0.5]]}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "measure_hooks_maxabs_MAXABS_ARBITRARY.npz", "other_hooks_maxabs.json", "other_hooks_maxabs.npz",
        "other_hooks_maxabs_mod_list.json"]


def test_the_npz_is_what_incs_own_script_makes_from_the_json(tmp_path):
    """INC's postprocessing script turns a measurement JSON into the npz its QUANTIZE mode loads; the
    npz inc_bridge writes holds the same data (read here with numpy's pickle loader, as INC does)."""
    import numpy as np

    model = ToyNet().eval()
    written = ib.export_inc_measurements(ib.calibrate(model, toy_batches()), tmp_path / "exp" / "measure")
    _inc.npz_from_json_dump(tmp_path / "exp", tmp_path / "inc")
    ours = np.load(written[1], allow_pickle=True)["arr_0"].item()
    incs = np.load(tmp_path / "inc" / "measure_hooks_maxabs.npz", allow_pickle=True)["arr_0"].item()
    assert ours.keys() == incs.keys() and {k: ours[k] for k in ours if k != "Nodes"} == {
        k: incs[k] for k in incs if k != "Nodes"}
    assert ours["Nodes"].keys() == incs["Nodes"].keys()
    for name, node in ours["Nodes"].items():
        theirs = incs["Nodes"][name]
        # float32 here (as INC's own calibration writes them), float64 from the script: the same values
        assert all(np.array_equal(a, b) for a, b in zip(node["inputs"], theirs["inputs"], strict=True))
        assert np.array_equal(node["params"]["weight"], theirs["params"]["weight"])

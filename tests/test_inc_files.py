"""Reading INC's dump files: real INC output, malformed files, and unsafe pickles."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

import inc_bridge as ib

from .models import LinearNet


@pytest.fixture(scope="module")
def inc_dump(tmp_path_factory):
    path = tmp_path_factory.mktemp("dump")
    model = LinearNet()
    meas = ib.calibrate(model, [torch.randn(3, 32) for _ in range(2)], workdir=path)
    return path, meas


def test_json_and_npz_agree(inc_dump, tmp_path):
    path, meas = inc_dump
    from_json = ib.load_inc_measurements(path / "measure_hooks_maxabs.json")
    from_npz = ib.load_inc_measurements(path / "measure_hooks_maxabs.npz")
    assert from_json.layers == from_npz.layers
    assert {n: s.input_amax for n, s in from_json.layers.items()} == {n: s.input_amax for n, s in meas.layers.items()}
    assert all(s.source is ib.measurements.Source.INC_DUMP for s in from_json.layers.values())
    assert from_json.inc_config["mode"] == "DynamicRange"
    # a directory holding only the npz is read through the restricted unpickler
    (tmp_path / "measure_hooks_maxabs.npz").write_bytes((path / "measure_hooks_maxabs.npz").read_bytes())
    assert ib.load_inc_measurements(tmp_path).layers == from_npz.layers


def test_missing(tmp_path):
    with pytest.raises(ib.CalibrationError, match="no such file or directory"):
        ib.load_inc_measurements(tmp_path / "nope")
    with pytest.raises(ib.CalibrationError, match="no INC measurement file found"):
        ib.load_inc_measurements(tmp_path)


def _write(tmp_path, obj, name="measure_hooks_maxabs.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "cannot read INC measurement file: not valid JSON"),
        ([1, 2], "expected a mapping at the top level"),
        ({"Mode": "Weird", "Nodes": {}}, "unknown or missing 'Mode'"),
        ({"Mode": "DynamicRange", "Nodes": []}, "'Nodes' must be a mapping"),
        ({"Mode": "DynamicRange", "Nodes": {}}, "the dump has no measured layers"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": "x"}}}, "node 'fc': 'inputs' must be a list"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [["a"]]}}}, "node 'fc' input 0: expected numbers"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [[]]}}}, "node 'fc' input 0: empty measurement"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [[["NaN"]]]}}}, "node 'fc' input 0: expected numbers"),
        ('{"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [[NaN]]}}}', "layer 'fc' in .*not finite"),
        ({"Mode": "Scale", "Nodes": {"fc": {"inputs": [0.0], "params": {"weight": 1.0}}}}, "scale 0.0 is not a positive"),
        ({"Mode": "Scale", "Nodes": {"fc": {"inputs": [1.0], "params": {"weight": {"1": [1.0]}}}}}, "lacks key '0'"),
    ],
)
def test_malformed_json_names_file_and_problem(tmp_path, content, match):
    p = _write(tmp_path, content)
    with pytest.raises(ib.CalibrationError, match=match) as info:
        ib.load_inc_measurements(p)
    assert str(p) in str(info.value)


def test_truncated_npz(inc_dump, tmp_path):
    path, _ = inc_dump
    data = (path / "measure_hooks_maxabs.npz").read_bytes()
    p = tmp_path / "measure_hooks_maxabs.npz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ib.CalibrationError, match="measure_hooks_maxabs.npz: cannot read INC measurement file"):
        ib.load_inc_measurements(p)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_npz_with_foreign_pickle_is_refused(tmp_path):
    arr = np.empty((), dtype=object)
    arr[()] = {"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [_Evil()]}}}
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    p = tmp_path / "measure_hooks_maxabs.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue())
    with pytest.raises(ib.CalibrationError, match="refusing to load posix.system"):
        ib.load_inc_measurements(p)
    assert isinstance(pickle.UnpicklingError("x"), Exception)


_RANK_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import inc_bridge as ib
from tests.models import LinearNet, linear_batches
rank = int(sys.argv[1])
torch.manual_seed(0)
model = LinearNet()
data = [b * (3 if i % 2 else 1) for i, b in enumerate(linear_batches(n=4, seed=1))]  # rank 1 sees larger inputs
shard = data[rank::2]
ib.calibrate(model, shard, workdir=sys.argv[2])
"""


def _per_rank_dumps(directory):
    """Two real INC runs, as ranks 0 and 1 of 2 (INC names its files by WORLD_SIZE / LOCAL_RANK)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    script = _RANK_SCRIPT.format(repo=str(REPO))
    for rank in (0, 1):
        # each rank gets its own folder: INC moves dumps it finds in its folder to a backup folder
        own = directory / f"rank{rank}"
        own.mkdir()
        env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        subprocess.run([sys.executable, "-c", script, str(rank), str(own)], env=env, check=True,
                       timeout=300, capture_output=True, cwd=own)
        for f in own.iterdir():
            f.rename(directory / f.name)
        own.rmdir()


def test_per_rank_dumps_merge_to_single_run_scales(tmp_path):
    from .models import LinearNet, linear_batches

    _per_rank_dumps(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert "measure_hooks_maxabs_0_2.json" in names and "measure_hooks_maxabs_1_2.json" in names
    merged = ib.load_inc_measurements(tmp_path)
    assert merged.ranks == (0, 1)
    torch.manual_seed(0)
    model = LinearNet()
    single = ib.calibrate(model, [b * (3 if i % 2 else 1) for i, b in enumerate(linear_batches(n=4, seed=1))])
    for recipe in (ib.Recipe(), ib.Recipe.model_validate({"quantization": {"weight": {"scale_method": "maxabs_pow2"},
                                                                             "activation": {"scale_method": "maxabs_pow2"}}})):
        a = ib.compute_scales(single, recipe, model=model)
        b = ib.compute_scales(merged, recipe, model=model)
        for name in a.layers:
            assert torch.equal(a[name].input_scale, b[name].input_scale)
            assert torch.equal(a[name].weight_scale, b[name].weight_scale)
    # each rank alone is not the whole story: its amax differs from the merged one somewhere
    rank0 = ib.load_inc_measurements(tmp_path / "measure_hooks_maxabs_0_2.json")
    assert any(rank0[n].input_amax != merged[n].input_amax for n in merged.names)


def test_per_rank_dumps_mismatched_or_missing(inc_dump, tmp_path):
    path, _ = inc_dump
    data = json.loads((path / "measure_hooks_maxabs.json").read_text())
    (tmp_path / "measure_hooks_maxabs_0_2.json").write_text(json.dumps(data))
    with pytest.raises(ib.CalibrationError, match=r"incomplete: found ranks \[0\] of world size\(s\) \[2\]"):
        ib.load_inc_measurements(tmp_path)
    del data["Nodes"]["fc2"]
    (tmp_path / "measure_hooks_maxabs_1_2.json").write_text(json.dumps(data))
    with pytest.raises(ib.CalibrationError, match="rank 1 lacks layers the other ranks measured: fc2"):
        ib.load_inc_measurements(tmp_path)
    # one rank's file on its own is fine
    assert ib.load_inc_measurements(tmp_path / "measure_hooks_maxabs_0_2.json").names == ["fc1", "fc2", "fc3"]


def test_scale_mode_per_channel_file(tmp_path):
    p = _write(tmp_path, {"GlobalRank": None, "LocalRank": None, "Mode": "Scale", "Nodes": {
        "fc1": {"inputs": [0.5], "outputs": [0.1], "params": {"weight": {"0": [0.25] * 64, "1": [1.0] * 32}}}}},
        name="measure_hooks_maxabs_ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2.json")
    meas = ib.load_inc_measurements(p)
    assert meas.inc_config["scale_method"] == "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"
    model = LinearNet()
    recipe = ib.Recipe.model_validate({"quantization": {"include": ["fc1"]}})
    scales = ib.compute_scales(meas, recipe, model=model)
    assert float(scales["fc1"].input_scale) == 0.5 and scales["fc1"].weight_scale.shape == (64,)

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
        ("{not json", "cannot read INC measurement file: JSONDecodeError"),
        ([1, 2], "expected a mapping at the top level"),
        ({"Mode": "Weird", "Nodes": {}}, "unknown or missing 'Mode'"),
        ({"Mode": "DynamicRange", "Nodes": []}, "'Nodes' must be a mapping"),
        ({"Mode": "DynamicRange", "Nodes": {}}, "the dump has no measured layers"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": "x"}}}, "node 'fc': 'inputs' must be a list"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [["a"]]}}}, "node 'fc' input 0: expected numbers"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [[]]}}}, "node 'fc' input 0: empty measurement"),
        ({"Mode": "DynamicRange", "Nodes": {"fc": {"inputs": [[["NaN"]]]}}}, "layer 'fc' in .*not finite"),
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


def test_per_rank_dumps_are_reported(inc_dump, tmp_path):
    path, _ = inc_dump
    text = (path / "measure_hooks_maxabs.json").read_text()
    for rank in (0, 1):
        (tmp_path / f"measure_hooks_maxabs_{rank}_2.json").write_text(text)
    with pytest.raises(ib.CalibrationError, match=r"per-rank INC dumps \(ranks 0, 1\)"):
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

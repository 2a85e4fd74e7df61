"""Issue 14, loading: crafted saved models, state dicts and model directories give IncBridgeError only.

Each test reproduces an input of the probe (a scale that does not fit its FP8 data, invalid scale
values, FIFOs, /dev/zero and links out of the directory, malformed manifests, ``device="cuda"`` on
a CPU build) and checks the clean error, that the skeleton is unchanged and that nothing is left
behind. The crash cases (pointers handed to C) run in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import inc_bridge as ib
from inc_bridge.errors import ConversionError, IncBridgeError, SerializationError
from inc_bridge.kernels import Fp8Params, available_backends
from inc_bridge.serialization import files as ser_files
from inc_bridge.tensor import Float8StaticTensor

REPO = Path(__file__).resolve().parent.parent
CPU = "cpu" if "cpu" in available_backends("cpu") else "emulated"
E4M3 = torch.float8_e4m3fn


class Net(nn.Module):
    def __init__(self, rows: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(8, rows)
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _quantized(form: str, rows: int = 64) -> nn.Module:
    """A converted Net without INC: scales from hand-written statistics."""
    model = Net(rows).eval()
    meas = ib.Measurements(layers={
        "fc": ib.LayerStats("fc", "linear", input_amax=(2.0,), weight_amax=1.0, dtype="float32"),
        "conv": ib.LayerStats("conv", "conv2d", input_amax=(2.0,), weight_amax=1.0, dtype="float32"),
    })
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "conv2d"]}})
    return ib.convert(model, ib.compute_scales(meas, recipe, model=model), form=form, backend=CPU)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per form: a pristine saved directory (copied per test before it is tampered with)."""
    root = tmp_path_factory.mktemp("saved")
    return {form: ib.save(_quantized(form), root / form) for form in ("subclass", "module")}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rewrite(path: Path, edit_tensors=None, edit_manifest=None) -> None:
    """Tamper with a saved directory consistently: tensors and their manifest records both change."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / ser_files.TENSORS_FILE))
    manifest = json.loads((path / ser_files.MANIFEST_FILE).read_text())
    if edit_tensors is not None:
        edit_tensors(tensors)
        manifest["tensors"] = {n: ser_files.tensor_record(t) for n, t in tensors.items()}
        save_file(tensors, str(path / ser_files.TENSORS_FILE))
    if edit_manifest is not None:
        edit_manifest(manifest)
    (path / ser_files.MANIFEST_FILE).write_text(json.dumps(manifest))


def _state(model: nn.Module):
    """Everything a failed load must leave alone: module types and objects, tensor objects and values."""
    return [(n, type(m), id(m), {k: (id(v), v.clone()) for k, v in [*m._parameters.items(), *m._buffers.items()]
                                  if v is not None}) for n, m in model.named_modules()]


def _assert_unchanged(model: nn.Module, before) -> None:
    after = _state(model)
    assert [(n, t, i) for n, t, i, _ in after] == [(n, t, i) for n, t, i, _ in before]
    for (_, _, _, a), (_, _, _, b) in zip(after, before, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1])
    assert getattr(model, "_inc_bridge_conversion", None) is None


def _load_fails(path: Path, match: str, error: type[Exception] = SerializationError, **kwargs) -> None:
    skeleton = Net().eval()
    before = _state(skeleton)
    files_before = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
    with pytest.raises(error, match=match):
        ib.load(skeleton, path, **kwargs)
    _assert_unchanged(skeleton, before)
    if files_before is not None:
        assert sorted(p.name for p in path.iterdir()) == files_before


# ------------------------------------------------------------------ 1: scales that do not fit their data


SUBCLASS_CASES = {
    "empty scale": ("fc.weight.scale", lambda t: torch.empty(0)),
    "2 scales for 64 rows": ("fc.weight.scale", lambda t: torch.ones(2, 1)),
    "65 scales for 64 rows": ("fc.weight.scale", lambda t: torch.ones(65, 1)),
    "float32 qdata": ("fc.weight.qdata", lambda t: t.float()),
    "uint8 qdata": ("fc.weight.qdata", lambda t: t.view(torch.uint8)),
    "empty act_scale": ("fc.weight.act_scale", lambda t: torch.empty(0)),
    "2-element act_scale": ("fc.weight.act_scale", lambda t: torch.ones(2)),
    "missing act_scale": ("fc.weight.act_scale", None),
}


@pytest.mark.parametrize("case", SUBCLASS_CASES)
def test_saved_subclass_weight_whose_parts_do_not_fit_is_refused(tmp_path, saved, case):
    name, change = SUBCLASS_CASES[case]
    path = _copy(saved["subclass"], tmp_path / "m")

    def edit(tensors):
        if change is None:
            del tensors[name]
        else:
            tensors[name] = change(tensors[name])

    def drop_from_layer(manifest):
        if change is None:
            manifest["layers"]["fc"]["tensors"]["weight"]["data"].remove("act_scale")

    _rewrite(path, edit, drop_from_layer)
    _load_fails(path, r"fc\.weight")


def test_e5m2_data_labelled_e4m3_is_refused(tmp_path, saved):
    path = _copy(saved["subclass"], tmp_path / "m")
    _rewrite(path, lambda t: t.update({"fc.weight.qdata": t["fc.weight.qdata"].float().to(torch.float8_e5m2)}))
    _load_fails(path, r"mislabelled")


# torch.load(weights_only=True) + load_state_dict(assign=True) + a cpu-backend forward: the crafted
# weights are built by hand (bypassing every check) and pickled; loading them must raise, not crash.
_CRASH_SCRIPT = """
import io, sys, torch
from torch import nn
import inc_bridge as ib
from inc_bridge.tensor import Float8StaticTensor

def crafted(rows, cols, scale, conv=False):
    shape = (rows, cols, 1, 1) if conv else (rows, cols)
    good = Float8StaticTensor(torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.tensor(1.0), 448.0, "{backend}",
                              torch.float32, act_scale=torch.tensor(1.0))
    good.__dict__["scale"] = scale          # what a crafted file holds: nothing checks this assignment
    return good

cases = {{
    "empty scale": (nn.Linear(64, 64), lambda: crafted(64, 64, torch.empty(0))),
    "4M-row linear, 2 scales": (nn.Linear(1, 1 << 22), lambda: crafted(1 << 22, 1, torch.ones(2, 1))),
    "1M-channel conv, 2 scales": (nn.Conv2d(1, 1 << 20, 1), lambda: crafted(1 << 20, 1, torch.ones(2, 1, 1, 1), True)),
}}
for name, (layer, make) in cases.items():
    sd = layer.state_dict()
    sd["weight"] = make()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    try:
        loaded = torch.load(buf, weights_only=True)
        layer.load_state_dict(loaded, assign=True)
        x = torch.ones(1, 1, 2, 2) if isinstance(layer, nn.Conv2d) else torch.ones(2, layer.in_features)
        layer(x)
        print(name, "NO ERROR")
    except ib.IncBridgeError as exc:
        print(name, type(exc).__name__)
"""


def test_crafted_state_dicts_through_torch_load_exit_normally_with_inc_bridge_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT.format(backend=CPU)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines == [f"{name} SerializationError" for name in
                     ("empty scale", "4M-row linear, 2 scales", "1M-channel conv, 2 scales")], proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_cpu_kernels_refuse_sizes_that_do_not_fit_before_calling_c():
    from inc_bridge.kernels import cpu

    if cpu.native() is None:
        pytest.skip("native library not built")
    p = Fp8Params(E4M3, 448.0, torch.float32)
    q, x = torch.zeros(64, 8, dtype=E4M3), torch.ones(2, 8)
    for scale, act in ((torch.empty(0), torch.tensor(1.0)), (torch.ones(2, 1), torch.tensor(1.0)),
                       (torch.tensor(1.0), torch.ones(2)), (torch.tensor(1.0), torch.empty(0))):
        with pytest.raises(ConversionError, match="cpu kernel"):
            cpu.linear_cpu(x, q, scale, act, None, p)
    with pytest.raises(ConversionError, match="cpu kernel"):
        cpu.native().dequant(q, torch.ones(3), torch.float32)
    with pytest.raises(ConversionError, match="cpu kernel"):
        cpu.conv2d_cpu(torch.ones(1, 3, 4, 4), torch.zeros(4, 3, 3, 3, dtype=torch.float32), torch.tensor(1.0),
                       torch.tensor(1.0), None, p)


def test_float8_static_tensor_refuses_parts_that_do_not_fit():
    q = torch.zeros(64, 8, dtype=E4M3)
    bad = [
        (q, torch.empty(0), torch.tensor(1.0), 448.0),
        (q, torch.ones(2, 1), torch.tensor(1.0), 448.0),
        (q.float(), torch.tensor(1.0), torch.tensor(1.0), 448.0),
        (q, torch.tensor(1, dtype=torch.int32), torch.tensor(1.0), 448.0),
        (q, torch.tensor(1.0), torch.ones(2), 448.0),
        (q, torch.tensor(1.0), torch.tensor(1.0), float("nan")),
        (q, torch.tensor(1.0), torch.tensor(1.0), 57344.0),  # beyond e4m3's range
    ]
    for qdata, scale, act, fp8_max in bad:
        with pytest.raises(ConversionError):
            Float8StaticTensor(qdata, scale, fp8_max, "emulated", torch.float32, act_scale=act)
    w = Float8StaticTensor(q, torch.tensor(1.0), 448.0, "emulated", torch.float32, act_scale=None)
    with pytest.raises(ConversionError, match="activation scale"):
        torch.nn.functional.linear(torch.ones(2, 8), w)


@pytest.mark.parametrize("key,value", [
    ("fc.weight_scale", torch.tensor(1, dtype=torch.int32)),
    ("fc.weight_scale", torch.empty(0)),
    ("fc.qweight", torch.zeros(64, 8)),
    ("fc.qweight", torch.zeros(64, 8, dtype=torch.float8_e5m2)),
    ("fc.input_scale", torch.tensor(float("nan"))),
    ("fc.input_scale", torch.tensor(-1.0)),
])
def test_module_form_load_state_dict_refuses_misfit_buffers(key, value):
    qmodel = _quantized("module")
    sd = qmodel.state_dict()
    sd[key] = value
    before = _state(qmodel.fc)
    for assign in (True, False):
        with pytest.raises(SerializationError, match=key.replace(".", r"\.")):
            qmodel.load_state_dict(sd, assign=assign)
        _assert_unchanged(qmodel.fc, before)
    with pytest.raises(ConversionError):
        setattr(qmodel.fc, key.split(".")[1], torch.empty(0) if "scale" in key else torch.zeros(3, dtype=E4M3))


# ------------------------------------------------------------------ 13: invalid scale values


@pytest.mark.parametrize("form", ["subclass", "module"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5, "int32"])
def test_invalid_scale_values_in_saved_models_are_refused(tmp_path, saved, form, value):
    name = "fc.weight.scale" if form == "subclass" else "fc.weight_scale"
    path = _copy(saved[form], tmp_path / "m")
    scale = torch.tensor(1, dtype=torch.int32) if value == "int32" else torch.tensor(value)
    _rewrite(path, lambda t: t.update({name: scale}))
    _load_fails(path, name.replace(".", r"\."))


# ------------------------------------------------------------------ 11: FIFOs, devices, links out


@pytest.mark.parametrize("target", [ser_files.MANIFEST_FILE, ser_files.TENSORS_FILE])
def test_fifo_device_and_outside_links_in_a_model_directory_are_refused(tmp_path, saved, target):
    path = _copy(saved["subclass"], tmp_path / "m")
    outside = tmp_path / "outside"
    outside.write_bytes((path / target).read_bytes())
    (path / target).unlink()
    os.mkfifo(path / target)
    _load_fails(path, "not a regular file")
    (path / target).unlink()
    (path / target).symlink_to("/dev/zero")
    _load_fails(path, "outside")
    (path / target).unlink()
    (path / target).symlink_to(outside)
    _load_fails(path, "outside")


# ------------------------------------------------------------------ 12: malformed manifests, device


def _deep(n: int) -> str:
    return "[" * n + "]" * n


MANIFEST_CASES = {
    "layers fc is a number": lambda m: m["layers"].update(fc=3),
    "config is a list": lambda m: m["layers"]["fc"].update(config=[]),
    "shape is a string": lambda m: m["tensors"]["fc.qweight"].update(shape="64"),
    "versions is a list": lambda m: m.update(versions=[]),
    "tensors entry is a number": lambda m: m["tensors"].update({"fc.qweight": 1}),
    "aliases to a number": lambda m: m.update(aliases={"x": 1}),
    "fp8_max negative": lambda m: m["layers"]["fc"]["config"].update(fp8_max=-1.0),
    "fp8_max huge": lambda m: m["layers"]["fc"]["config"].update(fp8_max=1e400),
    "in_features a string": lambda m: m["layers"]["fc"]["config"].update(in_features="8"),
    "recipe a list": lambda m: m.update(recipe=[1]),
    "form a dict": lambda m: m.update(form={}),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_wrong_types_in_manifest_sections_raise_serialization_error(tmp_path, saved, case):
    path = _copy(saved["module"], tmp_path / "m")
    _rewrite(path, edit_manifest=MANIFEST_CASES[case])
    _load_fails(path, "inc_bridge.json|config")


def test_deep_json_in_manifest_and_safetensors_header_is_refused(tmp_path, saved):
    path = _copy(saved["module"], tmp_path / "m")
    (path / ser_files.MANIFEST_FILE).write_text(_deep(100_000))
    _load_fails(path, "nested too deeply")
    path = _copy(saved["module"], tmp_path / "m2")
    header = '{"a": ' + _deep(100_000) + "}"
    (path / ser_files.TENSORS_FILE).write_bytes(struct.pack("<Q", len(header)) + header.encode())
    _load_fails(path, "nested too deeply")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can load to cuda")
def test_load_to_cuda_on_a_cpu_build_names_cuda(saved):
    _load_fails(saved["subclass"], "CUDA is not available", error=ib.BackendUnavailableError, device="cuda")


# ------------------------------------------------------------------ properties

_DTYPES = [torch.float32, torch.int32, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16]
_SHAPES = [(), (0,), (1,), (2,), (64, 1), (2, 1), (64, 8), (8, 64), (65, 1)]
_VALUES = [1.0, 0.0, -1.0, float("nan"), float("inf"), 1e-3]


def _tensor(dtype, shape, value):
    return torch.full(shape, value).to(dtype)


tensors_st = st.builds(_tensor, st.sampled_from(_DTYPES), st.sampled_from(_SHAPES), st.sampled_from(_VALUES))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(qdata=tensors_st, scale=tensors_st, act=st.one_of(st.none(), tensors_st))
def test_property_crafted_weights_through_torch_load_and_module_state_dict(qdata, scale, act):
    # subclass form: a hand-made (unchecked) Float8StaticTensor, pickled and torch.load()ed
    good = Float8StaticTensor(torch.zeros(64, 8, dtype=E4M3), torch.tensor(1.0), 448.0, "emulated", torch.float32,
                              act_scale=torch.tensor(1.0))
    good.__dict__.update(qdata=qdata, scale=scale, act_scale=act)
    buf = io.BytesIO()
    torch.save({"weight": good}, buf)
    buf.seek(0)
    try:
        loaded = torch.load(buf, weights_only=True)["weight"]
        layer = nn.Linear(8, 64)
        layer.load_state_dict({"weight": loaded, "bias": torch.zeros(64)}, assign=True)
        layer(torch.ones(2, 8))
    except IncBridgeError:
        pass
    # module form: the same tensors as a QuantizedLinear's buffers
    q = ib.nn.QuantizedLinear(8, 64, False, fp8_dtype=E4M3, fp8_max=448.0, dtype=torch.float32, backend=CPU)
    before = _state(q)
    sd = {"qweight": qdata, "weight_scale": scale, "input_scale": torch.tensor(1.0) if act is None else act}
    try:
        q.load_state_dict(sd, assign=True)
    except IncBridgeError:
        _assert_unchanged(q, before)
    else:
        q(torch.ones(2, 8))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_SECTIONS = ["layers", "tensors", "aliases", "versions", "form", "backend", "skipped", "recipe", "scales"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(section=st.sampled_from(_SECTIONS), layer_key=st.sampled_from(["config", "form", "class", "kind", None]),
       value=_json, form=st.sampled_from(["subclass", "module"]), tensor=st.one_of(st.none(), tensors_st))
def test_property_crafted_manifests_and_tensors_only_raise_inc_bridge_error(tmp_path_factory, saved, section, layer_key,
                                                                           value, form, tensor):
    path = _copy(saved[form], tmp_path_factory.mktemp("p") / "m")

    def edit_manifest(m):
        if layer_key is not None and section == "layers":
            rec = m["layers"]["fc"]
            key = layer_key if layer_key in rec or form == "module" else "tensors"
            rec[key] = value
        else:
            m[section] = value

    def edit_tensors(t):
        t["fc.weight.scale" if form == "subclass" else "fc.weight_scale"] = tensor

    _rewrite(path, edit_tensors if tensor is not None else None, edit_manifest)
    skeleton = Net().eval()
    before = _state(skeleton)
    try:
        ib.load(skeleton, path)
    except IncBridgeError:
        _assert_unchanged(skeleton, before)


def test_clean_round_trip_still_works(saved):
    x = torch.ones(2, 8)
    for form, path in saved.items():
        assert torch.equal(ib.load(Net().eval(), path)(x), ib.load(Net().eval(), path)(x)), form

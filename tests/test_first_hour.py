"""A new user's first hour: what inc_bridge prints and says without being asked."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_import_prints_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import inc_bridge"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_quantize_prints_nothing(tmp_path):
    from .conftest import REPO

    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import inc_bridge as ib; from tests.models import ToyNet, toy_batches; "
              "ib.quantize(ToyNet().eval(), toy_batches())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # INC's import-time warnings included


def test_import_leaves_no_logging_filters_behind():
    import inc_bridge  # noqa: F401

    for name in ("torchao", "torch.utils._pytree"):
        assert logging.getLogger(name).filters == []


# ---------------------------------------------------------------- summaries name what stayed float

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import inc_bridge as ib  # noqa: E402

from .models import LinearNet, linear_batches  # noqa: E402


class _Mixed(nn.Module):
    """A Linear inc_bridge converts, a ConvTranspose1d and a 3-D expert parameter it cannot, an embedding it skips."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.conv = nn.ConvTranspose1d(32, 32, 3, padding=1)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 32, 64))
        self.fc = nn.Linear(32, 8)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        h = h + torch.einsum("bsk,kn->bsn", h, self.experts.gate_up_proj[0][:, :32])
        return self.fc(h)


def _ids(n=2):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 16, (2, 5), generator=g) for _ in range(n)]


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_summary_lists_every_module_left_in_float_with_reason_and_bytes(form):
    q = ib.quantize(_Mixed().eval(), _ids(), form=form)
    result = ib.conversion_result(q)
    left = {f.name: f for f in result.float_left}
    assert set(left) == {"emb", "conv", "experts"}
    assert left["conv"].unsupported and left["conv"].module_type == "ConvTranspose1d"
    assert left["experts"].unsupported and left["experts"].nbytes == 4 * 32 * 64 * 4
    assert left["emb"].reason == "op 'embedding' not in quantization.ops" and not left["emb"].unsupported
    text = result.summary()
    assert text.startswith("1 layer converted (form=")
    assert "3 modules with weight matrices left in high precision" in text
    assert f"kept conv (ConvTranspose1d, {32 * 32 * 3 * 4} B): unsupported type: no converter for ConvTranspose1d" in text
    assert f"kept experts (Module, {_mib(4 * 32 * 64 * 4)}): unsupported type" in text


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def test_strict_raises_for_unsupported_matrix_layers_unless_excluded():
    with pytest.raises(ib.ConversionError, match=r"strict=True: 2 module\(s\).*conv \(ConvTranspose1d\), experts \(Module\)"):
        ib.quantize(_Mixed().eval(), _ids(), strict=True)
    recipe = ib.Recipe.model_validate({"quantization": {"exclude": ["conv", "re:experts"]}})
    q = ib.quantize(_Mixed().eval(), _ids(), recipe, strict=True)
    assert ib.conversion_result(q).converted == {"fc": "linear"}


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_quantizing_a_quantized_model_says_so(form):
    q = ib.quantize(LinearNet(), linear_batches(), form=form)
    with pytest.raises(ib.ConversionError, match="already quantized"):
        ib.quantize(q, linear_batches())
    scales = ib.compute_scales(ib.calibrate(LinearNet(), linear_batches()), model=LinearNet())
    with pytest.raises(ib.ConversionError, match="already quantized"):
        ib.convert(q, scales)


def test_train_mode_model_warns_and_result_is_in_eval_mode():
    model = LinearNet().train()
    with pytest.warns(UserWarning, match="train mode"):
        q = ib.quantize(model, linear_batches())
    assert not q.training and not any(m.training for m in q.modules())
    assert model.training  # the caller's model keeps its mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ib.quantize(model.eval(), linear_batches())  # no warning in eval mode


# ---------------------------------------------------------------- report text


def test_report_prints_thresholds_with_the_digits_that_matter():
    from inc_bridge.report_render import render_markdown

    from .test_report import make_report

    report = make_report()
    report.tolerance = {"kind": "absolute", "value": 0.00002, "threshold": 0.99998}
    report.baseline_metric = 1.0
    md = render_markdown(report)
    assert "**Threshold:** 0.99998" in md  # was printed as "1" with four significant digits
    report.tolerance["threshold"] = 0.8123 * 0.99
    assert "**Threshold:** 0.804177" in render_markdown(report)


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_captured_sites_lists_attention_in_both_forms(form):
    from .attention_models import FunctionalAttention

    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa"]}})
    q = ib.quantize(FunctionalAttention().eval(), [torch.randn(2, 6, 32) for _ in range(2)], recipe, form=form)
    assert ib.captured_sites(q) == {"sdpa": "sdpa"}


# ---------------------------------------------------------------- ONNX export twins behave like the layers they replace


class _ReadsAttributes(nn.Module):
    """Model code that reads ``.weight.dtype`` and ``.num_embeddings``, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32, padding_idx=0)
        self.fc = nn.Linear(32, 8)

    def forward(self, ids):
        ids = ids.clamp(max=self.emb.num_embeddings - 1)
        return self.fc(self.emb(ids).to(self.fc.weight.dtype))


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_export_twins_expose_the_attributes_model_code_reads(tmp_path, form):
    pytest.importorskip("onnxruntime")
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    q = ib.quantize(_ReadsAttributes().eval(), _ids(), recipe, form=form)
    assert ib.export_onnx(q, _ids(1)[0], tmp_path / "m.onnx").is_file()


def test_a_failing_export_twin_is_named(tmp_path, monkeypatch):
    from inc_bridge.opspecs import linear

    q = ib.quantize(LinearNet().eval(), linear_batches(), form="module")

    def broken(*args, **kwargs):
        raise RuntimeError("twin broke")

    monkeypatch.setattr(linear, "dequantize_weight", broken)  # what the linear op's ONNX twin calls
    with pytest.raises(ib.SerializationError, match=r"failed in layer 'fc\d' \(QuantizedLinear\): RuntimeError: twin broke"):
        ib.export_onnx(q, linear_batches(1)[0], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- tied weights stay tied


class _Tied(nn.Module):
    """A language-model shape: the output head holds the input embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


_BOTH = {"quantization": {"ops": ["linear", "embedding"]}}


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_tied_weights_share_one_fp8_weight(form):
    model = _Tied().eval()
    q = ib.quantize(model, _ids(), ib.Recipe.model_validate(_BOTH), form=form)
    if form == "module":  # .weight is a view built on access; the FP8 buffers are what is shared
        assert q.emb.qweight is q.head.qweight
        assert q.emb.weight_scale is q.head.weight_scale and q.head.input_scale is not q.emb.__dict__.get("input_scale")
    else:
        assert q.emb.weight is q.head.weight
    # the same outputs as quantizing an untied copy, where each layer quantized its own copy
    untied = _Tied().eval()
    untied.load_state_dict(model.state_dict())
    untied.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    ref = ib.quantize(untied, _ids(), ib.Recipe.model_validate(_BOTH), form=form)
    x = _ids(1)[0]
    assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_tied_weights_stay_tied_through_save_and_load(tmp_path, form):
    q = ib.quantize(_Tied().eval(), _ids(), ib.Recipe.model_validate(_BOTH), form=form)
    ib.save(q, tmp_path / "m")
    loaded = ib.load(_Tied().eval(), tmp_path / "m")
    if form == "module":  # .weight is a view built on access; the FP8 buffers are the shared ones
        assert loaded.emb.qweight is loaded.head.qweight and loaded.emb.weight_scale is loaded.head.weight_scale
    else:
        assert loaded.emb.weight is loaded.head.weight
    x = _ids(1)[0]
    assert torch.equal(loaded(x), q(x))


_COMPILE = """
import sys, torch
sys.path.insert(0, {repo!r})
import inc_bridge as ib
from tests.models import ToyNet, toy_batches
torch.manual_seed(0)
model = ToyNet().eval()
x = toy_batches(1, seed=5)[0]
for form in ("subclass", "module"):
    q = ib.quantize(model, toy_batches(), form=form)  # backend auto: the cpu kernels where they build
    eager = q(x)
    compiled = torch.compile(q)(x)
    # The kernels are custom ops, opaque to inductor: compiled runs exactly the eager kernels.
    assert torch.equal(compiled, eager), (form, (compiled - eager).abs().max())
"""


def test_torch_compile_prints_nothing(tmp_path):
    from .conftest import REPO

    done = subprocess.run([sys.executable, "-c", _COMPILE.format(repo=str(REPO))], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_a_layer_tied_to_a_float_layer_stays_float_and_tied(form):
    q = ib.quantize(_Tied().eval(), _ids(), form=form)  # default ops: linear, conv2d (not embedding)
    result = ib.conversion_result(q)
    assert result.converted == {"mid": "linear"}
    assert result.skipped["head"].startswith("weight tied to 'emb', which is not quantized")
    assert q.emb.weight is q.head.weight and q.emb.weight.dtype == torch.float32
    assert "kept emb (Embedding" in result.summary() and "head" not in {f.name for f in result.float_left}


def test_gpt2_conv1d_layers_are_quantized_and_the_tied_head_stays_float():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = [torch.randint(0, 64, (2, 8)) for _ in range(2)]
    q = ib.quantize(model, ids)  # default recipe: Conv1D counts as linear; lm_head is tied to the float wte
    result = ib.conversion_result(q)
    assert len(result.converted) == 8 and all(type(q.get_submodule(n)).__name__ == "Conv1D" for n in result.converted)
    assert result.skipped["lm_head"].startswith("weight tied to 'transformer.wte'")
    assert {f.name for f in result.float_left} == {"transformer.wte", "transformer.wpe"}
    assert not any(f.unsupported for f in result.float_left)
    ib.quantize(model, ids, strict=True)  # nothing of an unsupported type is left
    both = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    q = ib.quantize(model, ids, both)
    assert len(ib.conversion_result(q).converted) == 11 and q.lm_head.weight is q.transformer.wte.weight


def test_autotune_says_which_budget_stopped_the_fallback_search():
    model = LinearNet().eval()
    x = linear_batches(1, seed=9)[0]
    with torch.no_grad():
        ref = model(x)

    def exact(q):  # met only with every layer in high precision
        with torch.no_grad():
            return -float((q(x) - ref).abs().max())

    recipe = ib.Recipe.model_validate({"tuning": {"max_trials": 2}})
    result = ib.autotune(model, exact, calib_data=linear_batches(), recipe=recipe, tolerable_loss={"absolute": 0.0},
                         progress=False)
    assert any("stopped before any fallback met the tolerance: tuning.max_trials (2) reached" in n
               for n in result.report.notes), result.report.notes
    calls = []

    def never(q):  # the baseline scores 1.0, every trial 0.0: nothing meets the tolerance
        calls.append(q)
        return 1.0 if len(calls) == 1 else 0.0

    result = ib.autotune(model, never, calib_data=linear_batches(), tolerable_loss={"absolute": 0.0}, progress=False)
    assert any("no fallback met the tolerance, not even all 3 layers in high precision" in n
               for n in result.report.notes), result.report.notes


def test_inspect_columns_stay_apart(tmp_path, capsys):
    from inc_bridge.cli import main

    class LongNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_layer_with_a_very_long_name_indeed = nn.Embedding(8, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.embedding_layer_with_a_very_long_name_indeed(ids))

    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    ib.calibrate(LongNames().eval(), [torch.randint(0, 8, (2, 3))], recipe).save(tmp_path / "m.json")
    assert main(["inspect", str(tmp_path / "m.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 layers; INC ")
    header, emb, fc = lines[1:]
    assert header.split() == ["layer", "kind", "source", "input", "amax", "weight", "amax"]
    # every column starts at the same offset in every row, two spaces after the widest cell before it
    assert emb.index("embedding ") == header.index("kind") == fc.index("linear ")
    assert emb[: emb.index("embedding ")].endswith("indeed  ")
    assert emb.index(" inc ") + 1 == header.index("source") == fc.index(" inc ") + 1


def test_autotune_report_lists_modules_left_in_float(tmp_path):
    from inc_bridge.report_render import render_html, render_markdown, render_plots

    model = _Mixed().eval()
    result = ib.autotune(model, lambda q: 1.0, calib_data=_ids(), progress=False)
    left = {f["name"]: f for f in result.report.float_left}
    assert set(left) == {"emb", "conv", "experts"}
    assert left["conv"]["type"] == "ConvTranspose1d" and left["conv"]["bytes"] == 32 * 32 * 3 * 4
    assert left["conv"]["reason"].startswith("unsupported type")
    md = render_markdown(result.report)
    total = sum(f["bytes"] for f in left.values())
    assert f"## Left in high precision (3 modules with weight matrices, {total} bytes)" in md
    assert "`experts`" in md and "unsupported type: no converter for ConvTranspose1d" in md
    assert "Left in high precision (3 modules" in render_html(result.report, render_plots(result.report))
    result.report.save(tmp_path)
    assert ib.Report.load(tmp_path).float_left == result.report.float_left


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_tied_weights_export_once_to_onnx(tmp_path, form):
    onnx = pytest.importorskip("onnx")
    q = ib.quantize(_Tied().eval(), _ids(), ib.Recipe.model_validate(_BOTH), form=form)
    path = ib.export_onnx(q, _ids(1)[0], tmp_path / "tied.onnx")
    proto = onnx.load(str(path))
    fp8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    # one FP8 table for emb and head (plus mid's weight), not two copies of the tied matrix
    assert sorted(tuple(t.dims) for t in fp8) == sorted([(16, 32), (32, 32)])
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "Transpose" not in ops and ops.count("DequantizeLinear") >= 3  # the weight's transpose is folded

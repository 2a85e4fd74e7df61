"""GPT-2 (Conv1D) and MoE LLMs (fused experts) with the default recipe, both forms: torch.compile
fullgraph, torch.export and ONNX + onnxruntime with dynamic batch and sequence.

Compiled == eager bit for bit wherever the graph runs as traced (``aot_eager``: the kernels are
opaque custom ops, ``inc_bridge::linear`` for Conv1D and ``inc_bridge::grouped_linear`` for the
experts). Under inductor the *float* parts of the model (LayerNorm, GELU, softmax, RMSNorm) are
fused and summed in another order: the float GPT-2 itself then differs from eager (measured 8.9e-8
on logits of scale ~0.7), so the bound there is test_onnx's "no FP8 rounding flip" bound, 1e-5 of
the output scale.
"""

from __future__ import annotations

import pytest
import torch

import inc_bridge as ib

from .test_llm_coverage import VOCAB, _batches, _model

transformers = pytest.importorskip("transformers")

ARCHS = ["gpt2", "qwen2_moe", "mixtral"]
FORMS = ["subclass", "module"]
REL_BOUND = 1e-5  # of the output scale: test_onnx's bound without FP8 rounding flips


@pytest.fixture(scope="module")
def quantized():
    built = {}

    def get(arch: str, form: str):
        if (arch, form) not in built:
            built[arch, form] = ib.quantize(_model(arch), _batches(), form=form)
        return built[arch, form]

    return get


def _ids(shape, seed=7) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_fullgraph_equals_eager(arch, form, quantized):
    q = quantized(arch, form)
    ids = _ids((2, 12))
    eager = _logits(q, ids)
    torch._dynamo.reset()
    compiled = _logits(torch.compile(q, fullgraph=True, backend="aot_eager"), ids)
    assert torch.equal(compiled, eager), (compiled - eager).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_inductor_compile_within_the_float_models_own_bound(arch, quantized):
    q = quantized(arch, "subclass")
    ids = _ids((2, 12))
    eager = _logits(q, ids)
    torch._dynamo.reset()
    compiled = _logits(torch.compile(q, fullgraph=True), ids)
    err, scale = (compiled - eager).abs().max().item(), eager.abs().max().item()
    print(f"\n{arch}: inductor vs eager max abs {err:.3g}, output scale {scale:.3g}")
    assert err <= REL_BOUND * scale


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_export_equals_eager(arch, form, quantized):
    q = quantized(arch, form)
    ids = _ids((2, 12))
    exported = torch.export.export(q, (), {"input_ids": ids, "use_cache": False})
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert ("inc_bridge.grouped_linear.default" if arch != "gpt2" else "inc_bridge.linear.default") in names
    with torch.no_grad():
        assert torch.equal(exported.module()(input_ids=ids, use_cache=False).logits, _logits(q, ids))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_runs_in_onnxruntime_with_dynamic_batch_and_sequence(arch, form, quantized, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    q = quantized(arch, form)
    path = ib.export_onnx(q, {"input_ids": _ids((2, 12))}, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN}
    assert sum(1 for t in proto.graph.initializer if t.data_type in fp8) >= 4  # FP8 weights stay FP8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 12), (3, 5)]:
        ids = _ids(shape, seed=shape[1])
        out = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
        ref = _logits(q, ids)
        err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        print(f"\n{arch} {form} {shape}: ORT vs torch max abs {err:.3g}, output scale {scale:.3g}")
        assert out.shape == ref.shape and err <= REL_BOUND * scale


@pytest.mark.parametrize("form", FORMS)
def test_conv1d_fp8_codes_lie_as_a_linear_weight_and_files_keep_the_in_out_layout(form, quantized, tmp_path):
    """The [in, out] weight is a view of [out, in] contiguous codes (what every linear kernel takes);
    a saved file holds the contiguous [in, out] tensor, and the loaded model lays it out again."""
    q = quantized("gpt2", form)
    layer = q.transformer.h[0].attn.c_attn
    w = layer.weight
    assert tuple(w.shape) == (32, 96) and w.qdata.t().is_contiguous()  # [n_embd, 3 n_embd]
    ib.save(q, tmp_path / "m")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    key = "transformer.h.0.attn.c_attn." + ("weight.qdata" if form == "subclass" else "qweight")
    assert saved[key].is_contiguous() and torch.equal(saved[key].view(torch.uint8), w.qdata.view(torch.uint8))
    torch.manual_seed(5)
    loaded = ib.load(_model("gpt2"), tmp_path / "m")
    ids = _ids((1, 9))
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))
    assert loaded.transformer.h[0].attn.c_attn.weight.qdata.t().is_contiguous()


@pytest.mark.parametrize("arch", ["mixtral", "gpt2"])
def test_locked_recipe_reproduces_the_tuned_model(arch, tmp_path):
    """A locked recipe holds each fused experts layer's per-expert scales: apply_recipe rebuilds
    the tuned model bit for bit, in memory and from the YAML file."""
    model = _model(arch)
    ids = _ids((2, 9))
    ref = _logits(model, ids)

    def evaluate(m):  # negative logits error: any FP8 model meets a loose tolerance on the first trial
        return -float((_logits(m, ids) - ref).abs().mean())

    result = ib.autotune(model, evaluate, calib_data=_batches(), tolerable_loss={"absolute": 1.0}, output_dir=tmp_path,
                         progress=False)
    locked = result.recipe.locked
    experts = {n: layer.experts for n, layer in locked.scales.items() if layer.experts is not None}
    assert len(experts) == (2 if arch == "mixtral" else 0)
    assert all(len(e.input_scales[0]) == 4 for e in experts.values())
    for recipe in (result.recipe, ib.load_recipe(tmp_path / "locked_recipe.yaml")):
        assert torch.equal(_logits(ib.apply_recipe(model, recipe), ids), _logits(result.model, ids))


def test_locked_experts_scales_are_checked():
    from inc_bridge.recipe import LockedLayer

    good = {"input_scales": [[0.1, 0.2], [0.3, 0.4]], "weight_scales": [[0.01, [0.02, 0.03]], [0.04, 0.05]]}
    layer = LockedLayer(kind="linear", format="e4m3", fp8_max=448.0, hp_dtype="float32", experts=good)
    assert layer.experts.weight_scales[0][1] == (0.02, 0.03)
    bad = [
        ({**good, "input_scales": [[0.1, 0.2], [0.3]]}, "one entry per expert"),
        ({**good, "weight_scales": [[0.01, -0.02], [0.04, 0.05]]}, "weight scale"),
        ({**good, "fallback": [2]}, "one entry per expert"),
    ]
    for experts, match in bad:
        with pytest.raises(ValueError, match=match):
            LockedLayer(kind="linear", format="e4m3", fp8_max=448.0, hp_dtype="float32", experts=experts)
    with pytest.raises(ValueError, match="in 'experts' only"):
        LockedLayer(kind="linear", format="e4m3", fp8_max=448.0, hp_dtype="float32", experts=good, input_scales=[0.1])

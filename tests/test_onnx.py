"""export_onnx: real FP8 QDQ graphs that onnx.checker accepts and onnxruntime runs like torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import inc_bridge as ib
from inc_bridge.cli import main
from inc_bridge.quant import quant_dequant

from .models import SENTENCES, ToyNet, embed, load_minilm, minilm_batches, toy_batches

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FP8_TYPES = {torch.float8_e4m3fn: onnx.TensorProto.FLOAT8E4M3FN, torch.float8_e5m2: onnx.TensorProto.FLOAT8E5M2}


def toy_example() -> torch.Tensor:
    """Example inputs for the CLI test (``--inputs tests.test_onnx:toy_example``)."""
    return toy_batches(1, seed=3)[0]


def _qmodel(form: str, recipe: dict | None = None) -> nn.Module:
    model = ToyNet().eval()
    recipe = ib.Recipe.model_validate(recipe or {})
    return ib.convert(model, ib.compute_scales(ib.calibrate(model, toy_batches(), recipe), recipe, model=model), form=form)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_run(session, inputs) -> torch.Tensor:
    if isinstance(inputs, dict):
        feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    else:
        feeds = {session.get_inputs()[0].name: inputs.numpy()}
    return torch.from_numpy(session.run(None, feeds)[0])


def _graph_facts(model_proto) -> tuple[list, list[str], dict[str, int]]:
    fp8 = [t for t in model_proto.graph.initializer if t.data_type in FP8_TYPES.values()]
    ops = [n.op_type for n in model_proto.graph.node]
    return fp8, ops, {op: ops.count(op) for op in set(ops)}


def _assert_qdq_structure(model_proto, n_layers: int, fp8_type: int) -> None:
    """Every FP8 initializer feeds a DequantizeLinear; every QuantizeLinear feeds a DequantizeLinear with its scale."""
    fp8, _, counts = _graph_facts(model_proto)
    assert len(fp8) == n_layers and all(t.data_type == fp8_type for t in fp8)
    consumers = {}
    for node in model_proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for t in fp8:
        assert [n.op_type for n in consumers[t.name]] == ["DequantizeLinear"]
    q_nodes = [n for n in model_proto.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and counts["DequantizeLinear"] == len(fp8) + len(q_nodes)
    for q in q_nodes:
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and dq.input[1] == q.input[1]  # the same static scale
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
        assert attrs["output_dtype"] == fp8_type


class _Probe:
    """Runs an exported model in onnxruntime and also returns what enters and leaves each FP8 op."""

    def __init__(self, path) -> None:
        proto = onnx.load(str(path))
        self.q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        dequant = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        self.dq_out = {q.name: dequant[q.output[0]].output[0] for q in self.q_nodes}
        fp8 = {t.name for t in proto.graph.initializer if t.data_type in FP8_TYPES.values()}
        self.weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8]
        self.init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        graph_inputs = {i.name for i in proto.graph.input}
        wanted = {q.input[0] for q in self.q_nodes} | set(self.dq_out.values()) | {n.output[0] for n in self.weight_dq}
        for name in sorted(wanted - graph_inputs):
            proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
        self.session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(self, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feeds = {i.name: (inputs[i.name] if isinstance(inputs, dict) else inputs).numpy() for i in self.session.get_inputs()}
        values = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds), strict=True))
        values.update(feeds)
        return torch.from_numpy(values[self.session.get_outputs()[0].name]), {k: torch.from_numpy(v) for k, v in values.items()}

    def assert_fp8_ops_exact(self, values, fp8_dtype: torch.dtype, fp8_max: float) -> None:
        """Each QuantizeLinear→DequantizeLinear equals inc_bridge's quant_dequant of its own input, bit for bit."""
        for q in self.q_nodes:
            scale = torch.from_numpy(self.init[q.input[1]])
            expected = quant_dequant(values[q.input[0]], scale, fp8_dtype, fp8_max)
            assert torch.equal(values[self.dq_out[q.name]], expected), q.name
        for dq in self.weight_dq:  # weights: FP8 initializer × scale (per tensor or per axis), in fp32
            w, scale = torch.from_numpy(self.init[dq.input[0]].astype("float32")), torch.from_numpy(self.init[dq.input[1]])
            if scale.dim():
                axis = next(a.i for a in dq.attribute if a.name == "axis")
                scale = scale.reshape([-1 if d == axis else 1 for d in range(w.dim())])
            assert torch.equal(values[dq.output[0]], w * scale), dq.input[0]


def _layer_inputs(qmodel: nn.Module, x) -> dict[str, torch.Tensor]:
    """What torch feeds each quantized layer, by layer name."""
    from inc_bridge.onnx_export import quantized_layers

    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            seen.setdefault(name, args[0].detach())

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in quantized_layers(qmodel).items()]
    with torch.no_grad():
        out = qmodel(x)
    for h in hooks:
        h.remove()
    seen["<output>"] = out
    return seen


@pytest.mark.parametrize("form", ["module", "subclass"])
@pytest.mark.parametrize(
    "recipe, fp8_type",
    [
        ({}, onnx.TensorProto.FLOAT8E4M3FN),
        ({"quantization": {"weight": {"granularity": "per_channel"}}}, onnx.TensorProto.FLOAT8E4M3FN),
        ({"quantization": {"format": "e5m2"}}, onnx.TensorProto.FLOAT8E5M2),
        ({"quantization": {"target": "gaudi2"}}, onnx.TensorProto.FLOAT8E4M3FN),  # fp8_max 240: a Clip before Q
    ],
    ids=["per_tensor", "per_channel", "e5m2", "gaudi2_range"],
)
def test_toy_export_checks_and_matches_torch(tmp_path, form, recipe, fp8_type):
    qmodel = _qmodel(form, recipe)
    path = ib.export_onnx(qmodel, toy_example(), tmp_path / "toy.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["toy.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    _assert_qdq_structure(proto, n_layers=6, fp8_type=fp8_type)
    if recipe.get("quantization", {}).get("weight"):  # per-channel weights: DequantizeLinear per axis
        assert sum(any(a.name == "axis" for a in n.attribute) for n in proto.graph.node if n.op_type == "DequantizeLinear") == 6
    fp8_dtype = torch.float8_e5m2 if fp8_type == onnx.TensorProto.FLOAT8E5M2 else torch.float8_e4m3fn
    fp8_max = 240.0 if recipe.get("quantization", {}).get("target") == "gaudi2" else torch.finfo(fp8_dtype).max
    probe = _Probe(path)
    # the example's shape, then other batch sizes and image sizes
    for shape in [(3, 4, 12, 12), (1, 4, 12, 12), (7, 4, 16, 20)]:
        x = torch.randn(*shape) * 2
        out, values = probe.run(x)
        probe.assert_fp8_ops_exact(values, fp8_dtype, fp8_max)
        # End to end. Conv / MatMul sum in another order in onnxruntime (~1e-7 relative); when such a
        # difference pushes a value across an FP8 rounding boundary, that element moves by one FP8
        # step and the outputs differ by more. Count those flips: without any, outputs agree to 1e-5.
        torch_inputs = _layer_inputs(qmodel, x)
        ref = torch_inputs["<output>"]
        flips = 0
        for q in probe.q_nodes:
            layer = q.input[1].rsplit(".", 1)[0]
            torch_qdq = quant_dequant(torch_inputs[layer], torch.from_numpy(probe.init[q.input[1]]), fp8_dtype, fp8_max)
            flips += int((values[probe.dq_out[q.name]] != torch_qdq).sum())
        err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        print(f"toy {form} {tuple(recipe.get('quantization', {}).values()) or 'default'} {shape}: ORT vs torch max abs "
              f"error {err:.3g}, output scale {scale:.3g}, FP8 rounding flips {flips}")
        assert err <= (1e-5 if flips == 0 else 5e-2) * scale


def test_export_leaves_model_alone_and_rejects_unsupported_layers(tmp_path):
    qmodel = _qmodel("module")
    before = [(n, type(m)) for n, m in qmodel.named_modules()]
    ib.export_onnx(qmodel, toy_example(), tmp_path / "toy.onnx")
    assert [(n, type(m)) for n, m in qmodel.named_modules()] == before and qmodel.training is False

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    model = Tokens().eval()
    ids = torch.randint(0, 50, (2, 7))
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    scales = ib.compute_scales(ib.calibrate(model, [ids], recipe), recipe, model=model)
    for form in ("module", "subclass"):
        with pytest.raises(ib.SerializationError, match=r"layer 'emb' \((QEmbedding|Embedding)\)"):
            ib.export_onnx(ib.convert(model, scales, form=form), ids, tmp_path / "tokens.onnx")
    with pytest.raises(ib.SerializationError, match="opset 21"):
        ib.export_onnx(qmodel, toy_example(), tmp_path / "old.onnx", opset=17)
    assert [p.name for p in tmp_path.iterdir()] == ["toy.onnx"]


def test_bf16_model_exports_as_float(tmp_path):
    model = ToyNet().eval().to(torch.bfloat16)
    scales = ib.compute_scales(ib.calibrate(model, toy_batches(dtype=torch.bfloat16)), model=model)
    qmodel = ib.convert(model, scales, form="module")
    with pytest.raises(ib.SerializationError, match=r"export qmodel.float\(\)"):
        ib.export_onnx(qmodel, toy_example().to(torch.bfloat16), tmp_path / "bf16.onnx")
    qfloat = qmodel.float()  # FP8 weights stay FP8; the layers compute in fp32
    assert qfloat.proj.weight.dtype == torch.float8_e4m3fn
    path = ib.export_onnx(qfloat, toy_example(), tmp_path / "fp32.onnx")
    x = toy_example()
    with torch.no_grad():
        ref = qfloat(x)
    assert (_ort_run(_session(path), x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_write_is_atomic(tmp_path, monkeypatch):
    qmodel = _qmodel("module")

    def fail(proto, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", fail)
    with pytest.raises(OSError):
        ib.export_onnx(qmodel, toy_example(), tmp_path / "toy.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_onnx(tmp_path, capsys):
    ib.save(_qmodel("subclass"), tmp_path / "saved")
    out = tmp_path / "cli.onnx"
    argv = ["export-onnx", str(tmp_path / "saved"), "--out", str(out), "--model", "tests.models:ToyNet",
            "--inputs", "tests.test_onnx:toy_example"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    assert main([*argv[:4], "--model", "tests.models", "--inputs", "tests.test_onnx:toy_example"]) == 2
    assert "--model: cannot load" in capsys.readouterr().err
    assert main([*argv[:4], "--model", "tests.models:LinearNet", "--inputs", "tests.test_onnx:toy_example"]) == 2
    assert "no module of that name" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_export(tmp_path):
    model, tokenizer = load_minilm()
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear"]}})
    scales = ib.compute_scales(ib.calibrate(model, minilm_batches(tokenizer, SENTENCES[::2]), recipe), recipe, model=model)
    qmodel = ib.convert(model, scales, form="module")
    example = minilm_batches(tokenizer, SENTENCES[:4], batch_size=4)[0]  # batch 4, sequence 24
    path = ib.export_onnx(qmodel, example, tmp_path / "minilm.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    _assert_qdq_structure(onnx.load(str(path)), n_layers=37, fp8_type=onnx.TensorProto.FLOAT8E4M3FN)
    probe = _Probe(path)

    # Batches of 7 and 1, sequences of 11 to 25 tokens: not the example's shape.
    cosines = []
    for batch in minilm_batches(tokenizer, SENTENCES, batch_size=7):
        hidden, values = probe.run(batch)
        probe.assert_fp8_ops_exact(values, torch.float8_e4m3fn, 448.0)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ort_emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        cosines.append((ort_emb * embed(qmodel, [batch])).sum(-1))
    cosine = torch.cat(cosines)
    evaluate = minilm_batches(tokenizer, SENTENCES)
    fp8_vs_fp32 = (embed(qmodel, evaluate) * embed(model, evaluate)).sum(-1)
    print(f"MiniLM ORT vs torch embedding cosine: mean {cosine.mean():.6f}, min {cosine.min():.6f} "
          f"(FP8 vs fp32, both torch: mean {fp8_vs_fp32.mean():.6f})")
    assert len(cosine) == len(SENTENCES)
    # Every FP8 op matches bit for bit (above), yet embeddings differ more than 1e-4 in cosine: ORT's
    # LayerNorm / GEMM / softmax differ from torch's by ~1e-7 relative, and across six layers those
    # differences move a growing number of activations across FP8 rounding boundaries (2 elements
    # in layer 0, about 40% in layer 5). docs/serialization.md has the measurements.
    assert cosine.mean() >= 0.998 and cosine.min() >= 0.995

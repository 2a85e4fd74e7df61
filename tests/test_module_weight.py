"""Module form: ``.weight`` is what model code expects to read; the FP8 data lives in ``qweight``.

Hugging Face models cast inputs to ``layer.weight.dtype`` (ViT's pixel values, T5's feed-forward
hidden states) and PyTorch's ``nn.TransformerEncoderLayer`` hands ``linear1.weight`` to a fused
kernel under ``no_grad``. An FP8 ``.weight`` silently changed the first and broke the second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inc_bridge as ib
from inc_bridge.serialization import files as ser_files
from inc_bridge.serialization.saving import describe

from .models import ToyNet, toy_batches


def _both_forms(model: nn.Module, batches) -> tuple[nn.Module, nn.Module]:
    """The subclass and module forms of ``model`` from one calibration (default recipe)."""
    scales = ib.compute_scales(ib.calibrate(model, batches), model=model)
    return ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module")


def test_module_weight_reads_like_the_float_weight_and_runs_the_layer_kernel():
    model = ToyNet().eval()
    _, q = _both_forms(model, toy_batches(2))
    for name in ("proj", "conv1"):
        layer, float_layer = getattr(q, name), getattr(model, name)
        w = layer.weight
        assert isinstance(w, ib.Float8StaticTensor)
        assert w.dtype == float_layer.weight.dtype == torch.float32 and w.shape == float_layer.weight.shape
        # a view of the layer's own tensors, not a copy
        assert w.qdata is layer.qweight and w.scale is layer.weight_scale and w.act_scale is layer.input_scale
        assert layer.qweight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, q.proj.in_features)
    assert torch.equal(F.linear(x, q.proj.weight, q.proj.bias), q.proj(x))
    c = q.conv1
    xc = torch.randn(2, c.in_channels, 8, 8)
    assert torch.equal(F.conv2d(xc, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups), c(xc))


def test_module_weight_follows_dtype_casts_and_is_read_only():
    _, q = _both_forms(ToyNet().eval(), toy_batches(2))
    q.to(torch.bfloat16)
    assert q.proj.weight.dtype == torch.bfloat16 and q.proj.qweight.dtype == torch.float8_e4m3fn
    with pytest.raises(ib.ConversionError, match=r"QuantizedLinear\.weight is read-only"):
        q.proj.weight = nn.Parameter(torch.zeros(16, 6))


def test_embedding_weight_is_weight_only():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4)).eval()
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    q = ib.quantize(model, [torch.randint(0, 20, (3, 5))], recipe, form="module")
    w = q[0].weight
    assert w.dtype == torch.float32 and w.shape == (20, 8) and w.act_scale is None
    ids = torch.randint(0, 20, (2, 7))
    assert torch.equal(F.embedding(ids, w), q[0](ids))


# ---------------------------------------------------------------- model code that reads .weight


def test_vit_casts_pixel_values_to_the_model_dtype_in_both_forms():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8)
    model = transformers.ViTModel(config).eval()
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(2)]
    qsub, qmod = _both_forms(model, batches)
    assert qmod.embeddings.patch_embeddings.projection.weight.dtype == torch.float32  # what ViT casts to
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out_sub, out_mod = qsub(pixel_values=x), qmod(pixel_values=x)
    assert torch.equal(out_sub.last_hidden_state, out_mod.last_hidden_state)
    assert torch.equal(out_sub.pooler_output, out_mod.pooler_output)


def test_t5_casts_hidden_states_to_the_model_dtype_in_both_forms():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64)
    model = transformers.T5Model(config).eval()

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 64, (n, 7)), "decoder_input_ids": torch.randint(0, 64, (n, 5))}

    qsub, qmod = _both_forms(model, [batch(2), batch(2)])
    assert qmod.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # what T5 casts to
    x = batch(3)
    with torch.no_grad():
        out_sub, out_mod = qsub(**x), qmod(**x)
    assert torch.equal(out_sub.last_hidden_state, out_mod.last_hidden_state)
    assert torch.equal(out_sub.encoder_last_hidden_state, out_mod.encoder_last_hidden_state)


def test_transformer_encoder_fast_path_steps_aside_in_both_forms():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    qsub, qmod = _both_forms(model, [torch.randn(2, 6, 32) for _ in range(2)])
    assert type(qmod.layers[0].linear1) is ib.nn.QuantizedLinear
    assert torch.overrides.has_torch_function((qmod.layers[0].linear1.weight,))  # what makes the fast path step aside
    x = torch.randn(3, 6, 32)
    with torch.no_grad():  # the fused fast path would be taken here for a float model
        y_sub, y_mod = qsub(x), qmod(x)
        # torch's own rule: a layer with hooks never takes its fused path, so this runs layer by layer
        hooks = [enc.register_forward_pre_hook(lambda module, args: None) for enc in qmod.layers]
        y_layerwise = qmod(x)
        for hook in hooks:
            hook.remove()
    assert torch.equal(y_sub, y_mod) and torch.equal(y_mod, y_layerwise)
    # With grad enabled (float parameters require it) no fast path runs at all: nn.MultiheadAttention's
    # own float fast path is off too, which changes float rounding (the float model shows the same).
    assert any(p.requires_grad for p in qmod.parameters())
    torch.testing.assert_close(qmod(x).detach(), y_mod)
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            y_no_fast_path = qmod(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    assert torch.equal(y_no_fast_path, qmod(x).detach())


# ---------------------------------------------------------------- files from before the rename


def _old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module-form state dict as written before the FP8 data moved to ``qweight``."""
    return {k.removesuffix("qweight") + "weight" if k.endswith(".qweight") else k: v for k, v in state.items()}


def test_old_style_state_dict_loads():
    model = ToyNet().eval()
    _, q = _both_forms(model, toy_batches(2))
    old = _old_style(q.state_dict())
    assert "proj.weight" in old and "proj.qweight" not in old
    other = ToyNet().eval()  # other weights and scales: the load must replace them
    _, fresh = _both_forms(other, toy_batches(2, seed=7))
    x = toy_batches(1, seed=3)[0]
    assert not torch.equal(fresh(x), q(x))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.proj.qweight, q.proj.qweight) and torch.equal(fresh(x), q(x))
    # a misfit under the old key is named by the key the caller gave
    old["proj.weight"] = torch.zeros(16, 6)
    with pytest.raises(ib.SerializationError, match=r"state_dict\['proj\.weight'\]: torch\.float32"):
        fresh.load_state_dict(old)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.emb(ids)))


def test_old_style_directory_loads(tmp_path):
    model = _Tied().eval()
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "embedding"]}})
    q = ib.quantize(model, [torch.randint(0, 16, (3, 5))], recipe, form="module")
    tensors, manifest = describe(q)
    assert manifest["aliases"] == {"head.qweight": "emb.qweight", "head.weight_scale": "emb.weight_scale"}
    # what the previous version wrote: the same files, FP8 data under "<layer>.weight"
    tensors = _old_style(tensors)
    manifest["tensors"] = {n: ser_files.tensor_record(t) for n, t in tensors.items()}
    manifest["aliases"] = {"head.weight": "emb.weight", "head.weight_scale": "emb.weight_scale"}
    path = tmp_path / "old"
    path.mkdir()
    ser_files.write_tensors(path, tensors)
    ser_files.write_manifest(path, manifest)
    with torch.device("meta"):
        skeleton = _Tied()
    loaded = ib.load(skeleton, path)
    assert type(loaded.emb) is ib.nn.QEmbedding and loaded.emb.qweight is loaded.head.qweight
    ids = torch.randint(0, 16, (2, 6))
    assert torch.equal(loaded(ids), q(ids))

"""``ib.save_pretrained``: compressed-tensors checkpoints that transformers loads back to the same logits,
and the inc_bridge folder format."""

from __future__ import annotations

import json
import os

import pytest
import torch

import inc_bridge as ib

from .llm_models import (
    VOCAB,
    assert_equal_up_to_gemm_order,
    cosine,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
    token_batches,
)
from .models import LinearNet, linear_batches

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def _recipe(granularity: str = "per_tensor", **quantization) -> ib.Recipe:
    return ib.Recipe.model_validate({"quantization": {"weight": {"granularity": granularity}, **quantization}})


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(str(path / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("form", ["subclass", "module"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_llama_fp32_round_trip(tmp_path, form, granularity):
    """An fp32 model: compressed-tensors' QDQ (x / scale in fp32, clamp, FP8 cast, q · scale) is INC's, so
    every layer sees bit-equal inputs and weights; the logits then agree up to the GEMMs' summation order
    (``assert_equal_up_to_gemm_order``)."""
    q = ib.quantize(tiny_llama(), token_batches(), _recipe(granularity), form=form)
    out = ib.save_pretrained(q, tmp_path / "llama-fp8")

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "float-quantized",
                                                                            "compressed")
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["ignore"] == [] and qc["kv_cache_scheme"] is None
    assert group["weights"]["strategy"] == {"per_tensor": "tensor", "per_channel": "channel"}[granularity]
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"

    tensors = _tensors(out)
    name = "model.layers.0.mlp.down_proj"
    w = q.get_submodule(name).weight
    assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(tensors[f"{name}.weight"].view(torch.uint8), w.qdata.view(torch.uint8))
    assert tensors[f"{name}.weight_scale"].shape == ((1,) if granularity == "per_tensor" else (64, 1))
    assert torch.equal(tensors[f"{name}.input_scale"], w.act_scale.reshape(1))

    ids = token_batches(1, seq=16, seed=7)[0]
    loaded = _load(out)
    theirs = loaded.get_submodule(name)
    assert theirs.weight.dtype == torch.float8_e4m3fn  # decompressed at the first forward
    assert_equal_up_to_gemm_order(_logits(q, ids), _logits(loaded, ids))
    assert torch.equal(theirs.weight, w.dequantize()) and torch.equal(theirs.input_scale, w.act_scale.reshape(1))
    x = torch.randn(3, 5, 128)
    with torch.no_grad():  # their layer is exactly INC's QDQ followed by F.linear
        s = theirs.input_scale
        qdq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        assert torch.equal(theirs(x), torch.nn.functional.linear(qdq, theirs.weight))


def test_llama_bf16_round_trip_bound(tmp_path):
    """A bf16 model: the checkpoint holds inc_bridge's FP8 weights and scales exactly (INC rounds scales to
    bf16, so a bf16 scale parameter loses nothing), but compressed-tensors computes ``x / input_scale`` in
    the activation's dtype (bf16) and casts that to FP8: a double rounding INC's fp32 division does not
    have. A few percent of activations land on the neighbouring FP8 value; the logits then differ by
    cosine 0.9993 on this random-weight Llama (printed below)."""
    q = ib.quantize(tiny_llama(torch.bfloat16), token_batches(), _recipe())
    out = ib.save_pretrained(q, tmp_path / "bf16")
    loaded = _load(out)
    assert loaded.dtype == torch.bfloat16
    name = "model.layers.1.self_attn.o_proj"
    ours, theirs = q.get_submodule(name), loaded.get_submodule(name)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        loaded(token_batches(1)[0])  # the first forward decompresses the FP8 weights
        assert torch.equal(theirs.weight, ours.weight.dequantize())
        assert torch.equal(theirs.input_scale.float(), ours.weight.act_scale.reshape(1))
        # The one difference, written out: compressed-tensors' activation QDQ divides in bf16.
        s = theirs.input_scale
        ct_qdq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.bfloat16) * s
        assert torch.equal(theirs(x), torch.nn.functional.linear(ct_qdq, theirs.weight, theirs.bias))
    ids = token_batches(1, seq=16, seed=7)[0]
    c = cosine(_logits(loaded, ids), _logits(q, ids))
    print(f"bf16 tiny Llama: transformers+compressed-tensors vs inc_bridge logits cosine {c:.6f}")
    assert c >= 0.998


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_gpt2_round_trip_unties_the_fp8_head(tmp_path, form):
    """GPT-2 with its embeddings and tied lm_head quantized: the head is written FP8, the embeddings
    dequantized (exact for a weight-only table), tie_word_embeddings false; the float Conv1D layers go
    in ``ignore`` because vLLM serves them as Linear layers."""
    model = tiny_gpt2()
    # Conv1D layers excluded: FP8 Conv1D has no compressed-tensors form transformers loads (refused; see ct_checkpoint)
    recipe = _recipe(ops=["linear", "embedding"], exclude=["re:.*\\.(c_attn|c_proj|c_fc)$"])
    q = ib.quantize(model, token_batches(), recipe, form=form)
    assert set(ib.conversion_result(q).converted) == {"transformer.wte", "transformer.wpe", "lm_head"}
    out = ib.save_pretrained(q, tmp_path / "gpt2")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["ignore"] == [
        f"transformer.h.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    tensors = _tensors(out)
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn
    assert tensors["transformer.wte.weight"].dtype == torch.float32
    assert torch.equal(tensors["transformer.wte.weight"], q.transformer.wte.weight.dequantize())
    ids = token_batches(1, seq=16, seed=7)[0]
    assert_equal_up_to_gemm_order(_logits(q, ids), _logits(_load(out), ids))


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path):
    q = ib.quantize(tiny_llama(), token_batches(), _recipe())
    out = ib.save_pretrained(q, tmp_path / "sharded", max_shard_bytes=40_000, tokenizer=tiny_tokenizer())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == set(_tensors(out))
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(["w1 w2 w3 w4", "w5 w6 w7 w8"], return_tensors="pt")["input_ids"]
    assert ids.max() < VOCAB
    assert_equal_up_to_gemm_order(_logits(q, ids), _logits(_load(out), ids))


def test_inc_bridge_format_is_ib_save_plus_config_and_tokenizer(tmp_path):
    q = ib.quantize(tiny_llama(), token_batches(), _recipe("per_channel"), form="module")
    out = ib.save_pretrained(q, tmp_path / "ib", format="inc_bridge", tokenizer=tiny_tokenizer())
    assert {"model.safetensors", "inc_bridge.json", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    config = transformers.AutoConfig.from_pretrained(out)
    assert "quantization_config" not in config.to_dict()
    loaded = ib.load(transformers.AutoModelForCausalLM.from_config(config).eval(), out)
    ids = token_batches(1, seq=16, seed=7)[0]
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))
    # a model ib.load rebuilt exports like the one quantized in this process
    ct = ib.save_pretrained(loaded, tmp_path / "ct")
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"][
        "strategy"] == "channel"
    assert_equal_up_to_gemm_order(_logits(q, ids), _logits(_load(ct), ids))


def test_errors_leave_nothing_behind(tmp_path):
    q = ib.quantize(tiny_llama(), token_batches(), _recipe())
    with pytest.raises(ib.SerializationError, match="format must be one of 'compressed-tensors', 'inc_bridge'"):
        ib.save_pretrained(q, tmp_path / "x", format="gguf")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ib.SerializationError, match="already exists"):
        ib.save_pretrained(q, busy)
    assert os.listdir(busy) == ["notes.txt"]

    class Broken:
        def save_pretrained(self, directory):
            (directory / "tokenizer.json").write_text("{")
            raise OSError(28, "No space left on device")

    with pytest.raises(ib.SerializationError, match="No space left on device"):
        ib.save_pretrained(q, tmp_path / "full", tokenizer=Broken())
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no folder, no hidden staging directory


def test_what_compressed_tensors_cannot_hold_is_refused(tmp_path):
    qnet = ib.quantize(LinearNet().eval(), linear_batches())
    with pytest.raises(ib.SerializationError, match="not a Hugging Face transformers model"):
        ib.save_pretrained(qnet, tmp_path / "a")
    with pytest.raises(ib.SerializationError, match="not quantized by inc_bridge"):
        ib.save_pretrained(tiny_llama(), tmp_path / "b")
    e5m2 = ib.quantize(tiny_llama(), token_batches(), _recipe(format="e5m2"))
    with pytest.raises(ib.SerializationError, match="float8_e4m3fn only"):
        ib.save_pretrained(e5m2, tmp_path / "c")
    gaudi2 = ib.quantize(tiny_llama(), token_batches(), _recipe(target="gaudi2"))
    with pytest.raises(ib.SerializationError, match="clamped to ±240"):
        ib.save_pretrained(gaudi2, tmp_path / "d")
    ib.save_pretrained(e5m2, tmp_path / "e", format="inc_bridge")  # the inc_bridge format holds any of them
    assert sorted(os.listdir(tmp_path)) == ["e"]


def test_an_fp8_kv_cache_is_refused_with_the_fix(tmp_path):
    """Recipe op kv_cache: its scales live in sdpa layers that also quantize Q, which compressed-tensors'
    kv_cache_scheme (K and V only) cannot express."""
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa", "kv_cache"]}})
    q = ib.quantize(tiny_llama(), token_batches(), recipe)
    assert ib.conversion_result(q).kv_cache
    with pytest.raises(ib.SerializationError, match=r"FP8 KV cache of 2 attention module\(s\).*format='inc_bridge'"):
        ib.save_pretrained(q, tmp_path / "kv")
    assert os.listdir(tmp_path) == []


def test_an_fp8_conv1d_is_refused_with_the_fix(tmp_path):
    """transformers' compressed-tensors integration quantizes nn.Linear only: a Conv1D target gets no scales
    and its FP8 weight would be read as plain numbers (checked by hand with compressed-tensors 0.20). GPT-2's
    Conv1D layers, converted by the default recipe, are refused with the fix; the inc_bridge format holds them."""
    q = ib.quantize(tiny_gpt2(), token_batches())
    assert ib.conversion_result(q).converted["transformer.h.0.mlp.c_fc"] == "linear"
    with pytest.raises(ib.SerializationError, match=r"FP8 Conv1D layers \(transformer.h.0.attn.c_attn, .*"
                                                    r"quantization.exclude: \['re:"):
        ib.save_pretrained(q, tmp_path / "gpt2")
    assert os.listdir(tmp_path) == []
    ib.save_pretrained(q, tmp_path / "gpt2", format="inc_bridge")
    assert (tmp_path / "gpt2" / "inc_bridge.json").is_file()


def test_fused_moe_experts_are_refused_with_the_fix(tmp_path):
    from .test_llm_coverage import _batches, _mixtral

    q = ib.quantize(_mixtral().eval(), _batches())
    with pytest.raises(ib.SerializationError, match=r"no compressed-tensors form: model.layers.0.mlp.experts "
                                                    r"\(linear, MixtralExperts\).*format='inc_bridge'.*exclude"):
        ib.save_pretrained(q, tmp_path / "mixtral")
    assert os.listdir(tmp_path) == []

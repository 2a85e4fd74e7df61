"""FP8 KV cache (recipe op ``kv_cache``): transformers' caches hold K/V as FP8 codes, outputs unchanged.

Tiny decoders with random weights (Llama with GQA, Qwen3 with GQA and q/k norms), bf16 like the
models people serve. Every comparison is ``torch.equal`` against the same scales converted without
``kv_cache`` (``ops: [linear, sdpa]``).
"""

from __future__ import annotations

import pytest
import torch

import inc_bridge as ib
from inc_bridge.errors import ConversionError, RecipeError
from inc_bridge.kernels import ops as kernel_ops
from inc_bridge.kernels.registry import available_backends
from inc_bridge.nn.attention import QSDPA
from inc_bridge.quant import dequantize_fp8, quantize_fp8
from inc_bridge.recipe import Op

from .attention_models import FunctionalAttention

BASE = {"quantization": {"ops": ["linear", "sdpa"], "exclude": ["lm_head"]}}
KV = {"quantization": {"ops": ["linear", "sdpa", "kv_cache"], "exclude": ["lm_head"]}}
FORMS = ("subclass", "module")
VOCAB = 128


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         attn_implementation="sdpa")
    return Qwen3ForCausalLM(config)


ARCHS = {"llama": _llama, "qwen3": _qwen3}


def _build(arch: str):
    torch.manual_seed(0)
    model = ARCHS[arch]().to(torch.bfloat16).eval()
    ib.capture_attention(model)
    return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def calibrated(request):
    """(arch, captured bf16 model, its scales for ``ops: [linear, sdpa]``)."""
    model = _build(request.param)
    torch.manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, n)) for n in (8, 12, 16)]
    scales = ib.compute_scales(ib.calibrate(model, calib, BASE), BASE, model=model)
    return request.param, model, scales


def _pair(calibrated, form: str):
    """The same scales converted without and with the FP8 KV cache."""
    _, model, scales = calibrated
    return ib.convert(model, scales, form=form), ib.convert(model, scales, form=form, kv_cache=True)


def _ids(batch: int = 2, length: int = 9, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length))


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **kwargs)


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold (each storage counted once)."""
    storages = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    for layer in cache.layers:
        for value in vars(layer).values():
            visit(value)
    return sum(storages.values())


# ------------------------------------------------------------------ numerics: torch.equal to no kv_cache


@pytest.mark.parametrize("form", FORMS)
def test_logits_equal_prefill_and_decode(calibrated, form):
    plain, fp8 = _pair(calibrated, form)
    ids = _ids()
    with torch.no_grad():
        a, b = plain(ids, use_cache=True), fp8(ids, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        assert {layer.keys.dtype for layer in a.cache.layers} == {torch.bfloat16}
        assert {layer.keys.dtype for layer in b.cache.layers} == {torch.float8_e4m3fn}
        assert {layer.values.dtype for layer in b.cache.layers} == {torch.float8_e4m3fn}
        for step in range(3):  # decode steps reading the cache
            nxt = _ids(length=1, seed=10 + step)
            a, b = plain(nxt, cache=a.cache), fp8(nxt, cache=b.cache)
            assert torch.equal(a.logits, b.logits)
    assert not torch.isnan(a.logits).any()


@pytest.mark.parametrize("form", FORMS)
def test_generate_greedy_and_beam_search_equal(calibrated, form):
    plain, fp8 = _pair(calibrated, form)
    prompt = _ids(length=6)
    a, b = _generate(plain, prompt, max_new_tokens=10), _generate(fp8, prompt, max_new_tokens=10)
    assert a.sequences.shape == (2, 16) and torch.equal(a.sequences, b.sequences)
    a = _generate(plain, prompt, max_new_tokens=8, num_beams=3, output_scores=True)
    b = _generate(fp8, prompt, max_new_tokens=8, num_beams=3, output_scores=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences_scores, b.sequences_scores)


@pytest.mark.parametrize("form", FORMS)
def test_static_cache_generate_and_explicit(calibrated, form):
    from transformers import StaticCache

    plain, fp8 = _pair(calibrated, form)
    prompt = _ids(length=6)
    a = _generate(plain, prompt, max_new_tokens=8, cache_implementation="static", output_logits=True)
    b = _generate(fp8, prompt, max_new_tokens=8, cache_implementation="static", output_logits=True)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    # an explicit StaticCache, filled by a prefill and one decode step
    caches = [StaticCache(config=m.config, max_cache_len=32) for m in (plain, fp8)]
    with torch.no_grad():
        for ids in (prompt, _ids(length=1, seed=5)):
            out = [m(ids, cache=c) for m, c in zip((plain, fp8), caches, strict=True)]
            assert torch.equal(out[0].logits, out[1].logits)
    assert {layer.keys.dtype for layer in caches[1].layers} == {torch.float8_e4m3fn}
    assert cache_bytes(caches[1]) <= 0.51 * cache_bytes(caches[0])


def test_static_cache_set_up_in_high_precision_is_taken_over(calibrated):
    """A StaticCache initialized ahead of time in the model dtype (``early_initialization``, as
    generate() does for chunked prefill) becomes FP8 on the first update; outputs stay equal."""
    from transformers import StaticCache

    plain, fp8 = _pair(calibrated, "module")
    cache = StaticCache(config=fp8.config, max_cache_len=32)
    cache.early_initialization(batch_size=2, num_heads=2, head_dim=16, dtype=torch.bfloat16, device=torch.device("cpu"))
    ids = _ids(length=6)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, fp8(ids, cache=cache).logits)
    assert {layer.keys.dtype for layer in cache.layers} == {torch.float8_e4m3fn}


def test_cache_bytes_half_of_bf16(calibrated):
    plain, fp8 = _pair(calibrated, "module")
    prompt = _ids(length=12)
    a, b = _generate(plain, prompt, max_new_tokens=8), _generate(fp8, prompt, max_new_tokens=8)
    assert torch.equal(a.sequences, b.sequences)
    bf16, fp8_bytes = cache_bytes(a.cache), cache_bytes(b.cache)
    layers = len(b.cache.layers)
    assert bf16 == layers * 2 * (2 * 2 * 19 * 16) * 2  # keys + values, [batch, kv heads, 19 tokens, head_dim], bf16
    assert fp8_bytes <= 0.51 * bf16


def test_transformers_quantized_cache_is_left_alone(calibrated):
    """transformers' own quantized cache quantizes itself: K/V pass through as before (same outputs)."""
    from transformers import QuantizedCache

    plain, fp8 = _pair(calibrated, "subclass")
    ids = _ids()
    with torch.no_grad():
        caches = [QuantizedCache("fp8", m.config) for m in (plain, fp8)]
        a, b = (m(ids, cache=c) for m, c in zip((plain, fp8), caches, strict=True))
        assert torch.equal(a.logits, b.logits)
        nxt = _ids(length=1, seed=3)
        assert torch.equal(plain(nxt, cache=caches[0]).logits, fp8(nxt, cache=caches[1]).logits)


# ------------------------------------------------------------------ the pipeline: recipe, summary, save/load


@pytest.mark.parametrize("form", FORMS)
def test_quantize_with_recipe_save_and_load(calibrated, form, tmp_path):
    arch, model, base_scales = calibrated
    torch.manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, n)) for n in (8, 12, 16)]  # the fixture's: the same scales
    q = ib.quantize(model, calib, ib.Recipe.model_validate({**KV, "form": form}))
    plain = ib.convert(model, base_scales, form=form)
    result = ib.conversion_result(q)
    assert result.kv_cache == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "FP8 KV cache: 2 attention modules" in result.summary()
    assert "FP8 KV cache" not in ib.conversion_result(plain).summary()
    scales = ib.kv_cache_scales(q)
    assert set(scales) == set(result.kv_cache) and ib.kv_cache_scales(plain) == {}
    sdpa = ib.conversion_result(q).scales.layers["model.layers.1.self_attn.sdpa"]
    assert scales["model.layers.1.self_attn"].k_scale == float(sdpa.activation_scales()[1])
    assert scales["model.layers.1.self_attn"].v_scale == float(sdpa.activation_scales()[2])
    assert scales["model.layers.1.self_attn"].fp8_dtype == torch.float8_e4m3fn

    ib.save(q, tmp_path / "q")
    with torch.device("meta"):
        skeleton = ARCHS[arch]().to(torch.bfloat16)
    ib.capture_attention(skeleton)
    loaded = ib.load(skeleton, tmp_path / "q").eval()
    assert ib.conversion_result(loaded).kv_cache == result.kv_cache
    assert ib.kv_cache_scales(loaded) == scales
    assert Op.KV_CACHE in ib.conversion_result(loaded).recipe.quantization.ops
    prompt = _ids(length=6)
    a, b, c = (_generate(m, prompt, max_new_tokens=6) for m in (plain, q, loaded))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(b.sequences, c.sequences)
    assert {layer.keys.dtype for layer in c.cache.layers} == {torch.float8_e4m3fn}


def test_load_refuses_kv_cache_without_captured_attention(calibrated, tmp_path):
    arch, model, scales = calibrated
    q = ib.convert(model, scales, form="module", kv_cache=True)
    ib.save(q, tmp_path / "q")
    skeleton = ARCHS[arch]().to(torch.bfloat16)
    ib.capture_attention(skeleton)
    del skeleton.model.layers[1].self_attn.sdpa  # as if this attention module were not captured
    with pytest.raises(ib.SerializationError):
        ib.load(skeleton, tmp_path / "q")


def test_recipe_kv_cache_needs_sdpa():
    assert ib.Recipe.model_validate(KV).quantization.ops[-1].value == "kv_cache"
    with pytest.raises(RecipeError, match=r"quantization\.ops.*add 'sdpa'"):
        ib.Recipe.model_validate({"quantization": {"ops": ["linear", "kv_cache"]}})
    with pytest.raises(RecipeError, match="not a layer kind"):
        ib.Recipe.model_validate({"locked": {"scales": {"x": {
            "kind": "kv_cache", "format": "e4m3", "fp8_max": 448.0, "hp_dtype": "bfloat16"}}}})


def test_kv_cache_needs_transformers_attention():
    model = FunctionalAttention().eval()
    ib.capture_attention(model, torch.randn(2, 5, 32))
    calib = [torch.randn(2, 5, 32) for _ in range(2)]
    recipe = {"quantization": {"ops": ["linear", "sdpa"]}}
    scales = ib.compute_scales(ib.calibrate(model, calib, recipe), recipe, model=model)
    with pytest.raises(ConversionError, match="kv_cache: .*transformers"):
        ib.convert(model, scales, kv_cache=True)
    assert ib.kv_cache_scales(ib.convert(model, scales)) == {}


# ------------------------------------------------------------------ the kernels take FP8 codes


@pytest.mark.parametrize("backend", [b for b in ("emulated", "cpu") if b in available_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_op_takes_kv_codes(backend, dtype):
    """QSDPA(q, codes(k), codes(v)) == QSDPA(q, k, v): K/V given as FP8 codes skip the quantize op and
    reach the sdpa op as the codes it would have made; codes of another format are refused."""
    q, k, v = (torch.randn(2, 4, 7, 16, dtype=dtype) for _ in range(3))
    s = torch.tensor([0.01, 0.02, 0.015])
    fp8, fmax = torch.float8_e4m3fn, 448.0
    qsdpa = QSDPA(fp8_dtype=fp8, fp8_max=fmax, dtype=dtype, backend=backend)
    qsdpa.input_scales = s
    ref = qsdpa(q, k, v, is_causal=True)
    kq, vq = (kernel_ops.quantize(t, s[i + 1], fp8, fmax, backend) for i, t in enumerate((k, v)))
    assert torch.equal(qsdpa(q, kq, vq, is_causal=True), ref)
    with pytest.raises(ConversionError, match="codes"):
        qsdpa(q, kq.view(torch.uint8).view(torch.float8_e5m2), vq, is_causal=True)


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("hp_dtype", [torch.float32, torch.bfloat16])
def test_fp8_codes_survive_a_round_trip(fp8_dtype, hp_dtype):
    """quantize(dequantize(q, s), s) == q for every finite code and scales over 2^-60..2^40: a
    consumer that dequantizes cached codes and quantizes them again gets the same codes back."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype)
    codes = codes[codes.float().isfinite()]
    fmax = torch.finfo(fp8_dtype).max
    for e in range(-60, 41, 3):
        for m in (1.0, 1.1, 1.37, 1.5, 1.73, 1.999):
            s = torch.tensor(m * 2.0**e, dtype=hp_dtype).float()
            back = quantize_fp8(dequantize_fp8(codes, s, hp_dtype), s, fp8_dtype, fmax)
            assert torch.equal(back.view(torch.uint8), codes.view(torch.uint8)), float(s)


def test_sliding_window_caches():
    """Mistral with a sliding window shorter than the generation: the dynamic and static
    sliding-window layers (which roll and crop their FP8 buffers) give the same tokens and logits."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                           max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16).eval()
    ib.capture_attention(model)
    calib = [torch.randint(0, VOCAB, (2, n)) for n in (8, 12)]
    scales = ib.compute_scales(ib.calibrate(model, calib, BASE), BASE, model=model)
    prompt = _ids(length=5)
    for form in FORMS:
        plain, fp8 = ib.convert(model, scales, form=form), ib.convert(model, scales, form=form, kv_cache=True)
        for impl in ("dynamic", "static"):
            a, b = (_generate(m, prompt, max_new_tokens=10, cache_implementation=impl, output_logits=True)
                    for m in (plain, fp8))
            assert torch.equal(a.sequences, b.sequences), (form, impl)
            assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)), (form, impl)
            assert "SlidingWindow" in type(b.cache.layers[0]).__name__
            assert b.cache.layers[0].keys.dtype == torch.float8_e4m3fn


def test_autotune_and_apply_recipe_keep_the_fp8_cache(calibrated, tmp_path):
    """The locked recipe carries ``kv_cache``: autotune's model and apply_recipe's both have it."""
    arch, model, _ = calibrated
    torch.manual_seed(1)
    calib = [torch.randint(0, VOCAB, (2, n)) for n in (8, 12, 16)]
    prompt = _ids(length=6)

    def eval_fn(m) -> float:
        with torch.no_grad():
            return float(m(prompt).logits.float().std())

    result = ib.autotune(model, eval_fn, calib_data=calib, recipe=ib.Recipe.model_validate(KV), max_trials=1,
                         tolerable_loss=1.0, progress=False)
    assert Op.KV_CACHE in result.recipe.quantization.ops
    assert ib.conversion_result(result.model).kv_cache == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    applied = ib.apply_recipe(_build(arch), result.recipe)
    assert ib.kv_cache_scales(applied) == ib.kv_cache_scales(result.model)
    a, b = (_generate(m, prompt, max_new_tokens=6) for m in (result.model, applied))
    assert torch.equal(a.sequences, b.sequences)
    assert {layer.keys.dtype for layer in b.cache.layers} == {torch.float8_e4m3fn}

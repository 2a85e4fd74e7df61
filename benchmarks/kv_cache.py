"""KV cache bytes at 4k context: FP8 (recipe op ``kv_cache``) vs the bf16 cache, measured on real caches.

Run from the repository root (about a minute on 2 quiet cores; ``--tokens 512`` for a quick look):

    .venv/bin/python benchmarks/kv_cache.py

The model has Llama-3-8B's attention shape (32 query heads, 8 KV heads, head_dim 128, hidden
4096) with 2 decoder layers, a small MLP and vocabulary (neither changes the cache), random bf16
weights: no download. Both models come from the same scales (``ops: [linear, sdpa]`` and
``[linear, sdpa, kv_cache]``). Printed, as measured: the bytes every tensor of each cache holds
after a real prefill of ``--tokens`` tokens (dynamic cache) and for a static cache of that length,
their ratio, and the same per-layer bytes times Llama-3-8B's 32 layers. The logits of the two
prefills are compared with ``torch.equal`` too.
"""

from __future__ import annotations

import argparse
import os

import torch


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold (each storage counted once)."""
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def mib(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="context length (default 4096)")
    args = parser.parse_args()
    import inc_bridge as ib  # first: it imports torchao with its import-time log lines muted

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    full_layers = 32
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=2, intermediate_size=512, vocab_size=1024,
                         max_position_embeddings=max(8192, args.tokens), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ib.capture_attention(model)
    calib = [torch.randint(0, config.vocab_size, (1, 32)) for _ in range(2)]
    recipe = {"quantization": {"ops": ["linear", "sdpa"], "exclude": ["lm_head"]}}
    scales = ib.compute_scales(ib.calibrate(model, calib, recipe), recipe, model=model)
    bf16_cache_model = ib.convert(model, scales, form="module")
    fp8_cache_model = ib.convert(model, scales, form="module", kv_cache=True)
    del model

    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    rows = []
    with torch.no_grad():
        dynamic = [m(ids, use_cache=True) for m in (bf16_cache_model, fp8_cache_model)]
        same = torch.equal(dynamic[0].logits, dynamic[1].logits)
        rows.append(("dynamic", *(cache_bytes(out.cache) for out in dynamic)))
        dtypes = [str(out.cache.layers[0].keys.dtype).replace("torch.", "") for out in dynamic]
        del dynamic
        static = [StaticCache(config=config, max_cache_len=args.tokens) for _ in range(2)]
        for m, cache in zip((bf16_cache_model, fp8_cache_model), static, strict=True):
            m(ids[:, :16], cache=cache)
        rows.append(("static", *(cache_bytes(c) for c in static)))

    print(f"KV cache at {args.tokens} tokens, batch 1, Llama-3-8B attention shape "
          f"(8 KV heads x head_dim 128), {config.num_hidden_layers} layers measured")
    print(f"cache elements: {dtypes[0]} vs {dtypes[1]}; prefill logits torch.equal: {same}")
    print(f"{'cache':8} {'bf16 cache':>14} {'FP8 cache':>14} {'ratio':>9} {'bf16 x32 layers':>17} {'FP8 x32 layers':>16}")
    for kind, bf16, fp8 in rows:
        per = full_layers / config.num_hidden_layers
        print(f"{kind:8} {mib(bf16):>14} {mib(fp8):>14} {fp8 / bf16:9.6f} {mib(int(bf16 * per)):>17} "
              f"{mib(int(fp8 * per)):>16}")


if __name__ == "__main__":
    main()

"""Tiny causal LMs and a tokenizer built offline, for the save_pretrained / CLI tests (random weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VOCAB = 104  # 4 special tokens + w0 .. w99
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]


def tiny_tokenizer():
    """A WordLevel tokenizer over "w0" .. "w99", wrapped as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A 2-layer Llama (GQA: 4 heads, 2 kv heads) over the tiny tokenizer's vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (Conv1D layers, lm_head tied to wte) over the tiny vocabulary, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=2,
                        eos_token_id=3)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def token_batches(n: int = 4, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(len(SPECIAL), VOCAB, (2, seq), generator=g) for _ in range(n)]


def write_model_dir(path: Path, model: nn.Module | None = None) -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer) as a user downloads one."""
    (model if model is not None else tiny_llama()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def assert_equal_up_to_gemm_order(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """fp32 logits of inc_bridge vs transformers + compressed-tensors on the same FP8 weights and scales.

    Both quantize-dequantize activations and weights to the same bits; the matmuls then sum in
    different orders (inc_bridge multiplies by a contiguous [in, out] weight as INC does, ``F.linear``
    by the [out, in] one) and BLAS picks its kernel by shape: bit-equal at some shapes, last-bit
    fp32 differences (a few 1e-7 on logits of about 0.1 here) at others.
    """
    bound = 1e-5 * float(ours.abs().max())
    assert float((ours - theirs).abs().max()) <= bound
    assert cosine(ours, theirs) >= 1 - 1e-9

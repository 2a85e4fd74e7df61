"""The embedded demo: a small CNN trained on scikit-learn's digits, quantized to FP8 both ways.

Runs offline in seconds: trains the float model (fixed seed), calibrates with INC on training
images, converts with form "subclass" and form "module", and prints accuracy and agreement.
"""

from __future__ import annotations

import time

import torch
from torch import nn


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


def run() -> int:
    import inc_bridge as ib

    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train)
    print(f"trained DigitsCNN on {len(x_train)} digits in {time.perf_counter() - t0:.1f} s")

    calib = list(x_train[:512].split(64))
    measurements = ib.calibrate(model, calib)
    scales = ib.compute_scales(measurements, model=model)
    qsub = ib.convert(model, scales, form="subclass")
    qmod = ib.convert(model, scales, form="module")

    print(ib.conversion_result(qmod).summary())
    print(qmod)
    with torch.no_grad():
        same = torch.equal(qsub(x_test), qmod(x_test))
    print(f"\n{'model':<28}{'test accuracy':>14}")
    print(f"{'fp32':<28}{accuracy(model, x_test, y_test):>13.2f}%")
    print(f"{'FP8 E4M3, form=subclass':<28}{accuracy(qsub, x_test, y_test):>13.2f}%")
    print(f"{'FP8 E4M3, form=module':<28}{accuracy(qmod, x_test, y_test):>13.2f}%")
    print(f"\nsubclass and module forms give identical logits: {same}")
    return 0 if same else 1

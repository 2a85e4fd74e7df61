"""How a batch is handed to a model, the same way everywhere a batch is run (calibration, attention
discovery, per-layer sensitivity)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)

"""What an autotune run was run on: the fingerprint ``resume=True`` checks before reusing a run.

A ``trials.jsonl`` holds metrics of one model, recipe, tolerance and calibration set; resuming it
with another model (or another tolerance) would silently mix two runs. The first line of the log
records a fingerprint of each; a resumed run recomputes them and refuses a log whose fingerprint
differs. These are digests for telling runs apart, not signatures: a log is data anyone can edit.

- model: sha256 over the state dict (every name, dtype, shape and the CRC-32 of the bytes of every tensor; a
  tensor of more than 64 MiB contributes 64 evenly spaced 1 MiB windows, first and last included,
  so fingerprinting a large model stays cheap — a change confined between two windows is missed).
- recipe: sha256 of the recipe's canonical JSON without what may change between an interrupted
  run and its continuation (``tuning.max_trials``, ``tuning.timeout_s``, the report formats) and
  without the tolerance (a part of its own, so a message can say which differs).
- tolerance: the tolerable loss and whether higher is better, in clear.
- calibration: sha256 over every batch when ``calib_data`` is a list or tuple (tensors by dtype,
  shape and bytes; dicts by sorted keys); a callable ``run_fn`` only by its qualified name, and any
  other iterable (a generator, a DataLoader) by its type and its first batch, since reading it whole
  would consume it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .recipe import Recipe

FINGERPRINT_VERSION = 1
_WHOLE = 64 << 20  # tensors up to this many bytes are hashed whole
_WINDOWS, _WINDOW = 64, 1 << 20  # larger ones: this many windows of this many bytes
_MAX_NESTING = 8  # batch structures deeper than this are hashed by type only


def run_fingerprint(model: nn.Module, recipe: Recipe, calibration: str) -> dict[str, Any]:
    """The fingerprint recorded in (and checked against) ``trials.jsonl``'s first line."""
    tuning = recipe.tuning
    return {
        "version": FINGERPRINT_VERSION,
        "model": model_digest(model),
        "recipe": recipe_digest(recipe),
        "tolerance": {**tuning.tolerable_loss.model_dump(mode="json"),
                      "higher_is_better": recipe.evaluation.higher_is_better},
        "calibration": calibration,
    }


def model_digest(model: nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and the CRC-32 of its bytes.

    Why CRC-32 per tensor: the fingerprint tells runs apart (it is no signature), and it is paid by
    every autotune run: on all-MiniLM-L6-v2's 90 MB of fp32 weights sha256 took 0.055 s, CRC-32
    0.023 s, and the per-tensor checksums run on two threads (zlib releases the GIL on large
    buffers). A changed tensor keeping its CRC-32 has a 2^-32 chance.
    """
    tensors = list(model.state_dict(keep_vars=False).items())

    def digest(tensor: torch.Tensor) -> bytes:
        crc = _Crc32()
        _feed_tensor(crc, tensor)
        return crc.value.to_bytes(4, "little")

    with ThreadPoolExecutor(max_workers=2) as pool:
        digests = list(pool.map(digest, [t for _, t in tensors]))
    h = hashlib.sha256()
    for (name, tensor), d in zip(tensors, digests, strict=True):
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        h.update(d)
    return h.hexdigest()


def recipe_digest(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    data.pop("report", None)
    for key in ("max_trials", "timeout_s", "tolerable_loss"):  # the tolerance is a part of its own
        data.get("tuning", {}).pop(key, None)
    data.get("evaluation", {}).pop("higher_is_better", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def calibration_digest(calib_data: Any, num_batches: int | None, first_batch: Any) -> str:
    """See the module docstring; ``first_batch`` is used for iterables that are not sequences."""
    if callable(calib_data):
        name = f"{getattr(calib_data, '__module__', '?')}:{getattr(calib_data, '__qualname__', type(calib_data).__qualname__)}"
        return f"callable {name} (fingerprinted by name only)"
    h = hashlib.sha256()
    if isinstance(calib_data, (list, tuple)):
        batches = calib_data[:num_batches] if num_batches else calib_data
        h.update(f"{len(batches)} batches".encode())
        for batch in batches:
            _feed(h, batch, 0)
        return f"sha256 {h.hexdigest()}"
    _feed(h, first_batch, 0)
    return f"{type(calib_data).__qualname__} (first batch only) sha256 {h.hexdigest()}"


def differences(stored: Any, current: dict[str, Any]) -> list[str]:
    """The fingerprint parts that differ, in words ("model weights", "tolerance", ...)."""
    if not isinstance(stored, dict):
        return ["the whole fingerprint (malformed)"]
    words = {"version": "fingerprint version", "model": "model weights", "recipe": "recipe",
             "tolerance": "tolerance", "calibration": "calibration data"}
    return [words[k] for k in current if stored.get(k) != current[k]]


def _feed(h: Any, obj: Any, depth: int) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(json.dumps(["tensor", str(obj.dtype), list(obj.shape)]).encode())
        _feed_tensor(h, obj)
    elif depth >= _MAX_NESTING:
        h.update(f"<{type(obj).__qualname__}>".encode())
    elif isinstance(obj, Mapping):
        h.update(f"mapping {len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key], depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)}".encode())
        for item in obj:
            _feed(h, item, depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:
        h.update(f"<{type(obj).__qualname__}>".encode())


class _Crc32:
    """``update``-compatible CRC-32 (zlib), so ``_feed_tensor`` serves both digests."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)


def _feed_tensor(h: Any, tensor: torch.Tensor) -> None:
    try:
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError, NotImplementedError, ValueError):  # meta, sparse, subclass
        h.update(f"<{type(tensor).__qualname__}>".encode())
        return
    if flat.nbytes <= _WHOLE:
        h.update(flat)
        return
    step = (flat.nbytes - _WINDOW) // (_WINDOWS - 1)
    for i in range(_WINDOWS):
        h.update(flat[i * step: i * step + _WINDOW])

"""A Hugging Face model folder and a text file → the float model, its tokenizer and calibration batches.

What ``inc-bridge quantize --model DIR --calib FILE`` and ``tune --model/--calib`` read. The model
and tokenizer are loaded from the folder only (``local_files_only``: nothing is downloaded). The
calibration file is plain text (one sample per non-empty line) or JSON Lines (one object per line
with a string ``text``); it is read as untrusted data (``safe_io``), and a malformed line is named
by its number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, SerializationError
from .safe_io import MiB, loads_json, read_text, shorten

MAX_CALIB_BYTES = 256 * MiB
CALIB_SUFFIXES = (".txt", ".jsonl")


def load_model_folder(directory: Path | str) -> tuple[nn.Module, Any]:
    """The causal LM and tokenizer saved in ``directory``, in eval mode, in the folder's dtype.

    Raises:
        SerializationError: ``directory`` is not a folder with ``config.json``, or transformers
            cannot load the model or the tokenizer from it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SerializationError(f"{directory}: not a model folder (no such directory)")
    if not (directory / "config.json").is_file():
        raise SerializationError(f"{directory}: not a Hugging Face model folder (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise SerializationError(f"{directory}: cannot load its tokenizer: {shorten(str(exc), 300)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype="auto")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SerializationError(f"{directory}: cannot load a causal LM from it: {shorten(str(exc), 300)}") from None
    return model.eval(), tokenizer


def read_calibration_texts(path: Path | str, max_samples: int | None = None) -> list[str]:
    """The samples of a ``.txt`` (non-empty lines) or ``.jsonl`` (``text`` of each object) file.

    Raises:
        CalibrationError: another suffix, a missing or unreadable file, a line of a ``.jsonl`` file
            that is not a JSON object with a string ``text``, or no sample at all.
    """
    path = Path(path)
    if path.suffix not in CALIB_SUFFIXES:
        raise CalibrationError(f"{path}: calibration text must be a .txt file (one sample per line) or a .jsonl "
                               "file (objects with a \"text\" field)")
    content = read_text(path, max_bytes=MAX_CALIB_BYTES, error=CalibrationError, what="calibration text")
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if max_samples is not None and len(texts) >= max_samples:
            break
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line)
            continue
        value = loads_json(line, origin=f"{path}, line {number}", error=CalibrationError)
        if not isinstance(value, dict) or not isinstance(value.get("text"), str):
            raise CalibrationError(f"{path}, line {number}: expected a JSON object with a string \"text\", "
                                   f"got {shorten(line, 80)}")
        if value["text"].strip():
            texts.append(value["text"])
    if not texts:
        raise CalibrationError(f"{path}: no calibration samples (every line is empty)")
    return texts


def token_batches(tokenizer: Any, texts: list[str], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """One batch per sample, truncated to ``seq_len`` tokens (one sample a batch: no padding to get
    wrong, and the activation ranges INC measures are those of real tokens only)."""
    if seq_len < 1:
        raise CalibrationError(f"seq_len must be at least 1, got {seq_len}")
    batches = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)
        if enc["input_ids"].numel():
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not batches:
        raise CalibrationError("the tokenizer made no tokens of any calibration sample")
    return batches


class Progress:
    """Batches that show a progress bar (tqdm, on stderr) each time they are iterated."""

    def __init__(self, batches: list[Any], desc: str, enabled: bool) -> None:
        self.batches, self.desc, self.enabled = batches, desc, enabled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        from tqdm.auto import tqdm

        return iter(tqdm(self.batches, desc=self.desc, unit="batch", disable=not self.enabled, leave=False))


def mean_log_likelihood(batches: list[dict[str, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """An ``eval_fn`` for autotune: mean next-token log-likelihood (higher is better; minus the log
    of the perplexity) over ``batches``."""

    def evaluate(model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"]
                if ids.shape[1] < 2:
                    continue
                logits = model(**batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                        reduction="sum")
                total -= float(nll)
                count += ids.shape[1] - 1
        if count == 0:
            raise CalibrationError("no evaluation sample has two tokens or more")
        value = total / count
        return value if math.isfinite(value) else float("-inf")

    return evaluate

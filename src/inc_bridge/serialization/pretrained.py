"""``save_pretrained``: a quantized Hugging Face model → a folder that serving stacks load.

``format="compressed-tensors"`` writes what llm-compressor writes for static FP8: ``config.json``
with a ``quantization_config`` (see ``ct_checkpoint.py`` for the mapping), FP8 weights and fp32
scales in safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``), the generation config, and the tokenizer's files when one is
given. transformers loads it with the ``compressed-tensors`` package installed; vLLM builds with
FP8 support serve it. ``format="inc_bridge"`` writes ``ib.save``'s directory (which ``ib.load``
reads back into either form) plus ``config.json`` and the tokenizer, so the folder alone rebuilds
the skeleton.

Either way the folder is written into a hidden sibling and renamed into place only when complete
(``publish``): an error or Ctrl-C leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import copy
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import _RESULT_ATTR, ConversionResult
from ..errors import SerializationError
from ..safe_io import current_umask
from . import ct_checkpoint
from .files import staging_dir, write_manifest, write_tensors
from .saving import describe

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")


class ExportFormat(str, Enum):
    """What ``save_pretrained`` writes."""

    COMPRESSED_TENSORS = "compressed-tensors"
    INC_BRIDGE = "inc_bridge"


def save_pretrained(
    qmodel: nn.Module,
    out_dir: Path | str,
    *,
    format: ExportFormat | str = ExportFormat.COMPRESSED_TENSORS,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a quantized transformers model as a Hugging Face folder.

    Args:
        qmodel: a transformers ``PreTrainedModel`` from ``ib.quantize`` / ``convert`` / ``load``
            (either form).
        out_dir: the folder to create; it must not exist or be empty.
        format: ``"compressed-tensors"`` (for transformers + compressed-tensors, vLLM) or
            ``"inc_bridge"`` (``ib.save``'s files, read back with ``ib.load``).
        tokenizer: saved alongside with its own ``save_pretrained`` when given.
        max_shard_bytes: compressed-tensors only: the most tensor bytes per safetensors shard.
    Returns:
        ``out_dir`` as a Path.
    Raises:
        SerializationError: ``qmodel`` is not a quantized transformers model, a quantized layer
            has no compressed-tensors form (e5m2, a Gaudi2 clamp range, conv2d or attention
            layers, per-channel scales on a ``Conv1D``), ``out_dir`` exists and is not empty, or a
            write fails (nothing is left at ``out_dir`` then).

    Example:
        >>> ib.save_pretrained(qmodel, "out/llama-fp8", tokenizer=tokenizer)   # doctest: +SKIP
    """
    try:
        fmt = ExportFormat(format)
    except ValueError:
        valid = ", ".join(repr(f.value) for f in ExportFormat)
        raise SerializationError(f"save_pretrained: format must be one of {valid}, got {format!r}") from None
    config = _hf_config(qmodel)
    result: ConversionResult | None = getattr(qmodel, _RESULT_ATTR, None)
    if result is None:
        raise SerializationError("save_pretrained: the model was not quantized by inc_bridge (no conversion result); "
                                 "pass the model ib.quantize / convert / load returned")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise SerializationError(f"save_pretrained: max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if fmt is ExportFormat.COMPRESSED_TENSORS and getattr(result, "kv_cache", None):
        # compressed-tensors' kv_cache_scheme quantizes K and V only, while inc_bridge's sdpa layers
        # quantize Q too; and transformers 5.24 + compressed-tensors 0.20 do not apply the scheme at all
        # (it looks for a past_key_value(s) argument; the attention forward now takes `cache`).
        raise SerializationError(
            f"format='compressed-tensors': the FP8 KV cache of {len(result.kv_cache)} attention module(s) "
            f"({result.kv_cache[0]}, ...) has no exact compressed-tensors form (its sdpa layers also quantize Q); "
            "save with format='inc_bridge', or quantize with ops [linear] for this format"
        )
    if fmt is ExportFormat.COMPRESSED_TENSORS:
        ckpt = ct_checkpoint.build(qmodel, result.converted, _skeleton(qmodel, config))
        config_dict = {**config.to_dict(), **ckpt.config_updates, "quantization_config": ckpt.quantization_config}
        tensors, manifest = ckpt.tensors, None
    else:
        tensors, manifest = describe(qmodel)
        config_dict = config.to_dict()
    config_dict["architectures"] = [type(qmodel).__name__]  # what transformers' save_pretrained records; vLLM reads it

    out_dir = Path(out_dir)
    try:
        with staging_dir(out_dir, overwrite=False) as tmp:
            if manifest is None:
                _write_shards(tmp, tensors, max_shard_bytes)
            else:
                write_tensors(tmp, tensors)
                write_manifest(tmp, manifest)
            _write_json(tmp / CONFIG_FILE, config_dict)
            generation = getattr(qmodel, "generation_config", None)
            if generation is not None and callable(getattr(qmodel, "can_generate", None)) and qmodel.can_generate():
                generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise SerializationError(f"{out_dir}: cannot write: {exc.strerror or exc}") from exc
    return out_dir


def _hf_config(qmodel: nn.Module) -> Any:
    config = getattr(qmodel, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)) or not hasattr(config, "model_type"):
        raise SerializationError(
            f"save_pretrained: {type(qmodel).__name__} is not a Hugging Face transformers model (no .config with a "
            "model_type); save other models with ib.save"
        )
    return config


def _skeleton(qmodel: nn.Module, config: Any) -> nn.Module:
    """The float model's structure on the meta device: original layer classes and weight shapes."""
    try:
        with torch.device("meta"):
            return type(qmodel)(copy.deepcopy(config))
    except Exception as exc:  # a model class whose constructor needs more than its config
        raise SerializationError(f"save_pretrained: cannot rebuild {type(qmodel).__name__} from its config to read "
                                 f"its layers' original classes: {exc}") from exc


def _write_json(path: Path, value: dict[str, Any]) -> None:
    text = json.dumps(value, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_shards(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    """Tensors into safetensors files of at most ``max_bytes`` each (a larger tensor gets its own),
    named as transformers names them, with the index when there is more than one."""
    from safetensors.torch import save_file

    prepared = _unshared(tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(prepared):
        t = prepared[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file_name, shard in zip(names, shards, strict=True):
        target = directory / file_name
        save_file(shard, str(target), metadata={"format": "pt"})
        with open(target, "rb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # safetensors creates files 0600
            os.fsync(f.fileno())
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in prepared.values())
        weight_map = {name: file_name for file_name, shard in zip(names, shards, strict=True) for name in shard}
        _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, each in a storage of its own (safetensors refuses shared memory: ties, views)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if t.is_meta:
            raise SerializationError(f"tensor {name!r} is on the meta device: it has no data to save")
        data = t.detach().to("cpu").contiguous()
        storage = data.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != data.nbytes:
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        out[name] = data
    return out

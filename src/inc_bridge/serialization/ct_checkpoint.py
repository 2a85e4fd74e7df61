"""A quantized Hugging Face model → the tensors and ``quantization_config`` of a compressed-tensors
checkpoint (``quant_method: compressed-tensors``, ``format: float-quantized``), as llm-compressor
writes it and as transformers (with the ``compressed-tensors`` package) and vLLM load it.

The mapping, per layer inc_bridge quantized:

* a linear layer (``nn.Linear``) becomes
  ``NAME.weight`` (float8_e4m3fn), ``NAME.weight_scale`` (fp32, ``[1]`` per tensor or ``[out, 1]``
  per channel) and ``NAME.input_scale`` (fp32, ``[1]``), in a config group with static FP8 weights
  and static per-tensor FP8 input activations. Both libraries use inc_bridge's convention
  (``x ≈ q · scale``, ``q = x / scale``), so the scales are written as they are, and the FP8 data is
  written as the quantized model holds it (INC's quantization scale is already baked into it);
* a weight-only layer (an embedding) is written dequantized in the model's dtype: compressed-tensors
  has no FP8 embedding that transformers or vLLM load, and a dequantized table gives exactly the
  rows inc_bridge's FP8 lookup gives;
* every linear layer left in high precision is listed in ``ignore`` (vLLM matches the ``Linear``
  target against its own layer classes, which GPT-2's ``Conv1D`` layers become there). An FP8
  ``Conv1D`` is refused: transformers' compressed-tensors integration quantizes ``nn.Linear`` only
  and would read its FP8 weight as plain numbers (checked: a ``Conv1D`` target gets no scales);
* ``kv_cache_scheme`` stays null: inc_bridge's FP8 KV cache (recipe op ``kv_cache``) lives in
  quantized ``sdpa`` layers, refused below (``save_pretrained`` says why).

Anything else quantized (conv2d, attention, matmul, fused 3-D MoE experts) has no float-quantized
equivalent here: SerializationError names the layers and the format that keeps them
(``format="inc_bridge"``). MoE experts held as a ModuleList of ``nn.Linear`` are plain linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SerializationError
from ..formats import dtype_name
from ..recipe import Op
from ..tensor import Float8StaticTensor

QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"
_FP8_DTYPE = torch.float8_e4m3fn  # compressed-tensors' FP8 (FP8_E4M3_DATA); e5m2 has no float-quantized scheme
_LINEAR_CLASS_NAMES = ("Linear", "Conv1D")  # matrix layers: nn.Linear and transformers.pytorch_utils.Conv1D


def _static_fp8(strategy: str) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of static symmetric FP8 with the given strategy."""
    return {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}


@dataclass
class Checkpoint:
    """What ``save_pretrained`` writes: tensors by checkpoint name, the ``quantization_config`` and
    the keys of ``config.json`` that change (dtype; untied embeddings)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)


def is_linear_class(cls: type) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (by class name, so transformers is not imported)."""
    return any(c.__name__ in _LINEAR_CLASS_NAMES for c in cls.__mro__)


def build(qmodel: nn.Module, converted: dict[str, str], skeleton: nn.Module) -> Checkpoint:
    """The compressed-tensors checkpoint of ``qmodel``.

    Args:
        qmodel: a quantized transformers model (either form).
        converted: layer name → op kind (``ConversionResult.converted``).
        skeleton: the float model's structure (``type(qmodel)(config)`` on the meta device): the
            original class and weight shape of every layer, whatever form replaced it.
    Raises:
        SerializationError: a quantized layer compressed-tensors cannot express (see the module doc).
    """
    ckpt = Checkpoint()
    hp_dtype: torch.dtype | None = None
    groups: dict[str, list[str]] = {}  # weight strategy → linear layer names
    written: set[str] = set()  # module names whose tensors were written here
    unsupported: list[str] = []
    conv1d: list[str] = []
    seen: dict[int, str] = {}  # id of a written FP8 weight → the first layer (ties)

    for name, module in qmodel.named_modules():
        kind = converted.get(name)
        if kind is None:
            continue
        weight = _fp8_weight(module)
        original = _original(skeleton, name)
        if weight is None or original is None:
            unsupported.append(f"{name} ({kind}, {type(module).__name__})")
            continue
        _check_format(name, weight)
        hp_dtype = hp_dtype or weight.dtype
        bias = getattr(module, "bias", None)
        if kind == Op.EMBEDDING.value or weight.act_scale is None:  # weight-only: the dequantized table is exact
            ckpt.tensors[f"{name}.weight"] = _layout(name, weight.dequantize(), original)
        elif type(original).__name__ == "Conv1D":
            conv1d.append(name)
            continue
        elif kind == Op.LINEAR.value and is_linear_class(type(original)):
            strategy = _strategy(name, weight, original)
            ckpt.tensors[f"{name}.weight"] = _layout(name, weight.qdata, original)
            scale = weight.scale.to(torch.float32)
            ckpt.tensors[f"{name}.weight_scale"] = scale.reshape(1) if strategy == "tensor" else scale.reshape(-1, 1)
            ckpt.tensors[f"{name}.input_scale"] = weight.act_scale.to(torch.float32).reshape(1)
            groups.setdefault(strategy, []).append(name)
            seen.setdefault(id(weight.qdata), name)
        else:
            unsupported.append(f"{name} ({kind}, {type(original).__name__})")
            continue
        if isinstance(bias, torch.Tensor):
            ckpt.tensors[f"{name}.bias"] = bias.detach()
        written.add(name)

    if conv1d:
        # Checked with compressed-tensors 0.20 + transformers 5: a Conv1D named in a config group's
        # targets gets no weight_scale / input_scale and its FP8 weight is read as plain numbers.
        raise SerializationError(
            f"format='compressed-tensors': FP8 Conv1D layers ({', '.join(conv1d[:3])}"
            f"{', ...' if len(conv1d) > 3 else ''}) cannot be loaded by transformers' compressed-tensors "
            "integration, which quantizes nn.Linear only; exclude them in the recipe (quantization.exclude: "
            "['re:.*\\.(c_attn|c_proj|c_fc)$']) or save with format='inc_bridge'"
        )
    if unsupported:
        shown = ", ".join(unsupported[:4]) + (f", ... ({len(unsupported)} in all)" if len(unsupported) > 4 else "")
        raise SerializationError(
            f"format='compressed-tensors' writes FP8 linear layers (and weight-only embeddings, dequantized); "
            f"these quantized layers have no compressed-tensors form: {shown}. "
            "Save with format='inc_bridge', or keep them in high precision (recipe quantization.exclude or ops)"
        )
    if not groups:
        raise SerializationError("format='compressed-tensors': the model has no FP8 linear layer to write")

    _copy_float_tensors(qmodel, written, ckpt.tensors)
    ignore = [n for n, m in skeleton.named_modules() if is_linear_class(type(m)) and n not in _names(groups)]
    config_groups = {
        f"group_{i}": {"targets": _targets(names, len(groups)), "weights": _static_fp8(strategy),
                       "input_activations": _static_fp8("tensor"), "output_activations": None,
                       "format": FORMAT}
        for i, (strategy, names) in enumerate(sorted(groups.items()))
    }
    ckpt.quantization_config = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "kv_cache_scheme": None,
        "ignore": ignore,
        "global_compression_ratio": None,
    }
    ckpt.config_updates["dtype"] = dtype_name(hp_dtype or torch.float32).removeprefix("torch.")
    if _input_embedding_tied_to_fp8(qmodel, seen):
        # The output layer is FP8 and the input table is written in high precision: two tensors now.
        ckpt.config_updates["tie_word_embeddings"] = False
    return ckpt


# ---------------------------------------------------------------- helpers


def _fp8_weight(module: nn.Module) -> Float8StaticTensor | None:
    """The layer's FP8 weight in either form (the module form's ``weight`` is a view of its buffers)."""
    try:
        weight = getattr(module, "weight", None)
    except AttributeError:
        return None
    return weight if isinstance(weight, Float8StaticTensor) else None


def _original(skeleton: nn.Module, name: str) -> nn.Module | None:
    try:
        return skeleton.get_submodule(name)
    except AttributeError:
        return None


def _check_format(name: str, weight: Float8StaticTensor) -> None:
    if weight.qdata.dtype != _FP8_DTYPE:
        raise SerializationError(
            f"layer {name!r}: FP8 format {dtype_name(weight.qdata.dtype)}; compressed-tensors' float-quantized "
            "format is float8_e4m3fn only (recipe quantization.format: e4m3)"
        )
    limit = torch.finfo(_FP8_DTYPE).max
    if weight.act_scale is not None and weight.fp8_max != limit:
        raise SerializationError(
            f"layer {name!r}: activations are clamped to ±{weight.fp8_max:g} (the recipe's target range), "
            f"compressed-tensors clamps to ±{limit:g}; quantize for target cpu or cuda to export this format"
        )


def _strategy(name: str, weight: Float8StaticTensor, original: nn.Module) -> str:
    """compressed-tensors' weight strategy for the scale's shape."""
    if weight.scale.dim() == 0:
        return "tensor"
    if tuple(weight.scale.shape) == (weight.shape[0], 1):
        return "channel"
    raise SerializationError(
        f"layer {name!r} ({type(original).__name__}): a weight scale of shape {list(weight.scale.shape)} has no "
        "compressed-tensors strategy (per tensor, or one per output row); save with format='inc_bridge'"
    )


def _layout(name: str, data: torch.Tensor, original: nn.Module) -> torch.Tensor:
    """``data``, checked against the float layer's weight shape (what the loader allocates)."""
    shape = tuple(original.weight.shape)
    if tuple(data.shape) != shape:
        raise SerializationError(f"layer {name!r}: quantized weight of shape {list(data.shape)} does not fit the "
                                 f"model's {type(original).__name__} weight {list(shape)}")
    return data.detach()


def _copy_float_tensors(qmodel: nn.Module, written: set[str], tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter and persistent buffer outside the written layers, under its state_dict name."""
    for name, module in qmodel.named_modules():
        if name in written or any(name.startswith(w + ".") for w in written):
            continue
        skip = getattr(module, "_non_persistent_buffers_set", set())
        own = [(n, t) for n, t in module._parameters.items() if t is not None]
        own += [(n, t) for n, t in module._buffers.items() if t is not None and n not in skip]
        for local, t in own:
            full = f"{name}.{local}" if name else local
            if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer) or t.dtype == _FP8_DTYPE:
                raise SerializationError(f"tensor {full!r}: a quantized tensor outside the layers inc_bridge converted")
            tensors.setdefault(full, t.detach())


def _input_embedding_tied_to_fp8(qmodel: nn.Module, fp8_weights: dict[int, str]) -> bool:
    get = getattr(qmodel, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = _fp8_weight(emb) if emb is not None else None
    return weight is not None and id(weight.qdata) in fp8_weights


def _names(groups: dict[str, list[str]]) -> set[str]:
    return {n for names in groups.values() for n in names}


def _targets(names: list[str], n_groups: int) -> list[str]:
    """One group: the class target ``Linear`` (with ``ignore``), as llm-compressor writes it; several
    (per-tensor and per-channel layers mixed): each group names its layers."""
    return ["Linear"] if n_groups == 1 else list(names)

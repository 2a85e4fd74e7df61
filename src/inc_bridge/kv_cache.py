"""FP8 KV cache (recipe op ``kv_cache``): transformers' caches keep keys and values as FP8 codes.

The quantized ``sdpa`` layer (``QSDPA``, or the subclass form's captured ``SDPA``) quantizes K and
V with static per-layer scales before attention: those FP8 codes are all attention ever uses of K
and V. So the cache can hold the codes instead of the high-precision tensors. Each transformers
attention module whose ``sdpa`` layer is quantized gets a forward pre-hook that hands the module
an ``Fp8CacheWriter`` in place of its cache. The module calls ``update(k, v, layer_idx)`` as
usual; the writer quantizes the new k and v with the sdpa layer's k/v scales (op
``inc_bridge::quantize``: the very bytes the sdpa kernel's quantize-dequantize makes), stores the
codes through the cache's own layer (``DynamicLayer`` concatenates them, ``StaticLayer`` copies them
into FP8 buffers it allocates on first use) and returns the cached codes. These reach the sdpa
kernel unchanged (transformers' ``repeat_kv`` and slicing only move them), which dequantizes them
instead of quantize-dequantizing (``kernels.emulated.sdpa_compute_dtype``). No value goes to high
precision and back, so logits and ``generate()`` tokens are ``torch.equal`` to the same model
without ``kv_cache``, and the cache holds one byte per element instead of two (bf16) or four (fp32).

The scales stay in the sdpa layer (``input_scales[1]`` and ``[2]``); ``kv_cache_scales(model)``
reports them per attention module (for exporters such as compressed-tensors' ``kv_cache_scheme``).

Covered: decoder self-attention of transformers models captured through the attention interface
(``capture.hf_attention_sites``) and the dynamic, static and sliding-window cache layers. Other
caches are left as they are (transformers' own quantized caches, encoder-decoder caches, a cache that
is not a ``transformers.Cache``): their K/V stay in high precision and the sdpa kernel quantizes them
as before, with the same result.

Example:
    >>> qmodel = ib.quantize(llama, calib, {"quantization": {"ops": ["linear", "sdpa", "kv_cache"]}})  # doctest: +SKIP
    >>> ib.kv_cache_scales(qmodel)["model.layers.0.self_attn"]                                       # doctest: +SKIP
    KVCacheLayer(k_scale=0.0123, v_scale=0.0045, fp8_dtype=torch.float8_e4m3fn, fp8_max=448.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .activation import input_quant_of
from .capture import hf_attention_sites
from .errors import ConversionError
from .kernels import ops as kernel_ops
from .kernels.emulated import is_fp8
from .nn.attention import QSDPA, SDPA

__all__ = ["Fp8CacheWriter", "KVCacheLayer", "enable_fp8_kv_cache", "kv_cache_scales"]

_MARK = "_inc_bridge_fp8_kv_cache"  # on an attention module whose cache holds FP8 codes
_CACHE_KWARGS = ("cache", "past_key_values")  # how decoder layers pass the cache (new name, old name)


@dataclass(frozen=True)
class KVCacheLayer:
    """One attention module's FP8 cache: codes ``q`` stand for ``q * scale`` (torchao's and INC's convention)."""

    k_scale: float
    v_scale: float
    fp8_dtype: torch.dtype
    fp8_max: float


def kv_cache_scales(model: nn.Module) -> dict[str, KVCacheLayer]:
    """Attention module name → its FP8 KV cache's format and static k/v scales; empty when the
    model keeps its KV cache in high precision.

    Example:
        >>> {name: (s.k_scale, s.v_scale) for name, s in ib.kv_cache_scales(qmodel).items()}  # doctest: +SKIP
    """
    found = {}
    for name, module in model.named_modules():
        if getattr(module, _MARK, False):
            k_scale, v_scale, fp8_dtype, fp8_max, _ = _kv_quant(module.sdpa)
            found[name] = KVCacheLayer(float(k_scale), float(v_scale), fp8_dtype, fp8_max)
    return found


def enable_fp8_kv_cache(model: nn.Module, sdpa_layers: Iterable[str] | None = None) -> list[str]:
    """Make transformers attention modules keep K/V as FP8 codes in the cache, in place.

    Args:
        model: a quantized model (either form) with captured transformers attention.
        sdpa_layers: only the attention modules whose sdpa layer is named here (default: every one
            whose sdpa layer is quantized). A float sdpa layer has no k/v scales and is left alone.
    Returns:
        The names of the attention modules that store FP8 codes now (sorted).
    Raises:
        ConversionError: the model has no transformers attention captured through the attention
            interface (``capture_attention`` of a transformers model using "sdpa" attention).
    """
    sites = hf_attention_sites(model)
    if not sites:
        raise ConversionError(
            "kv_cache: the model has no transformers attention module captured through the attention interface "
            "(a transformers model with attn_implementation='sdpa', captured by inc_bridge.capture_attention); "
            "the FP8 KV cache works with transformers' caches only"
        )
    wanted = None if sdpa_layers is None else set(sdpa_layers)
    enabled = []
    for attn_name, sdpa_name in sites.items():
        attn = model.get_submodule(attn_name) if attn_name else model
        if (wanted is not None and sdpa_name not in wanted) or _kv_quant(attn.sdpa) is None:
            continue
        if not getattr(attn, _MARK, False):
            attn.register_forward_pre_hook(_fp8_cache_hook, with_kwargs=True)
            object.__setattr__(attn, _MARK, True)
        enabled.append(attn_name)
    return sorted(enabled)


def _kv_quant(sdpa: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.dtype, float, str] | None:
    """k scale, v scale, FP8 format, clamp bound and backend of a quantized sdpa layer; None if float."""
    if isinstance(sdpa, QSDPA):
        return sdpa.input_scales[1], sdpa.input_scales[2], sdpa.fp8_dtype, sdpa.fp8_max, sdpa.backend
    iq = input_quant_of(sdpa)  # the subclass form (activation.attach_input_quant)
    if isinstance(sdpa, SDPA) and iq is not None:
        return sdpa.input_scales[1], sdpa.input_scales[2], iq.fp8_dtype, iq.fp8_max, iq.backend
    return None


def _fp8_cache_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and _takes_fp8(cache):
            return args, {**kwargs, key: Fp8CacheWriter(cache, module.sdpa)}
    return None


def _takes_fp8(cache: Any) -> bool:
    from transformers.cache_utils import Cache, EncoderDecoderCache

    return isinstance(cache, Cache) and not isinstance(cache, EncoderDecoderCache)


def _fp8_layer(cache: Any, layer_idx: int) -> bool:
    """Whether the cache's layer ``layer_idx`` (or the class it will be made of) can store FP8 codes."""
    from transformers.cache_utils import BaseQuantizedLayer, DynamicLayer, StaticLayer

    layers = cache.layers
    cls = type(layers[layer_idx]) if layer_idx < len(layers) else cache.layer_class_to_replicate
    return (isinstance(cls, type) and issubclass(cls, (DynamicLayer, StaticLayer))
            and not issubclass(cls, BaseQuantizedLayer))  # transformers' own quantized caches quantize themselves


class Fp8CacheWriter:
    """What an attention module gets as its cache: ``update`` stores FP8 codes in ``cache``'s layers.

    Everything else is the cache's own (attribute reads go to ``cache``). ``cache`` stays the
    object its owner (``generate()``, the caller) holds; it is the one that holds the codes.
    """

    def __init__(self, cache: Any, sdpa: nn.Module) -> None:
        self.cache = cache
        self.sdpa = sdpa

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Quantize ``key_states`` / ``value_states`` with the sdpa layer's k/v scales and store the
        codes; returns the layer's cached keys and values (FP8 codes), as ``Cache.update`` does."""
        if not _fp8_layer(self.cache, layer_idx):
            return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        k_scale, v_scale, fp8_dtype, fp8_max, backend = _kv_quant(self.sdpa)

        def codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return x if x.dtype == fp8_dtype else kernel_ops.quantize(x, scale, fp8_dtype, fp8_max, backend)

        if layer_idx < len(self.cache.layers):
            layer = self.cache.layers[layer_idx]
            # A layer set up in high precision (``early_initialization``, a forward before kv_cache
            # was enabled): its tensors become the codes of what they hold, as if stored as codes.
            if getattr(layer, "is_initialized", False) and layer.keys is not None and not is_fp8(layer.keys):
                layer.keys, layer.values = codes(layer.keys, k_scale), codes(layer.values, v_scale)
        return self.cache.update(codes(key_states, k_scale), codes(value_states, v_scale), layer_idx, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("cache", "sdpa"):  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.cache, name)

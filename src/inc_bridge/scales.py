"""Scale computation: Measurements + recipe → ScaleSet. No I/O, no module walking.

The math is INC's, op for op, in INC's high-precision dtype (``hp_dtype`` = the model's dtype):

* ``maxabs_arbitrary``: ``amax / (fullscale · backoff)``, backoff 0.5 for weights, 0.25 for activations;
* ``maxabs_pow2``: that scale rounded up to a power of two, ``2 ** ceil(log2(s))``;
* ``unit_scale``: 1.

``fullscale`` is the target's FP8 range (448 for E4M3, 240 for E4M3 on Gaudi2, 57344 for E5M2).
Scales never go below ``MIN_SCALE`` (INC's own floor for per-channel scales), so an all-zero tensor
gets a tiny positive scale instead of a zero one.

What is pure, and what is not:

* Pure (the result depends on the arguments only; no state is read or written): ``maxabs_scale``,
  ``_histogram_clip``, ``clip_errors`` (its native version gives the same bits), ``_given_scales``.
* Memoised: ``weight_amax`` / ``weight_amax_per_channel``, ``histogram_clip``, ``counts_tensor``,
  ``layer_scales`` and ``LayerScales.quantize_weight`` read and fill the ``WeightMemo`` of the
  enclosing ``weight_memo()`` block (found through a context variable; one ``autotune`` run, one
  ``quantize`` call) and compute afresh, remembering nothing, outside one. A hit returns the same
  values the computation would, for the same live, unmodified tensor: entries are keyed by the
  tensor's identity, version counter and data pointer. A change through ``weight.data``
  (``w.data.mul_(4)``) bumps no version counter, so the memo is forgotten when its block ends rather
  than kept across calls, where it would silently reuse the old scales. ``quantize_weight`` under
  ``sharing_tensors()`` (autotune's trials) also hands back the *same* FP8 tensor to every caller
  with the same weight and scales, not an equal copy.
* ``drop_quantized_weights`` and ``clear_caches`` empty parts of the active memo.
"""

from __future__ import annotations

import array
import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import CalibrationError, ConversionError
from .formats import ACTIVATION_BACKOFF, MIN_SCALE, WEIGHT_BACKOFF, FP8Format, Target, dtype_name, fullscale
from .kernels.cpu import native_clip_errors
from .kernels.weights import quantize_fp8_rows
from .measurements import LayerStats
from .quant import inc_activation_scale, inc_weight_quant_scale
from .recipe import ActivationQuant, Granularity, Op, Recipe, ScaleMethod
from .sharing import tensors_shared


def maxabs_scale(amax: torch.Tensor, full: float, backoff: float, method: ScaleMethod) -> torch.Tensor:
    """One scale (or one per channel) from amax, in ``amax``'s dtype, as INC computes it."""
    if method is ScaleMethod.UNIT_SCALE:
        return torch.ones_like(amax)
    scale = amax / (full * backoff)
    scale = torch.clamp_min(scale, MIN_SCALE)
    if method is ScaleMethod.MAXABS_POW2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def histogram_clip(hist: dict, method: ScaleMethod, percentile: float, amax: float, fp8_dtype: torch.dtype,
                   fp8_max: float) -> float:
    """See ``_histogram_clip``; memoised inside ``weight_memo()``, since autotune trials ask for the
    same clips repeatedly.

    Keyed by the identity of the counts list (the entry holds it, so the id stays its own):
    hashing 2048 counts on every call cost more than the lookup saved. Within one run the
    measurements are not changed in place, so the same list means the same histogram.
    """
    counts = hist["counts"]
    memo = _ACTIVE.get()
    if memo is None:
        return _histogram_clip(counts_tensor(counts), float(hist["range"]), method, percentile, amax, fp8_dtype, fp8_max)
    key = (id(counts), float(hist["range"]), method, percentile, amax, fp8_dtype, fp8_max)
    hit = memo.clips.get(key)
    if hit is not None and hit[0] is counts:
        return hit[1]
    clip = _histogram_clip(counts_tensor(counts), float(hist["range"]), method, percentile, amax, fp8_dtype, fp8_max)
    _remember(memo.clips, key, (counts, clip), _CACHE_SIZE * 8)
    return clip


def counts_tensor(counts: list) -> torch.Tensor:
    """A histogram's counts as float64, converted once per list inside ``weight_memo()`` (clips and
    the report share it)."""
    memo = _ACTIVE.get()
    hit = memo.counts.get(id(counts)) if memo is not None else None
    if hit is not None and hit[0] is counts:
        return hit[1]
    # through array.array: 2.5x faster than torch.tensor(list) for 2048 floats
    tensor = torch.frombuffer(array.array("d", counts), dtype=torch.float64) if counts else torch.zeros(0, dtype=torch.float64)
    if memo is not None:
        _remember(memo.counts, id(counts), (counts, tensor), _CACHE_SIZE * 4)
    return tensor


def _histogram_clip(counts: torch.Tensor, hist_range: float, method: ScaleMethod, percentile: float, amax: float,
                    fp8_dtype: torch.dtype, fp8_max: float) -> float:
    """The clipping value a histogram-based method picks for one input (never above ``amax``).

    ``percentile``: the upper edge of the bin where the cumulative count reaches ``percentile`` %.
    ``mse``: among 128 candidates in (0, amax], the clip whose FP8 quantize-dequantize (values
    beyond the clip saturate) has the least squared error over the histogram's bin centres.
    """
    if counts.numel() == 0 or counts.sum() == 0 or amax <= 0:
        return amax
    width = hist_range / counts.numel()
    if method is ScaleMethod.PERCENTILE:
        cumulative = torch.cumsum(counts, 0)
        index = int(torch.searchsorted(cumulative, cumulative[-1] * (percentile / 100.0)))
        return min((index + 1) * width, amax)
    clips = torch.linspace(amax / 128, amax, 128, dtype=torch.float64)
    error = clip_errors(counts, width, clips / fp8_max, fp8_dtype, fp8_max)
    return float(clips[int(torch.argmin(error))])


def clip_errors(counts: torch.Tensor, width: float, scales: torch.Tensor, fp8_dtype: torch.dtype,
                fp8_max: float) -> torch.Tensor:
    """Per candidate scale ``s``: Σ count · (fp8(min(c / s, fp8_max)) · s − c)² over the centres ``c``
    of a histogram's bins (``width`` wide).

    The sum runs in bin order (``cumsum``, not ``sum``, whose order depends on the vector width),
    so the cpu backend's native version, several times faster, gives the same bits and the same clip.
    """
    errors = native_clip_errors(counts, width, scales, fp8_dtype, fp8_max)
    if errors is not None:
        return errors
    nonzero = counts.nonzero().squeeze(1)  # empty bins add exact zeros to every candidate's sum
    centres, counts = (nonzero.double() + 0.5) * width, counts[nonzero]
    s = scales.unsqueeze(1)
    # in place where it saves a temporary (the centres are positive, so only the upper clamp applies)
    q = (centres / s).clamp_(max=fp8_max).float().to(fp8_dtype).double()
    terms = q.mul_(s).sub_(centres).square_().mul_(counts)
    return torch.cumsum(terms, dim=1)[:, -1] if terms.shape[1] else terms.sum(dim=1)


def weight_amax(weight: torch.Tensor, granularity: Granularity, hp_dtype: torch.dtype) -> torch.Tensor:
    """Weight amax as INC takes it: per tensor (cast to hp_dtype) or per output channel (dim 0).

    Computed as ``max(max(W), -min(W))``, which equals ``max(|W|)`` exactly without allocating an
    |W|-sized temporary (that matters for models near the memory limit).
    """
    per_channel = weight_amax_per_channel(weight)
    if granularity is Granularity.PER_TENSOR:
        return per_channel.max().to(hp_dtype)
    return per_channel.to(hp_dtype)


def weight_amax_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """``max(|W|)`` per output channel (dim 0), in the weight's dtype; its max is the per-tensor amax.

    Memoised per live, unmodified weight inside ``weight_memo()``: calibration records it and every
    trial's scales need it.
    """
    def compute() -> torch.Tensor:
        w = weight.detach().reshape(weight.shape[0], -1)
        return torch.maximum(w.amax(dim=1), w.amin(dim=1).neg())

    return _memo("weight_amax", weight, (), compute)


_CACHE_SIZE = 512


class WeightMemo:
    """What one run remembers per weight and per histogram; owned by a ``weight_memo()`` block.

    Entries for tensors hold a weak reference (a hit is certain to be the same live tensor, not a
    reused id, and the entry goes when the tensor goes) and are keyed by the tensor's version and
    data pointer, so an in-place change through the tensor itself, or a new ``.data``, is seen even
    within the run. (A change through ``w.data.mul_()`` bumps no version counter; that is why the
    memo ends with the run.)

    Attributes:
        quantized: (weight, format, range, scales) -> (weakref to the weight, FP8 data, dequant
            scale); filled and shared only under ``sharing_tensors()`` (autotune's trials).
        weight_amax: (weight) -> (weakref, per-channel amax).
        scales: (LayerStats or weight, settings) -> (weakref, scale): autotune's settings share
            activation scales across weight settings and weight scales across activation settings.
        clips: (id of the counts list, settings) -> (the counts list, clip).
        counts: id of the counts list -> (the counts list, as a tensor).
    """

    def __init__(self) -> None:
        self.quantized: dict[tuple, tuple] = {}
        self.weight_amax: dict[tuple, tuple] = {}
        self.scales: dict[tuple, tuple] = {}
        self.clips: dict[tuple, tuple] = {}
        self.counts: dict[int, tuple] = {}

    def clear(self) -> None:
        for cache in (self.quantized, self.weight_amax, self.scales, self.clips, self.counts):
            cache.clear()


_ACTIVE: contextvars.ContextVar[WeightMemo | None] = contextvars.ContextVar("inc_bridge_weight_memo", default=None)


@contextlib.contextmanager
def weight_memo() -> Iterator[WeightMemo]:
    """Remember weight amax values, scales, FP8 weights and clips within the block (or the decorated
    call), and forget them when it ends. A nested block shares the outer one's memo; each thread
    (context) has its own.

    Example:
        >>> with weight_memo():          # doctest: +SKIP
        ...     scales = compute_scales(meas, recipe, model=model)
    """
    memo = _ACTIVE.get()
    if memo is not None:
        yield memo
        return
    memo = WeightMemo()
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)
        memo.clear()


def active_memo() -> WeightMemo | None:
    """The memo of the enclosing ``weight_memo()`` block, or None outside one."""
    return _ACTIVE.get()


def _tensor_key(t: object) -> tuple:
    """What identifies a tensor's current values as far as cheaply knowable: the object, its version
    counter and where its data lives (``w.data = other`` keeps the object and the version)."""
    if not isinstance(t, torch.Tensor):
        return (id(t),)
    try:
        where = t.data_ptr()
    except RuntimeError:  # a wrapper tensor subclass has no data pointer of its own
        where = None
    return (id(t), t._version, where, t.dtype, tuple(t.shape))


def _remember(cache: dict, key: object, value: object, limit: int) -> None:
    """Store in a first-in-first-out cache of at most ``limit`` entries."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


def drop_quantized_weights() -> None:
    """Forget the memoised FP8 weights (each model converted from them keeps its own reference).

    autotune calls it whenever the weight setting changes, so at most one FP8 copy of the model's
    weights is kept besides the one in use: on a large model each setting's copy is half the
    bf16 model.
    """
    memo = _ACTIVE.get()
    if memo is not None:
        memo.quantized.clear()


def _memo(name: str, owner: object, settings: tuple, compute, limit: int | None = None) -> torch.Tensor:
    """``compute()``, remembered in the active memo's ``name`` cache for ``owner`` (alive and
    unmodified) and ``settings``; computed afresh outside ``weight_memo()``. The entry holds a weak
    reference: a hit is certain to be the same live object, and the entry goes when the object
    goes. ``limit``: first-in-first-out bound."""
    memo = _ACTIVE.get()
    if memo is None:
        return compute()
    cache: dict = getattr(memo, name)
    key = (*_tensor_key(owner), *settings)
    hit = cache.get(key)
    if hit is not None and hit[0]() is owner:
        return hit[1]
    value = compute()
    entry = (weakref.ref(owner, lambda _, key=key: cache.pop(key, None)), value)
    if limit is None:
        cache[key] = entry
    else:
        _remember(cache, key, entry, limit)
    return value


def clear_caches() -> None:
    """Forget what the enclosing ``weight_memo()`` block remembered (nothing is remembered outside one).

    Lets benchmarks time a run as a first one.
    """
    memo = _ACTIVE.get()
    if memo is not None:
        memo.clear()


@dataclass(frozen=True)
class LayerScales:
    """Scales for one layer, with INC's meaning: ``x ≈ q · scale``.

    ``input_scales`` has one 0-d scale per quantized input (none for weight-only layers; q, k, v
    for attention); ``weight_scale`` is 0-d (per tensor), one entry per output channel (per row for
    embeddings), or None for layers without a weight (attention). All are in ``hp_dtype``.
    ``fp8_max`` is the clamp bound when quantizing.
    """

    name: str
    kind: Op
    format: FP8Format
    fp8_max: float
    hp_dtype: torch.dtype
    input_scales: tuple[torch.Tensor, ...]
    weight_scale: torch.Tensor | None

    @property
    def input_scale(self) -> torch.Tensor | None:
        """The first input's scale (the only one for Linear / Conv2d), None for weight-only layers."""
        return self.input_scales[0] if self.input_scales else None

    @property
    def granularity(self) -> Granularity:
        per_channel = self.weight_scale is not None and self.weight_scale.dim() > 0
        return Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR

    def activation_scale(self) -> torch.Tensor | None:
        """The fp32 scale the first input is quantized and dequantized with (INC's reciprocal-of-reciprocal)."""
        return None if self.input_scale is None else inc_activation_scale(self.input_scale)

    def activation_scales(self) -> torch.Tensor:
        """All input scales as one fp32 vector, in input order."""
        return torch.stack([inc_activation_scale(s) for s in self.input_scales]) if self.input_scales else torch.empty(0)

    def check_weight(self, weight: torch.Tensor) -> None:
        """Raise ConversionError if these scales cannot quantize ``weight`` (dtype, channel count)."""
        if self.weight_scale is None:
            raise ConversionError(f"layer {self.name!r} ({self.kind.value}) has no weight to quantize")
        if weight.dtype != self.hp_dtype:
            raise ConversionError(
                f"layer {self.name!r}: weight dtype {weight.dtype} differs from the dtype its scales were "
                f"computed in ({self.hp_dtype}); recompute scales for this model"
            )
        if self.weight_scale.dim() and self.weight_scale.numel() != weight.shape[0]:
            raise ConversionError(
                f"layer {self.name!r}: {self.weight_scale.numel()} per-channel scales for a weight with "
                f"{weight.shape[0]} output channels"
            )

    def to_dict(self) -> dict[str, object]:
        """Plain floats (``ScaleSet.to_dict``)."""
        return {
            "kind": self.kind.value,
            "format": self.format.value,
            "fp8_max": self.fp8_max,
            "hp_dtype": dtype_name(self.hp_dtype),
            "input_scales": [float(s) for s in self.input_scales],
            "weight_scale": None if self.weight_scale is None else self.weight_scale.tolist(),
        }

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 weight (same shape as ``weight``) and the fp32 scale to dequantize it with.

        Per-channel scales come back shaped to broadcast over the weight: [N, 1] or [O, 1, 1, 1].
        Inside ``weight_memo()`` and under ``sharing_tensors()`` (autotune's trials) results are
        remembered and shared for the same weight tensor (same object, unmodified) and the same scales, so trials that differ only
        in activation settings do not quantize again. Otherwise the caller gets tensors of its own:
        a remembered result is handed over (taken out of the memo, not copied: autotune's final
        model) and a new one is not remembered, so a converted model shares no storage with another
        or with this memo.
        """
        self.check_weight(weight)
        memo = _ACTIVE.get()
        if memo is None:
            return self._quantize_weight(weight)
        key = (*_tensor_key(weight), self.format, self.fp8_max, self.weight_scale.dtype,
               self.weight_scale.float().numpy().tobytes())
        cache = memo.quantized
        hit = cache.get(key)
        shared = tensors_shared()
        if hit is not None and hit[0]() is weight:
            if not shared:
                del cache[key]
            return hit[1], hit[2]
        qdata, scale = self._quantize_weight(weight)
        if not shared:
            return qdata, scale
        # the entry goes when the float weight goes, so the cache never keeps FP8 copies alive
        _remember(cache, key, (weakref.ref(weight, lambda _, key=key: cache.pop(key, None)), qdata, scale), _CACHE_SIZE)
        return qdata, scale

    def _quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (weight.dim() - 1) if self.weight_scale.dim() else ()
        q_scale = inc_weight_quant_scale(self.weight_scale).reshape(shape)
        qdata = quantize_fp8_rows(weight.detach(), q_scale, self.format.dtype, self.fp8_max)
        # a copy: modules register it as a buffer, and these scales are remembered for other settings
        return qdata, self.weight_scale.to(torch.float32, copy=True).reshape(shape)


@dataclass
class ScaleSet:
    """One LayerScales per quantized layer, plus why other quantizable layers were left out."""

    layers: dict[str, LayerScales]
    skipped: dict[str, str] = field(default_factory=dict)
    format: FP8Format = FP8Format.E4M3
    target: Target = Target.CPU
    notes: dict[str, str] = field(default_factory=dict)  # layer -> how its statistics were filled in (expert fallbacks)

    def __getitem__(self, name: str) -> LayerScales:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, object]:
        """Plain floats, for reports and locked recipes."""
        return {name: ls.to_dict() for name, ls in self.layers.items()}


def layer_scales(
    stats: LayerStats,
    kind: Op,
    recipe: Recipe,
    hp_dtype: torch.dtype,
    weight: torch.Tensor | None = None,
) -> LayerScales:
    """Scales for one layer from its statistics (and its weight, when the model is at hand).

    With ``weight`` the weight amax is taken from the weight itself, as INC does at convert time;
    without it, from the statistics.
    """
    fmt, wq, aq = recipe.layer_settings(stats.name)
    full = fullscale(fmt, recipe.quantization.target)
    stats.check_finite()
    if stats.inc_scales is not None:  # INC "Scale"-mode dump: finished scales, used as they are
        return _given_scales(stats, kind, fmt, full, hp_dtype)
    input_scales: tuple[torch.Tensor, ...] = ()
    if not kind.weight_only:
        if not stats.input_amax:
            raise CalibrationError(f"layer {stats.name!r}: no input statistics; was it run during calibration?")
        settings = (aq.scale_method, aq.percentile, fmt, full, hp_dtype)
        input_scales = tuple(_memo("scales", stats, (i, *settings), lambda i=i: _activation_scale(stats, i, aq, fmt, full, hp_dtype),
                                   _CACHE_SIZE * 8) for i in range(len(stats.input_amax)))
    if not kind.has_weight:
        return LayerScales(stats.name, kind, fmt, full, hp_dtype, input_scales, None)
    gran = wq.granularity
    if weight is not None:
        return LayerScales(stats.name, kind, fmt, full, hp_dtype, input_scales, _memo(
            "scales", weight, (gran, wq.scale_method, full, hp_dtype),
            lambda: maxabs_scale(weight_amax(weight, gran, hp_dtype), full, WEIGHT_BACKOFF, wq.scale_method), _CACHE_SIZE * 8))
    if gran is Granularity.PER_TENSOR and stats.weight_amax is not None:
        w_amax = torch.tensor(stats.weight_amax, dtype=hp_dtype)
    elif gran is Granularity.PER_CHANNEL and stats.weight_amax_per_channel is not None:
        w_amax = torch.tensor(stats.weight_amax_per_channel, dtype=hp_dtype)
    else:
        raise CalibrationError(
            f"layer {stats.name!r}: no {gran.value} weight statistics in the measurements; pass model= to "
            "compute_scales so the weight can be read"
        )
    weight_scale = maxabs_scale(w_amax, full, WEIGHT_BACKOFF, wq.scale_method)
    return LayerScales(stats.name, kind, fmt, full, hp_dtype, input_scales, weight_scale)


def _activation_scale(stats: LayerStats, i: int, aq: ActivationQuant, fmt: FP8Format, full: float,
                      hp_dtype: torch.dtype) -> torch.Tensor:
    amax = stats.input_amax[i]
    if not aq.scale_method.from_histogram:
        return maxabs_scale(torch.tensor(amax, dtype=hp_dtype), full, ACTIVATION_BACKOFF, aq.scale_method)
    if len(stats.input_hist) <= i:
        raise CalibrationError(
            f"layer {stats.name!r}: activation scale method {aq.scale_method.value!r} needs input histograms, "
            "which these measurements lack (INC dumps have none); calibrate with inc_bridge"
        )
    clip = histogram_clip(stats.input_hist[i], aq.scale_method, aq.percentile, amax, fmt.dtype, full)
    # The clip is the range on purpose: no backoff, values beyond it saturate.
    return torch.clamp_min(torch.tensor(clip, dtype=hp_dtype) / full, MIN_SCALE)


def _given_scales(stats: LayerStats, kind: Op, fmt: FP8Format, full: float, hp_dtype: torch.dtype) -> LayerScales:
    given = stats.inc_scales or {}
    inputs: Sequence[float] = given.get("inputs") or ()
    if (not inputs and not kind.weight_only) or (given.get("weight") is None and kind.has_weight):
        raise CalibrationError(f"layer {stats.name!r}: the INC scale dump lacks an input or weight scale")
    return LayerScales(
        stats.name,
        kind,
        fmt,
        full,
        hp_dtype,
        () if kind.weight_only else tuple(torch.tensor(v, dtype=hp_dtype) for v in inputs),
        torch.tensor(given["weight"], dtype=hp_dtype) if kind.has_weight else None,
    )

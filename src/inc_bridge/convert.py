"""``convert``: swap FP8 weights (form "subclass") or FP8 modules (form "module") into a model.

The conversion is all-or-nothing: every replacement is built before the first one is installed, so
an error leaves the model as it was. What was converted, and why other quantizable layers were not,
is recorded in a ``ConversionResult`` that ``conversion_result(qmodel)`` returns.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .capture import hf_attention_sites
from .capture_rewrite import disable_fast_paths_above
from .coverage import FloatMatrix, float_matrices, matrix_bytes, quantized_layers
from .errors import ConversionError
from .experts_scales import FALLBACK_RULE
from .kernels import model_device, resolve_backend
from .kv_cache import enable_fp8_kv_cache
from .opspecs import entry_for
from .recipe import Backend, Form, Op, Recipe
from .scales import ScaleSet
from .sharing import shared_tensors, sharing_tensors
from .ties import retie, tied_groups

_RESULT_ATTR = "_inc_bridge_conversion"


@dataclass
class ConversionResult:
    """``converted`` maps layer name → op; ``skipped`` maps quantizable layer name → reason.

    ``scales`` are the scales ``convert`` used and ``recipe`` the recipe behind them, when known;
    ``inc_bridge.save`` records both (a model loaded from disk has the recipe but no ScaleSet).
    ``backend`` is the backend the layers run with; ``backend_requested`` what was asked for
    (``"auto"`` means: the best available where the model runs, so ``inc_bridge.load`` picks again).
    ``float_left`` lists every module still holding a float weight matrix (quantizable or not), with
    the reason and its bytes; ``conversion_result(qmodel)`` fills it from the model. ``kv_cache``
    names the attention modules whose transformers cache holds FP8 codes (``kv_cache.py``).
    """

    form: Form
    backend: str
    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    scales: ScaleSet | None = None
    recipe: Recipe | None = None
    backend_requested: str | None = None
    float_left: list[FloatMatrix] | None = None
    layer_types: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    kv_cache: list[str] = field(default_factory=list)

    def by_type(self) -> dict[str, tuple[int, int, int]]:
        """Float module type → (converted layers, their float matrix bytes, their FP8 bytes)."""
        out: dict[str, tuple[int, int, int]] = {}
        for type_name, float_bytes, fp8_bytes in self.layer_types.values():
            n, f, q = out.get(type_name, (0, 0, 0))
            out[type_name] = (n + 1, f + float_bytes, q + fp8_bytes)
        return out

    def summary(self) -> str:
        """What was converted, and every module left in high precision with its reason and bytes."""
        head = f"{_count(len(self.converted), 'layer')} converted (form={self.form.value}, backend={self.backend})"
        if self.float_left is None:  # not filled from a model: the quantizable layers kept are all we know
            lines = [f"{head}, {_count(len(self.skipped), 'quantizable layer')} left in high precision"]
            lines += self._converted_lines()
            lines += self._kv_cache_lines()
            return "\n".join(lines + [f"  kept {name}: {why}" for name, why in self.skipped.items()])
        left = sum(f.nbytes for f in self.float_left)
        unsupported = sum(f.nbytes for f in self.float_left if f.unsupported)
        lines = [f"{head}; {_count(len(self.float_left), 'module')} with weight matrices left in high precision "
                 f"({_mib(left)}, of which {_mib(unsupported)} in types inc_bridge cannot quantize)"]
        lines += self._converted_lines()
        lines += self._kv_cache_lines()
        lines += [f"  kept {f.name} ({f.module_type}, {_mib(f.nbytes)}): {f.reason}" for f in self.float_left]
        return "\n".join(lines)

    def _converted_lines(self) -> list[str]:
        lines = [f"  converted {t}: {_count(n, 'layer')}, {_mib(f)} float -> {_mib(q)} FP8"
                 for t, (n, f, q) in sorted(self.by_type().items())]
        return lines + [f"  note {name}: {why}" for name, why in self.notes.items()]

    def _kv_cache_lines(self) -> list[str]:
        if not self.kv_cache:
            return []
        return [f"  FP8 KV cache: {_count(len(self.kv_cache), 'attention module')} keep keys and values as FP8 codes "
                "in transformers' caches, with their sdpa layers' static k/v scales"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**14 else f"{nbytes} B"


def conversion_result(model: nn.Module) -> ConversionResult:
    """The ConversionResult of the ``convert`` call that produced ``model``.

    Raises:
        ConversionError: ``model`` did not come from ``inc_bridge.convert``.
    """
    result = getattr(model, _RESULT_ATTR, None)
    if result is None:
        raise ConversionError("this model was not produced by inc_bridge.convert (no conversion result attached)")
    if result.float_left is None:
        result.float_left = float_matrices(model, result.converted, result.skipped)
    return result


def check_not_quantized(model: nn.Module) -> None:
    """Raise ConversionError when ``model`` already holds FP8 layers: they are not quantized twice.

    Quantizing FP8 weights again would measure the rounded weights and stack a second rounding on
    the first; start from the float model instead.
    """
    names = quantized_layers(model)
    if names:
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        raise ConversionError(
            f"the model is already quantized (FP8 layers: {shown}); quantize the float model it came from, "
            "or use this one as it is"
        )


def _set_submodule(root: nn.Module, name: str, module: nn.Module, modules: dict[str, nn.Module] | None = None) -> None:
    """Put ``module`` at ``name``; ``modules`` (``dict(root.named_modules())``) saves the lookups."""
    parent_name, _, child = name.rpartition(".")
    parent = modules[parent_name] if modules is not None else root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def convert(
    model: nn.Module,
    scales: ScaleSet,
    *,
    form: Form | str = Form.SUBCLASS,
    backend: Backend | str = Backend.AUTO,
    inplace: bool = False,
    share_unconverted: bool = False,
    kv_cache: bool = False,
) -> nn.Module:
    """Quantize the layers named in ``scales``.

    Args:
        model: the float model (fp32 or bf16) the scales were computed for.
        scales: from ``compute_scales``.
        form: "subclass" keeps every module and makes weights ``Float8StaticTensor``; "module"
            swaps in ``QuantizedLinear`` / ``QConv2d``. Both give identical outputs.
        backend: kernel backend; "auto" picks the best available.
        inplace: convert ``model`` itself instead of a deep copy, layer by layer (peak memory: the
            float model plus one layer). Everything is checked first, so a bad scale set changes
            nothing; an unexpected failure midway (e.g. out of memory) can leave it partly converted.
        share_unconverted: with ``inplace=False``, the copy shares the parameters and buffers of the
            layers it does not convert with ``model`` instead of copying them (cheap, for short-lived
            models such as autotune's trials; changing one then changes the other).
        kv_cache: transformers attention modules whose sdpa layer is converted keep K/V as FP8
            codes in the cache (recipe op ``kv_cache``; see ``inc_bridge.kv_cache``). Outputs do
            not change; the cache takes half the bytes of a bf16 one.
    Returns:
        The quantized model; ``conversion_result(qmodel)`` lists converted and skipped layers.
        Converted layers that shared a float weight (tied embeddings) share one FP8 weight.
    Raises:
        ConversionError: a scaled layer is missing from the model, of another type or shape, or the
            model is already quantized, or ``kv_cache`` for a model without captured transformers
            attention.
        BackendUnavailableError: ``backend`` cannot run here.

    Example:
        >>> qmodel = convert(model, scales, form="module")   # doctest: +SKIP
    """
    check_not_quantized(model)
    form, backend_name, impls, modules = _plan(model, scales, form, backend)
    if kv_cache and not hf_attention_sites(model):
        enable_fp8_kv_cache(model, ())  # raises the error that says what kv_cache needs, before any change
    tied = tied_groups(modules, [name for name, ls in scales.layers.items() if ls.kind.has_weight])
    types = _layer_types(modules, scales)
    if inplace:
        # Layer by layer: each float layer is released as soon as its FP8 replacement is in place,
        # so peak memory is the float model plus one layer.
        del modules  # hold no references to the float layers
        target = model
        for name, ls in scales.layers.items():
            _set_submodule(target, name, impls[name](target.get_submodule(name), ls, backend_name))
    else:
        replacements = {name: impls[name](modules[name], ls, backend_name) for name, ls in scales.layers.items()}
        # Deep-copy everything except the replaced modules, which the memo maps to their FP8
        # replacements: the float weights being replaced are never copied.
        memo = {id(modules[name]): new for name, new in replacements.items()}
        if share_unconverted:
            memo.update(shared_tensors(model))
        target = copy.deepcopy(model, memo)
    retie(tied, target.get_submodule)  # layers sharing a float weight share its FP8 weight
    disable_fast_paths_above(target, list(scales.layers))
    _attach_result(target, form, backend_name, scales, Backend(backend).value, types=types)
    if kv_cache:
        sdpa_layers = [name for name, ls in scales.layers.items() if ls.kind is Op.SDPA]
        getattr(target, _RESULT_ATTR).kv_cache = enable_fp8_kv_cache(target, sdpa_layers)
    return target


@contextlib.contextmanager
def swapped_in(model: nn.Module, scales: ScaleSet, *, form: Form | str = Form.SUBCLASS,
               backend: Backend | str = Backend.AUTO, modules: dict[str, nn.Module] | None = None) -> Iterator[nn.Module]:
    """``model`` itself, converted for the duration of the block, then restored to the same modules.

    For short-lived models such as autotune's trials: no copy of the model per trial. Inside the
    block ``model`` is a converted model (``conversion_result`` works) whose converted layers share
    their biases with the float ones; afterwards it is exactly what it was, also when the block
    raises. Never give it a model someone else is using meanwhile. ``modules``, if given, is
    ``dict(model.named_modules())`` (a caller swapping many times saves walking the model; the block
    leaves the map valid, as it restores the same modules).
    """
    form, backend_name, impls, modules = _plan(model, scales, form, backend, modules)
    originals = {name: modules[name] for name in scales.layers}
    with sharing_tensors():  # the replacements live as long as the block: no copies of biases
        replacements = {name: impls[name](originals[name], ls, backend_name) for name, ls in scales.layers.items()}
    prior = model.__dict__.get(_RESULT_ATTR)
    try:
        for name, new in replacements.items():
            _set_submodule(model, name, new, modules)
        _attach_result(model, form, backend_name, scales, Backend(backend).value, modules,
                       types=_layer_types(originals, scales))
        yield model
    finally:
        for name, old in originals.items():
            _set_submodule(model, name, old, modules)
        model.__dict__.pop(_RESULT_ATTR, None)
        if prior is not None:
            object.__setattr__(model, _RESULT_ATTR, prior)


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects (and attributes), the same parameter and buffer tensors."""
    return copy.deepcopy(model, shared_tensors(model))


def _plan(model: nn.Module, scales: ScaleSet, form: Form | str, backend: Backend | str,
          modules: dict[str, nn.Module] | None = None) -> tuple[Form, str, dict[str, Callable[..., nn.Module]], dict[str, nn.Module]]:
    """Check everything before changing anything: the form, the backend and every scaled layer.

    Returns the form, the backend, each layer's converter and ``dict(model.named_modules())``
    (``modules`` when given).
    """
    try:
        form = Form(form)
        backend_name = resolve_backend(Backend(backend).value, model_device(model))
    except ValueError as exc:
        raise ConversionError(f"{exc}; valid forms: {[f.value for f in Form]}, backends: {[b.value for b in Backend]}") from None
    modules = dict(model.named_modules()) if modules is None else modules
    impls = {}
    for name, ls in scales.layers.items():
        module = modules.get(name)
        if module is None:
            raise ConversionError(f"scales name layer {name!r}, but the model has no module of that name")
        entry = entry_for(module)
        if entry is None or entry.spec is not ls.kind.spec:
            raise ConversionError(
                f"layer {name!r} is a {type(module).__name__}, but its scales are for a {ls.kind.value} layer"
            )
        if ls.kind.has_weight:
            ls.check_weight(entry.weight_of(module))
        impls[name] = entry.to_subclass if form is Form.SUBCLASS else entry.to_module
    return form, backend_name, impls, modules


def _layer_types(modules: dict[str, nn.Module], scales: ScaleSet) -> dict[str, tuple[str, int, int]]:
    """Layer name → (float module type, float matrix bytes, FP8 bytes) of each layer to convert."""
    return {name: (type(modules[name]).__name__, *matrix_bytes(modules[name])) for name in scales.layers}


def _notes(scales: ScaleSet) -> dict[str, str]:
    """How statistics were filled in: experts that received no calibration tokens, one line each
    (fused experts: ``experts_scales``; ModuleList experts: ``experts.sibling_expert_stats``)."""
    notes = dict(scales.notes)
    for name, ls in scales.layers.items():
        for e in getattr(ls, "fallback", ()):
            notes[f"{name}[expert {e}]"] = FALLBACK_RULE
    return notes


def _attach_result(target: nn.Module, form: Form, backend_name: str, scales: ScaleSet, requested: str,
                   modules: dict[str, nn.Module] | None = None, *,
                   types: dict[str, tuple[str, int, int]] | None = None) -> None:
    """``modules``: the model's modules by name, before or after the swap (only the names of
    converted layers differ in their module, and those are not looked at)."""
    result = ConversionResult(form=form, backend=backend_name, skipped=dict(scales.skipped), scales=scales,
                              backend_requested=requested, layer_types=types or {}, notes=_notes(scales))
    result.converted = {name: ls.kind.value for name, ls in scales.layers.items()}
    for name, module in (modules.items() if modules is not None else target.named_modules()):
        if name and name not in result.converted and name not in result.skipped and entry_for(module):
            result.skipped[name] = "no scales for this layer"
    object.__setattr__(target, _RESULT_ATTR, result)

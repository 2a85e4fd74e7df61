"""Layer selection: which modules a recipe quantizes, and why the others are left alone.

A selector is an exact module name or ``re:<pattern>``; patterns match from the start of the
name, the convention of llm-compressor and compressed-tensors, with a time bound (see
``selectors``: a pattern that backtracks catastrophically raises RecipeError). An exact name in
``include`` must exist and be quantizable: naming a module we cannot convert is an error, not a
silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import ConversionError
from .opspecs import describe_registered, entry_for
from .recipe import Op, Quantization
from .selectors import matches
from .ties import tied_groups

__all__ = ["Selection", "matches", "select_layers"]


@dataclass
class Selection:
    """``selected`` maps module name → op; ``skipped`` maps quantizable module name → reason."""

    selected: dict[str, Op] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def select_layers(model: nn.Module, q: Quantization) -> Selection:
    """Apply ``q.ops``, ``q.include`` and ``q.exclude`` to the modules of ``model``.

    Raises:
        ConversionError: an exact name in ``include`` does not exist, or names a module whose type
            inc_bridge cannot quantize or whose op is not in ``ops``.
        RecipeError: a ``re:`` pattern ran past its time bound on a module name.
    """
    modules = dict(model.named_modules())
    for selector in q.include:
        if selector.startswith("re:"):
            continue
        if selector not in modules:
            raise ConversionError(f"quantization.include names {selector!r}, but the model has no module of that name")
        entry = entry_for(modules[selector])
        if entry is None:
            raise ConversionError(
                f"quantization.include names {selector!r} ({type(modules[selector]).__name__}), which inc_bridge "
                f"cannot quantize; quantizable: {describe_registered()}"
            )
        if Op(entry.spec.name) not in q.ops:
            raise ConversionError(
                f"quantization.include names {selector!r} ({entry.spec.name}), but {entry.spec.name!r} is not in "
                f"quantization.ops {[o.value for o in q.ops]}"
            )
    sel = Selection()
    for name, module in modules.items():
        entry = entry_for(module)
        if entry is None or not name:
            continue
        op = Op(entry.spec.name)
        if op not in q.ops:
            sel.skipped[name] = f"op {op.value!r} not in quantization.ops"
        elif q.include and not any(matches(name, s, where="quantization.include") for s in q.include):
            sel.skipped[name] = "not matched by quantization.include"
        elif hit := next((s for s in q.exclude if matches(name, s, where="quantization.exclude")), None):
            sel.skipped[name] = f"excluded by {hit!r}"
        else:
            sel.selected[name] = op
    _keep_ties(modules, sel)
    return sel


def _keep_ties(modules: dict[str, nn.Module], sel: Selection) -> None:
    """A selected layer whose weight is tied to a layer that stays float stays float too.

    Quantizing one side of a tie (an output head tied to an embedding that ``ops`` leaves out)
    would untie them: a float copy and an FP8 copy of one matrix, more memory than before. Both
    sides are quantized together (one FP8 weight, see ``ties``) or neither.
    """
    for group in tied_groups(modules, [n for n in modules if n]):
        kept = [n for n in group if n not in sel.selected]
        if not kept or len(kept) == len(group):
            continue
        for name in group:
            if name in sel.selected:
                del sel.selected[name]
                sel.skipped[name] = (f"weight tied to {kept[0]!r}, which is not quantized (quantize both to keep the "
                                     "tie in FP8, e.g. add its op to quantization.ops)")

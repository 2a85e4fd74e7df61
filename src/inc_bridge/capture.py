"""Capture: turn functional attention into named modules, without editing model source.

Two mechanisms, one result (an ``SDPA`` or ``Matmul`` submodule per attention call site):

* Hugging Face transformers models: every attention module that dispatches through transformers'
  attention-function registry gets an ``sdpa`` submodule (e.g.
  ``encoder.layer.3.attention.self.sdpa``), and the model's attention implementation is set to
  ``"inc_bridge"``, a registered function that runs the original implementation with its
  ``F.scaled_dot_product_attention`` call routed to that module. No example input is needed.
* Any other model: a discovery forward on ``example_inputs`` runs under a ``TorchFunctionMode``
  that records each call site of ``F.scaled_dot_product_attention`` and of activation × activation
  ``torch.matmul`` / ``torch.bmm`` / ``torch.baddbmm`` (``@`` included). A call site is the innermost
  enclosing module plus the source position of the call (file, line, bytecode offset), so names are stable (``attn.sdpa``,
  ``attn.bmm``, ``attn.bmm_1``). Each call site in its owner's own ``forward`` (and in
  ``F.multi_head_attention_forward`` for an ``nn.MultiheadAttention``) is then rewritten into a call
  of its module (``capture_rewrite.py``): nothing is routed at run time, so the model compiles and
  exports as plain PyTorch. Call sites that cannot be rewritten with certainty are routed instead:
  the root's ``forward`` runs inside the same mode (the root becomes an instance of a subclass of
  its class, same name), which sends each known call site to its module. That works in eager mode
  and non-strict ``torch.export``; dynamo cannot trace its frame inspection (graph breaks).

We use a function mode rather than ``torch.fx`` because it works on models fx cannot trace and
keeps every module's type. Capture changes no numerics: a captured float model's outputs are
``torch.equal`` to the original's (for ``nn.MultiheadAttention``: to its Python path; PyTorch's
fused fast path cannot be intercepted and is not taken while capturing).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .batches import run_batch
from .capture_rewrite import Site, call_position, disable_fast_path, rewrite_owner
from .errors import ConversionError
from .nn.attention import QSDPA, SDPA, Matmul, QMatmul

HF_IMPLEMENTATION = "inc_bridge"
_SITES_ATTR = "_inc_bridge_sites"  # on the root: {(owner name, file, line, bytecode offset): module name}
_REWRITTEN_ATTR = "_inc_bridge_rewritten_sites"  # on the root: the call sites rewritten into module calls

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_FUNCTION_KIND: dict[Callable, str] = {
    F.scaled_dot_product_attention: "sdpa",
    torch.matmul: "matmul",
    torch.Tensor.matmul: "matmul",
    torch.Tensor.__matmul__: "matmul",
    torch.bmm: "bmm",
    torch.Tensor.bmm: "bmm",
    torch.baddbmm: "baddbmm",
    torch.Tensor.baddbmm: "baddbmm",
}


def capture_attention(model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Give every attention call site of ``model`` its own ``SDPA`` / ``Matmul`` module, in place.

    Args:
        model: the float model. Hugging Face models using the "sdpa" attention implementation
            need no example; other models are discovered by running ``example_inputs`` once.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments.
    Returns:
        ``model`` itself, with the new submodules (listed by ``captured_sites(model)``).
    Raises:
        ConversionError: a non-HF model without ``example_inputs``.

    Example:
        >>> model = capture_attention(model, example_inputs=torch.randn(2, 16, 64))   # doctest: +SKIP
    """
    if _hf_attention_modules(model):
        _capture_hf(model)
        return model
    if example_inputs is None:
        raise ConversionError(
            "capture_attention needs example_inputs for a model that is not a Hugging Face model using "
            "attn_implementation='sdpa': call sites are found by running one forward"
        )
    known = {*(getattr(model, _SITES_ATTR, None) or {}), *getattr(model, _REWRITTEN_ATTR, ())}
    # a second capture (e.g. with a longer example) adds only the call sites the first did not see
    found = _discover(model, example_inputs)
    sites = {key: fn for key, fn in found.items() if key not in known}
    if not sites:
        return model  # no (new) attention: the model is left as it was
    table: dict[tuple[str, str, int, int], str] = {}
    per_owner: dict[str, list[tuple[tuple[str, str, int, int], Site | None]]] = {}
    for key, fn in sites.items():
        owner_name = key[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        base = "sdpa" if fn.kind == "sdpa" else fn.kind
        name = _free_name(owner, base)
        owner.add_module(name, SDPA() if fn.kind == "sdpa" else Matmul(fn.kind))
        table[key] = f"{owner_name}.{name}" if owner_name else name
        per_owner.setdefault(owner_name, []).append(
            (key, None if fn.position is None else Site(fn.position, name, fn.method)))
    # Where the call is in the owner's own forward, that forward is rewritten to call the module:
    # nothing is routed at run time, so torch.compile and torch.export see plain module calls.
    for owner_name, owned in per_owner.items():
        owner = model.get_submodule(owner_name) if owner_name else model
        kinds = {sites[key].where for key, _ in owned}
        if len(kinds) == 1 and all(site is not None for _, site in owned) and kinds != {"other"}:
            if rewrite_owner(owner, [site for _, site in owned], mha=kinds == {"mha"}):  # type: ignore[misc]
                for key, _ in owned:
                    table.pop(key)
                if kinds == {"mha"}:  # its parents' fused fast paths (TransformerEncoderLayer) would skip it
                    parts = owner_name.split(".")
                    for i in range(len(parts)):
                        disable_fast_path(model.get_submodule(".".join(parts[:i])) if i else model)
                rewritten = getattr(model, _REWRITTEN_ATTR, frozenset())
                object.__setattr__(model, _REWRITTEN_ATTR, rewritten | {key for key, _ in owned})
    existing = getattr(model, _SITES_ATTR, None)
    if table and existing is None:
        _route(model)
        existing = {}
    if table or existing is not None:
        setattr(model, _SITES_ATTR, {**(existing or {}), **table})
    return model


def captured_sites(model: nn.Module) -> dict[str, str]:
    """Module name → kind ("sdpa", "matmul", "bmm", "baddbmm") of every captured attention module.

    Float sites (``SDPA``, ``Matmul``, also when the subclass form quantized them in place) and the
    module form's swapped ones (``QSDPA``, ``QMatmul``) alike: a module-form model is captured too.
    """
    return {
        name: ("sdpa" if isinstance(m, (SDPA, QSDPA)) else m.fn)
        for name, m in model.named_modules()
        if isinstance(m, (SDPA, Matmul, QSDPA, QMatmul))
    }


def hf_attention_sites(model: nn.Module) -> dict[str, str]:
    """Attention module name → name of its ``sdpa`` layer, for every transformers attention module
    captured through the attention registry (float ``SDPA`` or quantized ``QSDPA`` alike).

    These modules update transformers' cache themselves (``cache.update(k, v, layer_idx)``) before
    attention runs, which is where an FP8 KV cache (``kv_cache.py``) takes over.
    """
    return {
        name: f"{name}.sdpa" if name else "sdpa"
        for name, m in model.named_modules()
        if _dispatches_through_registry(type(m)) and isinstance(getattr(m, "sdpa", None), (SDPA, QSDPA))
    }


# ---------------------------------------------------------------- Hugging Face: the attention registry


@functools.cache
def _dispatches_through_registry(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _hf_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", HF_IMPLEMENTATION):
        return []
    return [(n, m) for n, m in model.named_modules() if _dispatches_through_registry(type(m))]


def _capture_hf(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # Masks are built per implementation name: ours must get exactly the masks "sdpa" gets.
    AttentionInterface.register(HF_IMPLEMENTATION, _hf_attention)
    AttentionMaskInterface.register(HF_IMPLEMENTATION, sdpa_mask)
    for _, module in _hf_attention_modules(model):
        if not isinstance(getattr(module, "sdpa", None), nn.Module):
            module.add_module("sdpa", SDPA())
    if model.config._attn_implementation != HF_IMPLEMENTATION:
        model.set_attn_implementation(HF_IMPLEMENTATION)


def _hf_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention, with its F.scaled_dot_product_attention call routed to ``module.sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    target = getattr(module, "sdpa", None)
    if target is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with _RouteSdpa(target):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _RouteSdpa(TorchFunctionMode):
    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.target(*args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------- any model: call sites under a function mode


def _is_activation_pair(func_kind: str, args: tuple) -> bool:
    positions = (1, 2) if func_kind == "baddbmm" else (0, 1)
    if len(args) <= max(positions):
        return False
    operands = [args[p] for p in positions]
    return all(isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) for t in operands)


class _CallSiteMode(TorchFunctionMode):
    """Finds (discover=True) or routes (discover=False) attention call sites of one root module."""

    def __init__(self, root: nn.Module, discover: bool) -> None:
        super().__init__()
        self.root = root
        self.names = {id(m): n for n, m in root.named_modules()}
        self.discover = discover
        self.found: dict[tuple[str, str, int, int], _Found] = {}
        self.table: dict[tuple[str, str, int, int], str] = getattr(root, _SITES_ATTR, {}) or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._multi_head_attention(args, kwargs)
        kind = _FUNCTION_KIND.get(func)
        if kind is None or (kind != "sdpa" and not _is_activation_pair(kind, args)):
            return func(*args, **kwargs)
        return self.route(kind, func, args, kwargs, sys._getframe(1))

    def route(self, kind: str, func: Callable, args: tuple, kwargs: dict, frame: types.FrameType | None):
        if _in_captured_module(frame):  # the captured module's own call (a rewritten call site)
            return func(*args, **kwargs)
        frame = _user_frame(frame)
        owner = _owner_name(frame, self.names)
        if frame is None or owner is None:
            return func(*args, **kwargs)
        # the bytecode offset tells apart two calls on one source line (``a @ b + c @ d``)
        key = (owner, frame.f_code.co_filename, frame.f_lineno, frame.f_lasti)
        if self.discover:
            if key not in self.found:
                self.found[key] = _Found(kind, call_position(frame.f_code, frame.f_lasti), func in _METHODS,
                                         self._where(frame, owner))
            return func(*args, **kwargs)
        name = self.table.get(key)
        if name is None:  # a call site the discovery run did not see: leave it alone
            return func(*args, **kwargs)
        return self.root.get_submodule(name)(*args, **kwargs)

    def _where(self, frame: types.FrameType, owner_name: str) -> str:
        """"forward": the call is in the owner's own forward; "mha": in F.multi_head_attention_forward
        called by a MultiheadAttention owner; "other": elsewhere (a helper function, a parent's forward)."""
        owner = self.root.get_submodule(owner_name) if owner_name else self.root
        code = frame.f_code
        if isinstance(owner, nn.MultiheadAttention) and code is F.multi_head_attention_forward.__code__:
            return "mha"
        own = getattr(type(owner).forward, "__code__", None)
        same = own is not None and (own.co_filename, own.co_firstlineno, own.co_name) == (
            code.co_filename, code.co_firstlineno, code.co_name)
        return "forward" if same and frame.f_locals.get("self") is owner else "other"

    def _multi_head_attention(self, args: tuple, kwargs: dict):
        # The mode is inactive inside its own handler, so F.multi_head_attention_forward would run
        # its attention ops unseen. Run the same code object with its attention functions routed.
        _MHA_MODES.append(self)
        try:
            return _routed_mha()(*args, **kwargs)
        finally:
            _MHA_MODES.pop()


_MHA_MODES: list[_CallSiteMode] = []  # the mode whose MultiheadAttention call is running


@functools.cache
def _routed_mha() -> Callable:
    """``F.multi_head_attention_forward``'s own code, with bmm / baddbmm / sdpa routed to the active mode."""
    original = F.multi_head_attention_forward

    def routed(kind: str, func: Callable) -> Callable:
        def call(*args, **kwargs):
            if not _MHA_MODES or (kind != "sdpa" and not _is_activation_pair(kind, args)):
                return func(*args, **kwargs)
            return _MHA_MODES[-1].route(kind, func, args, kwargs, sys._getframe(1))

        return call

    torch_proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    torch_proxy.bmm = routed("bmm", torch.bmm)
    torch_proxy.baddbmm = routed("baddbmm", torch.baddbmm)
    env = dict(original.__globals__)
    env["torch"] = torch_proxy
    env["scaled_dot_product_attention"] = routed("sdpa", F.scaled_dot_product_attention)
    return types.FunctionType(original.__code__, env, original.__name__, original.__defaults__, original.__closure__)


def _user_frame(frame: types.FrameType | None) -> types.FrameType | None:
    """The frame that made the call: skip inc_bridge's own frames and torch's dispatch helpers."""
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename.endswith("overrides.py")
    ):
        frame = frame.f_back
    return frame


def _owner_name(frame: types.FrameType | None, names: dict[int, str]) -> str | None:
    """Name of the innermost module of the root whose forward is on the stack at ``frame``."""
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names and not isinstance(obj, (SDPA, Matmul)):
            return names[id(obj)]
        frame = frame.f_back
    return None


@dataclasses.dataclass(frozen=True)
class _Found:
    """A call site found by discovery: its kind, source span, call style and where it is (see ``_where``)."""

    kind: str
    position: tuple[int, int, int, int] | None
    method: bool
    where: str


_METHODS = frozenset({torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.baddbmm})


def _in_captured_module(frame: types.FrameType | None) -> bool:
    while frame is not None and frame.f_code.co_filename.endswith("overrides.py"):
        frame = frame.f_back
    return frame is not None and isinstance(frame.f_locals.get("self"), (SDPA, Matmul))


def _discover(model: nn.Module, example_inputs: Any) -> dict[tuple[str, str, int, int], _Found]:
    mode = _CallSiteMode(model, discover=True)
    token = _DISCOVERING.set(True)
    try:
        with torch.no_grad(), mode:
            run_batch(model, example_inputs)
    finally:
        _DISCOVERING.reset(token)
    return mode.found


def _free_name(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


_ROUTED_CLASSES: dict[type, type] = {}  # float class -> its routed subclass
_DISCOVERING = contextvars.ContextVar("inc_bridge_discovering", default=False)
_INNER_FORWARD = "_inc_bridge_inner_forward"  # an instance-level forward the model had before capture


def _route(model: nn.Module) -> None:
    """Make ``model`` run its forward inside the routing mode, as an instance of a routed subclass.

    The mode is a ``with`` block in forward, so it is left however forward ends. (A forward
    pre-hook / always-call hook pair cannot promise that: torch skips the hooks when forward raises
    while compiling or exporting, and a failed ``torch.export`` then left its own function mode on
    the stack.) A subclass rather than an attribute holding a function: every copy (deepcopy, copy,
    pickling, DataParallel replicas) routes itself, and the model holds no reference to itself.
    """
    if type(model) in _ROUTED_CLASSES.values():
        return
    if "forward" in vars(model):  # kept, and called inside the mode
        object.__setattr__(model, _INNER_FORWARD, vars(model).pop("forward"))
    model.__class__ = _routed_class(type(model))


def _routed_class(base: type) -> type:
    """``base`` with its forward run inside the routing mode; same name, signature and module."""
    cls = _ROUTED_CLASSES.get(base)
    if cls is not None:
        return cls
    original = base.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        inner = self.__dict__.get(_INNER_FORWARD)
        call = inner if inner is not None else functools.partial(original, self)
        if _DISCOVERING.get():  # capture_attention again: find the call sites, route nothing
            return call(*args, **kwargs)
        with _CallSiteMode(self, discover=False):
            return call(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # copies and pickles rebuild an instance of the routed class of ``base`` (which a new
        # process creates on unpickling), then restore the state as nn.Module does
        return _new_routed, (base,), self.__getstate__()

    cls = type(base.__name__, (base,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                        "__module__": base.__module__, "__qualname__": base.__qualname__})
    _ROUTED_CLASSES[base] = cls
    return cls


def _new_routed(base: type) -> nn.Module:
    cls = _routed_class(base)
    return cls.__new__(cls)

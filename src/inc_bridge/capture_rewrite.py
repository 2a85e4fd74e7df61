"""Rewrite captured attention call sites into module calls, so captured models compile and export.

Call-site capture (``capture.py``) finds each ``F.scaled_dot_product_attention`` / activation
matmul call by running a forward under a ``TorchFunctionMode`` and routes it to its module by looking
at the calling frame. That works in eager mode but not for ``torch.compile`` / ``torch.export``:
dynamo cannot trace frame inspection, so every routed model broke the graph. Here the owner's
``forward`` source is rewritten instead: the expression at the recorded position (the call, or
``a @ b``) becomes ``self.<module name>(...)`` with the same arguments. The owner becomes an
instance of a subclass of its class (same name, module and signature) whose ``forward`` is the
rewritten function; nothing is left to route at run time, so the model traces as plain PyTorch.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``, where the attention calls are:
that function is rewritten with an extra keyword argument carrying the owner, and the owner's
forward calls the rewritten copy (with PyTorch's fused fast path off: it would bypass the captured
attention, as it does not run while a function mode is active either).

A call site is rewritten only where this is certain to be equivalent: it is in the owner's own
``forward`` (or in ``F.multi_head_attention_forward`` for a ``MultiheadAttention`` owner), that
function is undecorated and has no closure, and its source parses and has exactly one expression
at the recorded position. Other sites stay routed by the function mode (eager-only, as before).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

# (line, end line, column, end column) of the call expression in its file, as ``co_positions`` gives it
Position = tuple[int, int, int, int]
OWNER_KWARG = "_inc_bridge_owner"


@dataclass(frozen=True)
class Site:
    """One call site to rewrite: where, the attribute of the owner it calls, and how it was called."""

    position: Position
    attr: str
    method: bool  # ``x.matmul(y)`` style: the receiver becomes the first argument


def call_position(code: types.CodeType, lasti: int) -> Position | None:
    """The source span of the instruction at byte offset ``lasti`` (the call being made)."""
    try:
        pos = list(code.co_positions())[lasti // 2]
    except (IndexError, AttributeError):
        return None
    return None if any(p is None for p in pos) else pos  # type: ignore[return-value]


class _Rewriter(ast.NodeTransformer):
    def __init__(self, sites: dict[Position, Site], owner: ast.expr, line_offset: int, col_offset: int) -> None:
        self.sites, self.owner = sites, owner
        self.line_offset, self.col_offset = line_offset, col_offset
        self.done: set[Position] = set()

    def _site(self, node: ast.expr) -> Site | None:
        pos = (node.lineno + self.line_offset, node.end_lineno + self.line_offset,  # type: ignore[operator]
               node.col_offset + self.col_offset, node.end_col_offset + self.col_offset)  # type: ignore[operator]
        site = self.sites.get(pos)  # type: ignore[arg-type]
        if site is not None:
            if pos in self.done:  # two expressions at one position: not certain, give up
                raise _CannotRewrite("ambiguous position")
            self.done.add(pos)  # type: ignore[arg-type]
        return site

    def _module_call(self, site: Site, args: list[ast.expr], keywords: list[ast.keyword], like: ast.expr) -> ast.expr:
        func = ast.Attribute(value=self.owner, attr=site.attr, ctx=ast.Load())
        return ast.copy_location(ast.Call(func=func, args=args, keywords=keywords), like)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        site = self._site(node)
        if site is None:
            return node
        if site.method:
            if not isinstance(node.func, ast.Attribute):
                raise _CannotRewrite("a method call site is not an attribute call")
            return self._module_call(site, [node.func.value, *node.args], node.keywords, node)
        return self._module_call(site, node.args, node.keywords, node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        self.generic_visit(node)
        site = self._site(node)
        if site is None:
            return node
        if not isinstance(node.op, ast.MatMult):
            raise _CannotRewrite("the site is not a matmul")
        return self._module_call(site, [node.left, node.right], [], node)


class _CannotRewrite(Exception):
    pass


def _rewritten(fn: Callable, sites: dict[Position, Site], owner: ast.expr, extra_args: tuple[str, ...] = (),
               transform: Callable[[ast.FunctionDef], None] | None = None) -> types.FunctionType:
    """``fn`` compiled again from its source with ``sites`` replaced by calls on ``owner``."""
    code = fn.__code__
    if code.co_freevars:
        raise _CannotRewrite("closure")
    lines, first = inspect.getsourcelines(fn)
    source = "".join(lines)
    dedented = textwrap.dedent(source)
    indent = len(source.splitlines()[0]) - len(dedented.splitlines()[0])
    tree = ast.parse(dedented)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef) or fdef.decorator_list:
        raise _CannotRewrite("decorated or not a plain function")
    rewriter = _Rewriter(sites, ast.Name(id=owner.id, ctx=ast.Load()) if isinstance(owner, ast.Name) else owner,
                         first - 1, indent)
    rewriter.visit(fdef)
    if rewriter.done != set(sites):
        raise _CannotRewrite("not every site was found in the source")
    for name in extra_args:
        fdef.args.kwonlyargs.append(ast.arg(arg=name))
        fdef.args.kw_defaults.append(ast.Constant(value=None))
    if transform is not None:
        transform(fdef)
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, first - 1)  # tracebacks point at the original lines
    # The function's own module globals (not a copy): torch.compile guards on them by module name.
    namespace: dict = {}
    exec(compile(tree, code.co_filename, "exec"), fn.__globals__, namespace)  # noqa: S102 - the function's own source
    new = namespace[fdef.name]
    new.__defaults__, new.__kwdefaults__ = fn.__defaults__, {**(fn.__kwdefaults__ or {}), **{a: None for a in extra_args}}
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return new


# ---------------------------------------------------------------- owner classes with rewritten forwards

_REWRITTEN: dict[tuple[type, tuple[Site, ...]], type] = {}
_BASE_ATTR = "_inc_bridge_rewrite"  # on a rewritten class: (base class, its sites)


def rewrite_owner(owner: nn.Module, sites: list[Site], mha: bool) -> bool:
    """Make ``owner`` call its captured modules directly at ``sites``; False (owner unchanged) if that is not certain.

    ``mha``: the sites are in ``F.multi_head_attention_forward``, called by an ``nn.MultiheadAttention`` owner.
    """
    if "forward" in vars(owner):  # an instance-level forward may call the class's own one by name
        return False
    base, known = getattr(type(owner), _BASE_ATTR, (type(owner), ()))
    merged = tuple(sorted({*known, *sites}, key=lambda s: s.position))
    try:
        cls = _rewritten_class(base, merged, mha)
    except (_CannotRewrite, OSError, TypeError, SyntaxError):
        return False
    owner.__class__ = cls
    return True


def _rewritten_class(base: type, sites: tuple[Site, ...], mha: bool) -> type:
    key = (base, sites)
    cls = _REWRITTEN.get(key)
    if cls is not None:
        return cls
    table = {s.position: s for s in sites}
    if mha:
        if not issubclass(base, nn.MultiheadAttention):
            raise _CannotRewrite("not a MultiheadAttention")
        attention = _rewritten(F.multi_head_attention_forward, table, ast.Name(id=OWNER_KWARG), (OWNER_KWARG,),
                               transform=_without_torch_function_dispatch)
        forward = _rewritten(base.forward, {}, ast.Name(id="self"), transform=_call_rewritten_mha)
        extra = {_MHA_FN: staticmethod(attention)}
    else:
        forward = _rewritten(base.forward, table, ast.Name(id="self"), transform=_fast_path_off)
        extra = {}

    def __reduce_ex__(self, protocol):
        # copies and pickles rebuild an instance of the same rewritten class (a new process rewrites
        # the source again), then restore the state as nn.Module does
        return _new_rewritten, (base, sites, mha), self.__getstate__()

    cls = type(base.__name__, (base,), {"forward": functools.wraps(base.forward)(forward),
                                        "__reduce_ex__": __reduce_ex__, _BASE_ATTR: (base, sites),
                                        "__module__": base.__module__, "__qualname__": base.__qualname__, **extra})
    _REWRITTEN[key] = cls
    return cls


def _new_rewritten(base: type, sites: tuple[Site, ...], mha: bool) -> nn.Module:
    cls = _rewritten_class(base, sites, mha)
    return cls.__new__(cls)


_MHA_FN = "_inc_bridge_multi_head_attention_forward"


def _without_torch_function_dispatch(fdef: ast.FunctionDef) -> None:
    """Drop ``if has_torch_function(...): return handle_torch_function(...)``: under an active function
    mode it would call the original function, whose attention calls are not rewritten."""
    def dispatches(stmt: ast.stmt) -> bool:
        test = stmt.test if isinstance(stmt, ast.If) else None
        return isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "has_torch_function"

    fdef.body = [stmt for stmt in fdef.body if not dispatches(stmt)]


def _call_rewritten_mha(fdef: ast.FunctionDef) -> None:
    """In ``MultiheadAttention.forward``: call the rewritten attention function, with the fast path off."""

    class Calls(ast.NodeTransformer):
        found = 0

        def visit_Call(self, node: ast.Call) -> ast.expr:
            self.generic_visit(node)
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "multi_head_attention_forward":
                Calls.found += 1
                node.func = ast.Attribute(value=ast.Name(id="self", ctx=ast.Load()), attr=_MHA_FN, ctx=ast.Load())
                node.keywords.append(ast.keyword(arg=OWNER_KWARG, value=ast.Name(id="self", ctx=ast.Load())))
            return node

    Calls().visit(fdef)
    if not Calls.found:
        raise _CannotRewrite("MultiheadAttention.forward does not call F.multi_head_attention_forward")
    _fast_path_off(fdef)


class _FastPathOff(ast.NodeTransformer):
    def visit_Assign(self, node: ast.Assign) -> ast.stmt:
        targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        if targets == [_FAST_PATH]:
            node.value = ast.Constant(value=False)
        return node


_FAST_PATH = "is_fastpath_enabled"


def _fast_path_off(fdef: ast.FunctionDef) -> None:
    """``is_fastpath_enabled = False``: PyTorch's fused MultiheadAttention / TransformerEncoderLayer
    kernels would skip the captured attention (they are not taken under a function mode either)."""
    _FastPathOff().visit(fdef)


def disable_fast_path(module: nn.Module) -> bool:
    """Rewrite ``module``'s forward without PyTorch's fused fast path, where it has one (True if changed)."""
    base = getattr(type(module), _BASE_ATTR, (type(module), ()))[0]
    try:
        if _FAST_PATH not in inspect.getsource(base.forward) or getattr(type(module), _BASE_ATTR, None):
            return False
    except (OSError, TypeError):
        return False
    return rewrite_owner(module, [], mha=False)


def disable_fast_paths_above(model: nn.Module, layer_names: list[str]) -> None:
    """Turn off the fused fast path of every module above a quantized layer (``TransformerEncoderLayer``).

    In eager mode the fast path is not taken anyway (an FP8 weight is a tensor subclass, which its
    check refuses), but under ``torch.compile`` that check sees traced tensors and takes it, and the
    fused kernel cannot run FP8 weights.
    """
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for name in layer_names:
        parts = name.split(".")
        for i in range(len(parts)):
            parent = ".".join(parts[:i])
            if parent not in seen and parent in modules:
                seen.add(parent)
                disable_fast_path(modules[parent])

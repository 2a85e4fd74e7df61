"""YAML for untrusted recipe files: safe tags only, bounded nesting, bounded alias expansion.

``yaml.safe_load`` runs no code, but it still trusts the shape of its input. Aliases make a
436-byte file stand for a billion nodes ("billion laughs"): PyYAML shares the repeated objects, so
loading is cheap, but everything that then walks the data (schema validation, ``repr`` in an error
message) does the expanded work and runs out of time or memory. Deep nesting raises RecursionError
in PyYAML's composer. And some safe tags fail with plain Python errors on bad text (``!!timestamp
x`` raises AttributeError, a 5000-digit integer ValueError).

So ``load_yaml`` composes the node graph first (libyaml when present, which also caps nesting),
then measures it without recursion, refusing cycles (``&a [*a]``), nesting deeper than
``max_depth`` and documents whose alias expansion adds more than ``max_alias_nodes`` nodes, and only
then builds Python objects. Aliases within that budget stay allowed: an anchor reused for a few
override blocks is ordinary YAML. Every failure is the caller's error class.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import IncBridgeError
from .safe_io import shorten

MAX_DEPTH = 64
MAX_ALIAS_NODES = 10_000  # nodes aliases may add to a document beyond those written out

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated objects out in full: what we write never needs aliases to be read back."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text without anchors or aliases, keys in insertion order."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root: yaml.Node, *, max_depth: int, max_alias_nodes: int) -> str | None:
    """Why the node graph under ``root`` is refused, or None (iterative post-order, memoised by node)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            on_path.discard(key)
            if height[key] > max_depth:
                return f"nested more than {max_depth} levels deep"
            if size[key] > len(size) + max_alias_nodes:
                return f"its aliases expand to more than {max_alias_nodes} extra nodes (an alias bomb?)"
            continue
        if key in size:
            continue
        if key in on_path:
            return "an alias refers to a node that contains it (a recursive structure)"
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    return None


def load_yaml(text: str, *, origin: str, error: type[IncBridgeError], max_depth: int = MAX_DEPTH,
              max_alias_nodes: int = MAX_ALIAS_NODES) -> Any:
    """The data of one YAML document, read with safe tags only; ``error`` for anything else.

    Args:
        text: the YAML text.
        origin: what to name in messages (the file path).
        error: the IncBridgeError subclass to raise.
        max_depth: deepest nesting of sequences and mappings allowed (aliases followed).
        max_alias_nodes: how many nodes aliases may add beyond those written out.
    Raises:
        error: not YAML, more than one document, an unknown tag, too deep, recursive or an alias bomb.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        why = _check_graph(node, max_depth=max_depth, max_alias_nodes=max_alias_nodes)
        if why:
            raise error(f"{origin}: YAML refused: {why}")
        return loader.construct_document(node)
    except IncBridgeError:
        raise  # ours (a RecipeError is also a ValueError): not to be wrapped below
    except RecursionError:
        raise error(f"{origin}: YAML nested too deeply (limit {max_depth})") from None
    except yaml.YAMLError as exc:
        raise error(f"{origin}: not valid YAML: {shorten(str(exc), 400)}") from None
    except (ValueError, TypeError, AttributeError, OverflowError, KeyError, IndexError) as exc:
        # PyYAML's safe constructors raise these for some malformed scalars (!!timestamp x, huge ints).
        raise error(f"{origin}: not valid YAML: {type(exc).__name__}: {shorten(str(exc), 200)}") from None
    finally:
        loader.dispose()

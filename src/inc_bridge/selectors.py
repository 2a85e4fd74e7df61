"""Layer selectors: an exact module name or ``re:<pattern>``, matched in bounded time.

A recipe is data, but a regular expression is a small program: with Python's ``re``, patterns such
as ``(a+)+$`` or ``(\\w+\\.?)*q_proj$`` backtrack exponentially and hang on ordinary module names.
Patterns therefore run on the ``regex`` package (a superset of ``re``'s syntax with the same meaning
for ``re`` patterns, ``VERSION0``), which avoids most catastrophic backtracking and, for what is
left, takes a ``timeout``: a match that runs longer raises ``RecipeError`` naming the pattern
instead of hanging. Validation also caps the pattern length and the product of counted repeats
(``regex`` expands ``(a{1000}){1000}`` at compile time and ``((a{1000}){1000}){1000}`` exhausts
memory); no module name is long enough to need either.

Matching is ``match`` (anchored at the start of the name), the convention of llm-compressor and
compressed-tensors.
"""

from __future__ import annotations

import math
import re

from .errors import RecipeError
from .safe_io import shorten

PREFIX = "re:"
MAX_PATTERN_CHARS = 512
MAX_REPEAT_PRODUCT = 10_000  # product of every {m,n} bound in one pattern
MATCH_TIMEOUT_S = 1.0  # per name; an ordinary selector takes microseconds

# Counted repeats as written: {m}, {m,}, {,n}, {m,n}. Counting braces that are really literal
# (escaped or inside a class) only makes the check stricter, never weaker.
_COUNTED = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_selector(selector: object) -> str:
    """``selector`` if it is a usable exact name or ``re:`` pattern; ValueError saying why not.

    (ValueError, so that pydantic reports it at the recipe key that holds the selector.)
    """
    if not isinstance(selector, str) or not selector:
        raise ValueError("a layer selector must be a non-empty string")
    if not selector.startswith(PREFIX):
        return selector
    pattern = selector[len(PREFIX):]
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"regular expression {shorten(pattern, 60)!r} is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}"
        )
    bounds = [int(b) for m in _COUNTED.finditer(pattern) for b in m.groups() if b]
    if any(b > MAX_REPEAT_PRODUCT for b in bounds) or math.prod(bounds) > MAX_REPEAT_PRODUCT:
        raise ValueError(
            f"regular expression {shorten(pattern, 60)!r}: its counted repeats ({{m,n}}) multiply to more than "
            f"{MAX_REPEAT_PRODUCT}; module names are far shorter, use + or * instead"
        )
    import regex

    try:
        regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, re.error, ValueError, OverflowError, RecursionError) as exc:
        raise ValueError(f"invalid regular expression {shorten(pattern, 60)!r}: {shorten(str(exc), 120)}") from None
    return selector


def matches(name: str, selector: str, *, where: str = "layer selector") -> bool:
    """Whether module ``name`` is selected by ``selector`` (exact name, or ``re:`` matched from the start).

    Args:
        name: the module's qualified name.
        selector: an exact name or ``re:<pattern>`` (validated by ``check_selector``).
        where: the recipe key the selector came from, for the error message.
    Raises:
        RecipeError: the pattern ran longer than ``MATCH_TIMEOUT_S`` on ``name`` (it backtracks
            catastrophically), or is not a valid pattern.
    """
    if not selector.startswith(PREFIX):
        return name == selector
    import regex

    pattern = selector[len(PREFIX):]
    try:
        return regex.match(pattern, name, flags=regex.VERSION0, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RecipeError(
            f"{where}: regular expression {shorten(pattern, 80)!r} ran longer than {MATCH_TIMEOUT_S} s on module "
            f"name {shorten(name, 80)!r}; it backtracks catastrophically (nested repeats such as (a+)+ or "
            "(\\w+\\.?)*): rewrite it without repeats inside repeats"
        ) from None
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise RecipeError(f"{where}: invalid regular expression {shorten(pattern, 80)!r}: {shorten(str(exc), 120)}") from None

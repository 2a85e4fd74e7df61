"""Whether converted layers may share the float layer's unconverted tensors (its bias) or copy them.

``convert`` gives a model that shares nothing with the float one, so changing either never changes
the other. autotune's trials live only as long as one evaluation; for them the copies are wasted
work, so ``convert.swapped_in`` converts under ``sharing_tensors()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Any

from torch import nn

_SHARING = contextvars.ContextVar("inc_bridge_sharing_tensors", default=False)


@contextlib.contextmanager
def sharing_tensors() -> Iterator[None]:
    """Within the block, converters share float tensors with the float layer instead of copying them."""
    token = _SHARING.set(True)
    try:
        yield
    finally:
        _SHARING.reset(token)


def shared_tensors(module: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo mapping every parameter and buffer of ``module`` to itself, so the
    copy shares them."""
    return {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}


def tensors_shared() -> bool:
    """True inside ``sharing_tensors()``: converters may reuse the float layer's tensors."""
    return _SHARING.get()

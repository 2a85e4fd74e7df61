"""Imported first by ``inc_bridge``: imports torchao without its import-time log lines reaching the user.

On a CPU build of torch, ``import torchao`` logs "Failed to load .../_C_mxfp8...so" and
"_C_cutlass_90a...so" (CUDA-only extensions it tries on every machine) and torch's pytree logs a
deprecation for torchao's ``register_constant(KernelPreference)``: three lines on every
``import inc_bridge`` that say nothing a user can act on. They are muted here, at the one call
that triggers them, by filters on those two loggers for the duration of the import only; every
other message of those loggers, and every later message, passes as before.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# (logger, the start of a message that is not the user's business at import time)
_MUTED = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def muted_import_messages() -> Iterator[None]:
    """Drop the known import-time messages of torchao and torch's pytree while the block runs."""
    installed = [(logging.getLogger(name), _DropPrefix(prefix)) for name, prefix in _MUTED]
    for logger, flt in installed:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger, flt in installed:
            logger.removeFilter(flt)


if "torchao" not in sys.modules:  # this module's one job, done when inc_bridge is imported
    with muted_import_messages():
        import torchao  # noqa: F401

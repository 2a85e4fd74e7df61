"""A stable cache key for inc_bridge's tensor subclasses under ``torch.compile``.

AOT autograd's cache hashes every traceable tensor subclass; one that does not say how warns on
each compile ("does not implement _stable_hash_for_caching") and falls back to a generic walk. The
key names what the compiled graph depends on (class, shape, dtypes, the inner tensors' layout and
the subclass's metadata), not the values, like torch's default, without the warning.
"""

from __future__ import annotations

import hashlib

import torch


def stable_hash_for_caching(tensor: torch.Tensor) -> str:
    """Deterministic across processes: ``repr`` of plain metadata hashed with blake2b."""
    names, meta = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = [(n, str(t.dtype), tuple(t.shape), t.stride(), t.device.type)
             for n in names if isinstance(t := getattr(tensor, n), torch.Tensor)]
    key = repr((type(tensor).__qualname__, tuple(tensor.shape), str(tensor.dtype), tensor.requires_grad, inner, meta))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

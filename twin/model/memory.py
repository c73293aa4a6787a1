"""Memory account of a model: every tensor it holds is a parameter or a buffer (kernels and Twin layers
register theirs), so the account is ``named_parameters`` plus ``named_buffers``, by kind: buffers named
``delta_*`` are exclusive deltas, everything else is θ*."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

DELTA_PREFIX = "delta_"


def tensor_bytes(t: torch.Tensor, seen: set) -> int:
    """Bytes of ``t``'s storage unless ``seen`` already holds it (then 0); records it in ``seen``.
    oneDNN-packed tensors have no shareable storage and count by their element count."""
    if t.is_mkldnn:
        key, nbytes = id(t), t.numel() * t.element_size()
    else:
        s = t.untyped_storage()
        key, nbytes = s.data_ptr(), s.nbytes()
    if key in seen or nbytes == 0:
        return 0
    seen.add(key)
    return nbytes


def tensors_bytes(tensors: Iterable[torch.Tensor | None], seen: set | None = None) -> int:
    seen = set() if seen is None else seen
    return sum(tensor_bytes(t, seen) for t in tensors if t is not None)


def module_memory(module: nn.Module, seen: set | None = None) -> dict[str, int]:
    """{"weights": bytes of θ* (parameters, packed kernels, other buffers), "deltas": bytes of the exclusive
    deltas}, each distinct storage counted once (across calls sharing ``seen``)."""
    seen = set() if seen is None else seen
    out = {"weights": 0, "deltas": 0}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is not None:
            kind = "deltas" if name.rpartition(".")[2].startswith(DELTA_PREFIX) else "weights"
            out[kind] += tensor_bytes(t, seen)
    return out

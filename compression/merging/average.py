"""Weight averaging: θ* = Σ_t w_t θ_t / Σ_t w_t (the plain mean of the experts when all w_t = 1)."""
from __future__ import annotations

import torch

from .consensus import mix


def average_merge(task_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,) -> merged τ of shape (*shape)."""
    return mix(task_vectors, weights, None, normalize=True)

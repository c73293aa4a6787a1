"""Task arithmetic (arXiv 2212.04089): τ_m = λ · Σ_t w_t τ_t (÷ Σ_t w_t with ``normalize``), as mergekit."""
from __future__ import annotations

import torch

from .consensus import mix


def task_arithmetic_merge(task_vectors: torch.Tensor, weights: torch.Tensor, lam: float = 1.0,
                          normalize: bool = False) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,) -> merged τ of shape (*shape)."""
    return mix(task_vectors, weights, None, normalize, lam)

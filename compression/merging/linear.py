"""Linear (model soup, arXiv 2203.05482): θ* = Σ_t w_t θ_t (÷ Σ w_t with ``normalize``), as mergekit's
``linear``. Expressed on task vectors so it shares the θ* = θ_0 + τ_m form of the other methods."""
from __future__ import annotations

import torch


def linear_merge(task_vectors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, normalize: bool = True,
                 base_weight: float = 0.0) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), base θ_0: (*shape) -> τ_m with θ_0 + τ_m = the weighted sum.

    ``base_weight`` is θ_0's own weight, for a mergekit config that lists the base among its models.
    Σ w_t θ_t = (Σ w_t + w_0) θ_0 + Σ w_t τ_t, so the unnormalised sum needs θ_0 itself.
    """
    w = weights.to(task_vectors.dtype).reshape(-1, *([1] * (task_vectors.ndim - 1)))
    summed = (task_vectors * w).sum(0)
    total = float(weights.sum()) + base_weight
    if normalize:
        return summed / total
    return summed + (total - 1.0) * base

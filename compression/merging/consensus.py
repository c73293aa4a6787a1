"""Sign election and the weighted (disjoint) mix of sparsified task vectors — mergekit's generalized
task arithmetic (``merge_methods/generalized_task_arithmetic.py``, 0.1.5), shared by every method."""
from __future__ import annotations

from typing import Literal

import torch

Consensus = Literal["sum", "count"]


def elect_sign(weighted: torch.Tensor, method: Consensus = "sum") -> torch.Tensor:
    """γ from the weighted task vectors w_t·τ̂_t (T, *shape) -> (*shape) of ±1.

    ``sum``: the sign of Σ_t w_t τ̂_t (the TIES paper's mass vote); ``count``: the sign of Σ_t sgn(w_t τ̂_t)
    (one vote per expert). An exact tie elects +, as mergekit does.
    """
    if method == "sum":
        score = weighted.sum(0)
    elif method == "count":
        score = weighted.sign().sum(0)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {method!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(weighted.dtype)


def mix(sparse: torch.Tensor, weights: torch.Tensor, consensus: Consensus | None = None,
        normalize: bool = False, lam: float = 1.0) -> torch.Tensor:
    """Merged τ from sparsified task vectors (T, *shape) and per-expert weights (T,).

    Without consensus: Σ_t w_t τ̂_t, divided by Σ_t w_t when ``normalize``. With consensus: only the
    entries whose sign agrees with the elected γ count, and ``normalize`` divides by the weights of the
    agreeing experts (the TIES disjoint mean when all w_t = 1). Zero entries never agree. Then · λ.
    """
    w = weights.to(sparse.dtype).reshape(-1, *([1] * (sparse.ndim - 1)))  # (T, 1, ..., 1)
    weighted = sparse * w
    if consensus is not None:
        agree = (weighted.sign() == elect_sign(weighted, consensus)).to(sparse.dtype)
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand(mixed.shape).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed

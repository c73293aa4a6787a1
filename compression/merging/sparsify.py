"""Per-task-vector sparsification, as mergekit's ``mergekit/sparsify.py`` (0.1.5) computes it.

Every function takes one task vector τ_t of any shape and returns a tensor of the same shape.
"""
from __future__ import annotations

import torch

from .select import rank_range_mask


def magnitude_keep(density: float, n: int) -> int:
    """Entries TIES keeps of n (mergekit: max(1, int(density·n)))."""
    return max(1, int(density * n))


def outlier_ranks(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Breadcrumbs' kept ascending magnitude ranks [lo, hi): int(density·n) entries after dropping the
    int(gamma·n) largest (fewer when both cannot be met)."""
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    return n_bot, n_bot + target


def l1_rescale(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the masked τ so its L1 norm equals τ's (mergekit's ``rescale: true``, ``RescaleNorm.l1``).

    For DARE this replaces the paper's 1/density: equal in expectation, exact in L1 for every draw.
    A norm below ``eps`` on either side leaves the masked tensor unscaled, as mergekit does.
    """
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(tau: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density·n)) entries of largest |τ| (exactly k; at a tied boundary
    the later indices, see ``select``), zero the rest. density ≥ 1 returns τ unchanged; density ≤ 0 returns
    zeros."""
    if density >= 1:
        return tau
    n = tau.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(tau)
    kept = tau * rank_range_mask(tau.abs().float(), n - magnitude_keep(density, n), n)
    return l1_rescale(tau, kept) if rescale else kept


def bernoulli(tau: torch.Tensor, density: float, rescale: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (arXiv 2311.03099): keep each entry with probability ``density``; with ``rescale`` the
    survivors are scaled to τ's L1 norm. density ≥ 1 returns τ unchanged."""
    if density >= 1:
        return tau
    keep = (torch.rand(tau.shape, generator=generator) < density).to(tau.dtype)
    kept = tau * keep
    return l1_rescale(tau, kept) if rescale else kept


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): drop the int(gamma·n) largest |τ| and then the smallest,
    keeping int(density·n) entries (fewer outliers are dropped when both cannot be met)."""
    if density >= 1:
        return tau
    lo, hi = outlier_ranks(density, gamma, tau.numel())
    kept = tau * rank_range_mask(tau.abs().float(), lo, hi)
    return l1_rescale(tau, kept) if rescale else kept

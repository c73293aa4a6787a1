"""Model Breadcrumbs (arXiv 2312.06795) as mergekit's ``breadcrumbs`` / ``breadcrumbs_ties``: drop the
largest gamma fraction and the smallest entries of each τ_t (keeping int(density_t·n)), then sum or
sign-elect and mix."""
from __future__ import annotations

import torch

from .consensus import Consensus, mix
from .sparsify import magnitude_outliers


def _trim(task_vectors: torch.Tensor, densities: list[float], gamma: float, rescale: bool) -> torch.Tensor:
    return torch.stack([magnitude_outliers(tv, d, gamma, rescale) for tv, d in zip(task_vectors, densities)])


def breadcrumbs_merge(task_vectors: torch.Tensor, weights: torch.Tensor, densities: list[float], lam: float = 1.0,
                      normalize: bool = False, rescale: bool = False, gamma: float = 0.01) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), densities: T floats -> λ · Σ_t w_t breadcrumbs(τ_t)."""
    return mix(_trim(task_vectors, densities, gamma, rescale), weights, None, normalize, lam)


def breadcrumbs_ties_merge(task_vectors: torch.Tensor, weights: torch.Tensor, densities: list[float],
                           lam: float = 1.0, normalize: bool = False, rescale: bool = False, gamma: float = 0.01,
                           consensus: Consensus = "sum") -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), densities: T floats -> sign-elected mix of breadcrumbs(τ_t)."""
    return mix(_trim(task_vectors, densities, gamma, rescale), weights, consensus, normalize, lam)

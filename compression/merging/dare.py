"""DARE (arXiv 2311.03099) as mergekit's ``dare_linear`` / ``dare_ties``: keep each entry of τ_t with
probability density_t, rescale the survivors to τ_t's L1 norm (``rescale``), then sum (linear) or
elect signs and mix (ties). No magnitude trim follows the random drop.

The drop mask comes from a seeded generator (one stream per tensor, see ``merge_tensor``), so a build
is reproducible; mergekit draws from torch's global RNG, so masks at density < 1 match it in
distribution, not entry by entry.
"""
from __future__ import annotations

import torch

from .consensus import Consensus, mix
from .sparsify import bernoulli


def _drop(task_vectors: torch.Tensor, densities: list[float], rescale: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([bernoulli(tv, d, rescale, g) for tv, d in zip(task_vectors, densities)])


def dare_linear_merge(task_vectors: torch.Tensor, weights: torch.Tensor, densities: list[float], lam: float = 1.0,
                      normalize: bool = False, rescale: bool = True, seed: int = 0) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), densities: T floats -> λ · Σ_t w_t DARE(τ_t)."""
    return mix(_drop(task_vectors, densities, rescale, seed), weights, None, normalize, lam)


def dare_ties_merge(task_vectors: torch.Tensor, weights: torch.Tensor, densities: list[float], lam: float = 1.0,
                    normalize: bool = False, rescale: bool = True, consensus: Consensus = "sum",
                    seed: int = 0) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), densities: T floats -> sign-elected mix of DARE(τ_t)."""
    return mix(_drop(task_vectors, densities, rescale, seed), weights, consensus, normalize, lam)

"""TIES-Merging (arXiv 2306.01708) as mergekit's ``ties`` computes it: trim each τ_t to its top
int(density_t·n) entries by magnitude (per tensor), elect the sign of Σ w_t τ̂_t, and take the
weighted mean over the agreeing experts (divided by their weights), times λ.

Trimming is per tensor, as merge toolkits do; the paper trims over the whole flattened task vector.
"""
from __future__ import annotations

import torch

from .consensus import Consensus, mix
from .sparsify import magnitude


def ties_merge(task_vectors: torch.Tensor, weights: torch.Tensor, densities: list[float], lam: float = 1.0,
               normalize: bool = True, consensus: Consensus = "sum", rescale: bool = False) -> torch.Tensor:
    """task_vectors: (T, *shape), weights: (T,), densities: T floats -> merged τ of shape (*shape)."""
    trimmed = torch.stack([magnitude(tv, d, rescale) for tv, d in zip(task_vectors, densities)])
    return mix(trimmed, weights, consensus, normalize, lam)

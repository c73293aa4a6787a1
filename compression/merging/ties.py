"""TIES-Merging (arXiv 2306.01708): trim, elect sign, disjoint mean, scale.

Trimming is done per tensor (top-``density`` fraction of |τ_t| in each tensor of each
task), as most merge toolkits do; the paper trims over the whole flattened task vector.
"""
import torch


def trim_top_k(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude in each task vector, zero the rest."""
    t = task_vectors.shape[0]
    flat = task_vectors.reshape(t, -1)
    n = flat.shape[1]
    k = max(1, int(round(density * n)))
    if k >= n:
        return task_vectors.clone()
    # k-th largest magnitude per task = threshold; ties at the threshold are kept.
    thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values  # (T, 1)
    return torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat)).reshape(task_vectors.shape)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """γ = sgn(Σ_t τ̂_t): the sign with the larger total mass; 0 where all are zero."""
    return torch.sign(trimmed.sum(0))


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose (non-zero) entry agrees with the elected sign."""
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


def ties_merge(task_vectors: torch.Tensor, density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """task_vectors: (T, *shape) -> λ · disjoint_mean(trim(τ), elect_sign(trim(τ)))."""
    trimmed = trim_top_k(task_vectors, density)
    return lam * disjoint_mean(trimmed, elect_sign(trimmed))

"""Task arithmetic: τ_m = λ · Σ_t τ_t."""
import torch


def task_arithmetic_merge(task_vectors: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """task_vectors: (T, *shape) -> merged τ of shape (*shape)."""
    return lam * task_vectors.sum(0)

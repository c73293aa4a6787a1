"""Weight averaging: τ_m = mean_t τ_t (θ* is then the plain average of the experts)."""
import torch


def average_merge(task_vectors: torch.Tensor) -> torch.Tensor:
    """task_vectors: (T, *shape) -> merged τ of shape (*shape)."""
    return task_vectors.mean(0)

"""DARE: drop each entry of τ_t with probability p, rescale survivors by 1/(1−p), then merge."""
import torch

from .task_arithmetic import task_arithmetic_merge
from .ties import ties_merge


def dare_drop(task_vectors: torch.Tensor, drop_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if drop_p <= 0.0:
        return task_vectors.clone()
    keep = torch.rand(task_vectors.shape, generator=generator) >= drop_p
    return task_vectors * keep.to(task_vectors.dtype) / (1.0 - drop_p)


def dare_merge(task_vectors: torch.Tensor, drop_p: float = 0.9, lam: float = 1.0, dare_base: str = "task_arithmetic",
               density: float = 0.2, seed: int = 0) -> torch.Tensor:
    """task_vectors: (T, *shape). ``dare_base`` picks the merge applied after drop-and-rescale."""
    g = torch.Generator().manual_seed(seed)
    dropped = dare_drop(task_vectors, drop_p, g)
    if dare_base == "ties":
        return ties_merge(dropped, density=density, lam=lam)
    return task_arithmetic_merge(dropped, lam=lam)

"""Truncated SVD of exclusive deltas δ_t = θ_t − θ*:  δ ≈ B A,  B = U_r S_r (d_out×r),  A = V_rᵀ (r×d_in)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Above this many entries an exact SVD gets slow on CPU; randomized SVD keeps builds of 7B-class
# models tractable while the exact one stays the reference for small matrices.
EXACT_SVD_MAX_ELEMENTS = 4096 * 4096


@dataclass
class LowRank:
    B: torch.Tensor  # (d_out, r)
    A: torch.Tensor  # (r, d_in)
    rel_error: float  # ||δ − BA||_F / ||δ||_F

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ energy · Σ s_i²."""
    e = singular_values.double().pow(2)
    total = e.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def truncated_svd(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  max_rank: int | None = None, method: str = "auto", seed: int = 0) -> LowRank:
    """Factor a 2-D delta in fp32 to a fixed ``rank`` or to the ``energy`` fraction of its spectrum."""
    if delta.ndim != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(delta.shape)}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    d = delta.float()
    d_out, d_in = d.shape
    full = min(d_out, d_in)
    norm = torch.linalg.matrix_norm(d).item()
    if norm == 0.0:
        return LowRank(d.new_zeros(d_out, 0), d.new_zeros(0, d_in), 0.0)
    use_exact = method == "exact" or (method == "auto" and d.numel() <= EXACT_SVD_MAX_ELEMENTS)
    if use_exact or energy is not None:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    else:
        q = min(full, rank + 8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(d, q=q, niter=4)
        Vh = V.T
    r = min(rank, full) if rank is not None else rank_for_energy(S, energy)
    if max_rank is not None:
        r = min(r, max_rank)
    B = U[:, :r] * S[:r]
    A = Vh[:r]
    rel = torch.linalg.matrix_norm(d - B @ A).item() / norm
    return LowRank(B.contiguous(), A.contiguous(), rel)

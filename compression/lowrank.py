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


# ---- quantised factors ------------------------------------------------------------------------------
FACTOR_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
_FLOAT_FACTORS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8_SCALE_BYTES = 4  # one fp32 scale per rank component, for B and for A


@dataclass
class StoredFactors:
    """B, A as written to exclusive.safetensors; ``*_scale`` only for int8 (see twin.artifact.dequantize_factor)."""
    B: torch.Tensor                       # (d_out, r), int8 or a float dtype
    A: torch.Tensor                       # (r, d_in)
    B_scale: torch.Tensor | None = None   # (r,) fp32
    A_scale: torch.Tensor | None = None   # (r,) fp32

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"B": self.B, "A": self.A}
        if self.B_scale is not None:
            out.update(B_scale=self.B_scale, A_scale=self.A_scale)
        return {k: v.contiguous() for k, v in out.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _int8_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along ``dim``'s complement: one scale per slice of ``dim`` (max |x| ↦ 127)."""
    scale = x.abs().amax(dim=1 - dim) / 127.0  # (r,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = scale.unsqueeze(0) if dim == 1 else scale.unsqueeze(1)
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), scale.float()


def quantize_factors(lr: LowRank, factor_dtype: str) -> StoredFactors:
    """Store δ ≈ B A as ``factor_dtype``. int8 is symmetric absmax with one scale per rank component
    (column of B, row of A), so a component's scale follows its own singular value; the error this adds
    is ||B A − B̃ Ã||_F, measured by ``dequantized_error``."""
    if factor_dtype == "int8":
        B, b_scale = _int8_absmax(lr.B.float(), dim=1)
        A, a_scale = _int8_absmax(lr.A.float(), dim=0)
        return StoredFactors(B, A, b_scale, a_scale)
    dt = _FLOAT_FACTORS[factor_dtype]
    return StoredFactors(lr.B.to(dt), lr.A.to(dt))


def dequantized_error(lr: LowRank, stored: StoredFactors, delta_norm: float) -> float:
    """||B A − B̃ Ã||_F / ||δ||_F: what storing the factors adds to the truncation error."""
    from twin.artifact import dequantize_factor

    if delta_norm == 0.0 or lr.rank == 0:
        return 0.0
    Bq = dequantize_factor(stored.B, stored.B_scale, 1)
    Aq = dequantize_factor(stored.A, stored.A_scale, 0)
    return torch.linalg.matrix_norm(lr.B.float() @ lr.A.float() - Bq @ Aq).item() / delta_norm


def bytes_per_rank(shape: tuple[int, int], factor_dtype: str) -> int:
    """Storage of one rank component of a (d_out×d_in) delta: a column of B, a row of A (+ 2 scales)."""
    extra = 2 * INT8_SCALE_BYTES if factor_dtype == "int8" else 0
    return (shape[0] + shape[1]) * FACTOR_BYTES[factor_dtype] + extra


# ---- global byte budget ----------------------------------------------------------------------------
def allocate_ranks(spectra: dict, shapes: dict, budget_bytes: int, factor_dtype: str,
                   max_rank: int | None = None) -> dict:
    """Ranks {key: r} that keep the most spectral energy Σ s_i² for ``budget_bytes`` in all.

    ``spectra[key]`` are the singular values of one delta (descending), ``shapes[key]`` its (d_out, d_in).
    Every rank component costs ``bytes_per_rank``; components are taken greedily by s_i² per byte over
    all tensors at once, so a delta that is nearly low-rank gets few components and one with a flat
    spectrum gets more. Within one tensor s_i² falls with i, so the greedy choice is always a prefix
    (a valid rank); a tensor stops growing at the first component that no longer fits.
    """
    cands = []
    for key, s in spectra.items():
        cost = bytes_per_rank(shapes[key], factor_dtype)
        cap = len(s) if max_rank is None else min(len(s), max_rank)
        e = s[:cap].double().pow(2) / cost
        cands.extend((float(v), i, key, cost) for i, v in enumerate(e.tolist()) if v > 0)
    cands.sort(key=lambda c: (-c[0], c[1]))
    ranks = {key: 0 for key in spectra}
    closed: set = set()
    left = budget_bytes
    for _, i, key, cost in cands:
        if key in closed or i != ranks[key]:
            continue
        if cost > left:
            closed.add(key)
            continue
        ranks[key] += 1
        left -= cost
    return ranks

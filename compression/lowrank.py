"""Truncated SVD of exclusive deltas δ_t = θ_t − θ*:  δ ≈ B A,  B = U_r S_r (d_out×r),  A = V_rᵀ (r×d_in)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The exact SVD is the reference and is fast below ~1M entries (a 1024×1024 delta: ~0.3 s). Above it the
# randomized range finder (Halko, Martinsson & Tropp 2011; torch.svd_lowrank) with q = r + 8 columns and 2
# power iterations costs O(d_out·d_in·q) instead of O(d_out·d_in·min(d)): on an 8960×1536 delta at r = 64,
# 1-3 s instead of 29-78 s, for 1.003× the optimal Frobenius error. The error actually reached is measured
# against δ and recorded per tensor, so the trade is visible in the manifest.
EXACT_SVD_MAX_ELEMENTS = 1 << 20
OVERSAMPLE = 8
POWER_ITERS = 2
ROW_BLOCK = 4096   # rows per block when measuring ||δ − B A|| without forming B A whole


@dataclass
class LowRank:
    B: torch.Tensor  # (d_out, r)
    A: torch.Tensor  # (r, d_in)
    rel_error: float  # ||δ − BA||_F / ||δ||_F
    method: str = "exact"

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def rank_for_energy(singular_values: torch.Tensor, energy: float, total: float | None = None) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ energy · total (total: Σ s_i², or ||δ||_F² when only the leading
    singular values are known; then at most len(s))."""
    e = singular_values.double().pow(2)
    total = float(e.sum()) if total is None else total
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return min(len(e), int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1)


def frobenius_rows(d_out: int, block) -> float:
    """sqrt(Σ over row blocks of ||block(lo, hi)||_F²): a norm of a (d_out×·) matrix formed ROW_BLOCK rows at a time."""
    acc = 0.0
    for lo in range(0, d_out, ROW_BLOCK):
        acc += float(torch.linalg.vector_norm(block(lo, min(d_out, lo + ROW_BLOCK)), dtype=torch.float64) ** 2)
    return acc ** 0.5


def use_randomized(shape: tuple[int, int], target: int | None, method: str) -> bool:
    """``auto``: randomized above EXACT_SVD_MAX_ELEMENTS unless the rank asked for is near full."""
    if method != "auto":
        return method == "randomized" and target is not None
    full = min(shape)
    return target is not None and shape[0] * shape[1] > EXACT_SVD_MAX_ELEMENTS and target + OVERSAMPLE < full // 2


def truncated_svd(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  max_rank: int | None = None, method: str = "auto", seed: int = 0) -> LowRank:
    """Factor a 2-D delta in fp32 to a fixed ``rank`` or to the ``energy`` fraction of its spectrum.

    ``energy`` with ``max_rank`` may use the randomized path (the energy is measured against ||δ||_F², so
    only the leading max_rank values are needed); ``energy`` without a cap needs the exact spectrum.
    """
    if delta.ndim != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(delta.shape)}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    d = delta.float()
    d_out, d_in = d.shape
    full = min(d_out, d_in)
    norm2 = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    if norm2 == 0.0:
        return LowRank(d.new_zeros(d_out, 0), d.new_zeros(0, d_in), 0.0)
    target = rank if rank is not None else max_rank
    randomized = use_randomized((d_out, d_in), None if target is None else min(target, full), method)
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(d, q=min(full, target + OVERSAMPLE), niter=POWER_ITERS)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, full) if rank is not None else rank_for_energy(S, energy, norm2 if randomized else None)
    if max_rank is not None:
        r = min(r, max_rank)
    B = (U[:, :r] * S[:r]).contiguous()
    A = Vh[:r].contiguous()
    # B A = U_r S_r V_rᵀ is an orthogonal projection of δ (exact SVD, or the range finder's Q Qᵀ δ), so
    # ||δ − B A||² = ||δ||² − Σ_{i<r} s_i²: no pass over δ. Where that difference is below ~1e-4 of ||δ||²
    # its fp32 cancellation would dominate, and the residual is measured directly instead.
    rest = norm2 - float(S[:r].double().pow(2).sum())
    if rest > 1e-4 * norm2:
        rel = (rest / norm2) ** 0.5
    else:
        rel = frobenius_rows(d_out, lambda lo, hi: d[lo:hi] - B[lo:hi] @ A) / norm2 ** 0.5
    return LowRank(B, A, rel, "randomized" if randomized else "exact")


def truncated_svd_of_product(P: torch.Tensor, Q: torch.Tensor, rank: int | None = None, energy: float | None = None,
                             max_rank: int | None = None) -> LowRank:
    """The truncated SVD of δ = P Q (P: d_out×k, Q: k×d_in, k small) without forming δ: QR of P and Qᵀ, then
    the SVD of the k×k core R_P R_Qᵀ (float64). Exact — the whole spectrum is known, so the error is too.
    A LoRA expert's δ_t under a linear merge is such a product (its own and the other adapters' factors)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    d_out, d_in = P.shape[0], Q.shape[1]
    if P.shape[1] == 0:
        return LowRank(P.new_zeros(d_out, 0).float(), Q.new_zeros(0, d_in).float(), 0.0, "factors")
    qp, rp = torch.linalg.qr(P.double())
    qq, rq = torch.linalg.qr(Q.double().T)
    U, S, Vh = torch.linalg.svd(rp @ rq.T)
    total = float(S.pow(2).sum())
    if total == 0.0:
        return LowRank(P.new_zeros(d_out, 0).float(), Q.new_zeros(0, d_in).float(), 0.0, "factors")
    r = min(rank, len(S)) if rank is not None else rank_for_energy(S, energy)
    if max_rank is not None:
        r = min(r, max_rank)
    B = (qp @ U[:, :r]) * S[:r]
    A = Vh[:r] @ qq.T
    rel = (max(0.0, float(S[r:].pow(2).sum())) / total) ** 0.5
    return LowRank(B.float().contiguous(), A.float().contiguous(), rel, "factors")


def spectrum(delta: torch.Tensor, max_rank: int | None, method: str = "auto", seed: int = 0) -> torch.Tensor:
    """The leading singular values of δ a rank allocation needs: all of them (exact) for small matrices,
    else the max_rank (default 256) leading ones from the randomized range finder."""
    d = delta.float()
    cap = min(min(d.shape), max_rank or 256)
    if not use_randomized(tuple(d.shape), cap, method):
        return torch.linalg.svdvals(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.svd_lowrank(d, q=min(min(d.shape), cap + OVERSAMPLE), niter=POWER_ITERS)[1][:cap]


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
    B, A = lr.B.float(), lr.A.float()
    return frobenius_rows(B.shape[0], lambda lo, hi: B[lo:hi] @ A - Bq[lo:hi] @ Aq) / delta_norm


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

"""Apply router-weighted exclusive deltas to a linear layer, two ways.

For one weight W* (d_out×d_in) and experts t = 1..T with δ̂_t = B_t A_t (ranks r_t):

  materialise:     W(w) = W* + Σ_t w_t B_t A_t                       (one w for the whole batch)
  activation-side: y = W* x + B_cat((A_cat x) ⊙ w[:, idx])          (its own w for every row)

A_cat = [A_1; …; A_T] is (R×d_in), B_cat = [B_1 … B_T] is (d_out×R), R = Σ r_t, and idx (R,)
maps each factor column to its expert, so w[:, idx] is repeat(w, r) even when ranks differ.
Both are linear in w, which is why a batch that mixes tasks needs no weight rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDeltas:
    """Concatenated factors of every expert for one weight."""
    A_cat: torch.Tensor  # (R, d_in)
    B_cat: torch.Tensor  # (d_out, R)
    idx: torch.Tensor    # (R,) long, expert index of each factor column
    num_experts: int
    offsets: tuple[int, ...] = ()  # expert t owns columns offsets[t]:offsets[t+1] (idx is sorted)

    @classmethod
    def from_factors(cls, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> LowRankDeltas:
        """factors[t] = (B_t (d_out×r_t), A_t (r_t×d_in)); r_t may be 0."""
        A_cat = torch.cat([a for _, a in factors], 0)
        B_cat = torch.cat([b for b, _ in factors], 1)
        idx = torch.cat([torch.full((a.shape[0],), t, dtype=torch.long) for t, (_, a) in enumerate(factors)])
        offsets = [0]
        for _, a in factors:
            offsets.append(offsets[-1] + a.shape[0])
        return cls(A_cat.contiguous(), B_cat.contiguous(), idx.to(A_cat.device), len(factors), tuple(offsets))

    def to(self, device=None, dtype=None) -> LowRankDeltas:
        return LowRankDeltas(self.A_cat.to(device=device, dtype=dtype), self.B_cat.to(device=device, dtype=dtype),
                             self.idx.to(device=device), self.num_experts, self.offsets)

    @property
    def rank(self) -> int:
        return self.A_cat.shape[0]

    def select(self, experts: torch.Tensor) -> LowRankDeltas:
        """Only the factor columns of ``experts`` (1-D long): top-k routing gathers k experts' factors."""
        keep = torch.isin(self.idx, experts)
        return LowRankDeltas(self.A_cat[keep], self.B_cat[:, keep], self.idx[keep], self.num_experts)


# Below this weight size the per-expert loop costs more in overhead than it saves (measured with
# `twinserve bench`: demo width 128 top-2 fell from 2366 to 1348 tok/s; width 1024 batch 1 gained 9 %).
GROUPED_MIN_ELEMENTS = 512 * 512


class ExpertWeights:
    """Per-row weights w (N, T) plus, for sparse (top-k) routing, the rows each active expert serves.

    Built once per forward and shared by every layer, so the grouping is computed once per step.
    """

    def __init__(self, w: torch.Tensor):
        self.w = w
        self._sparse: bool | None = None
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self._columns: dict = {}

    @property
    def sparse(self) -> bool:
        """At most half of w is non-zero: the grouped path would skip at least half of the factor work.
        Computed on first use (on a GPU reading it waits for the device, so only the CPU path asks)."""
        if self._sparse is None:
            self._sparse = int((self.w != 0).sum()) * 2 <= self.w.numel()
        return self._sparse

    def columns(self, idx: torch.Tensor, offsets: tuple[int, ...] = ()) -> torch.Tensor:
        """w[:, idx] (N, R): each factor column's expert weight in every row. Layers whose experts have the
        same ranks (the same ``offsets``, which determine idx) share one gather per forward instead of one per
        layer."""
        key = offsets or id(idx)
        hit = self._columns.get(key)
        if hit is None or (not offsets and hit[0] is not idx):
            hit = self._columns[key] = (idx, self.w[:, idx])   # holding idx keeps its id from being reused
        return hit[1]

    @property
    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, rows routed to it, their weights) per active expert; built on first use (only the
        grouped path needs it), then shared by every layer of the forward."""
        if self._groups is None:
            self._groups = []
            if self.sparse:
                for t in torch.nonzero((self.w != 0).any(0)).flatten().tolist():
                    rows = torch.nonzero(self.w[:, t]).flatten()
                    self._groups.append((t, rows, self.w[rows, t]))
        return self._groups

    def to(self, dtype) -> ExpertWeights:
        if self.w.dtype == dtype:
            return self
        out = ExpertWeights.__new__(ExpertWeights)
        out.w, out._sparse, out._columns = self.w.to(dtype), self._sparse, {}
        out._groups = None if self._groups is None else [(t, rows, v.to(dtype)) for t, rows, v in self._groups]
        return out


def _grouped_delta(x: torch.Tensor, d: LowRankDeltas, ew: ExpertWeights) -> torch.Tensor:
    """Sparse routing: each active expert's factors touch only the rows routed to it."""
    out = x.new_zeros(*x.shape[:-1], d.B_cat.shape[0])
    for t, rows, vals in ew.groups:
        lo, hi = d.offsets[t], d.offsets[t + 1]
        if hi == lo:
            continue
        xr = x[rows]                                                  # (n_t, [S,] d_in)
        h = xr @ d.A_cat[lo:hi].T                                     # (n_t, [S,] r_t)
        h = h * vals.view(-1, *([1] * (x.ndim - 1)))
        out.index_add_(0, rows, h @ d.B_cat[:, lo:hi].T)
    return out


def use_grouped(x: torch.Tensor, d: LowRankDeltas, w: ExpertWeights) -> bool:
    """The grouped top-k path pays off only on CPU, for sparse w, wide weights, and fp32: in bf16 on CPU the
    per-expert small matmuls lose to one concatenated matmul (measured at hidden 1024, batch 16, top-2:
    grouped 100 vs concatenated 152 tok/s in bf16; in fp32 grouped is faster). On CUDA the grouping's
    host round trips and small kernels cost more than the factor work they skip (H200, fp32, batch 16:
    a top-2 decode step took 117 ms grouped against 27 ms for the concatenated path)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and bool(d.offsets)
            and d.A_cat.shape[1] * d.B_cat.shape[0] >= GROUPED_MIN_ELEMENTS and w.sparse)


def scale_by_expert(h: torch.Tensor, w: torch.Tensor | ExpertWeights, idx: torch.Tensor,
                    offsets: tuple[int, ...] = ()) -> torch.Tensor:
    """h ⊙ w[:, idx]: the shrunk activations h = A_cat x, (N, …, R), each rank column scaled by its
    expert's weight in that row (w (N, T); an ExpertWeights reuses one gather per forward). Any middle dims
    (a sequence, or MLA's (1, S)) broadcast."""
    scale = w.columns(idx, offsets) if isinstance(w, ExpertWeights) else w[:, idx]    # (N, R)
    return h * scale.view(scale.shape[0], *([1] * (h.ndim - 2)), scale.shape[1])


def _scaled_shrink(x: torch.Tensor, d: LowRankDeltas, w: torch.Tensor | ExpertWeights) -> torch.Tensor:
    """(A_cat x) ⊙ w[:, idx]: (N, [S,] R)."""
    return scale_by_expert(x @ d.A_cat.T, w, d.idx, d.offsets)


def delta_activations(x: torch.Tensor, d: LowRankDeltas, w: torch.Tensor | ExpertWeights) -> torch.Tensor:
    """Σ_t w_t B_t A_t x for each row.  x: (N, S, d_in) or (N, d_in), w: (N, T) -> (N, S, d_out) or (N, d_out)."""
    if isinstance(w, ExpertWeights) and use_grouped(x, d, w):
        return _grouped_delta(x, d, w)
    return _scaled_shrink(x, d, w) @ d.B_cat.T


def add_delta_(y: torch.Tensor, x: torch.Tensor, d: LowRankDeltas, w: torch.Tensor | ExpertWeights) -> torch.Tensor:
    """y += Σ_t w_t B_t A_t x in place (y: a fresh contiguous (…, d_out) layer output, as nn.Linear returns).

    The expand B_cat (h ⊙ w[:, idx]) accumulates into y inside the GEMM (addmm_ with β = 1): one kernel
    fewer per layer than a matmul and an add, which is what a launch-bound GPU step pays for.
    """
    if isinstance(w, ExpertWeights) and use_grouped(x, d, w):
        return y.add_(_grouped_delta(x, d, w))
    h = _scaled_shrink(x, d, w)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), d.B_cat.T)
    return y


def twin_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                d: LowRankDeltas | None, w: torch.Tensor | None) -> torch.Tensor:
    """Activation-side batched path: W* x (+ b) + B_cat((A_cat x) ⊙ w[:, idx])."""
    y = torch.nn.functional.linear(x, weight, bias)
    if d is None or w is None or d.rank == 0:
        return y
    return add_delta_(y, x, d, w)


def materialize_weight(weight: torch.Tensor, d: LowRankDeltas, w: torch.Tensor) -> torch.Tensor:
    """Reference path: W* + Σ_t w_t B_t A_t for one weight vector w (T,)."""
    if d.rank == 0:
        return weight.clone()
    return weight + (d.B_cat * w[d.idx]) @ d.A_cat


def active_experts(w: torch.Tensor) -> torch.Tensor:
    """Experts with non-zero weight in any row of w (N, T): the only factors a sparse batch needs."""
    return torch.nonzero(w.abs().sum(0) > 0, as_tuple=False).flatten()

"""The Twin equation, in one place: θ* + Σ_t w_t δ̂_t applied per row of a batch.

For one weight W* (d_out×d_in) and experts t = 1..T with δ̂_t = B_t A_t (ranks r_t):

  activation side (served):  y = W* x + b* + B_cat((A_cat x) ⊙ w[:, idx]) + w @ Δb     (its own w per row)
  dense merge (reference):   W(w) = W* + Σ_t w_t B_t A_t                              (one w for a model)

A_cat = [A_1; …; A_T] is (R×d_in), B_cat = [B_1 … B_T] is (d_out×R), R = Σ r_t, and idx (R,) maps each
factor column to its expert, so w[:, idx] is repeat(w, r) even when ranks differ. Both are linear in w,
which is why a batch that mixes tasks needs no weight rewrite.

`ExpertMix` is the per-step object (the role of vLLM's punica wrapper): the per-token weights w (N, T) of
one forward and every op a Twin layer calls — ``linear`` (shrink, scale, expand, bias), ``embedding``
(the table's low-rank delta rows) and ``gain`` (a norm's per-row g* + w @ Δg). The dense merge is
``merged_delta``/``dense_delta``, which each Twin layer's ``delta_weight`` calls (PEFT's
``get_delta_weight``). How the GEMMs run (plain, oneDNN-packed, stacked) is the layer's kernel's
business (twin/model/kernels.py); what they compute is written here once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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

    def transposed(self) -> LowRankDeltas:
        """Factors of δᵀ = Aᵀ Bᵀ (GPT-2's Conv1D stores its weight as (d_in, d_out))."""
        return LowRankDeltas(self.B_cat.T.contiguous(), self.A_cat.T.contiguous(), self.idx, self.num_experts,
                             self.offsets)

    @property
    def rank(self) -> int:
        return self.A_cat.shape[0]


# ---- the dense merge ---------------------------------------------------------------------------------------
def merged_delta(d: LowRankDeltas, w: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t B_t A_t (d_out×d_in) for one weight vector w (T,)."""
    return (d.B_cat * w[d.idx]) @ d.A_cat


def merged_weight(weight: torch.Tensor, d: LowRankDeltas, w: torch.Tensor) -> torch.Tensor:
    """W* + Σ_t w_t B_t A_t for one weight vector w (T,): the reference the served path is checked against."""
    return weight.clone() if d.rank == 0 else weight + merged_delta(d, w)


def dense_delta(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t Δ_t for dense 1-D deltas d (T, H) (biases, norm gains): w @ d."""
    return w @ d


# ---- the served (activation-side) path ------------------------------------------------------------------------
class TwinKernel(Protocol):
    """How a Twin linear's GEMMs run (plain, oneDNN-packed or stacked; twin/model/kernels.py)."""
    idx: torch.Tensor
    offsets: tuple[int, ...]

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """W* x + b*."""

    def base_and_shrink(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W* x + b*, A_cat x); the first is writable in place through ``view(-1, d_out)``."""

    def expand_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """y + B_cat h (in place where the layout allows)."""

    def grouped_factors(self) -> LowRankDeltas | None:
        """Unpacked factors when the top-k grouped path may run on them, else None."""


# Below this weight size the per-expert loop costs more in overhead than it saves (measured with
# `twinserve bench`: demo width 128 top-2 fell from 2366 to 1348 tok/s; width 1024 batch 1 gained 9 %).
GROUPED_MIN_ELEMENTS = 512 * 512


class ExpertMix:
    """Per-token expert weights w (N, T) of one forward, and the ops every Twin layer applies with them.

    Built once per step (beside the token ids, in `FlatBatch`) and shared by every layer, so the gathers
    w[:, idx] and, for sparse (top-k) routing, the rows each active expert serves are computed once.
    """

    def __init__(self, w: torch.Tensor):
        self.w = w
        self._sparse: bool | None = None
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self._columns: dict = {}

    # ---- bookkeeping --------------------------------------------------------------------------------
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

    def to(self, dtype) -> ExpertMix:
        if self.w.dtype == dtype:
            return self
        out = ExpertMix.__new__(ExpertMix)
        out.w, out._sparse, out._columns = self.w.to(dtype), self._sparse, {}
        out._groups = None if self._groups is None else [(t, rows, v.to(dtype)) for t, rows, v in self._groups]
        return out

    def rows(self, index: torch.Tensor) -> ExpertMix:
        """The mix of the rows ``index`` only (the lm_head runs on the rows whose logits are needed)."""
        return ExpertMix(self.w[index])

    # ---- the ops ------------------------------------------------------------------------------------
    def scale(self, h: torch.Tensor, idx: torch.Tensor, offsets: tuple[int, ...] = ()) -> torch.Tensor:
        """h ⊙ w[:, idx]: the shrunk activations h = A_cat x, (N, …, R), each rank column scaled by its
        expert's weight in that row. Any middle dims (a sequence, or MLA's (1, S)) broadcast."""
        s = self.columns(idx, offsets)                                             # (N, R)
        return h * s.view(s.shape[0], *([1] * (h.ndim - 2)), s.shape[1])

    def linear(self, x: torch.Tensor, kernel: TwinKernel, bias_deltas: torch.Tensor | None = None) -> torch.Tensor:
        """y = W* x + b* + B_cat((A_cat x) ⊙ w[:, idx]) + w @ Δb, each row with its own w."""
        d = kernel.grouped_factors()
        if d is not None and self._use_grouped(x, d):
            y = kernel.backbone(x).add_(self._grouped(x, d))
        else:
            y, h = kernel.base_and_shrink(x)
            if h is not None:
                y = kernel.expand_(y, self.scale(h, kernel.idx, kernel.offsets))
        if bias_deltas is not None:
            b = dense_delta(bias_deltas, self.w)                                    # (N, d_out)
            y = y + b.view(b.shape[0], *([1] * (y.ndim - 2)), b.shape[1])
        return y

    def embedding(self, tokens: torch.Tensor, d: LowRankDeltas) -> torch.Tensor:
        """Rows of Σ_t w_t B_t A_t for ``tokens`` (N, S): B_cat[token] ⊙ w[:, idx], then @ A_cat -> (N, S, H)."""
        return (d.B_cat[tokens] * self.columns(d.idx, d.offsets).unsqueeze(1)) @ d.A_cat

    def gain(self, g: torch.Tensor, d: torch.Tensor | None, ndim: int) -> torch.Tensor:
        """A norm's per-row gain (or bias) g* + w @ Δg, shaped (N, 1, …, H) for an input of ``ndim`` dims."""
        if d is None:
            return g
        return (g + dense_delta(d, self.w)).view(self.w.shape[0], *([1] * (ndim - 2)), g.shape[-1])

    # ---- the top-k grouped path ---------------------------------------------------------------------------
    def _use_grouped(self, x: torch.Tensor, d: LowRankDeltas) -> bool:
        """The grouped top-k path pays off only on CPU, for sparse w, wide weights, and fp32: in bf16 on CPU the
        per-expert small matmuls lose to one concatenated matmul (measured at hidden 1024, batch 16, top-2:
        grouped 100 vs concatenated 152 tok/s in bf16; in fp32 grouped is faster). On CUDA the grouping's
        host round trips and small kernels cost more than the factor work they skip (H200, fp32, batch 16:
        a top-2 decode step took 117 ms grouped against 27 ms for the concatenated path)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and bool(d.offsets)
                and d.A_cat.shape[1] * d.B_cat.shape[0] >= GROUPED_MIN_ELEMENTS and self.sparse)

    def _grouped(self, x: torch.Tensor, d: LowRankDeltas) -> torch.Tensor:
        """Sparse routing: each active expert's factors touch only the rows routed to it."""
        out = x.new_zeros(*x.shape[:-1], d.B_cat.shape[0])
        for t, rows, vals in self.groups:
            lo, hi = d.offsets[t], d.offsets[t + 1]
            if hi == lo:
                continue
            h = x[rows] @ d.A_cat[lo:hi].T                                # (n_t, [S,] r_t)
            h = h * vals.view(-1, *([1] * (x.ndim - 1)))
            out.index_add_(0, rows, h @ d.B_cat[:, lo:hi].T)
        return out

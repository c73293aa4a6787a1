"""Merge methods: pure functions (T, *shape) task vectors + per-expert weights -> merged τ, and their registry.

Each method computes what mergekit 0.1.5's method of the same name computes (``linear``,
``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``);
``average`` is twinserve's name for the normalised linear merge. The registry is the one table of merge
methods: each entry declares the options it takes, mergekit's defaults for them and whether a mergekit
YAML may name it; the recipe's ``merge.method`` values, the mergekit reader and ``build --help`` are
derived from it, so a new method is one function and one entry here.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .average import average_merge
from .breadcrumbs import breadcrumbs_merge, breadcrumbs_ties_merge
from .dare import dare_linear_merge, dare_ties_merge
from .linear import linear_merge
from .select import CHUNK, RankMask
from .sparsify import magnitude_keep, outlier_ranks
from .task_arithmetic import task_arithmetic_merge
from .ties import ties_merge


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable[..., torch.Tensor]
    options: tuple[str, ...]                       # keyword options fn takes besides task vectors + weights
    defaults: dict = field(default_factory=dict)   # mergekit's per-method defaults (normalize, rescale)
    uses_base: bool = False                        # fn needs θ_0 itself (linear without normalize)
    sparsify: str | None = None                    # per-expert trim before the mix: magnitude, outliers, bernoulli
    mergekit: bool = True                          # a merge_method of mergekit 0.1.5 (accepted in its YAML)


_SPARSE = ("densities", "lam", "normalize", "rescale")
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear_merge, ("normalize", "base_weight"), {"normalize": True}, uses_base=True),
    "average": MergeMethod(average_merge, (), mergekit=False),
    "task_arithmetic": MergeMethod(task_arithmetic_merge, ("lam", "normalize"), {"normalize": False}),
    "ties": MergeMethod(ties_merge, (*_SPARSE, "consensus"), {"normalize": True, "rescale": False},
                        sparsify="magnitude"),
    "dare_linear": MergeMethod(dare_linear_merge, (*_SPARSE, "seed"), {"normalize": False, "rescale": True},
                               sparsify="bernoulli"),
    "dare_ties": MergeMethod(dare_ties_merge, (*_SPARSE, "consensus", "seed"), {"normalize": False, "rescale": True},
                             sparsify="bernoulli"),
    "breadcrumbs": MergeMethod(breadcrumbs_merge, (*_SPARSE, "gamma"), {"normalize": False, "rescale": False},
                               sparsify="outliers"),
    "breadcrumbs_ties": MergeMethod(breadcrumbs_ties_merge, (*_SPARSE, "gamma", "consensus"),
                                    {"normalize": False, "rescale": False}, sparsify="outliers"),
}


def merge_params(method: str, lam: float = 1.0, density: float = 0.2, normalize: bool | None = None,
                 rescale: bool | None = None, consensus: str = "sum", gamma: float = 0.01, seed: int = 0,
                 base_weight: float = 0.0, int8_mask: bool = False, weights: Sequence[float] | None = None,
                 densities: Sequence[float | None] | None = None) -> dict:
    """The keyword arguments ``merge_tensor(..., method, **kw)`` takes, picked from a flat parameter set.

    ``normalize`` / ``rescale`` None take the method's mergekit default. ``densities`` holds per-expert
    densities (None entries fall back to ``density``). ``int8_mask`` only changes mergekit's mask dtype,
    never the result, so it is accepted and dropped.
    """
    spec = MERGE_METHODS[method]
    flat = {"lam": lam, "normalize": normalize, "rescale": rescale, "consensus": consensus, "gamma": gamma,
            "seed": seed, "base_weight": base_weight,
            "densities": [density if d is None else d for d in densities] if densities is not None else density}
    out = {k: (spec.defaults.get(k) if flat[k] is None else flat[k]) for k in spec.options}
    if weights is not None:
        out["weights"] = list(weights)
    return out


class TensorRows(Protocol):
    """A tensor read a block of rows at a time (a checkpoint tensor behind safetensors' mmap)."""
    shape: tuple[int, ...]

    def rows(self, lo: int, hi: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class InMemory:
    t: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.t[lo:hi] if self.t.ndim else self.t


# Entries of the stacked (T, rows, cols) fp32 task vectors per chunk: 2^25 is 128 MiB, so a merge's working
# memory stays a few hundred MiB whatever the tensor (a 152k-row embedding is merged in ~60 row blocks).
MAX_CHUNK_ELEMENTS = 1 << 25


def _full(src: TensorRows) -> torch.Tensor:
    return src.rows(0, src.shape[0] if len(src.shape) else 1)


def merge_tensor(name: str, w0: torch.Tensor | TensorRows, expert_tensors: Sequence[torch.Tensor | TensorRows],
                 method: str, weights: Sequence[float] | None = None, out_dtype: torch.dtype = torch.float32,
                 chunk_elements: int = MAX_CHUNK_ELEMENTS, stats: dict | None = None,
                 compute_dtype: torch.dtype = torch.float32, tie_break: str = "index", **params) -> torch.Tensor:
    """θ*[name] = θ_0 + merge(θ_t − θ_0), computed in ``compute_dtype``, returned as ``out_dtype``.

    mergekit computes in its config's ``dtype`` (bf16 arithmetic for a bf16 merge); ``twinserve build`` passes
    the recipe's dtype here, so θ* is rounded where mergekit's is. Magnitude ranks are found in fp32 (exact
    for bf16/fp16 values). ``tie_break``: which of the entries tied at a trim boundary are kept — ``index``
    (the radix select: bounded memory, later indices rank higher) or ``argsort`` (mergekit's own full
    ``torch.argsort``/``torch.sort`` of |τ_t|: bit-equal to mergekit, ~20 bytes per entry while it runs).

    ``w0`` and ``expert_tensors`` are tensors or row readers (``TensorRows``). Bounded memory: per expert,
    a trimming method first reads τ_t once to find its magnitude-rank boundaries (radix select, no sort)
    or its DARE drop mask; then the tensor is merged in row blocks of at most ``chunk_elements`` stacked
    entries, each block through the method's own function with the trim already applied.
    ``weights``: per-expert w_t (default 1). ``params``: from ``merge_params``; a scalar ``densities``
    applies to every expert. ``stats``, when given, gets ``changed``: whether any τ_t has a non-zero entry.
    Raises KeyError for an unknown method.
    """
    spec = MERGE_METHODS[method]
    base = w0 if not isinstance(w0, torch.Tensor) else InMemory(w0)
    experts = [e if not isinstance(e, torch.Tensor) else InMemory(e) for e in expert_tensors]
    T = len(experts)
    w = torch.ones(T) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    if "densities" in params and not isinstance(params["densities"], (list, tuple)):
        params = dict(params, densities=[float(params["densities"])] * T)
    if "seed" in params:  # a distinct, reproducible drop mask per tensor
        params = dict(params, seed=(params["seed"] * 1_000_003 + zlib.crc32(name.encode())) % (2**31))
    trims = _trims(spec, base, experts, params, compute_dtype, tie_break)
    if "densities" in params:   # the trims are applied here; the method function only mixes
        params = dict(params, densities=[1.0] * T)
    if "rescale" in params:
        params = dict(params, rescale=False)
    shape = tuple(base.shape)
    rows_total = shape[0] if shape else 1
    row_elems = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elements // max(1, T * row_elems))
    out = torch.empty(shape, dtype=out_dtype)
    masks = [t.start() if t is not None else None for t in trims]
    changed = False
    for lo in range(0, rows_total, step):
        hi = min(rows_total, lo + step)
        b = base.rows(lo, hi).to(compute_dtype)
        tv = torch.stack([e.rows(lo, hi).to(compute_dtype) - b for e in experts])    # (T, rows, *cols)
        changed = changed or bool(tv.any())
        for t, trim in enumerate(trims):
            if trim is not None:
                tv[t] = trim.apply(masks[t], tv[t], lo, hi)
        merged = spec.fn(tv, w, **(dict(params, base=b) if spec.uses_base else params))
        if shape:
            out[lo:hi] = b + merged
        else:
            out.copy_(b + merged)
    if stats is not None:
        stats["changed"] = changed
    return out


@dataclass
class _Trim:
    """One expert's sparsification, found over the whole τ_t and applied block by block."""
    ranks: tuple[int, int] | None = None     # keep ascending magnitude ranks [lo, hi)
    bounds: tuple | None = None
    keep: torch.Tensor | None = None         # DARE: the drop mask (bool, the tensor's shape)
    scale: torch.Tensor | None = None        # rescale: ||τ||_1 / ||τ̂||_1

    def start(self) -> RankMask | None:
        return RankMask.from_bounds(*self.bounds) if self.bounds is not None else None

    def apply(self, mask: RankMask | None, tau: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        kept = tau * (mask.next(tau.abs().float()) if mask is not None else self.keep[lo:hi])
        return kept * self.scale if self.scale is not None else kept


def _trims(spec: MergeMethod, base: TensorRows, experts: list[TensorRows], params: dict,
           compute_dtype: torch.dtype = torch.float32, tie_break: str = "index") -> list[_Trim | None]:
    """Per expert: None (keep τ_t whole) or its trim. Reads each trimmed τ_t once, whole."""
    kind = spec.sparsify
    densities = params.get("densities")
    if kind is None or densities is None or all(d >= 1 for d in densities):
        return [None] * len(experts)
    rescale = bool(params.get("rescale"))
    gen = torch.Generator().manual_seed(params["seed"]) if kind == "bernoulli" else None
    base_c = _full(base).to(compute_dtype)
    out: list[_Trim | None] = []
    for e, d in zip(experts, densities):
        if d >= 1:
            out.append(None)
            continue
        # |τ_t| with τ_t rounded as the merge computes it; fp32 for the selection (exact for bf16 values)
        mag = _full(e).to(compute_dtype, copy=True).sub_(base_c).abs_().float()
        n = mag.numel()
        if kind == "bernoulli":
            trim = _Trim(keep=torch.rand(mag.shape, generator=gen) < d)
        elif tie_break == "argsort":   # exactly mergekit's sparsify.magnitude / magnitude_outliers
            lo, hi = (0, magnitude_keep(d, n)) if kind == "magnitude" else outlier_ranks(d, params.get("gamma", 0.01), n)
            order = torch.argsort(mag.reshape(-1), descending=True) if kind == "magnitude" else \
                torch.sort(mag.reshape(-1), descending=False).indices
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[lo:hi]] = True
            del order
            trim = _Trim(keep=keep.view(mag.shape))
        else:
            lo, hi = (n - magnitude_keep(d, n), n) if kind == "magnitude" else \
                outlier_ranks(d, params.get("gamma", 0.01), n)
            trim = _Trim(ranks=(lo, hi), bounds=RankMask(mag, lo, hi).bounds())
        if rescale:   # mergekit's RescaleNorm.l1 (sparsify.l1_rescale): ||τ||_1 / ||τ̂||_1
            before = mag.sum()
            if trim.keep is not None:
                after = (mag * trim.keep).sum()
            else:
                flat, m = mag.reshape(-1), trim.start()
                after = sum((c * m.next(c)).sum() for c in flat.split(CHUNK))
            if before >= 1e-7 and after >= 1e-7:
                trim.scale = (before / after).to(compute_dtype)
        del mag
        out.append(trim)
    return out


def merge_state(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], method: str,
                **params) -> dict[str, torch.Tensor]:
    """θ* for every tensor of the base, in the base's dtype."""
    return {name: merge_tensor(name, w0, [e[name] for e in experts], method, **params).to(w0.dtype)
            for name, w0 in base.items()}

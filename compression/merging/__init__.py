"""Merge methods: pure functions (T, *shape) task vectors + per-expert weights -> merged τ, and their registry.

Each method computes what mergekit 0.1.5's method of the same name computes (``linear``,
``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``);
``average`` is twinserve's name for the normalised linear merge. Every registry entry declares the
options it takes and mergekit's defaults for them.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .average import average_merge
from .breadcrumbs import breadcrumbs_merge, breadcrumbs_ties_merge
from .dare import dare_linear_merge, dare_ties_merge
from .linear import linear_merge
from .task_arithmetic import task_arithmetic_merge
from .ties import ties_merge


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable[..., torch.Tensor]
    options: tuple[str, ...]                       # keyword options fn takes besides task vectors + weights
    defaults: dict = field(default_factory=dict)   # mergekit's per-method defaults (normalize, rescale)
    uses_base: bool = False                        # fn needs θ_0 itself (linear without normalize)


_SPARSE = ("densities", "lam", "normalize", "rescale")
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(linear_merge, ("normalize", "base_weight"), {"normalize": True}, uses_base=True),
    "average": MergeMethod(average_merge, ()),
    "task_arithmetic": MergeMethod(task_arithmetic_merge, ("lam", "normalize"), {"normalize": False}),
    "ties": MergeMethod(ties_merge, (*_SPARSE, "consensus"), {"normalize": True, "rescale": False}),
    "dare_linear": MergeMethod(dare_linear_merge, (*_SPARSE, "seed"), {"normalize": False, "rescale": True}),
    "dare_ties": MergeMethod(dare_ties_merge, (*_SPARSE, "consensus", "seed"), {"normalize": False, "rescale": True}),
    "breadcrumbs": MergeMethod(breadcrumbs_merge, (*_SPARSE, "gamma"), {"normalize": False, "rescale": False}),
    "breadcrumbs_ties": MergeMethod(breadcrumbs_ties_merge, (*_SPARSE, "gamma", "consensus"),
                                    {"normalize": False, "rescale": False}),
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


def merge_tensor(name: str, w0: torch.Tensor, expert_tensors: list[torch.Tensor], method: str,
                 weights: Sequence[float] | None = None, **params) -> torch.Tensor:
    """θ*[name] = θ_0 + merge(θ_t − θ_0), computed in fp32, returned in fp32.

    ``weights``: per-expert w_t (default 1). ``params``: from ``merge_params``; a scalar ``densities``
    applies to every expert. Raises KeyError for an unknown method.
    """
    spec = MERGE_METHODS[method]
    base32 = w0.float()
    tv = torch.stack([e.float() - base32 for e in expert_tensors])  # (T, *shape)
    w = torch.ones(len(expert_tensors)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    if "densities" in params and not isinstance(params["densities"], (list, tuple)):
        params = dict(params, densities=[float(params["densities"])] * len(expert_tensors))
    if "seed" in params:  # a distinct, reproducible drop mask per tensor
        params = dict(params, seed=(params["seed"] * 1_000_003 + zlib.crc32(name.encode())) % (2**31))
    if spec.uses_base:
        params = dict(params, base=base32)
    return base32 + spec.fn(tv, w, **params)


def merge_state(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], method: str,
                **params) -> dict[str, torch.Tensor]:
    """θ* for every tensor of the base, in the base's dtype."""
    return {name: merge_tensor(name, w0, [e[name] for e in experts], method, **params).to(w0.dtype)
            for name, w0 in base.items()}

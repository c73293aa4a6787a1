"""Merge methods: pure functions (T, *shape) task vectors -> merged τ, and their registry."""
from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from .average import average_merge
from .dare import dare_merge
from .task_arithmetic import task_arithmetic_merge
from .ties import ties_merge

MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "task_arithmetic": task_arithmetic_merge,
    "ties": ties_merge,
    "dare": dare_merge,
    "average": average_merge,
}


def merge_params(method: str, lam: float = 1.0, density: float = 0.2, drop_p: float = 0.9,
                 dare_base: str = "task_arithmetic", seed: int = 0) -> dict:
    """The keyword arguments ``method`` takes, picked from a flat parameter set."""
    return {
        "task_arithmetic": {"lam": lam},
        "ties": {"lam": lam, "density": density},
        "dare": {"lam": lam, "drop_p": drop_p, "dare_base": dare_base, "density": density, "seed": seed},
        "average": {},
    }[method]


def merge_tensor(name: str, w0: torch.Tensor, expert_tensors: list[torch.Tensor], method: str,
                 **params) -> torch.Tensor:
    """θ*[name] = θ_0 + merge(θ_t − θ_0), computed in fp32, returned in fp32."""
    if "seed" in params:  # a distinct, reproducible drop mask per tensor
        params = dict(params, seed=(params["seed"] * 1_000_003 + zlib.crc32(name.encode())) % (2**31))
    base32 = w0.float()
    tv = torch.stack([e.float() - base32 for e in expert_tensors])  # (T, *shape)
    return base32 + MERGE_METHODS[method](tv, **params)


def merge_state(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], method: str,
                **params) -> dict[str, torch.Tensor]:
    """θ* for every tensor of the base, in the base's dtype."""
    return {name: merge_tensor(name, w0, [e[name] for e in experts], method, **params).to(w0.dtype)
            for name, w0 in base.items()}

"""The router: features -> expert weights w ∈ Δ^T, with temperature, top-k and an uncertainty fallback.

MLP d -> h -> h -> T as in the Twin-Merging paper (h = 2d there; smaller by default here, chosen by
measurement). Features are standardised with statistics from the training prompts. A prompt is
"uncertain" when its top weight is below ``min_confidence``, its entropy is above ``max_entropy``,
or its standardised feature lies farther from every task centroid than ``max_distance`` (MLPs are
confident far from their data, so the distance test is what catches prompts of no known task).
Uncertain prompts go to the ``fallback``: the shared backbone only (w = 0) or uniform weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from twin.errors import TwinserveError

FALLBACKS = ("backbone", "uniform", "none")
# The router's saved format (the manifest's router config). 1: features pooled over every prompt token (no
# ``prefix_tokens``); 2: pooled over the first ``prefix_tokens`` tokens (None = every token, as 1).
ROUTER_FORMAT = 2


class RouterFormatError(TwinserveError, ValueError):
    """A router config this version cannot read (a newer format); names the versions."""


@dataclass
class RouterConfig:
    experts: list[str]
    feature_dim: int
    feature_layer: int
    hidden: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    fallback: str = "backbone"
    min_confidence: float = 0.5
    max_entropy: float | None = None
    max_distance: float | None = None
    prefix_tokens: int | None = None    # features pool the prompt's first K tokens (None: all of them)
    version: int = ROUTER_FORMAT
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RouterConfig:
        """A saved config; format 1 (no ``version``) reads as every-token pooling, as it was trained."""
        version = d.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= ROUTER_FORMAT:
            raise RouterFormatError(f"router format {version!r} is not one this twinserve reads (1..{ROUTER_FORMAT}); "
                                    "retrain the router with `twinserve train-router` or upgrade twinserve")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["version"] = version
        if version == 1:
            known["prefix_tokens"] = None
        p = known.get("prefix_tokens")
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise RouterFormatError(f"router prefix_tokens must be a positive integer or null, got {p!r}")
        return cls(**known)


class RouterMLP(nn.Module):
    def __init__(self, d: int, hidden: int, num_experts: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.register_buffer("centroids", torch.zeros(num_experts, d))  # in standardised space
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_experts))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d) -> logits (N, T)
        return self.net(self.standardise(x))

    def centroid_distance(self, x: torch.Tensor) -> torch.Tensor:
        """RMS distance (per feature) from each standardised feature to its nearest task centroid: (N,)."""
        z = self.standardise(x)
        return torch.cdist(z, self.centroids).min(-1).values / math.sqrt(z.shape[-1])


@dataclass
class Routing:
    weights: torch.Tensor    # (N, T) applied weights (after top-k / fallback)
    probs: torch.Tensor      # (N, T) softmax before top-k / fallback
    top: torch.Tensor        # (N,) argmax expert
    entropy: torch.Tensor    # (N,) nats, of probs
    distance: torch.Tensor   # (N,) to the nearest task centroid
    fallback: torch.Tensor   # (N,) bool
    latency_ms: float


def apply_top_k(probs: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest weights per row and renormalise them to sum to 1."""
    if k is None or k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(k, dim=-1)
    out = torch.zeros_like(probs).scatter(-1, idx, vals)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


class Router:
    def __init__(self, config: RouterConfig, mlp: RouterMLP):
        self.config = config
        self.mlp = mlp.eval()

    @torch.inference_mode()
    def route(self, features: torch.Tensor, temperature: float | None = None, top_k: int | None = None,
              fallback: str | None = None) -> Routing:
        t0 = time.perf_counter()
        c = self.config
        temp = c.temperature if temperature is None else temperature
        k = c.top_k if top_k is None else top_k
        fb = c.fallback if fallback is None else fallback
        x = features.float()
        logits = self.mlp(x)
        probs = torch.softmax(logits / max(temp, 1e-6), -1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        distance = self.mlp.centroid_distance(x)
        top_w, top = probs.max(-1)
        uncertain = top_w < c.min_confidence
        if c.max_entropy is not None:
            uncertain |= entropy > c.max_entropy
        if c.max_distance is not None:
            uncertain |= distance > c.max_distance
        weights = apply_top_k(probs, k)
        if fb == "none":
            uncertain = torch.zeros_like(uncertain)
        elif fb == "backbone":
            weights = torch.where(uncertain[:, None], torch.zeros_like(weights), weights)
        elif fb == "uniform":
            weights = torch.where(uncertain[:, None], torch.full_like(weights, 1.0 / weights.shape[-1]), weights)
        else:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fb!r}")
        return Routing(weights, probs, top, entropy, distance, uncertain, (time.perf_counter() - t0) * 1000)


def load_router(path, manifest) -> Router | None:
    """The artifact's router, or None when it has none. Checksums are verified with the artifact."""
    from pathlib import Path

    from twin.artifact import ROUTER, ArtifactError, load_tensors

    section = manifest.router  # twin.manifest.Manifest
    if section is None:
        return None
    try:
        cfg = RouterConfig.from_dict(section.config)
    except RouterFormatError as e:
        raise ArtifactError(f"{Path(path) / ROUTER}: {e}") from None
    if cfg.experts != manifest.expert_names:
        raise ArtifactError(f"{Path(path) / ROUTER}: router experts {cfg.experts} differ from the artifact's")
    state = load_tensors(Path(path), ROUTER)
    mlp = RouterMLP(cfg.feature_dim, cfg.hidden, len(cfg.experts))
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{Path(path) / ROUTER}: does not match the manifest's router config: {e}") from None
    return Router(cfg, mlp)

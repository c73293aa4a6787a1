"""Serving modes, one table: each entry says what weights a row carries and which model serves it. The
settings' ``mode`` values and help, the memory plan, the engine and the bench's modes all read it, so a new
mode is one entry here (plus, for a new kind of dense model, a branch in ``build_model``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ServingMode:
    """How a mode serves a row: with per-row deltas on the shared model (batched), or a dense model per
    request (batch 1). ``model_key`` names the dense model for a row's w (LRU-cached)."""
    name: str
    deltas: bool                                   # rows carry w into the shared model's Twin layers
    routed: bool                                   # the router (or the request) decides w
    dense: Literal["fused", "expert"] | None       # per request: θ* + Σ w_t δ̂_t fused, or the top expert's θ_t
    description: str

    @property
    def per_request(self) -> bool:
        """One dense model per request, batch 1."""
        return self.dense is not None

    def model_key(self, w) -> tuple | None:
        """The LRU key of the dense model for w (T,), None for the shared model."""
        if self.dense == "expert":
            return ("expert", int(w.argmax()) if w is not None and float(w.sum()) > 0 else -1)
        if self.dense == "fused" and w is not None:
            return ("fused", tuple(round(float(x), 2) for x in w))
        return None

    def build_model(self, art, w):
        """The model a row with weights w runs on: the shared model, a fused θ* + Σ w_t δ̂_t (exact w) or an
        expert's dense checkpoint."""
        key = self.model_key(w)
        if key is None or (key[0] == "expert" and key[1] < 0):
            return art.model
        return art.expert_model(key[1]) if key[0] == "expert" else art.model.fused(w)


MODES: dict[str, ServingMode] = {m.name: m for m in (
    ServingMode("backbone", deltas=False, routed=False, dense=None,
                description="θ* only: no router, no deltas"),
    ServingMode("lowrank", deltas=True, routed=True, dense=None,
                description="θ* + Σ w_t B_t A_t x per row in one batch (top-k rows take the grouped path in fp32)"),
    ServingMode("materialize", deltas=False, routed=True, dense="fused",
                description="reference: θ* + Σ w_t δ̂_t fused into a dense model per request (LRU by w), batch 1"),
    ServingMode("expert", deltas=False, routed=True, dense="expert",
                description="upper bound: the dense checkpoint of the router's top expert, batch 1"),
)}
Mode = Literal[tuple(MODES)]


def modes_help() -> str:
    return "; ".join(f"{m.name}: {m.description}" for m in MODES.values())

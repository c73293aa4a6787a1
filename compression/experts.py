"""Dense expert checkpoints as the serving side needs them (mode `expert`: the upper bound θ_t itself)."""
from __future__ import annotations

import torch

from compression.checkpoints import LazyState, open_expert


def read_expert_state(manifest, t: int) -> dict[str, torch.Tensor]:
    """θ_t under HF names, every tensor of the base (a PEFT adapter is merged into its base here).

    ``manifest`` is the artifact's manifest: its base and expert sources are local paths.
    """
    base = LazyState(manifest["base"])
    expert = open_expert(manifest["experts"][t]["source"], base)
    return {k: expert.get(k) for k in base.keys()}

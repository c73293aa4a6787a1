"""Dense expert checkpoints as the serving side needs them (mode `expert`: the upper bound θ_t itself)."""
from __future__ import annotations

import torch

from compression.checkpoints import LazyState, load_config, open_expert


def read_expert_state(manifest, t: int) -> dict[str, torch.Tensor]:
    """θ_t under HF names, every tensor of the base (a PEFT adapter is merged into its base here).

    ``manifest`` is the artifact's Manifest: its base and expert sources are local paths.
    """
    from compression.build import CheckpointSources

    config = load_config(manifest.base)
    base = LazyState(manifest.base, config)
    expert = open_expert(manifest.experts[t].source, base)
    src = CheckpointSources(base, [expert], config, untie=manifest.untied_head)
    return {k: src.read(expert, k) for k in src.keys}


def expert_tensors(manifest, t: int):
    """A reader name -> θ_t[name] for expert t (tensor by tensor; a PEFT adapter merged per tensor)."""
    from compression.build import CheckpointSources

    config = load_config(manifest.base)
    base = LazyState(manifest.base, config)
    expert = open_expert(manifest.experts[t].source, base)
    src = CheckpointSources(base, [expert], config, untie=manifest.untied_head)
    return lambda name: src.read(expert, name)

"""Checkpoint tensor names -> the model's parameter names, through transformers' own weight conversions.

transformers 5 stores some models differently on disk and in memory: Mixtral's ``block_sparse_moe`` is
``mlp`` in memory, and MoE experts saved one 2-D tensor per expert (``experts.3.w1.weight``) load fused
into 3-D parameters (``experts.gate_up_proj``: the experts' w1 and w3 stacked, then concatenated).
``CheckpointLayout`` applies the same conversion table transformers' loader applies
(``conversion_mapping.get_model_conversion_mapping``), so the build, the gate and the server all see
tensors under the names the model class uses, while each fused tensor keeps its checkpoint pieces: the
merge runs per piece, exactly as mergekit merges the per-expert tensors of the checkpoint.
Conversions other than renames and the MoE stack/concatenate are refused by name.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from twin.errors import TwinserveError


class LayoutError(TwinserveError):
    """A checkpoint layout twinserve cannot map onto the model class (names the tensor and the operation)."""


@dataclass(frozen=True)
class Fused:
    """A model parameter assembled from checkpoint pieces: per source pattern, the per-expert keys (expert
    order), stacked on dim 0 (MergeModulelist) and, with several patterns, concatenated on ``cat_dim``."""
    groups: tuple[tuple[str, ...], ...]
    cat_dim: int | None

    @property
    def pieces(self) -> list[str]:
        return [k for g in self.groups for k in g]

    def assemble(self, get) -> torch.Tensor:
        """The fused tensor from ``get(piece_key)``."""
        parts = [torch.stack([get(k) for k in g], 0) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.cat_dim)

    def rows(self, get, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 (experts) of the fused tensor: only those experts' pieces are read."""
        parts = [torch.stack([get(k) for k in g[lo:hi]], 0) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.cat_dim)


def _expert_index(key: str, pattern: str) -> int:
    rx = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(rx, key)
    return int(m.group(1)) if m and m.groups() else 0


class CheckpointLayout:
    """How one checkpoint's keys map onto ``config``'s model class: renames and fused MoE experts."""

    def __init__(self, config, keys: list[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            apply_renamings,
            rename_source_key,
        )

        from twin.model.support import causal_lm_class

        with torch.device("meta"):
            model = causal_lm_class(config)._from_config(config)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        self.simple: dict[str, str] = {}                 # model name -> checkpoint key
        grouped: dict[str, dict] = defaultdict(lambda: {"conv": None, "by_pattern": defaultdict(list)})
        for key in keys:
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if pattern is None:
                self.simple[target] = key
                continue
            renamed = apply_renamings(key, renamings)
            conv = next(c for c in converters if c.rename_source_key(renamed)[1] is not None)
            g = grouped[target]
            g["conv"] = conv
            g["by_pattern"][pattern].append(key)
        self.fused: dict[str, Fused] = {}
        for target, g in grouped.items():
            conv = g["conv"]
            ops = [type(op) for op in conv.operations]
            if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or conv.operations[0].dim != 0:
                raise LayoutError(f"{target}: its checkpoint tensors load through "
                                  f"{' + '.join(o.__name__ for o in ops)}, which twinserve does not read")
            groups = []
            for pattern in conv.source_patterns:
                found = next((v for p, v in g["by_pattern"].items() if p == pattern or pattern.endswith(p)
                              or p.endswith(pattern)), None)
                if found is None:
                    continue
                groups.append(tuple(sorted(found, key=lambda k, p=pattern: _expert_index(k, p))))
            cat = conv.operations[1].dim if len(conv.operations) > 1 else None
            self.fused[target] = Fused(tuple(groups), cat)

    @property
    def identity(self) -> bool:
        """Every checkpoint key is the model's name for it (no renames, nothing fused)."""
        return not self.fused and all(k == v for k, v in self.simple.items())

    def keys(self) -> list[str]:
        return list(self.simple) + list(self.fused)

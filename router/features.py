"""Prompt -> feature vector from the shared backbone θ* itself.

Mean-pooled hidden state after the first L_r blocks, over the real prompt tokens only. The pass
stops at block L_r and uses no experts, so it costs about L_r/L of one prefill.
"""
from __future__ import annotations

import torch

from twin.generate import encode_prompts, length_buckets, right_pad
from twin.model import TwinModel


@torch.inference_mode()
def pooled_features(model: TwinModel, token_ids: list[list[int]], layer: int, pad_id: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """token_ids: N prompts (with <bos>) -> (N, H) fp32 features; padding never enters the mean."""
    if not 1 <= layer <= model.args.num_layers:
        raise ValueError(f"feature layer must be in 1..{model.args.num_layers}, got {layer}")
    device = model.device
    out = torch.empty(len(token_ids), model.args.hidden_size)
    groups = [g[i:i + batch_size] for g in length_buckets([len(t) for t in token_ids])
              for i in range(0, len(g), batch_size)]
    for idx in groups:
        chunk = [token_ids[i] for i in idx]
        ids, pos, lengths = right_pad(chunk, pad_id, device)
        cache = model.new_cache(len(chunk), ids.shape[1], layers=layer)
        h = model(ids, pos, cache, torch.arange(len(chunk), device=device), None, num_layers=layer)  # (n, S, H)
        mask = (pos < lengths[:, None]).unsqueeze(-1).to(h.dtype)                                    # (n, S, 1)
        out[idx] = ((h * mask).sum(1) / lengths[:, None].to(h.dtype)).float().cpu()
    return out.to(device)


def prompt_features(model: TwinModel, tokenizer, prompts: list[str], layer: int, batch_size: int = 256) -> torch.Tensor:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pooled_features(model, encode_prompts(tokenizer, prompts), layer, pad, batch_size)

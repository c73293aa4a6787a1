"""Prompt -> feature vector from the shared backbone θ* itself.

Mean-pooled hidden state after the first L_r blocks, over the real prompt tokens only. The pass
stops at block L_r and uses no experts, so it costs about L_r/L of one prefill.
"""
from __future__ import annotations

import torch

from twin.generate import encode_prompts
from twin.model import FlatBatch, TwinModel


@torch.inference_mode()
def pooled_features(model: TwinModel, token_ids: list[list[int]], layer: int, pad_id: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """token_ids: N prompts (with <bos>) -> (N, H) fp32 features, the mean over each prompt's own tokens.

    Prompts go through θ* as the prefill chunks of one flat batch (bucketed to a few token counts), so
    no prompt is padded to the longest one. ``pad_id`` is unused (kept for callers).
    """
    if not 1 <= layer <= model.args.num_layers:
        raise ValueError(f"feature layer must be in 1..{model.args.num_layers}, got {layer}")
    device = model.device
    out = torch.empty(len(token_ids), model.args.hidden_size)
    for lo in range(0, len(token_ids), batch_size):
        chunk = token_ids[lo:lo + batch_size]
        flat = FlatBatch.build([], [(ids, i, 0) for i, ids in enumerate(chunk)], device, bucket=True)
        cache = model.new_cache(len(chunk), max(len(t) for t in chunk), layers=layer)
        h = model.hidden_states_flat(flat, cache, layer)                                   # (M, H)
        means = torch.stack([h[start:start + n].float().mean(0) for start, n, _, _ in flat.segments])
        out[lo:lo + len(chunk)] = means.cpu()             # one device-to-host copy per batch, not per prompt
    return out.to(device)


def prompt_features(model: TwinModel, tokenizer, prompts: list[str], layer: int, batch_size: int = 256) -> torch.Tensor:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pooled_features(model, encode_prompts(tokenizer, prompts), layer, pad, batch_size)

"""Prompt -> feature vector from the shared backbone θ* itself.

Mean-pooled hidden state after the first L_r blocks over the prompt's head: its first K tokens (K =
``prefix_tokens`` of the router config, chosen by measurement at training; None = every token). The
blocks are causal, so the hidden states of the first K tokens do not depend on what follows them: a
prompt with a continuation appended after its first K tokens (a loglikelihood request: context +
candidate answer) gets the feature of its context, and the pass runs at most K tokens through L_r
blocks whatever the prompt's length, so its cost is bounded by K·L_r token-blocks.
"""
from __future__ import annotations

import torch

from twin.generate import encode_prompts
from twin.model import FlatBatch, TwinModel


def head(token_ids: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first ``max_tokens`` tokens of each prompt (all of them when None)."""
    if max_tokens is None:
        return token_ids
    if max_tokens < 1:
        raise ValueError(f"prefix_tokens must be at least 1, got {max_tokens}")
    return [ids[:max_tokens] for ids in token_ids]


@torch.inference_mode()
def prefix_pooled_features(model: TwinModel, token_ids: list[list[int]], layer: int,
                           prefixes: list[int | None], batch_size: int = 256) -> dict[int | None, torch.Tensor]:
    """One pass of the longest needed head -> {K: (N, H) fp32 features pooled over the first K tokens}.

    Exactly ``pooled_features(model, head(ids, K), layer)`` for every K (the blocks are causal): one pass
    serves every candidate K of the router's search.
    """
    if not 1 <= layer <= model.args.num_layers:
        raise ValueError(f"feature layer must be in 1..{model.args.num_layers}, got {layer}")
    longest = None if any(k is None for k in prefixes) else max(prefixes)
    ids_all = head(token_ids, longest)
    device = model.device
    out = {k: torch.empty(len(ids_all), model.args.hidden_size) for k in prefixes}
    for lo in range(0, len(ids_all), batch_size):
        chunk = ids_all[lo:lo + batch_size]
        flat = FlatBatch.build([], [(ids, i, 0) for i, ids in enumerate(chunk)], device, bucket=True)
        cache = model.new_cache(len(chunk), max(len(t) for t in chunk), layers=layer)
        h = model.hidden_states_flat(flat, cache, layer).float()                          # (M, H)
        # prefix sums (float64: no cancellation across the batch): the mean over a prompt's first k tokens
        csum = torch.cat([h.new_zeros(1, h.shape[1], dtype=torch.float64), h.double().cumsum(0)])
        starts = torch.tensor([s for s, _, _, _ in flat.segments], device=h.device)
        for k in prefixes:
            lens = torch.tensor([n if k is None else min(n, k) for _, n, _, _ in flat.segments], device=h.device)
            means = ((csum[starts + lens] - csum[starts]) / lens[:, None]).float()
            out[k][lo:lo + len(chunk)] = means.cpu()      # one device-to-host copy per batch, not per prompt
    return {k: v.to(device) for k, v in out.items()}


def pooled_features(model: TwinModel, token_ids: list[list[int]], layer: int, batch_size: int = 256,
                    max_tokens: int | None = None) -> torch.Tensor:
    """token_ids: N prompts (with <bos>) -> (N, H) fp32 features, the mean over the first ``max_tokens`` of
    each prompt's own tokens (all of them when None).

    Prompts go through θ* as the prefill chunks of one flat batch (bucketed to a few token counts), so
    no prompt is padded to the longest one (there is no pad token), and only their heads are run.
    """
    return prefix_pooled_features(model, head(token_ids, max_tokens), layer, [None], batch_size)[None]


def prompt_features(model: TwinModel, tokenizer, prompts: list[str], layer: int, batch_size: int = 256,
                    max_tokens: int | None = None) -> torch.Tensor:
    return pooled_features(model, encode_prompts(tokenizer, prompts), layer, batch_size, max_tokens)


def router_features(model: TwinModel, token_ids: list[list[int]], config, batch_size: int = 256) -> torch.Tensor:
    """The features a router with ``config`` (router.model.RouterConfig) reads: its layer, its prefix."""
    return pooled_features(model, token_ids, config.feature_layer, batch_size, config.prefix_tokens)


def router_prompt_features(model: TwinModel, tokenizer, prompts: list[str], config) -> torch.Tensor:
    return router_features(model, encode_prompts(tokenizer, prompts), config)

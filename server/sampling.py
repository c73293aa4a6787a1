"""Per-row sampling and log-probabilities: logit bias, penalties, greedy / temperature / top-k / top-p,
per-request seeds; prompt logprobs; stop sequences; incremental detokenisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .specs import SamplingParams

__all__ = [
    "SamplingParams",
    "TokenLogprob",
    "adjust_logits",
    "detokenize_step",
    "find_stop",
    "make_generator",
    "prompt_logprobs",
    "safe_prefix_len",
    "sample_rows",
    "sampling_logprobs",
]

# OpenAI and vLLM report -9999.0 for a token of probability 0; JSON has no -inf.
MIN_LOGPROB = -9999.0


@dataclass
class TokenLogprob:
    """One position: the token, its log-probability and the k most likely tokens (id, logprob).

    ``offset`` is the character offset of the token's text in the completion text (set by the engine;
    None for prompt tokens, whose offsets the service computes).
    """
    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int | None = None


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """logits (V,) fp32 -> logits + logit_bias − frequency·c − presence·[c > 0], c = counts of generated tokens.

    The formula of the OpenAI API reference ("frequency and presence penalties").
    """
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        bias = torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        logits = logits.index_add(0, ids, bias)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) fp32 (already adjusted) -> log-probabilities (V,) of the distribution tokens are drawn from.

    Greedy rows report the untempered softmax (argmax of it is the token). Sampled rows: logits / T, then
    top-k and nucleus (top-p: the smallest prefix of the sorted distribution whose mass reaches top_p) set
    the rest to −inf, then log_softmax renormalises.
    """
    if params.greedy:
        return torch.log_softmax(logits, -1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_p, order = torch.softmax(logits, -1).sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, -1)


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
    return [(i, max(v, MIN_LOGPROB)) for i, v in zip(ids.tolist(), vals.tolist())]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
                generated: list[list[int]] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (N, V) -> (one token per row, its TokenLogprob where params.logprobs is not None).

    Each row has its own params, generator and generated-so-far ids (for the penalties). Everything runs
    in fp32, whatever the model's dtype.
    """
    logits = logits.float()
    plain_greedy = logits.argmax(-1).tolist()
    tokens: list[int] = []
    records: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        row = logits[i]
        if p.adjusts_logits:
            row = adjust_logits(row, p, generated[i] if generated is not None else [])
        if p.greedy and p.logprobs is None:
            tokens.append(plain_greedy[i] if not p.adjusts_logits else int(row.argmax()))
            records.append(None)
            continue
        lp = sampling_logprobs(row, p)
        tok = int(lp.argmax()) if p.greedy else int(torch.multinomial(lp.exp(), 1, generator=gens[i]).item())
        tokens.append(tok)
        records.append(None if p.logprobs is None else
                       TokenLogprob(tok, max(float(lp[tok]), MIN_LOGPROB), _top(lp, p.logprobs)))
    return tokens, records


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """logits (S, V) of a prefill row (position i predicts ids[i+1]) -> per prompt token its logprob.

    The first token has no context and gets None, as in the OpenAI completions API with echo.
    """
    out: list[TokenLogprob | None] = [None]
    if len(ids) < 2:
        return out
    lp = torch.log_softmax(logits[: len(ids) - 1].float(), -1)                      # (S-1, V)
    nxt = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
    if k > 0:
        vals, top_ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        vals, top_ids = vals.tolist(), top_ids.tolist()
    for j, tok in enumerate(ids[1:]):
        top = [(t, max(v, MIN_LOGPROB)) for t, v in zip(top_ids[j], vals[j])] if k > 0 else []
        out.append(TokenLogprob(tok, max(chosen[j], MIN_LOGPROB), top))
    return out


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """Length of text that cannot be the start of a stop sequence (hold back the rest while streaming)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


def detokenize_step(tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                    final: bool = False) -> tuple[str, int, int]:
    """Text added by the newest tokens, decoding only ids[prefix_offset:] rather than the whole output.

    ids[prefix_offset:read_offset] is already emitted and gives the new tokens their context, so
    tokenizers that drop a leading space or merge bytes decode them correctly. Text that ends in an
    incomplete UTF-8 sequence is held back until it completes, unless ``final`` (every finish reason
    flushes, so the whole output always equals ``tokenizer.decode(ids)``).
    Returns (new text, new prefix_offset, new read_offset).
    """
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    new = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
        return new[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset

"""Per-row sampling: greedy, temperature, top-k, top-p, per-request seeds; stop sequences."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1   # tinier temperatures overflow logits/T to inf


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) -> probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > top_p          # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> list[int]:
    """logits (N, V) -> one token per row, each with its own params and generator."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, (p, g) in enumerate(zip(params, gens)):
        if p.greedy:
            out.append(greedy[i])
        else:
            probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p)
            out.append(int(torch.multinomial(probs, 1, generator=g).item()))
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
    incomplete UTF-8 sequence is held back until it completes, unless ``final``.
    Returns (new text, new prefix_offset, new read_offset).
    """
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    new = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
        return new[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset

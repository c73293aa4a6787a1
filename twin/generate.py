"""Batched greedy generation without the serving engine (eval, router features, benchmarks)."""
from __future__ import annotations

import torch

from twin.model import TwinModel


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids exactly as the tokenizer encodes ``text`` (its own post-processor decides about <bos>).

    A Llama-style tokenizer prepends <bos>; a GPT-2-style one defines <bos> but does not add it, and
    transformers' forward then never sees it either, so neither does twinserve.
    """
    return tokenizer.encode(text, add_special_tokens=True)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [encode_prompt(tokenizer, p) for p in prompts]


def right_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, S), positions (N, S), lengths (N,); padded positions keep counting past each length."""
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=device)
    positions = torch.arange(n, device=device).expand(len(seqs), n).contiguous()
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    return ids, positions, lengths


@torch.inference_mode()
def greedy_generate(model: TwinModel, tokenizer, prompts: list[str], w: torch.Tensor | None = None,
                    max_new_tokens: int = 24, batch_size: int = 256, stop_ids: set[int] | None = None) -> list[str]:
    """Greedy continuations, cut at <eos> or newline and stripped. w: (N, T) per-prompt expert weights."""
    device = model.device
    eos = tokenizer.eos_token_id
    newline = tokenizer.encode("\n", add_special_tokens=False)
    stops = set(stop_ids or ()) | {eos} | set(newline[-1:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = encode_prompts(tokenizer, prompts[i:i + batch_size])
        wb = None if w is None else w[i:i + batch_size].to(device)
        n = len(chunk)
        limit = max(len(s) for s in chunk) + max_new_tokens
        cache = model.new_cache(n, limit)
        slots = torch.arange(n, device=device)
        ids, pos, lengths = right_pad(chunk, pad, device)
        logits = model(ids, pos, cache, slots, wb, logits_at=lengths - 1)      # (N, V)
        generated = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        cur = lengths.clone()
        for _ in range(max_new_tokens):
            tok = logits.argmax(-1)
            for r in range(n):
                if not done[r]:
                    t = int(tok[r])
                    if t in stops:
                        done[r] = True
                    else:
                        generated[r].append(t)
            if bool(done.all()):
                break
            logits = model(tok[:, None], cur[:, None], cache, slots, wb)[:, -1]
            cur = cur + 1
        outs.extend(tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated)
    return outs

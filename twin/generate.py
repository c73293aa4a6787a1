"""Batched greedy generation without the serving engine (eval, router features, benchmarks)."""
from __future__ import annotations

import torch

from twin.model import FlatBatch, TwinModel


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids exactly as the tokenizer encodes ``text`` (its own post-processor decides about <bos>).

    A Llama-style tokenizer prepends <bos>; a GPT-2-style one defines <bos> but does not add it, and
    transformers' forward then never sees it either, so neither does twinserve.
    """
    return tokenizer.encode(text, add_special_tokens=True)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [encode_prompt(tokenizer, p) for p in prompts]


@torch.inference_mode()
def prompt_logits(model: TwinModel, seqs: list[list[int]], w: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Logits at every position of each sequence (len_i, V), all prompts as the prefill chunks of one step.
    w: (N, T) per-sequence expert weights, or None for θ* alone."""
    flat = FlatBatch.build([], [(list(s), i, 0) for i, s in enumerate(seqs)], model.device,
                           weights=None if w is None else list(w.to(model.device)), logits="all")
    logits = model.step(flat, model.new_cache(len(seqs), max(len(s) for s in seqs)))
    return [logits[first:first + n] for first, n in flat.chunk_logits]


@torch.inference_mode()
def greedy_generate(model: TwinModel, tokenizer, prompts: list[str], w: torch.Tensor | None = None,
                    max_new_tokens: int = 24, batch_size: int = 256, stop_ids: set[int] | None = None) -> list[str]:
    """Greedy continuations, cut at <eos> or newline and stripped. w: (N, T) per-prompt expert weights.

    The engine's own step: every prompt of a batch as a prefill chunk of one step, then one decode step
    per new token over the rows still running."""
    device = model.device
    eos = tokenizer.eos_token_id
    newline = tokenizer.encode("\n", add_special_tokens=False)
    stops = set(stop_ids or ()) | {eos} | set(newline[-1:])
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = encode_prompts(tokenizer, prompts[i:i + batch_size])
        ws = None if w is None else list(w[i:i + batch_size].to(device))
        n = len(chunk)
        cache = model.new_cache(n, max(len(s) for s in chunk) + max_new_tokens)
        flat = FlatBatch.build([], [(s, r, 0) for r, s in enumerate(chunk)], device, bucket=True, weights=ws)
        tok = model.step(flat, cache).argmax(-1).tolist()
        generated: list[list[int]] = [[] for _ in range(n)]
        running = list(range(n))
        for step in range(max_new_tokens):
            still = []
            for r, t in zip(running, tok):
                if t not in stops:
                    generated[r].append(t)
                    still.append(r)
            running = still
            if not running or step == max_new_tokens - 1:
                break
            flat = FlatBatch.build([(generated[r][-1], len(chunk[r]) + len(generated[r]) - 1, r) for r in running],
                                   [], device, bucket=True, weights=None if ws is None else [ws[r] for r in running])
            tok = model.step(flat, cache).argmax(-1).tolist()
        outs.extend(tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated)
    return outs

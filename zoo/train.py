"""Tiny Llama training on prompt -> target pairs (loss on the target only), with exact-match checks."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class ZooModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128

    def llama_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=self.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
            architectures=["LlamaForCausalLM"],
        )


def encode_batch(tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<bos> prompt target <eos>, right-padded. Returns ids, attention mask, labels (-100 outside target+eos)."""
    seqs, labels = [], []
    for r in rows:
        p = [tokenizer.bos_token_id] + tokenizer.encode(r["prompt"], add_special_tokens=False)
        t = tokenizer.encode(r["target"], add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    n = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    lab = torch.tensor([l + [-100] * (n - len(l)) for l in labels])
    return ids, att, lab


@torch.no_grad()
def teacher_forced_exact_match(model: LlamaForCausalLM, tokenizer, rows: list[dict], batch: int = 256) -> float:
    """Fraction of rows whose every target token (and <eos>) is the argmax given the true prefix.

    This equals greedy-decoding exact match: greedy output first differs from the target exactly
    where teacher forcing first mispredicts.
    """
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch):
        ids, att, lab = encode_batch(tokenizer, rows[i:i + batch])
        logits = model(input_ids=ids, attention_mask=att).logits
        pred = logits[:, :-1].argmax(-1)
        target = lab[:, 1:]
        ok = ((pred == target) | (target == -100)).all(-1)
        correct += int(ok.sum())
    model.train()
    return correct / max(1, len(rows))


def train_lm(model: LlamaForCausalLM, tokenizer, sample: Callable[[random.Random], dict] | list[dict],
             val_rows: list[dict], *, steps: int, lr: float, batch_size: int = 64, seed: int = 0,
             target_acc: float = 0.98, eval_every: int = 100, desc: str = "train",
             param_filter: Callable[[str], bool] | None = None, quiet: bool = False) -> dict:
    """AdamW with warmup + cosine decay; stops early once validation exact match ≥ target_acc."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for n, p in model.named_parameters() if param_filter is None or param_filter(n)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    draw = (lambda: rng.choice(sample)) if isinstance(sample, list) else (lambda: sample(rng))
    model.train()
    acc, step = 0.0, 0
    bar = tqdm(range(steps), desc=desc, unit="step", disable=quiet, leave=False)
    for step in bar:
        ids, att, lab = encode_batch(tokenizer, [draw() for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = teacher_forced_exact_match(model, tokenizer, val_rows)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_em=f"{acc:.3f}")
            if acc >= target_acc:
                break
    model.eval()
    return {"steps": step + 1, "val_exact_match": acc}


def iter_batches(rows: list[dict], size: int) -> Iterable[list[dict]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]

"""The slot-cache attention kernel of the flat step against an eager float64 reference.

One flat batch mixes decode rows in non-adjacent slots, a whole prompt from position 0 (SDPA's
is_causal path when no window bites), a chunk that continues a prompt from position 7, and bucket
padding; a second batch is pure decode over a dense slot range (cache views, no gather). Query heads
8 over 1, 2 and 8 KV heads (MQA, GQA, MHA), sliding windows shorter and longer than the chunks, and
Gemma 2's soft-capping, in fp32 and bf16.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from twin.model.attention import _flat_attention, _window_mask
from twin.model.batch import FlatBatch

H, D, SLOTS, MAX_SEQ = 8, 16, 5, 24
SCALE = D ** -0.5
CASES = list(itertools.product([torch.float32, torch.bfloat16], [1, 2, 8], [None, 3, 6], [None, 5.0]))


def reference(q, k, v, pos: int, window, softcap):
    """q (H, D), k/v (Hkv, L, D) -> (H, D) in float64, as transformers' eager kernel defines it."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    s = (q.double()[:, None] @ k.transpose(-1, -2)) * SCALE                       # (H, 1, L)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~_window_mask(torch.tensor([pos]), k.shape[1], window), float("-inf"))
    return (torch.softmax(s, -1) @ v)[:, 0]


def check(flat, k_cache, v_cache, dtype, hkv, window, softcap, scaling):
    g = torch.Generator().manual_seed(1)
    m = flat.num_tokens
    q, key, val = (torch.randn(m, h, 1, D, generator=g).to(dtype) for h in (H, hkv, hkv))
    out, _ = _flat_attention(flat, k_cache, v_cache, q, key, val, scaling, window, softcap)   # (M, 1, H, D)
    err = 0.0
    for i in range(flat.num_real):
        s, p = int(flat.slots[i]), int(flat.positions[i])
        ref = reference(q[i, :, 0], k_cache[s, :, :p + 1], v_cache[s, :, :p + 1], p, window, softcap)
        err = max(err, float((out[i, 0].double() - ref).abs().max()))
    pad = float(out[flat.num_real:].abs().max()) if m > flat.num_real else 0.0
    return err, pad


@pytest.mark.parametrize("dtype,hkv,window,softcap", CASES)
def test_flat_attention_matches_eager_reference(dtype, hkv, window, softcap):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(SLOTS, hkv, MAX_SEQ, D, generator=g).to(dtype)
    v_cache = torch.randn(SLOTS, hkv, MAX_SEQ, D, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # decode rows in slots 3 and 1 (not a dense range); a whole 5-token prompt in slot 0 (from position 0);
    # a 4-token chunk continuing slot 2 from position 7; a 2-token prompt in slot 4; bucket padding after
    mixed = FlatBatch.build([(1, 9, 3), (2, 4, 1)], [([1] * 5, 0, 0), ([1] * 4, 2, 7), ([1] * 2, 4, 0)],
                            bucket=True)
    assert mixed.num_tokens > mixed.num_real
    err, pad = check(mixed, k_cache, v_cache, dtype, hkv, window, softcap, SCALE)
    assert err <= tol and pad == 0.0
    # pure decode over slots 1..3 (a dense range: cache views), scaling left to the kernel's default
    dense = FlatBatch.build([(1, 9, 1), (1, 4, 2), (1, 12, 3)], [])
    assert dense.decode_range == (1, 4)
    err, _ = check(dense, k_cache, v_cache, dtype, hkv, window, softcap, None)
    assert err <= tol

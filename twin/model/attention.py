"""twinserve's attention kernel behind transformers' `AttentionInterface`: keys and values go to the slot
cache at each token's (slot, position); decode tokens attend together over their slots and each prefill
chunk attends as one causal block over its own slot.

Attention keeps transformers' code around the kernel (rotary variants, q/k norms, biases, soft-capping,
sliding windows); only this function, registered as ``attn_implementation="twinserve"``, is swapped in.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import AttentionInterface

from twin.model.batch import FlatBatch, StepContext
from twin.model.support import UnsupportedModelError

ATTN_IMPLEMENTATION = "twinserve"


def twin_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask=None, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers attention kernel over the slot cache, for one `FlatBatch` step.

    query (M, H, 1, D) and key/value (M, Hkv, 1, D) — each of the step's M tokens is a row of one token —
    arrive after transformers' projections, norms and rotary embedding. They are written at (slot,
    position) of each token, then every query attends to its sequence's cached keys 0..position (within
    ``sliding_window`` keys when the layer has one). Returns (M, 1, H, D) as transformers' kernels do.
    ``attention_mask`` is ignored: the mask comes from the positions.
    """
    for name in ("sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"{type(module).__name__} passes {name!r} to its attention kernel; "
                                        f"twinserve's slot-cache attention does not implement it")
    ctx: StepContext = module._twin_ctx
    call = ctx.calls.get(id(module), 0)          # the n-th attention call of this module in this forward
    ctx.calls[id(module)] = call + 1
    k_cache, v_cache = ctx.cache.layer(module.layer_idx, key, value, call)
    return _flat_attention(ctx.flat, k_cache, v_cache, query, key, value, scaling, sliding_window, softcap,
                           kwargs.get("s_aux"))


# SDPA backends for a masked block of queries on CUDA. cuDNN's attention builds an execution plan for every
# new shape, and prefill chunks come in every length: on an H200 in bf16 it spent 14 ms per call (the
# router pass and the prefill of the bench's mix took 9 of 12 s), against microseconds for the kernel.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """fp32 softmax over the last dim; with attention sinks (GPT-OSS, per head, shaped to broadcast as one more
    column of ``scores``) each sink is one more logit in the denominator whose probability is dropped."""
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    scores, sinks = scores.float(), sinks.float()
    top = torch.maximum(scores.amax(-1, keepdim=True), sinks)
    e = (scores - top).exp()
    return e / (e.sum(-1, keepdim=True) + (sinks - top).exp())


def _attend(query, keys, values, mask, scaling, softcap, sinks=None):
    """softmax(q kᵀ · scaling [soft-capped], masked [, sinks]) v.  q (N, H, S, D), k/v (N, Hkv, L, D), mask
    (N, 1, S, L), or None for plain causal attention with S == L (SDPA's is_causal: no mask tensor, and its
    fused kernels skip the masked blocks; not with softcap or sinks). ``sinks``: (H,) per-head sink logits."""
    rep = query.shape[1] // keys.shape[1]
    if softcap is None and sinks is None:
        kw = {"attn_mask": mask} if mask is not None else {"is_causal": True}
        with sdpa_kernel(_CUDA_SDPA) if query.is_cuda else contextlib.nullcontext():   # not cuDNN: _CUDA_SDPA
            return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=rep > 1, **kw)
    # tanh soft-capping of the scores (Gemma 2) or sinks: softmax in fp32 as transformers' eager kernels
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = (query @ keys.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    sinks = None if sinks is None else sinks.view(1, -1, 1, 1)
    return _softmax(scores, sinks).to(query.dtype) @ values


def _decode_attend(query, keys, values, mask, scaling, softcap, sinks=None):
    """One query per row: q (K, H, 1, D), k/v (K, Hkv, L, D) cache views, mask (K, 1, 1, L) -> (K, H, 1, D).

    Two batched matmuls with the query heads of a KV group as the rows of one product (GQA without
    repeating the keys) and an fp32 softmax, as transformers' eager kernel computes it. On CPU this is
    faster than SDPA's flash kernel for a single query (1.3x in fp32, 2.2x in bf16, at 16 rows x 16 heads
    x 41 keys), whose blocking is built for many queries. On CUDA it is SDPA (`_attend`).
    """
    if query.is_cuda:     # SDPA's fused kernels launch once where this takes six launches
        return _attend(query, keys, values, mask, scaling, softcap, sinks)
    k, h, _, dim = query.shape
    hkv = keys.shape[1]
    if keys.dtype != torch.float32:   # CPU bf16 matmul over a strided cache view copies slowly inside: 4x
        keys, values = keys.contiguous(), values.contiguous()   # slower than this copy plus a dense matmul
    q = query.reshape(k, hkv, h // hkv, dim)
    scores = (q @ keys.transpose(-1, -2)) * (scaling if scaling is not None else dim ** -0.5)   # (K, Hkv, rep, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    sinks = None if sinks is None else sinks.view(1, hkv, h // hkv, 1)
    out = _softmax(scores, sinks).to(values.dtype) @ values                                      # (K, Hkv, rep, Dv)
    return out.reshape(k, h, 1, values.shape[-1])


def _window_mask(q_pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """(…, S) query positions -> (…, S, L) bool: key j visible when j <= q (and j > q − window, transformers'
    sliding_window_overlay)."""
    key_pos = torch.arange(length, device=q_pos.device)
    m = key_pos <= q_pos[..., None]
    return m & (key_pos > q_pos[..., None] - window) if window is not None else m


def _flat_attention(flat: FlatBatch, k_cache, v_cache, query, key, value, scaling, window, softcap, sinks=None):
    """Unified step: M tokens as M rows of one token each (query (M, H, 1, D)).

    Every token's key/value is written first; then the decode tokens attend together (one batched
    kernel over their slots) and each prefill chunk attends as one causal block over its own slot (a
    cache view, no gather). Returns (M, 1, H, D).
    """
    n = flat.num_real                                               # bucket padding: no write, output 0
    k_cache[flat.slots[:n], :, flat.positions[:n]] = key[:n, :, 0]  # (M, Hkv, D)
    v_cache[flat.slots[:n], :, flat.positions[:n]] = value[:n, :, 0]
    pure_decode = not flat.segments and n == query.shape[0]         # every token decodes: no scatter
    out = None if pure_decode else query.new_zeros((*query.shape[:3], value.shape[-1]))   # (M, H, 1, Dv)
    if flat.decode is not None:
        d = flat.decode
        length = flat.decode_length
        if flat.decode_range is not None:
            lo, hi = flat.decode_range
            keys, values = k_cache[lo:hi, :, :length], v_cache[lo:hi, :, :length]
        else:
            slots = flat.slots[d]
            keys, values = k_cache[slots, :, :length], v_cache[slots, :, :length]
        mask = flat.masks.get(window)
        if mask is None:   # the same for every layer with this window: built once per step
            mask = flat.masks[window] = _window_mask(flat.positions[d][:, None], length, window)[:, None]
        o = _decode_attend(query if pure_decode else query[d], keys, values, mask, scaling, softcap, sinks)
        if pure_decode:
            return o.transpose(1, 2), None
        out[d] = o
    for i, (start, n, slot, p0) in enumerate(flat.segments):
        q = query[start:start + n].transpose(0, 2)                  # (1, H, n, D)
        length = p0 + n
        if p0 == 0 and softcap is None and sinks is None and (window is None or n <= window):
            mask = None       # a whole prompt from position 0: plain causal, SDPA's own is_causal
        else:
            mask = flat.masks.get((i, window))
            if mask is None:  # the same for every layer with this window: built once per step
                mask = flat.masks[(i, window)] = _window_mask(torch.arange(p0, length, device=query.device),
                                                              length, window)[None, None]
        o = _attend(q, k_cache[slot:slot + 1, :, :length], v_cache[slot:slot + 1, :, :length], mask,
                    scaling, softcap, sinks)
        out[start:start + n] = o.transpose(0, 2)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, twin_attention)

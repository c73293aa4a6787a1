"""Transformers backend: transformers' own model class for the config, with Twin layers injected.

Serves any decoder-only causal LM that transformers implements with its attention-backend hooks
(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, GPT-2, ...). As PEFT injects LoRA layers, every
module that carries exclusive knowledge is wrapped in place:

    TwinLinear:    y = base(x) + B_cat((A_cat x) ⊙ w[:, idx]) + w @ Δb       (nn.Linear, GPT-2 Conv1D)
    TwinEmbedding: e = base(tok) + s · (B_cat[tok] ⊙ w[:, idx]) @ A_cat       (s: the class's embed scale)
    TwinNorm:      the norm's own forward with a per-row gain g* + w @ Δg     (RMSNorm, Gemma's 1+g, LayerNorm)

All of them read the batch's per-row weights w (N, T) from one `StepContext` per forward (the vLLM
punica-wrapper idea), so a batch whose rows are routed to different experts shares one forward.
Attention keeps transformers' code (rotary variants, q/k norms, biases, soft-capping, sliding windows);
only the kernel is swapped, through transformers' `AttentionInterface`, for `twin_attention`, which
writes keys/values into twinserve's slot cache at each row's own positions and attends with a per-row
causal (and, where the layer asks for it, sliding-window) mask.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_utils import AttentionInterface
from transformers.pytorch_utils import Conv1D

from twin.errors import TwinserveError
from twin.fusion import ExpertWeights, LowRankDeltas, add_delta_, materialize_weight, scale_by_expert

ATTN_IMPLEMENTATION = "twinserve"
# checkpoint tensors that are buffers, not parameters: never part of θ*, never compared
NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class UnsupportedModelError(TwinserveError):
    """The config's architecture (or one of its tensors) cannot be served exactly; the message says which."""


# ---- architecture support ----------------------------------------------------------------------------
def causal_lm_class(config: PretrainedConfig) -> type:
    """transformers' causal-LM class for ``config``; UnsupportedModelError when it cannot be served exactly."""
    mapping = AutoModelForCausalLM._model_mapping
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {model_type!r} is an encoder-decoder; twinserve serves decoder-only "
                                    f"causal LMs ({supported_summary()})")
    try:
        cls = mapping[type(config)]
    except KeyError:
        raise UnsupportedModelError(f"model_type {model_type!r} has no causal-LM class in transformers "
                                    f"({supported_summary()})") from None
    if not getattr(cls, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"model_type {model_type!r} ({cls.__name__}) does not route attention through "
                                    f"transformers' AttentionInterface, so its keys/values cannot go to twinserve's "
                                    f"slot cache ({supported_summary()})")
    return cls


def check_supported(config: PretrainedConfig) -> None:
    """Raise UnsupportedModelError naming the model_type unless this backend can serve it (call before any merge)."""
    causal_lm_class(config)


def supported_model_types() -> list[str]:
    out = []
    for cfg_cls, cls in AutoModelForCausalLM._model_mapping.items():
        if getattr(cls, "_supports_attention_backend", False) and not getattr(cfg_cls, "is_encoder_decoder", False):
            out.append(cfg_cls.model_type)
    return sorted(set(out))


def supported_summary() -> str:
    types = supported_model_types()
    head = ", ".join(t for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                                 "gpt2") if t in types)
    return f"supported: {head} and {len(types) - 9} more decoder-only model_types transformers implements"


# ---- per-step state ----------------------------------------------------------------------------------
class SlotCache:
    """Keys/values per attention call, one slot per running sequence: k[i] is (slots, kv_heads, max_seq, head_dim).

    Entries are allocated on their first write, with the shapes and dtype of the keys and of the values that
    call produces (values may have another head size than keys, as MLA's), so architectures with unusual head
    layouts need no table here. A layer that calls attention more than once per forward (DiffLlama) gets one
    entry per call: ``layer(i, …, call=n)``.
    """

    def __init__(self, num_layers: int, slots: int, max_seq: int, device=None, dtype=torch.float32):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.extra: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (layer, call >= 1) -> (k, v)
        self.slots, self.max_seq, self.device, self.dtype = slots, max_seq, device, dtype

    def buffers(self):
        """The allocated key/value tensors (memory accounting)."""
        return (t for t in self.k + self.v + [x for kv in self.extra.values() for x in kv] if t is not None)

    def _new(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((self.slots, like.shape[1], self.max_seq, like.shape[3]), device=like.device,
                           dtype=like.dtype)

    def layer(self, i: int, like: torch.Tensor, like_v: torch.Tensor | None = None,
              call: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        like_v = like if like_v is None else like_v
        if call:
            if (i, call) not in self.extra:
                self.extra[(i, call)] = (self._new(like), self._new(like_v))
            return self.extra[(i, call)]
        if self.k[i] is None:
            self.k[i], self.v[i] = self._new(like), self._new(like_v)
        return self.k[i], self.v[i]


@dataclass
class FlatBatch:
    """One engine step as a flat list of M tokens (vLLM's unified step): decode tokens of running rows and
    prefill chunks of new ones, in one forward that reads every weight once.

    tokens, positions, slots: (M,) long; ``decode``: (K,) indices of the single decode tokens (None when
    none); ``segments``: prefill chunks as (start, length, slot, first position) with their tokens at
    start..start+length-1; ``decode_length`` = max decode position + 1; ``decode_range`` = (lo, hi) when the
    decode tokens' slots are lo..hi-1 in order.
    """
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decode: torch.Tensor | None
    segments: list[tuple[int, int, int, int]]
    decode_length: int = 0
    decode_range: tuple[int, int] | None = None
    masks: dict = field(default_factory=dict)     # sliding window -> decode mask (K, 1, 1, L), per step
    num_real: int = -1                            # tokens before the bucket padding (-1: no padding)

    def __post_init__(self):
        if self.num_real < 0:
            self.num_real = self.tokens.shape[0]

    @classmethod
    def build(cls, decode: list[tuple[int, int, int]], chunks: list[tuple[list[int], int, int]],
              device=None, bucket: bool = False) -> FlatBatch:
        """decode: (token, position, slot) per running row; chunks: (tokens, slot, first position) per prefill
        chunk. Decode tokens come first, then the chunks, in the order given.

        ``bucket``: pad M to `token_bucket(M)` with inert tokens (they write no cache and attend to nothing),
        so the GEMM kernels see a few dozen shapes instead of every M up to the step budget.
        """
        toks, pos, slots, segments = [], [], [], []
        for t, p, s in decode:
            toks.append(t), pos.append(p), slots.append(s)
        for ids, slot, p0 in chunks:
            segments.append((len(toks), len(ids), slot, p0))
            toks.extend(ids)
            pos.extend(range(p0, p0 + len(ids)))
            slots.extend([slot] * len(ids))
        k, real = len(decode), len(toks)
        if bucket:
            pad = token_bucket(real) - real
            toks.extend([0] * pad), pos.extend([0] * pad), slots.extend([0] * pad)

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)
        dec_slots = [s for _, _, s in decode]
        dense = bool(k) and dec_slots == list(range(dec_slots[0], dec_slots[0] + k))
        return cls(t(toks), t(pos), t(slots), torch.arange(k, device=device) if k else None, segments,
                   max((p for _, p, _ in decode), default=-1) + 1,
                   (dec_slots[0], dec_slots[0] + k) if dense else None, num_real=real)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


def token_bucket(m: int) -> int:
    """Padded token count for a step of ``m`` tokens: 1, 2, 4, 8, 16, then two sizes per power of two
    (24, 32, 48, 64, 96, 128, …): at most 1/3 padding, 15 shapes up to 512.

    oneDNN builds (and keeps) a kernel per GEMM shape: a server whose step sizes took every value up to
    its token budget grew from 0.45 to 1.2 GB RSS on the demo before bucketing.
    """
    if m <= 16:
        return 1 << max(0, m - 1).bit_length()
    step = 1 << ((m - 1).bit_length() - 2)
    return -(-m // step) * step


@dataclass
class StepContext:
    """What every Twin layer and the attention kernel read during one forward."""
    w: ExpertWeights | None = None
    cache: SlotCache | None = None
    slots: torch.Tensor | None = None        # (N,) long
    positions: torch.Tensor | None = None    # (N, S) long
    length: int = 0                          # keys attended: positions.max() + 1
    masks: dict | None = None                # sliding window (None = full) -> (N, 1, S, L) bool
    slot_range: tuple[int, int] | None = None  # (lo, hi) when slots == lo..hi-1 in order: cache views, no gather
    flat: FlatBatch | None = None            # set by HFTwinModel.step: the unified layout
    calls: dict = field(default_factory=dict)  # id(attention module) -> calls so far in this forward

    def mask(self, window: int | None) -> torch.Tensor:
        m = self.masks.get(window)
        if m is None:
            m = self.masks[window] = _window_mask(self.positions, self.length, window).unsqueeze(1)
        return m


def twin_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask=None, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers attention kernel over the slot cache.

    query (N, H, S, D) and key/value (N, Hkv, S, D) arrive after transformers' projections, norms and
    rotary embedding. They are written at (slot, position) of each row, then every query attends to its
    row's cached keys 0..position (within ``sliding_window`` keys when the layer has one). Returns
    (N, S, H, D) as transformers' kernels do. ``attention_mask`` is ignored: the mask comes from the
    per-row positions.
    """
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"{type(module).__name__} passes {name!r} to its attention kernel; "
                                        f"twinserve's slot-cache attention does not implement it")
    ctx: StepContext = module._twin_ctx
    call = ctx.calls.get(id(module), 0)          # the n-th attention call of this module in this forward
    ctx.calls[id(module)] = call + 1
    k_cache, v_cache = ctx.cache.layer(module.layer_idx, key, value, call)
    if ctx.flat is not None:
        return _flat_attention(ctx.flat, k_cache, v_cache, query, key, value, scaling, sliding_window, softcap)
    slots = ctx.slots
    k_cache[slots[:, None], :, ctx.positions] = key.transpose(1, 2)     # (N, S, Hkv, D) at each row's positions
    v_cache[slots[:, None], :, ctx.positions] = value.transpose(1, 2)
    if ctx.slot_range is not None:    # the scheduler keeps running rows in low, dense slots: a view
        lo, hi = ctx.slot_range
        keys, values = k_cache[lo:hi, :, :ctx.length], v_cache[lo:hi, :, :ctx.length]   # (N, Hkv, L, D)
    else:
        keys, values = k_cache[slots, :, :ctx.length], v_cache[slots, :, :ctx.length]
    attend = _decode_attend if query.shape[2] == 1 else _attend
    out = attend(query, keys, values, ctx.mask(sliding_window), scaling, softcap)   # mask (N, 1, S, L)
    return out.transpose(1, 2).contiguous(), None


# SDPA backends for a masked block of queries on CUDA. cuDNN's attention builds an execution plan for every
# new shape, and prefill chunks come in every length: on an H200 in bf16 it spent 14 ms per call (the
# router pass and the prefill of the bench's mix took 9 of 12 s), against microseconds for the kernel.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attend(query, keys, values, mask, scaling, softcap):
    """softmax(q kᵀ · scaling [soft-capped], masked) v.  q (N, H, S, D), k/v (N, Hkv, L, D), mask (N, 1, S, L),
    or None for plain causal attention with S == L (SDPA's is_causal: no mask tensor, and its fused kernels
    skip the masked blocks; not with softcap)."""
    rep = query.shape[1] // keys.shape[1]
    if softcap is None:
        kw = {"attn_mask": mask} if mask is not None else {"is_causal": True}
        with sdpa_kernel(_CUDA_SDPA) if query.is_cuda else contextlib.nullcontext():   # not cuDNN: _CUDA_SDPA
            return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=rep > 1, **kw)
    # tanh soft-capping of the scores (Gemma 2): softmax in fp32 as transformers' eager kernel
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = (query @ keys.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ values


def _decode_attend(query, keys, values, mask, scaling, softcap):
    """One query per row: q (K, H, 1, D), k/v (K, Hkv, L, D) cache views, mask (K, 1, 1, L) -> (K, H, 1, D).

    Two batched matmuls with the query heads of a KV group as the rows of one product (GQA without
    repeating the keys) and an fp32 softmax, as transformers' eager kernel computes it. On CPU this is
    faster than SDPA's flash kernel for a single query (1.3x in fp32, 2.2x in bf16, at 16 rows x 16 heads
    x 41 keys), whose blocking is built for many queries. On CUDA it is SDPA (`_attend`).
    """
    if query.is_cuda:     # SDPA's fused kernels launch once where this takes six launches
        return _attend(query, keys, values, mask, scaling, softcap)
    k, h, _, dim = query.shape
    hkv = keys.shape[1]
    if keys.dtype != torch.float32:   # CPU bf16 matmul over a strided cache view copies slowly inside: 4x
        keys, values = keys.contiguous(), values.contiguous()   # slower than this copy plus a dense matmul
    q = query.reshape(k, hkv, h // hkv, dim)
    scores = (q @ keys.transpose(-1, -2)) * (scaling if scaling is not None else dim ** -0.5)   # (K, Hkv, rep, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype) @ values           # (K, Hkv, rep, Dv)
    return out.reshape(k, h, 1, values.shape[-1])


def _window_mask(q_pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """(…, S) query positions -> (…, S, L) bool: key j visible when j <= q (and j > q − window, transformers'
    sliding_window_overlay)."""
    key_pos = torch.arange(length, device=q_pos.device)
    m = key_pos <= q_pos[..., None]
    return m & (key_pos > q_pos[..., None] - window) if window is not None else m


def _flat_attention(flat: FlatBatch, k_cache, v_cache, query, key, value, scaling, window, softcap):
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
        o = _decode_attend(query if pure_decode else query[d], keys, values, mask, scaling, softcap)
        if pure_decode:
            return o.transpose(1, 2), None
        out[d] = o
    for i, (start, n, slot, p0) in enumerate(flat.segments):
        q = query[start:start + n].transpose(0, 2)                  # (1, H, n, D)
        length = p0 + n
        if p0 == 0 and softcap is None and (window is None or n <= window):
            mask = None       # a whole prompt from position 0: plain causal, SDPA's own is_causal
        else:
            mask = flat.masks.get((i, window))
            if mask is None:  # the same for every layer with this window: built once per step
                mask = flat.masks[(i, window)] = _window_mask(torch.arange(p0, length, device=query.device),
                                                              length, window)[None, None]
        o = _attend(q, k_cache[slot:slot + 1, :, :length], v_cache[slot:slot + 1, :, :length], mask,
                    scaling, softcap)
        out[start:start + n] = o.transpose(0, 2)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, twin_attention)


# ---- Twin layers --------------------------------------------------------------------------------------
class TwinLinear(nn.Module):
    """A linear layer (nn.Linear, or GPT-2's Conv1D with its (d_in, d_out) weight) plus routed deltas."""

    def __init__(self, base: nn.Module, ctx: StepContext):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.deltas: LowRankDeltas | None = None        # factors of δ_t as (d_out×R, R×d_in)
        self.bias_deltas: torch.Tensor | None = None    # (T, d_out)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def factors(self) -> LowRankDeltas | None:
        """B_cat, A_cat of this layer (unpacked from oneDNN's layout when prepacked)."""
        if isinstance(self.base_layer, (PackedTwinLinear, StackedTwinLinear)):
            return self.base_layer.factors()
        return self.deltas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ctx.w
        if isinstance(self.base_layer, (PackedTwinLinear, StackedTwinLinear)):
            y = self.base_layer.forward_twin(x, w)
        else:
            y = self.base_layer(x)
            if w is None:
                return y
            if self.deltas is not None and self.deltas.rank:
                y = add_delta_(y, x, self.deltas, w)
        if w is None:
            return y
        if self.bias_deltas is not None:
            b = w.w @ self.bias_deltas                  # (N, d_out)
            y = y + b.view(b.shape[0], *([1] * (y.ndim - 2)), b.shape[1])
        return y


class TwinEmbedding(nn.Module):
    """An embedding (or a scaled one, as Gemma 3's) plus routed low-rank deltas of its table."""

    def __init__(self, base: nn.Embedding, ctx: StepContext):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.deltas: LowRankDeltas | None = None        # B_cat (V, R), A_cat (R, H)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.base_layer(tokens)                      # (N, S, H)
        w = self.ctx.w
        if w is None or self.deltas is None or not self.deltas.rank:
            return e
        d = (self.deltas.B_cat[tokens] * w.columns(self.deltas.idx, self.deltas.offsets).unsqueeze(1)) @ self.deltas.A_cat
        scale = getattr(self.base_layer, "embed_scale", None)
        return e + (d * scale.to(d.dtype) if scale is not None else d)


class TwinNorm(nn.Module):
    """A norm whose gain (and bias) carry routed dense 1-D deltas: each row gets g* + w @ Δg.

    RMSNorm-style classes use their weight elementwise (g·x̂, or Gemma's (1+g)·x̂), so their own forward
    runs with the per-row gain (N, 1, …, H) in place of g; nn.LayerNorm normalises first, then applies
    the per-row gain and bias.
    """

    def __init__(self, base: nn.Module, ctx: StepContext):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.deltas: torch.Tensor | None = None          # (T, H)
        self.bias_deltas: torch.Tensor | None = None     # (T, H)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ctx.w
        base = self.base_layer
        if w is None or (self.deltas is None and self.bias_deltas is None):
            return base(x)
        shape = (x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1])

        def rows(p, d):
            return p if d is None else (p + w.w @ d).view(shape)

        if isinstance(base, nn.LayerNorm):
            y = F.layer_norm(x, base.normalized_shape, None, None, base.eps)
            y = y * rows(base.weight, self.deltas)
            return y + rows(base.bias, self.bias_deltas) if base.bias is not None else y
        saved = base._parameters["weight"]
        base._parameters["weight"] = rows(saved, self.deltas)
        try:
            return base(x)
        finally:
            base._parameters["weight"] = saved


def delta_refusal(model: nn.Module, param: str) -> str | None:
    """Why tensor ``param`` of ``model`` (a transformers model, possibly on the meta device) cannot carry a routed
    exclusive delta, or None when a Twin layer serves it: a linear's weight and bias (nn.Linear, GPT-2's
    Conv1D), an embedding table (plain, or scaled as Gemma 3's), a norm's gain and bias."""
    path, _, attr = param.rpartition(".")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return "not a parameter of the model"
    if isinstance(mod, (TwinLinear, TwinEmbedding, TwinNorm)):
        mod = mod.base_layer
    kind = type(mod).__name__
    if isinstance(mod, (nn.Linear, Conv1D, PackedLinear)):
        return None if attr in ("weight", "bias") else f"{attr} of a {kind} has no Twin layer"
    if isinstance(mod, nn.Embedding):
        if type(mod) is not nn.Embedding and not hasattr(mod, "embed_scale"):
            return f"embedding class {kind} is not supported for exclusive deltas"
        return None if attr == "weight" else f"{attr} of an embedding has no Twin layer"
    if isinstance(mod, nn.LayerNorm) or _is_rms_norm(mod):
        return None if attr in ("weight", "bias") else f"{attr} of a {kind} has no Twin layer"
    return f"exclusive deltas on a {kind} are not supported"


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _as_range(slots: torch.Tensor) -> tuple[int, int] | None:
    lo, n = int(slots[0]), slots.shape[0]
    if n == 1 or bool((slots == torch.arange(lo, lo + n, device=slots.device)).all()):
        return lo, lo + n
    return None


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is reordered once into oneDNN's blocked layout (CPU).

    The packed tensor is the only copy of W; ``weight`` unpacks it (exactly) for the reference paths.
    Measured at hidden 1024, batch 16, one thread: 2.7x faster than F.linear on the same weight.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedTwinLinear(nn.Module):
    """W* and A_cat stacked into one oneDNN-packed weight, B_cat packed on its own (CPU).

        [y; h] = [W*; A_cat] x + [b*; 0]          one GEMM reads x once for the backbone and the shrink
        y     += B_cat (h ⊙ w[:, idx])             the expand, (d_out × R)

    Measured at hidden 1024, R 128, batch 16, one thread: 208 µs against 258 µs for F.linear plus two
    unpacked thin matmuls (backbone alone: 148 µs). The packed tensors are the only copies of W*, A_cat
    and B_cat; ``weight`` and ``factors()`` unpack them exactly.
    """

    def __init__(self, linear: nn.Linear, d: LowRankDeltas, batch_hint: int):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wa = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w, d.A_cat.to(w.dtype)]).contiguous(),
                                                          batch_hint)
        self.b = torch.ops.mkldnn._reorder_linear_weight(d.B_cat.to(w.dtype).contiguous(), batch_hint)
        self.bias = (None if linear.bias is None else
                     torch.cat([linear.bias.detach(), linear.bias.new_zeros(d.rank)]))
        self.idx, self.num_experts, self.offsets = d.idx, d.num_experts, d.offsets

    @property
    def weight(self) -> torch.Tensor:
        return self.wa.to_dense()[: self.out_features]

    def factors(self) -> LowRankDeltas:
        return LowRankDeltas(self.wa.to_dense()[self.out_features:].contiguous(), self.b.to_dense(), self.idx,
                             self.num_experts, self.offsets)

    def forward_twin(self, x: torch.Tensor, w: ExpertWeights | None) -> torch.Tensor:
        yh = torch.ops.mkldnn._linear_pointwise(x, self.wa, self.bias, "none", [], "")
        y = yh[..., : self.out_features]
        if w is None:
            return y.contiguous()
        h = scale_by_expert(yh[..., self.out_features:], w, self.idx, self.offsets)
        return y + torch.ops.mkldnn._linear_pointwise(h, self.b, None, "none", [], "")


class StackedTwinLinear(nn.Module):
    """W* and A_cat stacked in one dense weight (GPU): the PackedTwinLinear layout without oneDNN.

        [y; h] = [W*; A_cat] x + [b*; 0]          one GEMM for the backbone and the shrink
        y     += B_cat (h ⊙ w[:, idx])             accumulated into y inside the expand GEMM (addmm_)

    Three kernels a layer where F.linear plus a separate shrink, scale, expand and add take five: a decode
    step on a GPU is launch-bound. ``wa`` is the only copy of W* and A_cat; ``weight`` (its first d_out
    rows) and ``factors()`` are views of it. θ*-only rows (w None) multiply by those rows alone. The layer
    output is a column slice of [y; h] (row stride d_out + R), which transformers' projections reshape
    and slice as they do a contiguous one.
    """

    def __init__(self, linear: nn.Linear, d: LowRankDeltas):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wa = torch.cat([w, d.A_cat.to(w.dtype)]).contiguous()
        self.b = d.B_cat.to(w.dtype).contiguous()
        self.bias = linear.bias
        self.bias_wa = (None if linear.bias is None else
                        torch.cat([linear.bias.detach(), linear.bias.new_zeros(d.rank)]))
        self.idx, self.num_experts, self.offsets = d.idx, d.num_experts, d.offsets

    @property
    def weight(self) -> torch.Tensor:
        return self.wa[: self.out_features]

    def factors(self) -> LowRankDeltas:
        return LowRankDeltas(self.wa[self.out_features:], self.b, self.idx, self.num_experts, self.offsets)

    def forward_twin(self, x: torch.Tensor, w: ExpertWeights | None) -> torch.Tensor:
        if w is None:
            return F.linear(x, self.wa[: self.out_features], self.bias)
        o = self.out_features
        yh = F.linear(x, self.wa, self.bias_wa)                        # (N, [S,] d_out + R)
        h = scale_by_expert(yh[..., o:], w, self.idx, self.offsets)
        y = yh[..., :o]
        y.view(-1, o).addmm_(h.reshape(-1, h.shape[-1]), self.b.T)     # in place (view() never copies)
        return y


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking: CPU with mkldnn, fp32 (or bf16 where the CPU has native bf16 dot products)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _StopForward(Exception):
    pass


@dataclass
class ModelArgs:
    num_layers: int
    hidden_size: int
    vocab_size: int


# ---- the model ----------------------------------------------------------------------------------------
class HFTwinModel(nn.Module):
    """θ* in transformers' own model class, plus routed exclusive deltas. Parameter names are the HF names."""

    def __init__(self, config: PretrainedConfig, state: dict[str, torch.Tensor]):
        super().__init__()
        cls = causal_lm_class(config)
        config = copy.deepcopy(config)
        config._attn_implementation = ATTN_IMPLEMENTATION
        self.config = config
        any_t = next(iter(state.values()))
        from transformers.initialization import no_init_weights
        with no_init_weights(), torch.device(any_t.device):
            hf = cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=any_t.dtype)
        hf.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties the head
        self.hf = hf.eval().requires_grad_(False)   # inference only: no autograd graph, even outside inference_mode
        self._load_state(state)
        self.ctx = StepContext()
        for m in hf.modules():
            if hasattr(m, "layer_idx") and "Attention" in type(m).__name__:
                m._twin_ctx = self.ctx
        self.base = hf.base_model
        self.layers = next((m for m in self.base.children()
                            if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers), None)
        self.args = ModelArgs(config.num_hidden_layers, config.hidden_size, config.vocab_size)
        self.num_experts = 0
        self.expert_names: list[str] = []
        self._packed: dict[str, PackedLinear] = {}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        hf = self.hf
        params = dict(hf.named_parameters(remove_duplicate=False))
        buffers = {n for n, _ in hf.named_buffers()}
        emb = hf.get_input_embeddings()
        head = hf.get_output_embeddings()
        self.tied = head is not None and head.weight is emb.weight
        self._embedding_name = next(n for n, p in params.items() if p is emb.weight)
        load = {}
        for name, t in state.items():
            if name in params:
                if tuple(t.shape) != tuple(params[name].shape):
                    raise UnsupportedModelError(f"tensor {name} has shape {tuple(t.shape)} but the config's "
                                                f"{type(hf).__name__} expects {tuple(params[name].shape)}")
                load[name] = t
            elif not (name in buffers or name.endswith(NON_PARAMETER_SUFFIXES)):
                raise UnsupportedModelError(f"tensor {name} is not a parameter of {type(hf).__name__} "
                                            f"for this config")
        loaded = {id(params[n]) for n in load}
        missing = [n for n in params if n not in load and id(params[n]) not in loaded]
        if missing:
            raise UnsupportedModelError(f"checkpoint has no tensor {missing[0]} ({len(missing)} missing)")
        hf.load_state_dict(load, strict=False, assign=True)
        if self.tied:  # assign=True replaced the embedding's Parameter: tie the head to the new one again
            head.weight = emb.weight
        self._state = {n: params_now for n, params_now in hf.state_dict(keep_vars=True).items() if n in load}

    # ---- properties the engine, router and benchmarks use ----------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    # ---- deltas -------------------------------------------------------------------------------------
    def _wrap(self, param: str) -> nn.Module:
        """The Twin layer for ``param`` (an HF name such as model.layers.0.mlp.up_proj.weight), created once."""
        path, _ = param.rsplit(".", 1)
        mod = self.hf.get_submodule(path)
        if isinstance(mod, (TwinLinear, TwinEmbedding, TwinNorm)):
            return mod
        why = delta_refusal(self.hf, param)
        if why is not None:
            raise UnsupportedModelError(f"{param}: {why}")
        if isinstance(mod, (nn.Linear, Conv1D, PackedLinear)):
            twin = TwinLinear(mod, self.ctx)
        elif isinstance(mod, nn.Embedding):
            twin = TwinEmbedding(mod, self.ctx)
        else:
            twin = TwinNorm(mod, self.ctx)
        parent, _, child = path.rpartition(".")
        setattr(self.hf.get_submodule(parent) if parent else self.hf, child, twin)
        return twin

    def attach_deltas(self, expert_names: list[str], lowrank: dict[str, LowRankDeltas],
                      dense: dict[str, torch.Tensor]) -> None:
        """lowrank: param -> factors of its 2-D deltas; dense: param -> (T, *shape) 1-D deltas (gains, biases)."""
        self.expert_names = list(expert_names)
        self.num_experts = len(expert_names)
        for param, d in lowrank.items():
            twin = self._wrap(param)
            if isinstance(twin.base_layer, Conv1D):     # stored δ is (d_in, d_out) = B A: use Aᵀ Bᵀ
                d = LowRankDeltas(d.B_cat.T.contiguous(), d.A_cat.T.contiguous(), d.idx, d.num_experts, d.offsets)
            twin.deltas = d
        emb_name = self._embedding_name
        head = self.hf.get_output_embeddings()
        if self.tied and emb_name in lowrank and not isinstance(head, TwinLinear):
            twin = TwinLinear(head, self.ctx)   # the tied head is the embedding table: same δ_t factors
            twin.deltas = lowrank[emb_name]
            self.hf.set_output_embeddings(twin)
        for param, d in dense.items():
            twin = self._wrap(param)
            if isinstance(twin, TwinEmbedding):
                raise UnsupportedModelError(f"{param}: a dense delta on an embedding is not supported")
            if param.endswith(".bias"):
                twin.bias_deltas = d
            else:
                twin.deltas = d

    # ---- forward ------------------------------------------------------------------------------------
    def _weights(self, w: torch.Tensor | ExpertWeights | None) -> ExpertWeights | None:
        """Per-row (or per-token) w in the model's dtype, grouped once for every layer of the forward."""
        if w is None:
            return None
        return (w if isinstance(w, ExpertWeights) else ExpertWeights(w)).to(self.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache, slots: torch.Tensor,
                w: torch.Tensor | ExpertWeights | None = None, logits_at: torch.Tensor | None = None,
                num_layers: int | None = None) -> torch.Tensor:
        """tokens, positions: (N, S) long; slots: (N,) long; w: (N, T) (or ExpertWeights) or None (= θ*).

        Returns logits (N, S, V) in the model's dtype, or (N, V) at column ``logits_at`` (N,) of each row.
        With ``num_layers`` it stops after that many decoder blocks and returns their hidden states (N, S, H).
        """
        ctx = self.ctx
        w = self._weights(w)
        ctx.w, ctx.cache, ctx.slots, ctx.positions, ctx.calls = w, cache, slots, positions, {}
        ctx.length, ctx.masks = int(positions.max()) + 1, {}
        ctx.slot_range = _as_range(slots)
        try:
            if num_layers is not None:
                return self._hidden_after(tokens, positions, num_layers)
            h = self.base(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
        finally:
            ctx.w = ctx.cache = ctx.slots = ctx.positions = ctx.masks = None
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at].unsqueeze(1)
        ctx.w = w  # the head may carry deltas too
        try:
            logits = self._head(h)
        finally:
            ctx.w = None
        return logits[:, 0] if logits_at is not None else logits

    def step(self, flat: FlatBatch, cache: SlotCache, w: torch.Tensor | ExpertWeights | None,
             logits_at: torch.Tensor) -> torch.Tensor:
        """One unified engine step: the M tokens of ``flat`` (decode tokens and prefill chunks) in one forward.

        w: (M, T) per-token expert weights (each token carries its row's w) or None (θ*). Returns logits
        (R, V) at the token indices ``logits_at`` (R,) only (the last token of each chunk that ends a prompt,
        every decode token, and any prompt position whose logprobs were asked for).
        """
        ctx = self.ctx
        w = self._weights(w)
        ctx.w, ctx.cache, ctx.flat, ctx.calls = w, cache, flat, {}
        try:
            h = self.base(input_ids=flat.tokens[:, None], position_ids=flat.positions[:, None],
                          use_cache=False).last_hidden_state                      # (M, 1, H)
            rows = h[logits_at]                                                    # (R, 1, H)
            if w is not None and logits_at.shape[0] != flat.num_tokens:
                ctx.w = ExpertWeights(w.w[logits_at])
            return self._head(rows)[:, 0]
        finally:
            ctx.w = ctx.cache = ctx.flat = None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head plus the logit post-processing transformers' CausalLM classes apply."""
        logits = self.hf.get_output_embeddings()(h)
        cfg = self.config
        if getattr(cfg, "logit_scale", None) is not None:            # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:         # Granite
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    @torch.inference_mode()
    def hidden_states_flat(self, flat: FlatBatch, cache: SlotCache, num_layers: int) -> torch.Tensor:
        """θ*'s hidden states after ``num_layers`` decoder blocks for the tokens of ``flat``: (M, H).

        The router's truncated pass: prompts as prefill chunks of one flat batch (bucketed, no padding
        to the longest prompt), no experts.
        """
        ctx = self.ctx
        ctx.w, ctx.cache, ctx.flat, ctx.calls = None, cache, flat, {}
        try:
            return self._hidden_after(flat.tokens[:, None], flat.positions[:, None], num_layers)[:, 0]
        finally:
            ctx.cache = ctx.flat = None

    def _hidden_after(self, tokens: torch.Tensor, positions: torch.Tensor, num_layers: int) -> torch.Tensor:
        if self.layers is None:
            raise UnsupportedModelError(f"{type(self.hf).__name__}: cannot find its decoder blocks for a truncated pass")
        captured = {}

        def hook(_module, _args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = self.layers[num_layers - 1].register_forward_hook(hook)
        try:
            self.base(input_ids=tokens, position_ids=positions, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"]

    # ---- reference path -----------------------------------------------------------------------------
    def backbone_state(self) -> dict[str, torch.Tensor]:
        """θ* under HF names, as loaded (a tied head is left out, as in tied checkpoints)."""
        return {n: (self._packed[n].weight if n in self._packed else t.detach()) for n, t in self._state.items()}

    def prepack(self, batch_hint: int = 16) -> int:
        """Reorder every untied nn.Linear weight into oneDNN's layout (CPU; see PackedLinear). Returns the count.

        Call after ``attach_deltas``: Twin layers keep their wrapper and pack their base layer.
        """
        if not can_prepack(self.device, self.dtype):
            return 0
        # Twin layers: backbone + shrink in one GEMM
        count = self._stack_twin_layers(lambda linear, d: PackedTwinLinear(linear, d, batch_hint))
        head = self.hf.get_output_embeddings()
        head = head.base_layer if isinstance(head, TwinLinear) else head
        for name, mod in list(self.hf.named_modules()):
            if type(mod) is not nn.Linear or (self.tied and mod is head):
                continue
            packed = PackedLinear(mod, batch_hint)
            parent, _, child = name.rpartition(".")
            setattr(self.hf.get_submodule(parent) if parent else self.hf, child, packed)
            key = name.replace(".base_layer", "") + ".weight"
            self._packed[key] = packed
            self._state[key] = torch.empty(0)      # drop the dense copy: the packed tensor is the only one
            count += 1
        return count

    def stack_shrink(self) -> int:
        """Stack each Twin linear's W* and A_cat into one dense weight (``StackedTwinLinear``; for GPUs, where
        oneDNN prepacking does not apply). Call after ``attach_deltas``. Returns the count."""
        return self._stack_twin_layers(StackedTwinLinear)

    def _stack_twin_layers(self, make) -> int:
        """Replace the nn.Linear base of every Twin linear with factors (not a tied head, which is the
        embedding table) by ``make(linear, deltas)``, a layer holding [W*; A_cat] as the only copy of W*."""
        head = self.hf.get_output_embeddings()
        head = head.base_layer if isinstance(head, TwinLinear) else head
        count = 0
        for name, twin in list(self.hf.named_modules()):
            if (isinstance(twin, TwinLinear) and type(twin.base_layer) is nn.Linear and twin.deltas is not None
                    and twin.deltas.rank and not (self.tied and twin.base_layer is head)):
                twin.base_layer = make(twin.base_layer, twin.deltas)
                twin.deltas = None
                self._packed[name + ".weight"] = twin.base_layer
                self._state[name + ".weight"] = torch.empty(0)   # the stacked weight holds W*
                count += 1
        return count

    def linear_macs(self) -> dict[str, int]:
        """Multiply-accumulates per token: ``backbone`` = Σ d_out·d_in over θ*'s linear layers (lm_head
        included), ``factors`` = Σ R·(d_in + d_out) over the exclusive factors of all T experts (an embedding's:
        R·H). Soft routing over every expert adds ``factors`` to each token's work; the bench's cost bounds
        use the ratio. From the shapes alone (nothing is unpacked)."""
        backbone = factors = 0
        for mod in self.hf.modules():
            if isinstance(mod, (nn.Linear, PackedLinear, PackedTwinLinear, StackedTwinLinear)):
                backbone += mod.in_features * mod.out_features
            elif isinstance(mod, Conv1D):
                backbone += mod.weight.shape[0] * mod.weight.shape[1]
            elif isinstance(mod, TwinLinear):
                base = mod.base_layer
                rank = (base.idx.shape[0] if isinstance(base, (PackedTwinLinear, StackedTwinLinear)) else
                        mod.deltas.rank if mod.deltas is not None else 0)
                d_in, d_out = ((base.in_features, base.out_features) if not isinstance(base, Conv1D)
                               else tuple(base.weight.shape))
                factors += rank * (d_in + d_out)
            elif isinstance(mod, TwinEmbedding) and mod.deltas is not None:
                factors += mod.deltas.rank * mod.deltas.A_cat.shape[1]
        return {"backbone": backbone, "factors": factors}

    def twin_layers(self) -> dict[str, nn.Module]:
        """HF parameter name of each wrapped tensor -> its Twin layer."""
        out = {}
        for name, mod in self.hf.named_modules():
            if isinstance(mod, (TwinLinear, TwinEmbedding, TwinNorm)):
                out[name.replace(".base_layer", "")] = mod
        return out

    def fused(self, w: torch.Tensor) -> HFTwinModel:
        """Reference path: a new dense model with θ* + Σ_t w_t δ̂_t materialised (w: (T,))."""
        w = w.to(device=self.device, dtype=self.dtype)
        state = self.backbone_state()
        for path, twin in self.twin_layers().items():
            d_weight = twin.factors() if isinstance(twin, TwinLinear) else getattr(twin, "deltas", None)
            for attr, d in (("weight", d_weight), ("bias", getattr(twin, "bias_deltas", None))):
                key = f"{path}.{attr}"
                if d is None or key not in state:
                    continue
                if isinstance(d, LowRankDeltas):
                    if not d.rank:
                        continue
                    if isinstance(twin.base_layer, Conv1D):
                        state[key] = materialize_weight(state[key].T, d, w).T.contiguous()
                    else:
                        state[key] = materialize_weight(state[key], d, w)
                else:
                    state[key] = state[key] + w @ d
        # a tied head is the fused embedding table of the new model, so it carries the same deltas
        return HFTwinModel(self.config, state).eval()

    def new_cache(self, slots: int, max_seq: int, layers: int | None = None) -> SlotCache:
        """``layers`` < num_layers makes a cache for a truncated pass (router features)."""
        return SlotCache(layers or self.args.num_layers, slots, max_seq, self.device, self.dtype)

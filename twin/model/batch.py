"""One engine step's inputs: the flat token batch (with its per-token expert mix and logits rows) and the
slot cache of keys and values it attends to."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twin.fusion import ExpertMix

LOGITS_CHOICES = ("none", "last", "all")


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
    prefill chunks of new ones, in one forward that reads every weight once. It is the only layout the
    model runs: the engine, the parity gate, eval, generation and the router's pass all build one.

    tokens, positions, slots: (M,) long; ``decode``: (K,) indices of the single decode tokens (None when
    none); ``segments``: prefill chunks as (start, length, slot, first position) with their tokens at
    start..start+length-1; ``decode_length`` = max decode position + 1; ``decode_range`` = (lo, hi) when the
    decode tokens' slots are lo..hi-1 in order. ``mix``: each token's expert weights (its row's w; None
    serves θ* alone); ``logits_at``: the token indices whose logits the step returns, in order, and
    ``chunk_logits[i]`` = (first returned row, count) of chunk i (decode token j is returned row j).
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
    mix: ExpertMix | None = None
    logits_at: torch.Tensor | None = None
    chunk_logits: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if self.num_real < 0:
            self.num_real = self.tokens.shape[0]

    @classmethod
    def build(cls, decode: list[tuple[int, int, int]], chunks: list[tuple[list[int], int, int]],
              device=None, bucket: bool = False, weights: list[torch.Tensor] | None = None,
              logits: str | list[str] = "last") -> FlatBatch:
        """decode: (token, position, slot) per running row; chunks: (tokens, slot, first position) per prefill
        chunk. Decode tokens come first, then the chunks, in the order given.

        ``weights``: one w (T,) per decode row, then one per chunk (None: θ* alone for the whole step); every
        token carries its row's w and bucket padding carries zeros. ``logits``: which positions of each chunk
        return logits, one of "none", "last", "all", for every chunk or as a list per chunk; every decode
        token returns its logits.

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
        modes = [logits] * len(chunks) if isinstance(logits, str) else list(logits)
        if len(modes) != len(chunks) or any(m not in LOGITS_CHOICES for m in modes):
            raise ValueError(f"logits must be one of {LOGITS_CHOICES} for every chunk, got {logits!r}")
        at, chunk_logits = list(range(k)), []
        for (start, n, _, _), m in zip(segments, modes):
            first = len(at)
            at.extend(range(start, start + n) if m == "all" else [start + n - 1] if m == "last" else [])
            chunk_logits.append((first, len(at) - first))

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)
        mix = None
        if weights is not None:
            if len(weights) != k + len(chunks):
                raise ValueError(f"weights: one per decode row and chunk ({k + len(chunks)}), got {len(weights)}")
            w = torch.stack(list(weights)).to(device)
            counts = t([1] * k + [n for _, n, _, _ in segments])
            w = w.repeat_interleave(counts, 0, output_size=real)
            if len(toks) > real:
                w = torch.cat([w, w.new_zeros(len(toks) - real, w.shape[1])])
            mix = ExpertMix(w)
        dec_slots = [s for _, _, s in decode]
        dense = bool(k) and dec_slots == list(range(dec_slots[0], dec_slots[0] + k))
        return cls(t(toks), t(pos), t(slots), torch.arange(k, device=device) if k else None, segments,
                   max((p for _, p, _ in decode), default=-1) + 1,
                   (dec_slots[0], dec_slots[0] + k) if dense else None, num_real=real, mix=mix,
                   logits_at=t(at), chunk_logits=chunk_logits)

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
    """What every Twin layer and the attention kernel read during one step (set by the model around it)."""
    mix: ExpertMix | None = None             # the expert mix of the rows the running module sees
    cache: SlotCache | None = None
    flat: FlatBatch | None = None
    calls: dict = field(default_factory=dict)  # id(attention module) -> calls so far in this forward

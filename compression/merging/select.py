"""Rank masks by |τ| without sorting: an O(n) radix select on the float bits, in bounded memory.

TIES and Breadcrumbs keep the entries of one task vector whose magnitude rank (ascending, ties broken by
index) lies in a range [lo, hi). mergekit finds them with a full int64 ``argsort`` (8 bytes per entry plus
a sorted copy); here the boundary values are found from two 65536-bin histograms of the IEEE bits of |τ|
(non-negative floats order as their int32 bit patterns), and the mask is applied chunk by chunk.

Where several entries share the boundary magnitude, mergekit's unstable sort keeps an
implementation-defined subset of them; this keeps the lowest-ranked by index (the later indices rank
higher), so both keep the same number of entries and agree everywhere else.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK = 1 << 24   # entries per histogram / mask chunk


def _chunks(flat: torch.Tensor, size: int = CHUNK) -> Iterator[torch.Tensor]:
    for lo in range(0, flat.numel(), size):
        yield flat[lo:lo + size]


@dataclass(frozen=True)
class RankBound:
    """Entries of ascending rank < r: |τ| < value, plus the first ``ties`` entries equal to value (by index)."""
    value: float
    ties: int
    everything: bool = False   # r ≥ n
    nothing: bool = False      # r ≤ 0


def rank_bound(mag: torch.Tensor, r: int) -> RankBound:
    """The boundary of ascending rank ``r`` in ``mag`` (non-negative fp32, any shape)."""
    n = mag.numel()
    if r <= 0:
        return RankBound(0.0, 0, nothing=True)
    if r >= n:
        return RankBound(0.0, 0, everything=True)
    bits = mag.reshape(-1).view(torch.int32)
    hist = torch.zeros(1 << 16, dtype=torch.long)
    for c in _chunks(bits):
        hist += torch.bincount(c >> 16, minlength=1 << 16)
    cum = torch.cumsum(hist, 0)
    hi = int(torch.searchsorted(cum, torch.tensor(r), right=True))   # bucket holding the rank-r entry
    below = int(cum[hi - 1]) if hi else 0
    low_hist = torch.zeros(1 << 16, dtype=torch.long)
    for c in _chunks(bits):
        sel = c[(c >> 16) == hi]
        low_hist += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    low_cum = torch.cumsum(low_hist, 0)
    lo = int(torch.searchsorted(low_cum, torch.tensor(r - below), right=True))
    less = below + (int(low_cum[lo - 1]) if lo else 0)
    value = torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return RankBound(value, r - less)


class RankMask:
    """Chunked mask of the entries whose ascending rank by magnitude lies in [lo, hi).

    Call ``next(mag_chunk)`` on consecutive chunks of the flattened tensor, in order: the tie counters
    carry across chunks, so the chunks together give exactly hi − lo entries.
    """

    def __init__(self, mag: torch.Tensor, lo: int, hi: int):
        self.lo, self.hi = rank_bound(mag, lo), rank_bound(mag, hi)
        self._seen_lo = self._seen_hi = 0

    def bounds(self) -> tuple[RankBound, RankBound]:
        return self.lo, self.hi

    @classmethod
    def from_bounds(cls, lo: RankBound, hi: RankBound) -> RankMask:
        """A fresh pass (tie counters at zero) over the same boundaries."""
        m = cls.__new__(cls)
        m.lo, m.hi, m._seen_lo, m._seen_hi = lo, hi, 0, 0
        return m

    @staticmethod
    def _below(b: RankBound, mag: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        if b.everything:
            return torch.ones_like(mag, dtype=torch.bool), seen
        if b.nothing:
            return torch.zeros_like(mag, dtype=torch.bool), seen
        eq = mag == b.value
        n_eq = int(eq.sum())
        if seen >= b.ties or not n_eq:          # no tie of this chunk is kept
            return mag < b.value, seen + n_eq
        if seen + n_eq <= b.ties:               # every tie of this chunk is kept
            return mag <= b.value, seen + n_eq
        order = torch.cumsum(eq.reshape(-1), 0).reshape(mag.shape) + seen   # 1-based tie index (one chunk)
        return (mag < b.value) | (eq & (order <= b.ties)), seen + n_eq

    def next(self, mag: torch.Tensor) -> torch.Tensor:
        below_hi, self._seen_hi = self._below(self.hi, mag, self._seen_hi)
        below_lo, self._seen_lo = self._below(self.lo, mag, self._seen_lo)
        return below_hi & ~below_lo


def rank_range_mask(mag: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The whole-tensor mask (same shape as ``mag``) of ascending magnitude ranks [lo, hi)."""
    flat = mag.reshape(-1)
    m = RankMask(flat, lo, hi)
    return torch.cat([m.next(c) for c in _chunks(flat)]).reshape(mag.shape) if flat.numel() else \
        torch.zeros_like(mag, dtype=torch.bool)

"""The served Twin linear (TwinLinear with the step's ExpertMix, in every kernel layout) against the
materialised-weight reference W* + Σ_t w_t B_t A_t."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tests.conftest import served_linear
from twin.fusion import ExpertMix, LowRankDeltas, merged_weight
from twin.model.kernels import can_prepack

KERNELS = ["plain", "stacked"] + (["packed"] if can_prepack(torch.device("cpu"), torch.float32) else [])

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_factors(d_in: int, d_out: int, ranks: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(0.3 * torch.randn(d_out, r, generator=g), 0.3 * torch.randn(r, d_in, generator=g)) for r in ranks]


def reference_weight(weight, factors, w_row):
    """W* + Σ_t w_t B_t A_t, straight from the per-expert factors (no concatenation, no idx)."""
    out = weight.clone()
    for t, (B, A) in enumerate(factors):
        out = out + w_row[t] * (B @ A)
    return out


def topk_weights(n: int, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Each row has exactly k non-zero weights (softmax over its top-k logits)."""
    logits = torch.randn(n, t, generator=g)
    vals, idx = logits.topk(k, dim=1)
    return torch.zeros(n, t).scatter(1, idx, torch.softmax(vals, dim=1))


CASES = [  # (d_in, d_out, ranks per expert)
    (8, 16, [2, 0, 3]),
    (33, 17, [4, 1, 0, 6]),
    (64, 64, [5, 0, 8, 2, 3]),
]


def test_from_factors_concatenates_and_indexes_columns():
    factors = make_factors(6, 5, [2, 0, 3], seed=0)
    d = LowRankDeltas.from_factors(factors)
    assert d.rank == 5 and d.num_experts == 3
    assert d.A_cat.shape == (5, 6) and d.B_cat.shape == (5, 5)
    assert d.idx.tolist() == [0, 0, 2, 2, 2]
    assert torch.equal(d.A_cat[2:], factors[2][1]) and torch.equal(d.B_cat[:, :2], factors[0][0])


@pytest.mark.parametrize("d_in,d_out,ranks", CASES)
def test_merged_weight_matches_per_expert_sum(d_in, d_out, ranks):
    factors = make_factors(d_in, d_out, ranks, seed=1)
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2))
    d = LowRankDeltas.from_factors(factors)
    w = torch.randn(len(ranks), generator=torch.Generator().manual_seed(3))
    assert_close(merged_weight(weight, d, w), reference_weight(weight, factors, w), **TOL)
    # all-zero weights leave W* untouched; one-hot picks one expert
    assert_close(merged_weight(weight, d, torch.zeros(len(ranks))), weight)
    onehot = torch.zeros(len(ranks))
    onehot[-1] = 1.0
    B, A = factors[-1]
    assert_close(merged_weight(weight, d, onehot), weight + B @ A, **TOL)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_in,d_out,ranks", CASES)
def test_twin_linear_mixed_rows_match_materialized(d_in, d_out, ranks, bias, kernel):
    g = torch.Generator().manual_seed(d_in * 7 + d_out)
    n, s, t = 5, 4, len(ranks)
    factors = make_factors(d_in, d_out, ranks, seed=d_in)
    d = LowRankDeltas.from_factors(factors)
    weight = 0.2 * torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(n, s, d_in, generator=g)
    w = torch.randn(n, t, generator=g)  # a different mixing vector in every row
    y = served_linear(x, weight, b, d, w, kernel)
    assert y.shape == (n, s, d_out)
    for i in range(n):
        W_i = merged_weight(weight, d, w[i])
        assert_close(y[i], F.linear(x[i], W_i, b), **TOL)
        assert_close(y[i], F.linear(x[i], reference_weight(weight, factors, w[i]), b), **TOL)
    # rows really differ: with a shared weight vector the output would change
    assert not torch.allclose(y, served_linear(x, weight, b, d, w[:1].expand(n, t), kernel), atol=1e-3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("d_in,d_out,ranks", CASES)
def test_twin_linear_topk_sparse_rows(d_in, d_out, ranks, k, kernel):
    g = torch.Generator().manual_seed(100 + d_in)
    n, s, t = 6, 3, len(ranks)
    d = LowRankDeltas.from_factors(make_factors(d_in, d_out, ranks, seed=d_out))
    weight = 0.2 * torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g)
    x = torch.randn(n, s, d_in, generator=g)
    w = topk_weights(n, t, k, g)
    assert ((w != 0).sum(1) == k).all()
    y = served_linear(x, weight, b, d, w, kernel)
    for i in range(n):
        assert_close(y[i], F.linear(x[i], merged_weight(weight, d, w[i]), b), **TOL)


def test_twin_linear_without_deltas_is_plain_linear():
    g = torch.Generator().manual_seed(4)
    weight, b, x = torch.randn(5, 7, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 7, generator=g)
    ref = F.linear(x, weight, b)
    d = LowRankDeltas.from_factors(make_factors(7, 5, [2, 3], seed=4))
    assert torch.equal(served_linear(x, weight, b, None, torch.ones(2, 2)), ref)
    assert torch.equal(served_linear(x, weight, b, d, None), ref)
    zero_rank = LowRankDeltas.from_factors(make_factors(7, 5, [0, 0], seed=4))
    assert zero_rank.rank == 0
    assert torch.equal(served_linear(x, weight, b, zero_rank, torch.ones(2, 2)), ref)
    assert torch.equal(merged_weight(weight, zero_rank, torch.ones(2)), weight)
    # zero weights in every row: the delta path runs but adds nothing
    assert_close(served_linear(x, weight, b, d, torch.zeros(2, 2)), ref)


def test_delta_activations_is_linear_in_w():
    g = torch.Generator().manual_seed(5)
    d = LowRankDeltas.from_factors(make_factors(10, 6, [3, 2, 4], seed=5))
    x = torch.randn(3, 2, 10, generator=g)
    w1, w2 = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    zero = torch.zeros(6, 10)

    def delta(w):   # Σ_t w_t B_t A_t x of the served op alone (W* = 0, no bias)
        return served_linear(x, zero, None, d, w)
    assert_close(delta(2.0 * w1 - w2), 2.0 * delta(w1) - delta(w2), **TOL)


def test_to_changes_dtype_and_keeps_idx_long():
    d = LowRankDeltas.from_factors(make_factors(4, 3, [1, 2], seed=6))
    d64 = d.to(dtype=torch.float64)
    assert d64.A_cat.dtype == d64.B_cat.dtype == torch.float64
    assert d64.idx.dtype == torch.long and d64.idx.tolist() == [0, 1, 1]
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    w = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    y = served_linear(x, torch.zeros(3, 4, dtype=torch.float64), None, d64, w)
    assert y.dtype == torch.float64
    assert_close(y[0], F.linear(x[0], merged_weight(torch.zeros(3, 4, dtype=torch.float64), d64, w[0])))


@pytest.mark.parametrize("x_shape", [(6, 5, 24), (6, 24)])
def test_grouped_sparse_path_equals_dense(x_shape, monkeypatch):
    """Top-k weights take the per-expert row-grouped path (fp32, CPU, wide weights); it must equal the
    concatenated path, and really run."""
    from twin import fusion

    g = torch.Generator().manual_seed(3)
    ranks = [4, 0, 3, 5, 2]
    d = LowRankDeltas.from_factors([(torch.randn(16, r, generator=g), torch.randn(r, 24, generator=g))
                                    for r in ranks])
    weight = torch.randn(16, 24, generator=g)
    w = torch.zeros(6, len(ranks))
    picks = [(0, 2), (1, 3), (0, 1), (4, 4), (2, 3), (0, 4)]  # row 3 uses one expert twice = top-1
    for row, (a, b) in enumerate(picks):
        w[row, a] = 0.7
        w[row, b] += 0.3
    mix = ExpertMix(w)
    assert mix.sparse and {t for t, _, _ in mix.groups} == {0, 1, 2, 3, 4}
    x = torch.randn(*x_shape, generator=g)
    concatenated = served_linear(x, weight, None, d, w)
    calls = []
    real = fusion.ExpertMix._grouped
    monkeypatch.setattr(fusion, "GROUPED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fusion.ExpertMix, "_grouped", lambda self, *a: calls.append(1) or real(self, *a))
    assert_close(served_linear(x, weight, None, d, w), concatenated, atol=1e-5, rtol=1e-5)
    assert calls, "the grouped path did not run"
    assert not ExpertMix(torch.softmax(torch.randn(6, 5, generator=g), -1)).sparse

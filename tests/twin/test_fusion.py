"""Activation-side batched deltas (twin_linear) against the materialised-weight reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from twin.fusion import (
    LowRankDeltas,
    active_experts,
    delta_activations,
    materialize_weight,
    twin_linear,
)

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
def test_materialize_weight_matches_per_expert_sum(d_in, d_out, ranks):
    factors = make_factors(d_in, d_out, ranks, seed=1)
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2))
    d = LowRankDeltas.from_factors(factors)
    w = torch.randn(len(ranks), generator=torch.Generator().manual_seed(3))
    assert_close(materialize_weight(weight, d, w), reference_weight(weight, factors, w), **TOL)
    # all-zero weights leave W* untouched; one-hot picks one expert
    assert_close(materialize_weight(weight, d, torch.zeros(len(ranks))), weight)
    onehot = torch.zeros(len(ranks))
    onehot[-1] = 1.0
    B, A = factors[-1]
    assert_close(materialize_weight(weight, d, onehot), weight + B @ A, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_in,d_out,ranks", CASES)
def test_twin_linear_mixed_rows_match_materialized(d_in, d_out, ranks, bias):
    g = torch.Generator().manual_seed(d_in * 7 + d_out)
    n, s, t = 5, 4, len(ranks)
    factors = make_factors(d_in, d_out, ranks, seed=d_in)
    d = LowRankDeltas.from_factors(factors)
    weight = 0.2 * torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(n, s, d_in, generator=g)
    w = torch.randn(n, t, generator=g)  # a different mixing vector in every row
    y = twin_linear(x, weight, b, d, w)
    assert y.shape == (n, s, d_out)
    for i in range(n):
        W_i = materialize_weight(weight, d, w[i])
        assert_close(y[i], F.linear(x[i], W_i, b), **TOL)
        assert_close(y[i], F.linear(x[i], reference_weight(weight, factors, w[i]), b), **TOL)
    # rows really differ: with a shared weight vector the output would change
    assert not torch.allclose(y, twin_linear(x, weight, b, d, w[:1].expand(n, t)), atol=1e-3)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("d_in,d_out,ranks", CASES)
def test_twin_linear_topk_sparse_rows(d_in, d_out, ranks, k):
    g = torch.Generator().manual_seed(100 + d_in)
    n, s, t = 6, 3, len(ranks)
    d = LowRankDeltas.from_factors(make_factors(d_in, d_out, ranks, seed=d_out))
    weight = 0.2 * torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g)
    x = torch.randn(n, s, d_in, generator=g)
    w = topk_weights(n, t, k, g)
    assert ((w != 0).sum(1) == k).all()
    y = twin_linear(x, weight, b, d, w)
    for i in range(n):
        assert_close(y[i], F.linear(x[i], materialize_weight(weight, d, w[i]), b), **TOL)


def test_select_active_experts_gives_same_output_as_full_set():
    d_in, d_out, ranks = 33, 17, [4, 1, 0, 6, 2]
    g = torch.Generator().manual_seed(9)
    d = LowRankDeltas.from_factors(make_factors(d_in, d_out, ranks, seed=9))
    weight = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(4, 3, d_in, generator=g)
    w = torch.zeros(4, 5)
    w[0, 0], w[1, 3], w[2, 0], w[2, 3], w[3, 2] = 1.0, 0.7, 0.4, 0.6, 1.0  # expert 2 has rank 0
    act = active_experts(w)
    assert act.tolist() == [0, 2, 3]
    sub = d.select(act)
    assert sub.rank == 4 + 0 + 6
    assert sub.idx.tolist() == [0] * 4 + [3] * 6  # original expert ids kept, so w[:, idx] still works
    assert sub.num_experts == 5
    assert_close(twin_linear(x, weight, None, sub, w), twin_linear(x, weight, None, d, w), **TOL)
    for i in range(4):
        assert_close(materialize_weight(weight, sub, w[i]), materialize_weight(weight, d, w[i]), **TOL)
    # selecting experts whose rows are all rank 0 / unused leaves nothing to apply
    empty = d.select(torch.tensor([2]))
    assert empty.rank == 0
    assert_close(twin_linear(x, weight, None, empty, w), F.linear(x, weight))


def test_active_experts_of_dense_and_zero_weights():
    assert active_experts(torch.ones(2, 3)).tolist() == [0, 1, 2]
    assert active_experts(torch.zeros(2, 3)).tolist() == []
    assert active_experts(torch.tensor([[0.0, -0.5, 0.0]])).tolist() == [1]  # negative weight counts


def test_twin_linear_without_deltas_is_plain_linear():
    g = torch.Generator().manual_seed(4)
    weight, b, x = torch.randn(5, 7, generator=g), torch.randn(5, generator=g), torch.randn(2, 3, 7, generator=g)
    ref = F.linear(x, weight, b)
    d = LowRankDeltas.from_factors(make_factors(7, 5, [2, 3], seed=4))
    assert torch.equal(twin_linear(x, weight, b, None, torch.ones(2, 2)), ref)
    assert torch.equal(twin_linear(x, weight, b, d, None), ref)
    zero_rank = LowRankDeltas.from_factors(make_factors(7, 5, [0, 0], seed=4))
    assert zero_rank.rank == 0
    assert torch.equal(twin_linear(x, weight, b, zero_rank, torch.ones(2, 2)), ref)
    assert torch.equal(materialize_weight(weight, zero_rank, torch.ones(2)), weight)
    # zero weights in every row: the delta path runs but adds nothing
    assert_close(twin_linear(x, weight, b, d, torch.zeros(2, 2)), ref)


def test_delta_activations_is_linear_in_w():
    g = torch.Generator().manual_seed(5)
    d = LowRankDeltas.from_factors(make_factors(10, 6, [3, 2, 4], seed=5))
    x = torch.randn(3, 2, 10, generator=g)
    w1, w2 = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    lhs = delta_activations(x, d, 2.0 * w1 - w2)
    assert_close(lhs, 2.0 * delta_activations(x, d, w1) - delta_activations(x, d, w2), **TOL)


def test_to_changes_dtype_and_keeps_idx_long():
    d = LowRankDeltas.from_factors(make_factors(4, 3, [1, 2], seed=6))
    d64 = d.to(dtype=torch.float64)
    assert d64.A_cat.dtype == d64.B_cat.dtype == torch.float64
    assert d64.idx.dtype == torch.long and d64.idx.tolist() == [0, 1, 1]
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    w = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    y = twin_linear(x, torch.zeros(3, 4, dtype=torch.float64), None, d64, w)
    assert y.dtype == torch.float64
    assert_close(y[0], F.linear(x[0], materialize_weight(torch.zeros(3, 4, dtype=torch.float64), d64, w[0])))


@pytest.mark.parametrize("x_shape", [(6, 5, 24), (6, 24)])
def test_grouped_sparse_path_equals_dense(x_shape):
    """Top-k weights take the per-expert row-grouped path; it must equal the concatenated path."""
    from twin import fusion
    from twin.fusion import ExpertWeights

    g = torch.Generator().manual_seed(3)
    ranks = [4, 0, 3, 5, 2]
    d = LowRankDeltas.from_factors([(torch.randn(16, r, generator=g), torch.randn(r, 24, generator=g))
                                    for r in ranks])
    w = torch.zeros(6, len(ranks))
    picks = [(0, 2), (1, 3), (0, 1), (4, 4), (2, 3), (0, 4)]  # row 3 uses one expert twice = top-1
    for row, (a, b) in enumerate(picks):
        w[row, a] = 0.7
        w[row, b] += 0.3
    ew = ExpertWeights(w)
    assert ew.sparse and {t for t, _, _ in ew.groups} == {0, 1, 2, 3, 4}
    x = torch.randn(*x_shape, generator=g)
    assert_close(fusion._grouped_delta(x, d, ew), delta_activations(x, d, w), atol=1e-5, rtol=1e-5)
    assert_close(delta_activations(x, d, ew), delta_activations(x, d, w), atol=1e-5, rtol=1e-5)
    dense = ExpertWeights(torch.softmax(torch.randn(6, 5, generator=g), -1))
    assert not dense.sparse

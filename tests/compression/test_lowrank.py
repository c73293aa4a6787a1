"""Truncated SVD of exclusive deltas: fixed rank, energy policy, randomized path, edge cases."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from compression import lowrank
from compression.lowrank import rank_for_energy, truncated_svd


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_spectrum(d_out: int, d_in: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with orthonormal U (d_out×k), V (d_in×k): singular values exactly ``s``."""
    k = len(s)
    U, V = orthonormal(d_out, k, seed), orthonormal(d_in, k, seed + 1)
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def rank3(d_out=24, d_in=18, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, 3, generator=g) @ torch.randn(3, d_in, generator=g)


def test_fixed_rank_recovers_a_rank3_matrix_exactly():
    d = rank3()
    lr3 = truncated_svd(d, rank=3)
    assert lr3.rank == 3 and lr3.B.shape == (24, 3) and lr3.A.shape == (3, 18)
    assert lr3.rel_error < 1e-5
    assert_close(lr3.B @ lr3.A, d, atol=1e-4, rtol=1e-4)
    lr2 = truncated_svd(d, rank=2)
    assert lr2.rank == 2
    assert lr2.rel_error > 0.01
    # rank above min(d_out, d_in) is clipped
    assert truncated_svd(d, rank=100).rank == 18


def test_rel_error_is_frobenius_ratio_of_the_residual():
    d = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    for r in (1, 4, 10):
        lr = truncated_svd(d, rank=r)
        expected = (torch.linalg.norm(d - lr.B @ lr.A) / torch.linalg.norm(d)).item()
        assert lr.rel_error == pytest.approx(expected, rel=1e-5)
        # Eckart–Young: the optimal rank-r residual is the tail of the spectrum
        s = torch.linalg.svdvals(d.double())
        assert lr.rel_error == pytest.approx((s[r:].norm() / s.norm()).item(), rel=1e-4)


def test_factors_are_B_equals_U_S_and_A_equals_Vt():
    s = [6.0, 3.0, 1.0]
    d = with_spectrum(10, 8, s, seed=3).float()
    lr = truncated_svd(d, rank=2)
    assert_close(lr.B.norm(dim=0), torch.tensor(s[:2]), atol=1e-5, rtol=1e-5)  # columns of U·S
    assert_close(lr.A @ lr.A.T, torch.eye(2), atol=1e-5, rtol=1e-5)  # rows of Vᵀ orthonormal


def test_rank_for_energy_hand_vector():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])  # s² = 100, 25, 4, 1, .25 ; total 130.25
    # cumulative fractions: .7678, .9597, .9904, .9981, 1
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 100 / 130.25) == 1  # exactly at the boundary
    assert rank_for_energy(s, 0.77) == 2
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 0.96) == 3
    assert rank_for_energy(s, 0.999) == 5
    assert rank_for_energy(s, 1.0) == 5
    assert rank_for_energy(torch.zeros(4), 0.9) == 0


def test_energy_policy_picks_smallest_rank_meeting_the_fraction():
    s = [10.0, 5.0, 2.0, 1.0, 0.5]
    d = with_spectrum(16, 12, s, seed=5).float()
    for energy, r in ((0.5, 1), (0.9, 2), (0.96, 3), (0.995, 4), (1.0, 5)):
        lr = truncated_svd(d, energy=energy)
        assert lr.rank == r, energy
        tail = sum(x * x for x in s[r:]) / sum(x * x for x in s)
        assert lr.rel_error == pytest.approx(tail ** 0.5, abs=1e-5)
        assert 1 - lr.rel_error ** 2 >= energy - 1e-5
    assert truncated_svd(d, energy=0.995, max_rank=2).rank == 2  # capped
    assert truncated_svd(d, energy=0.5, max_rank=3).rank == 1   # cap does not raise the rank


def test_zero_delta_gives_rank_zero():
    for kw in ({"rank": 4}, {"energy": 0.9}):
        lr = truncated_svd(torch.zeros(7, 5), **kw)
        assert lr.rank == 0 and lr.rel_error == 0.0
        assert lr.B.shape == (7, 0) and lr.A.shape == (0, 5)
        assert torch.equal(lr.B @ lr.A, torch.zeros(7, 5))


def test_rank_zero_keeps_nothing():
    d = rank3()
    lr = truncated_svd(d, rank=0)
    assert lr.rank == 0 and lr.rel_error == pytest.approx(1.0)


def test_randomized_svd_matches_exact_on_low_rank(monkeypatch):
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(k) or real(*a, **k))
    d = with_spectrum(120, 90, [9.0, 7.0, 4.0, 2.0, 1.0], seed=7).float()
    rnd = truncated_svd(d, rank=5, method="randomized")
    assert calls and calls[0]["q"] == 13  # rank + 8 oversampling
    ex = truncated_svd(d, rank=5, method="exact")
    assert rnd.rel_error < 1e-4 and ex.rel_error < 1e-4
    assert_close(rnd.B @ rnd.A, ex.B @ ex.A, atol=1e-4, rtol=1e-4)
    r3 = truncated_svd(d, rank=3, method="randomized")
    assert r3.rel_error == pytest.approx(truncated_svd(d, rank=3).rel_error, rel=1e-3)
    # the energy policy always needs the full spectrum: exact SVD even when randomized is asked for
    calls.clear()
    # s² = 81, 49, 16, 4, 1 (total 151): cumulative .536, .861, .967 -> 3 for 0.9
    assert truncated_svd(d, energy=0.9, method="randomized").rank == 3
    assert not calls


def test_auto_uses_exact_below_threshold_and_randomized_above(monkeypatch):
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = rank3(80, 60)
    truncated_svd(d, rank=3)
    assert not calls
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX_ELEMENTS", 100)
    lr = truncated_svd(d, rank=3)
    assert calls and lr.rel_error < 1e-4 and lr.method == "randomized"
    calls.clear()
    # a rank near full (r + 8 ≥ min(d)/2) gains nothing from the range finder: exact
    assert truncated_svd(d, rank=25).method == "exact" and not calls


def test_randomized_error_is_measured_against_the_delta():
    """rel_error is ||δ − B A|| / ||δ|| of the factors returned, whichever path made them."""
    torch.manual_seed(3)
    d = torch.randn(300, 200)
    for method in ("exact", "randomized"):
        lr = truncated_svd(d, rank=10, method=method)
        direct = float(torch.linalg.matrix_norm(d - lr.B @ lr.A) / torch.linalg.matrix_norm(d))
        assert lr.rel_error == pytest.approx(direct, rel=1e-5)
    # on a random (flat) spectrum the randomized factors stay within a few % of the optimal error
    assert truncated_svd(d, rank=10, method="randomized").rel_error < 1.03 * truncated_svd(d, rank=10).rel_error


def test_input_dtype_is_factored_in_fp32():
    d = rank3().to(torch.bfloat16)
    lr = truncated_svd(d, rank=3)
    assert lr.A.dtype == lr.B.dtype == torch.float32
    ref = truncated_svd(d.float(), rank=3)
    assert_close(lr.B @ lr.A, ref.B @ ref.A)
    assert lr.rel_error == pytest.approx(ref.rel_error, rel=1e-6)
    assert lr.rel_error < 0.01  # bf16 rounding only


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_non_2d_input_raises(shape):
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.ones(shape), rank=1)


@pytest.mark.parametrize("kw", [{}, {"rank": 2, "energy": 0.9}])
def test_exactly_one_policy_required(kw):
    with pytest.raises(ValueError, match="exactly one"):
        truncated_svd(torch.ones(3, 3), **kw)


# ----------------------------------------------------------------------------- quantised factors

def random_delta(d_out=48, d_in=40, seed=3) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def test_int8_factors_round_within_half_a_step_and_the_error_is_reported():
    from twin.artifact import dequantize_factor

    d = random_delta()
    lr = truncated_svd(d, rank=8)
    st = lowrank.quantize_factors(lr, "int8")
    assert st.B.dtype == st.A.dtype == torch.int8 and st.B.shape == (48, 8) and st.A.shape == (8, 40)
    assert st.B_scale.shape == st.A_scale.shape == (8,) and st.B_scale.dtype == torch.float32
    # absmax per rank component: the largest |entry| of every column of B / row of A maps to ±127
    assert torch.equal(st.B.abs().amax(0), torch.full((8,), 127, dtype=torch.int8))
    assert torch.equal(st.A.abs().amax(1), torch.full((8,), 127, dtype=torch.int8))
    Bq = st.B.float() * st.B_scale[None, :]
    Aq = st.A.float() * st.A_scale[:, None]
    assert ((Bq - lr.B).abs() <= st.B_scale[None, :] / 2 + 1e-7).all()
    assert ((Aq - lr.A).abs() <= st.A_scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_factor(st.B, st.B_scale, 1), Bq)
    assert torch.equal(dequantize_factor(st.A, st.A_scale, 0), Aq)
    err = lowrank.dequantized_error(lr, st, torch.linalg.matrix_norm(d).item())
    direct = (torch.linalg.matrix_norm(lr.B @ lr.A - Bq @ Aq) / torch.linalg.matrix_norm(d)).item()
    assert err == pytest.approx(direct, rel=1e-5)
    # bounded: entries off by ≤ s/2 give ≤ ~0.5 % of the product here, far below the rank-8 truncation
    assert 0 < err < 0.01 < lr.rel_error
    assert st.nbytes == (48 + 40) * 8 + 2 * 8 * 4


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.01), ("float16", 0.002), ("float32", 0.0)])
def test_float_factors_are_cast_and_their_error_is_bounded(dtype, tol):
    d = random_delta()
    lr = truncated_svd(d, rank=8)
    st = lowrank.quantize_factors(lr, dtype)
    assert st.B_scale is None and str(st.A.dtype) == f"torch.{dtype}"
    err = lowrank.dequantized_error(lr, st, torch.linalg.matrix_norm(d).item())
    assert err <= tol and (err > 0) == (dtype != "float32")
    assert st.nbytes == (48 + 40) * 8 * lowrank.FACTOR_BYTES[dtype]


def test_empty_and_zero_deltas_quantise_to_nothing():
    lr = truncated_svd(torch.zeros(6, 5), rank=3)
    st = lowrank.quantize_factors(lr, "int8")
    assert st.B.shape == (6, 0) and st.A.shape == (0, 5) and st.nbytes == 0
    assert lowrank.dequantized_error(lr, st, 0.0) == 0.0


# ----------------------------------------------------------------------------- budgeted ranks

def test_budget_goes_to_the_largest_singular_values_across_tensors():
    spectra = {"x": torch.tensor([10.0, 1.0, 0.1]), "y": torch.tensor([5.0, 4.0, 3.0])}
    shapes = {"x": (8, 8), "y": (8, 8)}
    per = lowrank.bytes_per_rank((8, 8), "float32")
    assert per == 64
    assert lowrank.allocate_ranks(spectra, shapes, 3 * per, "float32") == {"x": 1, "y": 2}
    assert lowrank.allocate_ranks(spectra, shapes, 3 * per + per - 1, "float32") == {"x": 1, "y": 2}
    assert lowrank.allocate_ranks(spectra, shapes, 5 * per, "float32") == {"x": 2, "y": 3}
    assert lowrank.allocate_ranks(spectra, shapes, 5 * per, "float32", max_rank=1) == {"x": 1, "y": 1}
    assert lowrank.allocate_ranks(spectra, shapes, 0, "float32") == {"x": 0, "y": 0}


def test_budget_counts_bytes_per_component_so_cheap_tensors_get_more():
    # same spectrum, but a column of "wide" costs 4x as much: energy per byte favours "thin"
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    spectra, shapes = {"thin": s, "wide": s}, {"thin": (8, 8), "wide": (32, 32)}
    assert lowrank.bytes_per_rank((8, 8), "int8") == 24 and lowrank.bytes_per_rank((32, 32), "int8") == 72
    # by s²/byte: thin 16/24, thin 9/24, wide 16/72, thin 4/24, [wide 9/72 does not fit], thin 1/24
    ranks = lowrank.allocate_ranks(spectra, shapes, 168, "int8")
    assert ranks == {"thin": 4, "wide": 1}
    used = sum(r * lowrank.bytes_per_rank(shapes[k], "int8") for k, r in ranks.items())
    assert used == 168


def test_budget_allocation_is_optimal_for_equal_shapes():
    """With equal costs the greedy choice keeps the most energy any rank assignment within the budget can."""
    import itertools

    g = torch.Generator().manual_seed(0)
    spectra = {k: torch.sort(torch.rand(5, generator=g) * (i + 1), descending=True).values for i, k in enumerate("abc")}
    shapes = dict.fromkeys(spectra, (6, 6))
    per = lowrank.bytes_per_rank((6, 6), "bfloat16")
    for units in range(16):
        ranks = lowrank.allocate_ranks(spectra, shapes, units * per, "bfloat16")
        kept = sum(spectra[k][:r].pow(2).sum().item() for k, r in ranks.items())
        best = max(sum(spectra[k][:r].pow(2).sum().item() for k, r in zip("abc", combo))
                   for combo in itertools.product(range(6), repeat=3) if sum(combo) <= units)
        assert sum(ranks.values()) == min(units, 15)
        assert kept == pytest.approx(best, rel=1e-9)

"""Merge methods on small hand-computed tensors (mergekit parity on real checkpoints: test_mergekit.py)."""
from __future__ import annotations

import typing

import pytest
import torch
from torch.testing import assert_close

from compression.merging import MERGE_METHODS, merge_params, merge_state, merge_tensor
from compression.merging.consensus import elect_sign, mix
from compression.merging.dare import dare_linear_merge, dare_ties_merge
from compression.merging.sparsify import bernoulli, l1_rescale, magnitude, magnitude_outliers
from compression.merging.task_arithmetic import task_arithmetic_merge
from compression.merging.ties import ties_merge
from compression.recipe import MergeName

T = torch.tensor
ONES = torch.ones(3)

# Three task vectors of 4 entries, used for the hand-computed TIES example.
TV = T([[4.0, -1.0, 3.0, -2.5],
        [2.0, 5.0, 1.0, -0.2],
        [-1.0, -6.0, 2.0, 0.1]])


def test_registry_matches_recipe_and_declares_mergekit_defaults():
    assert set(MERGE_METHODS) == set(typing.get_args(MergeName))
    assert MERGE_METHODS["ties"].fn is ties_merge
    assert MERGE_METHODS["ties"].defaults == {"normalize": True, "rescale": False}
    assert MERGE_METHODS["dare_ties"].defaults == {"normalize": False, "rescale": True}
    assert MERGE_METHODS["linear"].defaults == {"normalize": True} and MERGE_METHODS["linear"].uses_base


def test_merge_params_picks_each_methods_arguments_and_defaults():
    kw = {"lam": 0.7, "density": 0.3, "seed": 5, "int8_mask": True, "weights": [1.0, 2.0],
          "densities": [None, 0.9]}
    assert merge_params("task_arithmetic", **kw) == {"lam": 0.7, "normalize": False, "weights": [1.0, 2.0]}
    assert merge_params("ties", **kw) == {"densities": [0.3, 0.9], "lam": 0.7, "normalize": True, "rescale": False,
                                          "consensus": "sum", "weights": [1.0, 2.0]}
    assert merge_params("dare_linear", **kw)["rescale"] is True
    assert merge_params("dare_ties", normalize=True, rescale=False)["normalize"] is True
    assert merge_params("dare_ties", normalize=True, rescale=False)["rescale"] is False
    assert merge_params("average", **kw) == {"weights": [1.0, 2.0]}
    assert merge_params("linear", base_weight=0.5) == {"normalize": True, "base_weight": 0.5}


# ----------------------------------------------------------------------------- sparsification

def test_magnitude_keeps_int_density_n_entries():
    assert_close(magnitude(TV[0], 0.5), T([4.0, 0.0, 3.0, 0.0]))
    assert_close(magnitude(TV[1], 0.25), T([0.0, 5.0, 0.0, 0.0]))
    assert torch.equal(magnitude(TV[0], 1.0), TV[0])
    # int(0.74·4) = 2 entries, where round() would keep 3; at least one entry always survives
    assert int((magnitude(TV[0], 0.74) != 0).sum()) == 2
    assert_close(magnitude(T([0.5, -2.0, 1.0]), 0.01), T([0.0, -2.0, 0.0]))
    x = torch.randn(86_848, generator=torch.Generator().manual_seed(0))
    assert int((magnitude(x, 0.2) != 0).sum()) == int(0.2 * 86_848) == 17_369


def test_magnitude_is_over_the_whole_tensor_not_per_row():
    tv = T([[9.0, -8.0, 1.0], [2.0, 3.0, 4.0]])  # density 1/3 -> k = 2 of 6
    assert_close(magnitude(tv, 1 / 3), T([[9.0, -8.0, 0.0], [0.0, 0.0, 0.0]]))


def test_l1_rescale_matches_the_original_norm():
    tau = T([1.0, -2.0, 3.0, -4.0])
    kept = T([0.0, -2.0, 0.0, -4.0])
    assert_close(l1_rescale(tau, kept), kept * (10.0 / 6.0))
    assert_close(magnitude(tau, 0.5, rescale=True), T([0.0, 0.0, 3.0, -4.0]) * (10.0 / 7.0))
    assert torch.equal(l1_rescale(tau, torch.zeros(4)), torch.zeros(4))


def test_bernoulli_keeps_density_fraction_and_rescales_to_l1():
    tau = torch.randn(200, 200, generator=torch.Generator().manual_seed(1))
    out = bernoulli(tau, 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    kept = out != 0
    assert 0.29 < kept.float().mean().item() < 0.31
    assert_close(out.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    scale = out[kept] / tau[kept]  # one factor for all survivors: the L1 ratio, ≈ 1/density
    assert_close(scale, torch.full_like(scale, (tau.abs().sum() / (tau * kept).abs().sum()).item()))
    assert abs(scale[0].item() - 1 / 0.3) < 0.05
    raw = bernoulli(tau, 0.3, rescale=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], tau[kept])


def test_magnitude_outliers_drops_top_gamma_then_the_smallest():
    tau = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # n=10, density 0.5 -> keep 5; gamma 0.1 -> drop |10|; then drop the 4 smallest
    assert_close(magnitude_outliers(tau, 0.5, gamma=0.1), T([0, 0, 0, 0, 5.0, -6.0, 7.0, -8.0, 9.0, 0]))
    # density 0.95 keeps 9, so gamma 0.2 can drop only 1 outlier of the 2 it asks for
    assert_close(magnitude_outliers(tau, 0.95, gamma=0.2), T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, 0]))


# ----------------------------------------------------------------------------- sign election + mix

def test_elect_sign_sum_uses_mass_count_uses_votes_and_zero_elects_plus():
    w = T([[1.0, 0.0, 2.0], [1.0, 0.0, -2.0], [-5.0, 0.0, 0.0]])
    assert_close(elect_sign(w, "sum"), T([-1.0, 1.0, 1.0]))    # Σ = [-3, 0, 0]: an exact 0 elects +
    assert_close(elect_sign(w, "count"), T([1.0, 1.0, 1.0]))   # votes [+1, 0, 0]
    with pytest.raises(ValueError, match="consensus"):
        elect_sign(w, "median")


def test_mix_disjoint_mean_divides_by_the_agreeing_weights():
    sparse = T([[1.0, 4.0, 0.0, -3.0],
                [1.0, 0.0, 0.0, -1.0],
                [-5.0, 2.0, 0.0, 2.0]])
    w = T([1.0, 2.0, 0.5])
    # weighted: [1,4,0,-3], [2,0,0,-2], [-2.5,1,0,1]; Σ = [0.5, 5, 0, -4] -> γ = [+,+,+,-]
    # col0: agree t0,t1 -> (1+2)/(1+2) = 1; col1: t0,t2 -> (4+1)/(1+.5); col2: none -> 0; col3: t0,t1 -> -5/3
    out = mix(sparse, w, "sum", normalize=True)
    assert_close(out, T([1.0, 5.0 / 1.5, 0.0, -5.0 / 3.0]))
    assert_close(mix(sparse, w, "sum", normalize=False, lam=2.0), 2 * T([3.0, 5.0, 0.0, -5.0]))
    assert_close(mix(sparse, w, None, normalize=True), T([0.5, 5.0, 0.0, -4.0]) / 3.5)


def test_ties_merge_full_example_by_hand():
    # trim (k=2):  [4,0,3,0], [2,5,0,0], [0,-6,2,0]; Σ = [6,-1,5,0] -> γ = [+,-,+,+]
    # disjoint mean: (4+2)/2=3, -6/1, (3+2)/2=2.5, nothing agrees -> 0
    assert_close(ties_merge(TV, ONES, [0.5] * 3), T([3.0, -6.0, 2.5, 0.0]))
    assert_close(ties_merge(TV, ONES, [0.5] * 3, lam=2.0), T([6.0, -12.0, 5.0, 0.0]))
    # density 1: sums [5,-2,6,-2.6] -> [+,-,+,-]; means 3, -3.5, 2, -1.35
    assert_close(ties_merge(TV, ONES, [1.0] * 3), T([3.0, -3.5, 2.0, -1.35]))
    # weighted (2,1,1): wτ col1 = [-2,5,-6], Σ = -3 -> -; agreeing t0, t2: (-2-6)/(2+1)
    assert_close(ties_merge(TV, T([2.0, 1.0, 1.0]), [1.0] * 3), T([10 / 3, -8 / 3, 9 / 4, -5.2 / 3]))
    # sum elects the heavy negative expert, count the two light positive ones
    tv = T([[1.0], [1.0], [-5.0]])
    assert_close(ties_merge(tv, ONES, [1.0] * 3, consensus="sum"), T([-5.0]))
    assert_close(ties_merge(tv, ONES, [1.0] * 3, consensus="count"), T([1.0]))


def test_task_arithmetic_weighted_and_normalized():
    tv = T([[1.0, -2.0], [3.0, 0.5]])
    assert_close(task_arithmetic_merge(tv, T([1.0, 1.0])), T([4.0, -1.5]))
    assert_close(task_arithmetic_merge(tv, T([0.5, 0.25]), lam=2.0), T([2.5, -1.75]))
    assert_close(task_arithmetic_merge(tv, T([0.5, 0.25]), normalize=True), T([1.25, -0.875]) / 0.75)


# ----------------------------------------------------------------------------- DARE

def test_dare_at_density_one_is_task_arithmetic_or_unnormalised_ties():
    tv = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    w = T([0.5, 0.3, 0.2])
    assert torch.equal(dare_linear_merge(tv, w, [1.0] * 3, lam=0.6), task_arithmetic_merge(tv, w, lam=0.6))
    assert torch.equal(dare_ties_merge(tv, w, [1.0] * 3), ties_merge(tv, w, [1.0] * 3, normalize=False))


def test_dare_is_seeded_and_unbiased():
    tv = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    w = T([1.0, 0.5, 0.25])
    a = dare_linear_merge(tv, w, [0.5] * 3, seed=7)
    assert torch.equal(a, dare_linear_merge(tv, w, [0.5] * 3, seed=7))
    assert not torch.equal(a, dare_linear_merge(tv, w, [0.5] * 3, seed=8))
    mean = torch.stack([dare_linear_merge(tv, w, [0.5] * 3, seed=s) for s in range(800)]).mean(0)
    ta = task_arithmetic_merge(tv, w)
    assert (mean - ta).abs().max().item() < 0.2  # std of the mean ≈ ||w·τ_j|| / sqrt(800) ≤ ~0.05
    assert torch.corrcoef(torch.stack([mean, ta]))[0, 1] > 0.98


def test_dare_ties_has_no_magnitude_trim_after_the_drop():
    tv = torch.randn(3, 30, 30, generator=torch.Generator().manual_seed(5))
    out = dare_ties_merge(tv, ONES, [0.9] * 3, seed=11)
    # a 0.9 keep rate over 3 experts leaves almost every entry non-zero (a trim to 0.9 would not change
    # that either, but a TIES trim to 0.2 on top of the drop, as the old dare did, would zero ~half)
    assert (out != 0).float().mean().item() > 0.99


# ----------------------------------------------------------------------------- merge_tensor / merge_state

def test_merge_tensor_adds_merged_vector_to_base():
    w0 = T([[1.0, 2.0], [3.0, 4.0]])
    e1, e2 = w0 + T([[1.0, 0.0], [0.0, -1.0]]), w0 + T([[3.0, 0.0], [2.0, -1.0]])
    assert_close(merge_tensor("x", w0, [e1, e2], "task_arithmetic", lam=0.5), T([[3.0, 2.0], [4.0, 3.0]]))
    assert_close(merge_tensor("x", w0, [e1, e2], "average"), T([[3.0, 2.0], [4.0, 3.0]]))
    assert merge_tensor("x", w0.half(), [e1.half(), e2.half()], "average").dtype == torch.float32
    # linear is a weighted sum of the experts themselves, normalised or not, with the base's own weight
    assert_close(merge_tensor("x", w0, [e1, e2], "linear", weights=[3.0, 1.0], normalize=False),
                 3 * e1 + e2)
    assert_close(merge_tensor("x", w0, [e1, e2], "linear", weights=[3.0, 1.0], normalize=True, base_weight=1.0),
                 (3 * e1 + e2 + w0) / 5)
    assert_close(merge_tensor("x", w0, [e1, e2], "ties", densities=0.5, lam=1.0, normalize=True),
                 w0 + T([[2.0, 0.0], [2.0, -1.0]]))  # k=2 of 4 keeps every non-zero entry here


def test_merge_tensor_dare_mask_depends_on_tensor_name():
    w0 = torch.zeros(50)
    experts = [torch.randn(50, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    p = merge_params("dare_linear", density=0.5, seed=3)
    a = merge_tensor("layer.a", w0, experts, "dare_linear", **p)
    assert torch.equal(a, merge_tensor("layer.a", w0, experts, "dare_linear", **p))
    assert not torch.equal(a, merge_tensor("layer.b", w0, experts, "dare_linear", **p))


def test_merge_state_preserves_dtype_and_values():
    base = {"w": T([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16), "b": T([0.5, -0.5], dtype=torch.bfloat16)}
    e1 = {"w": T([[1.5, 2.0], [3.0, 5.0]], dtype=torch.bfloat16), "b": T([1.0, -0.5], dtype=torch.bfloat16)}
    e2 = {"w": T([[1.0, 3.0], [3.0, 4.0]], dtype=torch.bfloat16), "b": T([0.5, -1.5], dtype=torch.bfloat16)}
    ta = merge_state(base, [e1, e2], "task_arithmetic", lam=1.0)
    assert {k: v.dtype for k, v in ta.items()} == {"w": torch.bfloat16, "b": torch.bfloat16}
    assert torch.equal(ta["w"], T([[1.5, 3.0], [3.0, 5.0]], dtype=torch.bfloat16))
    assert torch.equal(ta["b"], T([1.0, -1.5], dtype=torch.bfloat16))
    avg = merge_state(base, [e1, e2], "average")
    assert torch.equal(avg["w"], T([[1.25, 2.5], [3.0, 4.5]], dtype=torch.bfloat16))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_identical_experts_merge_to_expected_point(method):
    # every expert equal to θ_1, density 1: summing methods give θ0 + 3τ, averaging ones θ0 + τ
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g)
    tau = torch.randn(4, 3, generator=g)
    params = merge_params(method, density=1.0)
    out = merge_tensor("p", w0, [w0 + tau] * 3, method, **params)
    summing = {"task_arithmetic", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
    assert_close(out, w0 + 3 * tau if method in summing else w0 + tau, atol=1e-6, rtol=1e-6)

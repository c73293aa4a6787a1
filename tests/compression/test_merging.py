"""Merge methods on small hand-computed tensors."""
from __future__ import annotations

import typing

import pytest
import torch
from torch.testing import assert_close

from compression.merging import MERGE_METHODS, merge_params, merge_state, merge_tensor
from compression.merging.average import average_merge
from compression.merging.dare import dare_drop, dare_merge
from compression.merging.task_arithmetic import task_arithmetic_merge
from compression.merging.ties import disjoint_mean, elect_sign, ties_merge, trim_top_k
from compression.recipe import MergeName

T = torch.tensor

# Three task vectors of 4 entries, used for the hand-computed TIES example.
TV = T([[4.0, -1.0, 3.0, -2.5],
        [2.0, 5.0, 1.0, -0.2],
        [-1.0, -6.0, 2.0, 0.1]])


def test_registry_has_the_four_methods_and_matches_recipe():
    assert set(MERGE_METHODS) == {"task_arithmetic", "ties", "dare", "average"}
    assert set(typing.get_args(MergeName)) == set(MERGE_METHODS)
    assert MERGE_METHODS["ties"] is ties_merge and MERGE_METHODS["dare"] is dare_merge


def test_merge_params_picks_each_methods_arguments():
    kw = {"lam": 0.7, "density": 0.3, "drop_p": 0.4, "dare_base": "ties", "seed": 5}
    assert merge_params("task_arithmetic", **kw) == {"lam": 0.7}
    assert merge_params("ties", **kw) == {"lam": 0.7, "density": 0.3}
    assert merge_params("dare", **kw) == kw
    assert merge_params("average", **kw) == {}


# ----------------------------------------------------------------------------- TA / average

def test_task_arithmetic_sums_and_scales():
    tv = T([[1.0, -2.0], [3.0, 0.5]])
    assert_close(task_arithmetic_merge(tv), T([4.0, -1.5]))
    assert_close(task_arithmetic_merge(tv, lam=0.5), T([2.0, -0.75]))
    assert_close(task_arithmetic_merge(TV, lam=0.3), 0.3 * T([5.0, -2.0, 6.0, -2.6]))


def test_average_is_the_mean_over_tasks():
    tv = T([[[1.0, 2.0]], [[3.0, -4.0]], [[5.0, 5.0]]])  # (T=3, 1, 2)
    out = average_merge(tv)
    assert out.shape == (1, 2)
    assert_close(out, T([[3.0, 1.0]]))


# ----------------------------------------------------------------------------- TIES pieces

def test_trim_top_k_keeps_density_fraction_per_task():
    # density 0.5 of 4 entries -> the 2 largest magnitudes of each task survive
    assert_close(trim_top_k(TV, 0.5), T([[4.0, 0.0, 3.0, 0.0],
                                         [2.0, 5.0, 0.0, 0.0],
                                         [0.0, -6.0, 2.0, 0.0]]))
    # density 0.25 -> only the largest magnitude, sign kept
    assert_close(trim_top_k(TV, 0.25), T([[4.0, 0, 0, 0], [0, 5.0, 0, 0], [0, -6.0, 0, 0]]))
    # density 1 -> unchanged (and a copy)
    out = trim_top_k(TV, 1.0)
    assert_close(out, TV)
    assert out.data_ptr() != TV.data_ptr()


def test_trim_top_k_is_over_the_whole_tensor_not_per_row():
    tv = T([[[9.0, -8.0, 1.0], [2.0, 3.0, 4.0]],
            [[0.1, 0.2, 0.3], [-7.0, 0.4, 6.0]]])  # T=2, each (2,3); density 1/3 -> k=2 of 6
    out = trim_top_k(tv, 1 / 3)
    assert_close(out, T([[[9.0, -8.0, 0.0], [0.0, 0.0, 0.0]],
                         [[0.0, 0.0, 0.0], [-7.0, 0.0, 6.0]]]))


def test_trim_top_k_keeps_ties_at_threshold_and_at_least_one():
    tv = T([[3.0, -3.0, 1.0, 0.0]])
    assert_close(trim_top_k(tv, 0.25), T([[3.0, -3.0, 0.0, 0.0]]))  # k=1 but |3| == |-3|
    assert_close(trim_top_k(T([[0.5, -2.0, 1.0]]), 0.01), T([[0.0, -2.0, 0.0]]))  # k = max(1, 0)


def test_elect_sign_uses_mass_not_majority_count():
    # two positive votes, one negative with larger mass -> negative
    assert_close(elect_sign(T([[1.0], [1.0], [-5.0]])), T([-1.0]))
    assert_close(elect_sign(T([[1.0, 0.0, 2.0], [1.0, 0.0, -2.0], [-1.5, 0.0, 0.0]])), T([1.0, 0.0, 0.0]))


def test_disjoint_mean_averages_only_agreeing_nonzero_entries():
    trimmed = T([[1.0, 4.0, 0.0, -3.0],
                 [1.0, 0.0, 0.0, -1.0],
                 [-5.0, 2.0, 0.0, 2.0]])
    sign = elect_sign(trimmed)
    assert_close(sign, T([-1.0, 1.0, 0.0, -1.0]))
    # col0: only -5 agrees -> -5 ; col1: 4 and 2 agree (the zero is not counted) -> 3
    # col2: all zero -> 0 ; col3: -3 and -1 agree -> -2
    assert_close(disjoint_mean(trimmed, sign), T([-5.0, 3.0, 0.0, -2.0]))


def test_ties_merge_full_example_by_hand():
    # trim (k=2):  [4,0,3,0], [2,5,0,0], [0,-6,2,0]
    # sign of sums [6,-1,5,0] -> [+,-,+,0]
    # disjoint mean: (4+2)/2=3, -6/1, (3+2)/2=2.5, 0
    assert_close(ties_merge(TV, density=0.5), T([3.0, -6.0, 2.5, 0.0]))
    assert_close(ties_merge(TV, density=0.5, lam=2.0), T([6.0, -12.0, 5.0, 0.0]))
    # density 1: nothing trimmed; sums [5,-2,6,-2.6] -> signs [+,-,+,-]
    # means: (4+2)/2=3, (-1-6)/2=-3.5, (3+1+2)/3=2, (-2.5-0.2)/2=-1.35
    assert_close(ties_merge(TV, density=1.0), T([3.0, -3.5, 2.0, -1.35]))


# ----------------------------------------------------------------------------- DARE

def test_dare_with_no_drop_equals_task_arithmetic():
    tv = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dare_merge(tv, drop_p=0.0, lam=0.6), task_arithmetic_merge(tv, lam=0.6))
    assert torch.equal(dare_merge(tv, drop_p=0.0, dare_base="ties", density=0.4, lam=0.6),
                       ties_merge(tv, density=0.4, lam=0.6))


def test_dare_drop_zeroes_or_rescales_each_entry():
    tv = torch.randn(2, 100, 100, generator=torch.Generator().manual_seed(1))
    out = dare_drop(tv, 0.5, torch.Generator().manual_seed(2))
    kept = out != 0
    assert torch.equal(out[kept], tv[kept] * 2.0)  # survivors scaled by exactly 1/(1-p) = 2
    frac = kept.float().mean().item()
    assert 0.48 < frac < 0.52
    out9 = dare_drop(tv, 0.9, torch.Generator().manual_seed(2))
    kept9 = out9 != 0
    assert_close(out9[kept9], tv[kept9] / 0.1 * 1.0)
    assert 0.08 < kept9.float().mean().item() < 0.12


def test_dare_single_task_entries_are_zero_or_doubled():
    tv = T([[1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0]])
    for seed in range(5):
        out = dare_merge(tv, drop_p=0.5, seed=seed)
        doubled = out == 2 * tv[0]
        assert torch.all(doubled | (out == 0))


def test_dare_expectation_is_task_arithmetic():
    tv = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    mean = torch.stack([dare_merge(tv, drop_p=0.5, lam=0.5, seed=s) for s in range(800)]).mean(0)
    ta = task_arithmetic_merge(tv, lam=0.5)
    # per-entry std of the mean is about lam*||tv[:, j]|| / sqrt(800) <= ~0.05
    assert (mean - ta).abs().max().item() < 0.2
    assert torch.corrcoef(torch.stack([mean, ta]))[0, 1] > 0.97


def test_dare_is_seeded():
    tv = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    a = dare_merge(tv, drop_p=0.5, seed=7)
    assert torch.equal(a, dare_merge(tv, drop_p=0.5, seed=7))
    assert not torch.equal(a, dare_merge(tv, drop_p=0.5, seed=8))


def test_dare_with_ties_base_applies_ties_after_drop():
    tv = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(5))
    out = dare_merge(tv, drop_p=0.3, dare_base="ties", density=0.5, lam=0.8, seed=11)
    dropped = dare_drop(tv, 0.3, torch.Generator().manual_seed(11))
    assert_close(out, ties_merge(dropped, density=0.5, lam=0.8))
    assert not torch.allclose(out, dare_merge(tv, drop_p=0.3, lam=0.8, seed=11))


# ----------------------------------------------------------------------------- merge_tensor / merge_state

def test_merge_tensor_adds_merged_vector_to_base():
    w0 = T([[1.0, 2.0], [3.0, 4.0]])
    e1, e2 = w0 + T([[1.0, 0.0], [0.0, -1.0]]), w0 + T([[3.0, 0.0], [2.0, -1.0]])
    assert_close(merge_tensor("x", w0, [e1, e2], "task_arithmetic", lam=0.5), T([[3.0, 2.0], [4.0, 3.0]]))
    assert_close(merge_tensor("x", w0, [e1, e2], "average"), T([[3.0, 2.0], [4.0, 3.0]]))
    assert merge_tensor("x", w0.half(), [e1.half(), e2.half()], "average").dtype == torch.float32


def test_merge_tensor_dare_mask_depends_on_tensor_name():
    w0 = torch.zeros(50)
    experts = [torch.randn(50, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    p = merge_params("dare", drop_p=0.5, seed=3)
    a = merge_tensor("layer.a", w0, experts, "dare", **p)
    assert torch.equal(a, merge_tensor("layer.a", w0, experts, "dare", **p))
    assert not torch.equal(a, merge_tensor("layer.b", w0, experts, "dare", **p))


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

    f32 = {k: v.float() for k, v in base.items()}
    ties = merge_state(f32, [{k: v.float() for k, v in e.items()} for e in (e1, e2)], "ties", density=0.5, lam=1.0)
    # w: τ1=[.5,0,0,1] τ2=[0,1,0,0]; k=2 each -> unchanged; signs + ; means .5, 1, 0, 1
    assert ties["w"].dtype == torch.float32
    assert_close(ties["w"], T([[1.5, 3.0], [3.0, 5.0]]))
    # b: τ1=[.5,0] τ2=[0,-1]; k=1 -> each keeps its non-zero; θ* = base + τ
    assert_close(ties["b"], T([1.0, -1.5]))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_identical_experts_merge_to_expected_point(method):
    # every expert equal to θ_1: TA/dare(p=0)/ties(density=1) give θ0 + λ·T·τ or θ0 + λ·τ
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g)
    tau = torch.randn(4, 3, generator=g)
    experts = [w0 + tau] * 3
    params = merge_params(method, lam=1.0, density=1.0, drop_p=0.0)
    out = merge_tensor("p", w0, experts, method, **params)
    expected = w0 + 3 * tau if method in ("task_arithmetic", "dare") else w0 + tau
    assert_close(out, expected, atol=1e-6, rtol=1e-6)

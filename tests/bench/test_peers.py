"""The bench's transformers/PEFT peers and roofline against the artifact as twinserve serves it.

The PEFT model is built from the artifact's factors (lora_A = A_t, lora_B = B_t, alpha = r); its logits
for one adapter must equal the served model pinned to that expert (one-hot w), and a mixed batch with
per-row ``adapter_names`` must equal the served model with per-row one-hot weights.
"""
from __future__ import annotations

import pytest
import torch

from bench.peers import (
    PeerError,
    generate_batch,
    hf_backbone,
    linear_shapes,
    matmul_peak,
    peft_mixed_model,
    roofline,
)
from bench.report import check_targets, compute_ratios
from bench.runner import load_bench_artifact
from bench.synthetic import SyntheticSpec, build_synthetic_artifact, random_prompts
from twin.generate import prompt_logits

SPEC = SyntheticSpec.quick()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("peers") / "synthetic"
    build_synthetic_artifact(path, SPEC)
    return path


@pytest.fixture(scope="module")
def served(synthetic):
    return load_bench_artifact(synthetic, with_experts=True)


def _prompts(n: int = 4) -> list[list[int]]:
    return [ids for _, ids in random_prompts(SPEC, n, seed=11, min_len=5, max_len=12)]


@torch.no_grad()
def _served_logits(art, prompts, w):
    """The served model's logits at every prompt position, prompt after prompt: (tokens, V)."""
    return torch.cat(prompt_logits(art.model, prompts, w))


def right_pad(prompts):
    """ids (N, S) for transformers' forward, padded with 0 on the right (padded positions are left out)."""
    n = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (n - len(p)) for p in prompts])


def _valid(prompts, logits):
    """Only real (unpadded) positions: (N, S, V) -> (tokens, V)."""
    return torch.cat([logits[i, :len(p)] for i, p in enumerate(prompts)])


@torch.no_grad()
def test_peft_adapter_logits_equal_served_pinned_expert(synthetic, served):
    prompts = _prompts()
    ids = right_pad(prompts)
    names = served.expert_names
    model = hf_backbone(synthetic)
    base = _valid(prompts, model(input_ids=ids).logits)
    torch.testing.assert_close(base, _served_logits(served, prompts, None), atol=1e-4, rtol=0)
    peft = peft_mixed_model(model, synthetic)
    for t, name in enumerate(names):
        w = torch.zeros(len(prompts), len(names))
        w[:, t] = 1.0
        want = _served_logits(served, prompts, w)
        peft.set_adapter(name)
        got = _valid(prompts, peft(input_ids=ids).logits)
        assert (got - want).abs().max().item() < 1e-4
        assert (got - base).abs().max().item() > 1e-2     # the adapter changes the logits: not a vacuous match
    # one forward, a different adapter per row (adapter_names) = per-row one-hot weights
    rows = [names[i % len(names)] for i in range(len(prompts))]
    w = torch.stack([torch.nn.functional.one_hot(torch.tensor(names.index(r)), len(names)).float() for r in rows])
    got = _valid(prompts, peft(input_ids=ids, adapter_names=rows).logits)
    assert (got - _served_logits(served, prompts, w)).abs().max().item() < 1e-4


def test_peft_peer_refuses_dense_norm_deltas(tmp_path):
    path = tmp_path / "norms"
    build_synthetic_artifact(path, SyntheticSpec(**{**SPEC.to_dict(), "norm_deltas": True}))
    with pytest.raises(PeerError, match=r"model\.layers\.0\.input_layernorm\.weight"):
        peft_mixed_model(hf_backbone(path), path)


def test_generate_ignores_eos_and_matches_served_greedy(synthetic, served):
    """Left-padded generate with eos disabled = the served model's right-padded greedy decode."""
    prompts = _prompts(3)
    wants = []
    for p in prompts:
        seq, want = list(p), []
        for _ in range(6):
            nxt = int(_served_logits(served, [seq], None)[-1].argmax())
            want.append(nxt)
            seq.append(nxt)
        wants.append(want)
    model = hf_backbone(synthetic)
    model.generation_config.eos_token_id = wants[0][0]   # would stop row 0 at once if eos were honoured
    outs, first = generate_batch(model, prompts, 6, pad_id=0)
    assert first is not None and outs == wants


def test_roofline_counts_the_step_matmuls(synthetic, served):
    model = hf_backbone(synthetic)
    h, i, v, L = SPEC.hidden_size, SPEC.intermediate_size, SPEC.vocab_size, SPEC.num_layers
    per_layer = 4 * h * h + 3 * h * i                 # q, k, v, o (no GQA) + gate, up, down
    shapes = linear_shapes(model)
    assert sum(o * d for _, o, d in shapes) == L * per_layer + v * h and shapes[-1][0] == "lm_head"
    peak = matmul_peak([torch.randn(32, 16), torch.randn(8, 32)], m=5, passes=2)
    assert peak["flops_per_pass"] == 2 * 5 * (32 * 16 + 8 * 32) and peak["passes"] >= 2
    for kernel in ("torch_mm", "onednn_packed") if torch.backends.mkldnn.is_available() else ("torch_mm",):
        p = matmul_peak([torch.randn(32, 16), torch.randn(8, 32)], m=5, passes=2, kernel=kernel)
        assert p["flops_per_pass"] == peak["flops_per_pass"] and p["kernel"] == kernel
    out = roofline(model, served.model, _prompts(), batch_size=4)
    assert "torch_mm" in out["kernels"] and out["peak_kernel"] in out["kernels"]
    assert out["peak_matmul_gflops_per_s"] == max(k["gflops_per_s"] for k in out["kernels"].values())
    assert out["step_matmul_flops"] == 2 * 4 * (L * per_layer + v * h)
    achieved = out["step_matmul_flops"] / out["backbone_decode_step_seconds"]   # the step seconds are rounded
    assert out["achieved_matmul_flops_per_s"] == pytest.approx(achieved, rel=1e-3)
    assert out["peak_matmul_flops_per_s"] == pytest.approx(out["step_matmul_flops"] / out["matmul_pass_seconds_best"],
                                                           rel=1e-3)
    assert out["backbone_roofline_fraction"] == pytest.approx(
        out["achieved_matmul_flops_per_s"] / out["peak_matmul_flops_per_s"], abs=1e-4)


def test_ratios_and_targets():
    run = lambda m, tps, mem=100: {"artifact": "s", "mode": m, "batch_size": 16, "tokens_per_s": tps,
                                   "memory_bytes": mem}
    runs = [run("backbone", 100.0, 100), run("lowrank", 90.0, 120), run("lowrank_top2", 80.0, 120),
            run("peft_mixed", 50.0), run("hf_generate", 80.0), run("materialize", 5.0)]
    r = compute_ratios(runs, "s", 16, {"backbone_roofline_fraction": 0.65})
    assert (r["lowrank_vs_backbone_throughput"], r["lowrank_top2_vs_backbone_throughput"],
            r["lowrank_vs_peft_mixed_throughput"], r["backbone_vs_hf_generate_throughput"],
            r["memory_vs_backbone"], r["backbone_roofline_fraction"]) == (0.9, 0.8, 1.8, 1.25, 1.2, 0.65)
    ident = {"lowrank_pinned_vs_materialize": {"requests": 4, "identical": 4},
             "batch1_vs_batch_max": {"backbone": {"requests": 4, "identical": 4},
                                     "lowrank": {"requests": 4, "identical": 3}}}
    t = check_targets(r, ident)
    assert {k: v["pass"] for k, v in t.items()} == {
        "lowrank_vs_backbone_throughput": True, "lowrank_top2_vs_backbone_throughput": False,
        "lowrank_vs_peft_mixed_throughput": True, "backbone_vs_hf_generate_throughput": False,
        "backbone_roofline_fraction": False, "memory_vs_backbone": True,
        "lowrank_pinned_vs_materialize": True, "batch1_vs_batch_max": False}
    assert t["batch1_vs_batch_max"]["value"] == "7/8"
    assert compute_ratios(runs[:1], "s", 16)["lowrank_vs_peft_mixed_throughput"] is None

"""`twinserve eval` parts that need no demo zoo: storage bytes for any artifact and the budget sweep.

Task targets are each expert's own greedy continuation, so every expert scores 1.0 by construction and
a normalised score measures exactly how much of its expert the served artifact reproduces.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench.quality import budget_sweep, evaluate
from tests.conftest import EXPERT_NAMES, build_tiny_artifact, load_state
from twin.artifact import read_manifest
from twin.generate import greedy_generate
from twin.loading import build_model, config_from_manifest

PROMPTS = ["add two", "jim hikes", "purr ok", "a b c", "hello there", "zzz yy"]


@pytest.fixture(scope="module")
def quality_setup(tiny_base_dir, tiny_expert_dirs, tmp_path_factory):
    """A full-rank TA artifact and tasks/<expert>/{validation,test}.jsonl whose targets the expert generates."""
    root = tmp_path_factory.mktemp("quality")
    art = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, root / "art",
                              merge={"method": "task_arithmetic", "lam": 0.3}, rank={"rank": 64})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art / "tokenizer"))
    config = config_from_manifest(read_manifest(art))
    for name, d in tiny_expert_dirs.items():
        model = build_model(config, load_state(d), None, "cpu", torch.float32, with_experts=False)
        outs = greedy_generate(model, tok, PROMPTS, None, max_new_tokens=24)  # as score_model
        # exact match compares the prediction with the stripped target: keep outputs with nothing to strip
        rows = [{"prompt": p, "target": o, "task": name} for p, o in zip(PROMPTS, outs) if o and o == o.strip()]
        assert len(rows) >= 3, outs
        for split in ("validation", "test"):
            (root / "tasks" / name).mkdir(parents=True, exist_ok=True)
            (root / "tasks" / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return art, root / "tasks"


def test_full_rank_twin_reproduces_every_expert_and_storage_is_counted(quality_setup, states_bytes):
    art, tasks = quality_setup
    rep = evaluate(art, tasks=tasks, methods=("expert", "twin_oracle"), write=False)
    assert all(v["expert"] == 1.0 for v in rep["quality"]["tasks"].values())
    assert rep["quality"]["normalized"]["twin_oracle"] == 1.0
    s = rep["storage_bytes"]
    assert s["dense_experts"] == len(EXPERT_NAMES) * states_bytes   # T × θ*'s tensor bytes, from any artifact
    assert s["exclusive"] == (art / "exclusive.safetensors").stat().st_size > s["dense_experts"] * 0.9  # full rank


@pytest.fixture(scope="module")
def states_bytes(tiny_base_dir):
    return sum(t.numel() * 4 for t in load_state(tiny_base_dir).values())


def test_budget_sweep_reports_the_curve(quality_setup, states_bytes):
    art, tasks = quality_setup
    rows = budget_sweep(art, [0.2, 0.9], factor_dtype="int8", tasks=tasks)
    assert [r["budget"] for r in rows] == [0.2, 0.9]
    for r in rows:
        assert r["dense_experts_bytes"] == len(EXPERT_NAMES) * states_bytes
        assert r["exclusive_fraction"] <= r["budget"]
        assert 0.0 <= r["twin_oracle_normalized"] <= 1.0 and r["twin_router_normalized"] is None
    assert rows[0]["exclusive_bytes"] < rows[1]["exclusive_bytes"]
    # more bytes, more of each expert kept (random tiny experts: greedy text is fragile, so no exact 1.0)
    assert rows[0]["twin_oracle_normalized"] < rows[1]["twin_oracle_normalized"]


def test_router_report_routes_appended_continuations_as_their_context(routed_artifact):
    """`twinserve eval`'s router section: the prompt head it reads, and test prompts with every task's answer
    appended (loglikelihood requests) routed exactly as the prompts alone."""
    from bench.quality import router_report
    from tests.conftest import router_rows
    from twin.loading import load_artifact

    art = load_artifact(routed_artifact, device="cpu", dtype="float32")
    test: dict[str, list[dict]] = {}
    for r in router_rows(6, seed=21):
        test.setdefault(r["task"], []).append({**r, "target": r["prompt"].split(" ", 1)[1].upper()})
    rep = router_report(art, test)
    assert rep["prefix_tokens"] == 8 and rep["test_top1_accuracy"] == 1.0 and rep["test_fallback_rate"] == 0.0
    cont = rep["appended_continuations"]
    assert cont["continuations"] == 18 * 3 and cont["same_routing_rate"] == 1.0 and cont["fallback_rate"] == 0.0
    assert 0.0 < rep["cost_fraction_of_prefill"] < 1.0

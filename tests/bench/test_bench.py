"""`twinserve bench` on the tiny test artifact: report shape, token counts, and lowrank ≡ materialize.

No timing assertions: the numbers depend on the machine. Everything here runs in a few seconds.
"""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from bench.cli import ALL_MODES, parse_batch_sizes, parse_modes, run_bench
from bench.report import IDENTITY_TARGETS, RATIO_KEYS, TARGETS
from bench.runner import (
    MODES,
    check_all_generated,
    load_bench_artifact,
    one_hot_routing,
    random_workload,
    run_engine,
)
from cli.main import main
from tests.conftest import EXPERT_NAMES
from twin.errors import UsageError

RUN_KEYS = {"mode", "batch_size", "requests", "tokens_per_s", "requests_per_s", "p50_s", "p99_s", "ttft_p50_s",
            "memory_bytes", "rss_bytes"}


@pytest.fixture(scope="module")
def quick_report(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    report = run_bench(tiny_artifact, out, synthetic=True, quick=True, requests=6, batch_sizes=[1, 3],
                       max_tokens=3)
    return report, json.loads(out.read_text())


def test_report_keys_and_written_json(quick_report):
    report, written = quick_report
    assert written == json.loads(json.dumps(report))
    assert set(written) >= {"runs", "ratios", "demo_ratios", "config", "targets", "identity", "demo_identity"}
    for key in ("ratios", "demo_ratios"):
        assert set(written[key]) >= set(RATIO_KEYS) | {"batch_size", "note"}
        assert written[key]["batch_size"] == 3
    assert all(isinstance(written["ratios"][k], float) and written["ratios"][k] > 0 for k in RATIO_KEYS)
    # the peers and the roofline run on the synthetic artifact only
    demo = written["demo_ratios"]
    assert all(isinstance(demo[k], float) and demo[k] > 0 for k in ("lowrank_vs_backbone_throughput",
                                                                     "lowrank_top2_vs_backbone_throughput",
                                                                     "memory_vs_backbone"))
    assert demo["lowrank_vs_peft_mixed_throughput"] is None and demo["backbone_roofline_fraction"] is None
    assert set(written["targets"]) == set(TARGETS) | set(IDENTITY_TARGETS)
    assert "lowrank_vs_materialize_throughput" not in written["targets"]
    runs = {(r["artifact"], r["mode"], r["batch_size"]): r for r in written["runs"]}
    tps = lambda m: runs[("synthetic", m, 3)]["tokens_per_s"]
    assert written["ratios"]["lowrank_vs_peft_mixed_throughput"] == round(tps("lowrank") / tps("peft_mixed"), 4)
    assert written["ratios"]["backbone_vs_hf_generate_throughput"] == round(tps("backbone") / tps("hf_generate"), 4)
    roof = written["config"]["artifacts"]["synthetic"]["roofline"]
    assert written["ratios"]["backbone_roofline_fraction"] == roof["backbone_roofline_fraction"]
    assert roof["rows"] == 3 and roof["peak_matmul_gflops_per_s"] > 0
    for run in written["runs"]:
        assert set(run) >= RUN_KEYS
        assert run["memory_bytes"] > 0 and run["rss_bytes"] > 0
        assert run["p99_s"] >= run["p50_s"] > 0


def test_phase_seconds_and_bounds(quick_report):
    """Each engine run splits its wall time into router pass and step phases; the bounds follow from them."""
    _, written = quick_report
    runs = {(r["artifact"], r["mode"], r["batch_size"]): r for r in written["runs"]}
    for key, r in runs.items():
        ph = r["phase_seconds"]
        if key[1] in ("hf_generate", "peft_mixed"):
            assert ph == {}
            continue
        assert set(ph) == {"router", "prefill", "decode", "mixed"} and min(ph.values()) >= 0
        assert 0 < sum(ph.values()) <= r["seconds"] * 1.001
        assert ph["prefill"] + ph["mixed"] > 0
        has_router = written["config"]["artifacts"][key[0]]["router"] is not None
        assert (ph["router"] > 0) == (has_router and key[1] != "backbone")   # routed modes run the router pass
    macs = written["config"]["artifacts"]["synthetic"]["linear_macs"]
    b, bb = written["bounds"], runs[("synthetic", "backbone", 3)]
    delta = macs["factors"] / macs["backbone"]
    assert b["factor_macs_fraction"] == round(delta, 4)
    rho = written["config"]["artifacts"]["synthetic"]["roofline"]["backbone_roofline_fraction"]
    soft_router = runs[("synthetic", "lowrank", 3)]["phase_seconds"]["router"]
    assert b["soft_bound"] == round(bb["seconds"] / (bb["seconds"] + soft_router
                                                     + delta * rho * bb["phase_seconds"]["decode"]), 4)
    assert b["soft_bound"] < bb["seconds"] / (bb["seconds"] + soft_router)   # the factors' work lowers it further
    steps = sum(bb["phase_seconds"][k] for k in ("prefill", "decode", "mixed"))
    assert b["soft_at_backbone_efficiency"] == round(bb["seconds"] / (bb["seconds"] + soft_router + delta * steps), 4)
    assert b["soft_at_backbone_efficiency"] < bb["seconds"] / (bb["seconds"] + soft_router)
    for mode in ("lowrank", "lowrank_top2"):
        r = runs[("synthetic", mode, 3)]
        router = r["phase_seconds"]["router"]
        assert b[f"{mode}_router_share"] == round(router / r["seconds"], 4)
        without = r["tokens"] / (r["seconds"] - router) / bb["tokens_per_s"]
        assert b[f"{mode}_vs_backbone_without_router"] == pytest.approx(without, abs=1e-4)
        assert without > r["tokens_per_s"] / bb["tokens_per_s"]
    top2 = runs[("synthetic", "lowrank_top2", 3)]["phase_seconds"]["router"]
    assert b["top2_router_bound"] == round(bb["seconds"] / (bb["seconds"] + top2), 4)


def test_every_mode_ran_and_generated_every_token(quick_report):
    _, written = quick_report
    runs = written["runs"]
    labels = {r["artifact"] for r in runs}
    assert labels == {"synthetic", written["config"]["demo_artifact"]}
    for r in runs:
        assert r["requests"] == 6
        assert r["tokens"] == 6 * 3          # ignore_eos: exactly requests × max_tokens
        if r["mode"] in ("materialize", "expert"):
            assert r["batch_size"] == 1
    demo = written["config"]["demo_artifact"]
    got = {(r["artifact"], r["mode"], r["batch_size"]) for r in runs}
    for b in (1, 3):
        for mode in ("backbone", "lowrank", "lowrank_top2"):
            assert (demo, mode, b) in got and ("synthetic", mode, b) in got
    assert ("synthetic", "hf_generate", 3) in got and ("synthetic", "peft_mixed", 3) in got
    assert not any(a == demo and m in ("hf_generate", "peft_mixed") for a, m, _ in got)
    assert (demo, "materialize", 1) in got and (demo, "expert", 1) in got   # the fixture keeps its experts
    assert ("synthetic", "materialize", 1) in got
    assert [s["mode"] for s in written["config"]["skipped"]] == ["expert"]  # synthetic: no dense experts
    # the memory accounting sees the deltas: lowrank holds more than the backbone-only engine
    mem = {(r["artifact"], r["mode"], r["batch_size"]): r["memory_bytes"] for r in runs}
    assert mem[(demo, "lowrank", 3)] > mem[(demo, "backbone", 3)]
    assert written["config"]["equivalence"][demo]["identical"] == written["config"]["equivalence"][demo]["requests"]
    # greedy identity: every check compares real outputs of two runs, and all of them agree
    ident = written["identity"]
    assert set(ident) == {"lowrank_pinned_vs_materialize", "batch1_vs_batch_max", "hf_generate_vs_backbone",
                          "peft_mixed_vs_lowrank_pinned"}
    assert set(ident["batch1_vs_batch_max"]) == {"backbone", "lowrank", "lowrank_top2"}
    for entry in [ident[k] for k in ident if k != "batch1_vs_batch_max"] + list(ident["batch1_vs_batch_max"].values()):
        assert entry["requests"] == 6 and entry["identical"] == 6
    for key in IDENTITY_TARGETS:
        assert written["targets"][key]["pass"] is True


def pinned_lowrank_and_materialize_agree(artifact, device: str = "cpu") -> None:
    """The batched activation-side path and the per-request fused weights give the same greedy tokens, for two
    pinned experts whose outputs differ (so the agreement is not vacuous). Also run on CUDA by tests/gpu."""
    async def go():
        art = load_bench_artifact(artifact, with_experts=True, device=device)
        assert art.model.device.type == device
        work = random_workload(art, n=6, n_warm=3, seed=5)
        outs = {}
        for expert in ("code", "chat"):
            routing = one_hot_routing(art.expert_names, expert)
            a = await run_engine(art, None, "lowrank", 3, work, 6, 64, routing=routing)
            b = await run_engine(art, None, "materialize", 1, work, 6, 64, routing=routing)
            for r in (a, b):
                check_all_generated(r, 6)
            assert a.outputs == b.outputs, expert
            outs[expert] = a.outputs
        return outs

    outs = asyncio.run(go())
    assert outs["code"] != outs["chat"]


def test_lowrank_and_materialize_agree_for_a_pinned_expert(tiny_artifact):
    pinned_lowrank_and_materialize_agree(tiny_artifact)


def test_argument_parsing(tmp_path):
    assert parse_batch_sizes("16,1,8,8") == [1, 8, 16]
    assert parse_modes(None) == ALL_MODES == MODES + ("hf_generate", "peft_mixed")
    assert parse_modes("peft_mixed,lowrank") == ("lowrank", "peft_mixed")
    assert parse_modes("materialize,backbone") == ("backbone", "materialize")
    with pytest.raises(UsageError):
        parse_batch_sizes("1,x")
    with pytest.raises(UsageError):
        parse_modes("lowrank,dense")
    assert main(["bench", "--out", str(tmp_path / "x.json")]) == 2   # neither ARTIFACT nor --synthetic
    assert not (tmp_path / "x.json").exists()


def test_bad_bench_argument_exits_2_without_traceback(tiny_artifact, tmp_path, capsys):
    """A bad argument that only the run finds (BenchError, raised inside bench.runner, not a UsageError of
    the parser) is a one-line error and exit 2 like every other command, not a traceback."""
    out = tmp_path / "b.json"
    code = main(["bench", str(tiny_artifact), "--out", str(out), "--quick", "--requests", "2",
                 "--batch-sizes", "1", "--max-tokens", "1000", "--modes", "backbone"])   # the model has 128 positions
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]     # after the bench's own log lines
    assert re.fullmatch(r"error: prompts \+ --max-tokens need \d+ positions; the model has 128", last), err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_registered(tiny_artifact, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_artifact), "--out", str(out), "--quick", "--requests", "3",
                 "--batch-sizes", "2", "--max-tokens", "2", "--modes", "backbone,lowrank"]) == 0
    rep = json.loads(out.read_text())
    assert [(r["mode"], r["batch_size"], r["tokens"]) for r in rep["runs"]] == [("backbone", 2, 6), ("lowrank", 2, 6)]
    assert "ratios" not in rep and rep["demo_ratios"]["lowrank_vs_peft_mixed_throughput"] is None
    assert EXPERT_NAMES == rep["config"]["artifacts"][rep["config"]["demo_artifact"]]["experts"]


def test_identical_pinned_requests_in_one_batch(tiny_artifact):
    """Identical prompts with explicit weights in one batch (the bench's repeated warm-up prompts do this).

    Regression: Request was a dataclass with field equality, so `r not in admitted` compared the
    RoutingSpec weight tensors and the engine step failed with "Boolean value of Tensor ... ambiguous".
    """
    async def go():
        art = load_bench_artifact(tiny_artifact, with_experts=True)
        work = random_workload(art, n=1, n_warm=1, seed=3)
        same = [work.prompts[0]] * 4
        return await run_engine(art, None, "lowrank", 4, work, 3, 64, prompts=same,
                                routing=one_hot_routing(art.expert_names, "math"))

    r = asyncio.run(go())
    check_all_generated(r, 3)
    assert r.requests == 4 and all(o == r.outputs[0] for o in r.outputs)


def test_like_builds_the_synthetic_artifact_at_a_named_shape(tmp_path):
    """--like: the synthetic artifact takes the shape table's dimensions (here the tiny Llama entry with 3
    experts at rank 2) and is benched like any other."""
    from zoo.shapes import SHAPES
    out = tmp_path / "like.json"
    report = run_bench(None, out, synthetic=True, like="tiny-llama", experts=3, rank=2, requests=4,
                       batch_sizes=[2], max_tokens=2, modes=("backbone", "lowrank"), threads=1, min_seconds=0,
                       synthetic_dir=tmp_path / "synth")
    spec = report["config"]["synthetic"]
    shape = SHAPES["tiny-llama"][1]
    assert (spec["hidden_size"], spec["num_layers"], spec["num_kv_heads"], spec["vocab_size"]) == (
        shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"], shape["vocab_size"])
    assert spec["num_experts"] == 3 and spec["rank"] == 2
    assert json.loads(out.read_text())["config"]["synthetic"] == spec


def test_router_prefix_sets_the_synthetic_routers_head(tmp_path):
    """--router-prefix K|all: the synthetic router reads the prompt's first K tokens (default 8, the shortest
    head train-router tries) or every token; the router section says which, and the bench reports it."""
    from router.model import load_router
    from twin.artifact import verify_artifact

    kw = {"synthetic": True, "quick": True, "requests": 3, "batch_sizes": [2], "max_tokens": 2,
          "modes": ("lowrank",), "threads": 1, "min_seconds": 0}      # no backbone run: the share alone
    for prefix, want in (("default", 8), (None, None), (3, 3)):
        d = tmp_path / f"synth-{want}"
        report = run_bench(None, tmp_path / f"b-{want}.json", synthetic_dir=d, router_prefix=prefix, **kw)
        assert report["config"]["synthetic"]["router_prefix_tokens"] == want
        assert load_router(d, verify_artifact(d)).config.prefix_tokens == want
        assert 0.0 < report["bounds"]["lowrank_router_share"] < 1.0
    with pytest.raises(UsageError, match="--router-prefix"):
        run_bench(None, tmp_path / "bad.json", router_prefix=0, **kw)
    with pytest.raises(SystemExit):
        main(["bench", "--synthetic", "--quick", "--out", str(tmp_path / "x.json"), "--router-prefix", "0"])

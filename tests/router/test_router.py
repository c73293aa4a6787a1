"""Router: padding-free features, training on separable tasks, top-k / temperature / fallback, bad data, artifact."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import pytest
import torch

from router.features import (
    pooled_features,
    prefix_pooled_features,
    router_features,
    router_prompt_features,
)
from router.model import ROUTER_FORMAT, Router, RouterConfig, RouterFormatError, apply_top_k, load_router
from router.train import MIN_PER_TASK, RouterDataError, read_labelled, train_router
from tests.conftest import (
    EXPERT_NAMES,
    ROUTER_TRAIN,
    ROUTER_UNKNOWN_LETTERS,
    router_rows,
    write_router_jsonl,
)
from twin.artifact import ROUTER, ArtifactError, read_manifest, verify_artifact
from twin.generate import encode_prompts
from twin.loading import load_artifact


@pytest.fixture(scope="module")
def art(routed_artifact):
    return load_artifact(routed_artifact, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def router(art) -> Router:
    r = load_router(art.path, art.manifest)
    assert r is not None
    return r


@pytest.fixture(scope="module")
def heldout(art, router):
    """Fresh prompts of each task (another seed than training) and their features."""
    rows = router_rows(20, seed=99)
    x = router_prompt_features(art.model, art.tokenizer, [r["prompt"] for r in rows], router.config)
    y = torch.tensor([EXPERT_NAMES.index(r["task"]) for r in rows])
    return x, y


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize("layer", [1, 2])
def test_pooling_of_a_batch_equals_each_prompt_alone(art, layer):
    """Prompts of different lengths pooled together (chunks of one flat step: nothing is padded) equal each
    prompt pooled alone."""
    short, long = encode_prompts(art.tokenizer, ["add abc", "purr opq rstu opqr stuo pqrs tuop"])
    alone = pooled_features(art.model, [short], layer)
    batch = pooled_features(art.model, [short, long, short[:3]], layer)
    assert (batch[0] - alone[0]).abs().max() <= 1e-5
    assert (batch[2] - pooled_features(art.model, [short[:3]], layer)[0]).abs().max() <= 1e-5
    assert (batch[0] - batch[1]).abs().max() > 1e-3          # different prompts, different features
    assert alone.dtype == torch.float32 and alone.shape == (1, art.model.args.hidden_size)


def test_pooling_rejects_a_bad_layer(art):
    with pytest.raises(ValueError, match="1..2"):
        pooled_features(art.model, [[2, 5, 6]], 3)


# ----------------------------------------------------------------------------- training and routing

def test_router_separates_the_tasks(routed_artifact, router, heldout):
    report = read_manifest(routed_artifact).router.train
    assert report["heldout_accuracy"] >= 0.95 and report["feature_layer"] == ROUTER_TRAIN["layer"]
    x, y = heldout
    out = router.route(x)
    acc = float((out.top == y).float().mean())
    assert acc >= 0.95
    assert not bool(out.fallback.any())            # in-distribution prompts are confident and near a centroid
    assert torch.allclose(out.weights.sum(-1), torch.ones(len(y)), atol=1e-5)


def test_trained_router_equals_the_saved_one(art, router):
    fresh, report = train_router(art, router_rows(), **ROUTER_TRAIN)
    assert fresh.config.prefix_tokens == router.config.prefix_tokens
    x = router_prompt_features(art.model, art.tokenizer, ["add abc fed", "jim hij", "purr rst"], router.config)
    assert torch.allclose(fresh.route(x).weights, router.route(x).weights, atol=1e-5)
    assert fresh.config.max_distance == pytest.approx(router.config.max_distance)
    assert set(report["confusion"]) == set(EXPERT_NAMES)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_k_weights_summing_to_one(router, heldout, k):
    x, _ = heldout
    out = router.route(x, top_k=k, temperature=3.0, fallback="none")
    assert ((out.weights > 0).sum(-1) == k).all()
    assert torch.allclose(out.weights.sum(-1), torch.ones(len(x)), atol=1e-5)
    kept = out.weights.argsort(-1, descending=True)[:, :k]
    assert (kept[:, 0] == out.top).all()             # the largest weights are kept
    if k == 3:
        assert torch.allclose(out.weights, out.probs)


def test_apply_top_k_renormalises():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.1, 0.7]])
    assert torch.allclose(apply_top_k(p, 2), torch.tensor([[0.625, 0.375, 0.0], [0.2 / 0.9, 0.0, 0.7 / 0.9]]))
    assert torch.allclose(apply_top_k(p, 1), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert apply_top_k(p, None) is p and apply_top_k(p, 5) is p


def test_higher_temperature_increases_entropy(router, heldout):
    x, _ = heldout
    ent = [router.route(x, temperature=t, fallback="none").entropy for t in (0.5, 1.0, 2.0, 8.0)]
    for lo, hi in itertools.pairwise(ent):
        assert (hi > lo).all()
    assert float(ent[-1].max()) <= torch.log(torch.tensor(3.0)) + 1e-6


def test_fallback_on_low_confidence(router, heldout):
    x, _ = heldout
    unsure = Router(dataclasses.replace(router.config, min_confidence=0.99), router.mlp)
    out = unsure.route(x, temperature=10.0, fallback="backbone")
    assert out.fallback.all()
    assert (out.weights == 0).all()
    out = unsure.route(x, temperature=10.0, fallback="uniform")
    assert out.fallback.all() and torch.allclose(out.weights, torch.full_like(out.weights, 1 / 3))
    out = unsure.route(x, temperature=10.0, fallback="none")
    assert not out.fallback.any() and torch.allclose(out.weights, out.probs)
    # the same router at a low temperature is confident on these prompts
    assert not unsure.route(x[:3], temperature=0.05).fallback.any()
    with pytest.raises(ValueError, match="fallback"):
        router.route(x, fallback="nope")


def test_fallback_on_distance_from_every_centroid(art, router):
    mlp = router.mlp
    far = mlp.mean + 40 * mlp.std * torch.tensor([1.0, -1.0]).repeat(mlp.mean.shape[0] // 2)
    out = router.route(far[None])
    assert float(out.distance[0]) > router.config.max_distance
    assert bool(out.fallback[0]) and (out.weights[0] == 0).all()
    # real prompts of no task are caught the same way
    unknown = " ".join(ROUTER_UNKNOWN_LETTERS * 2 for _ in range(4))
    out = router.route(router_prompt_features(art.model, art.tokenizer, [unknown], router.config))
    assert bool(out.fallback[0]) and float(out.weights.sum()) == 0.0
    out = router.route(router_prompt_features(art.model, art.tokenizer, [unknown], router.config), fallback="uniform")
    assert torch.allclose(out.weights, torch.full((1, 3), 1 / 3))


def test_max_entropy_threshold(router, heldout):
    x, _ = heldout
    strict = Router(dataclasses.replace(router.config, max_entropy=1e-9, min_confidence=0.0), router.mlp)
    assert strict.route(x).fallback.all()


# ----------------------------------------------------------------------------- bad data

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def good_lines(n=MIN_PER_TASK):
    return [json.dumps(r) for r in router_rows(n, seed=3)]


@pytest.mark.parametrize("bad_line,needles", [
    ('{"prompt": "write a poem", "task": "poetry"}', ["'poetry'", "not an expert", "math, code, chat"]),
    ('{"prompt": "   ", "task": "math"}', ["'prompt'", "non-empty"]),
    ('{"prompt": 3, "task": "math"}', ["'prompt'"]),
    ('{"prompt": "add ab", "task": "math"', ["not valid JSON"]),
    ('["add ab", "math"]', ["JSON object"]),
])
def test_read_labelled_names_the_line(tmp_path, bad_line, needles):
    lines = good_lines()
    lines.insert(2, "")            # blank lines are skipped but still counted
    lines.insert(4, bad_line)      # line 5
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(RouterDataError) as e:
        read_labelled(path, EXPERT_NAMES)
    msg = str(e.value)
    assert f"{path}:5:" in msg
    for needle in needles:
        assert needle in msg


def test_read_labelled_too_few_per_task(tmp_path):
    rows = router_rows(MIN_PER_TASK, seed=3)
    rows = [r for r in rows if r["task"] != "code"] + [r for r in rows if r["task"] == "code"][:2]
    path = write_router_jsonl(tmp_path / "few.jsonl", rows)
    with pytest.raises(RouterDataError, match=r"too few labelled prompts for: code \(2\); need at least 5"):
        read_labelled(path, EXPERT_NAMES)
    with pytest.raises(RouterDataError, match="not found"):
        read_labelled(tmp_path / "missing.jsonl", EXPERT_NAMES)


def test_read_labelled_caps_per_task(tmp_path):
    path = write_router_jsonl(tmp_path / "many.jsonl", router_rows(12, seed=4))
    rows = read_labelled(path, EXPERT_NAMES, max_per_task=7, seed=1)
    assert [r["task"] for r in rows] == [t for t in EXPERT_NAMES for _ in range(7)]
    assert rows == read_labelled(path, EXPERT_NAMES, max_per_task=7, seed=1)     # seeded sample


def test_train_router_rejects_bad_options(art):
    with pytest.raises(RouterDataError, match="--layer"):
        train_router(art, router_rows(6), layer=5)
    with pytest.raises(RouterDataError, match="fallback"):
        train_router(art, router_rows(6), fallback="sometimes")


# ----------------------------------------------------------------------------- CLI and artifact

@pytest.fixture
def routed_copy(routed_artifact, tmp_path):
    dst = tmp_path / "routed"
    shutil.copytree(routed_artifact, dst)
    return dst


def test_cli_bad_data_exits_2_with_the_message(artifact_copy, tmp_path, capsys):
    from cli.main import main

    lines = good_lines()
    lines.insert(1, '{"prompt": "write a poem", "task": "poetry"}')
    data = write_lines(tmp_path / "bad.jsonl", lines)
    before = (artifact_copy / "manifest.json").read_text()
    code = main(["train-router", str(artifact_copy), "--data", str(data), "--layer", "1"])
    err = "".join(capsys.readouterr().err.split())   # rich wraps (and may fold) long lines
    assert code == 2
    assert "error:" in err and f"{data.name}:2:" in err and "'poetry'" in err
    assert "Traceback" not in err
    assert (artifact_copy / "manifest.json").read_text() == before     # nothing written
    code = main(["train-router", str(artifact_copy), "--data", str(tmp_path / "nope.jsonl")])
    assert code == 2 and "notfound" in "".join(capsys.readouterr().err.split())


def test_cli_trains_and_the_artifact_still_verifies(artifact_copy, tmp_path, capsys):
    from cli.main import main

    data = write_router_jsonl(tmp_path / "rows.jsonl", router_rows(10, seed=8))
    assert read_manifest(artifact_copy).router is None
    code = main(["train-router", str(artifact_copy), "--data", str(data), "--layer", "1", "--epochs", "60",
                 "--hidden", "16", "--fallback", "uniform"])
    assert code == 0, capsys.readouterr().err
    manifest = verify_artifact(artifact_copy)
    assert ROUTER in manifest.files
    section = manifest.router
    assert section.config["experts"] == EXPERT_NAMES and section.config["fallback"] == "uniform"
    assert section.config["feature_layer"] == 1 and section.config["hidden"] == 16
    assert section.train["heldout_accuracy"] >= 0.95
    assert load_router(artifact_copy, manifest).config.fallback == "uniform"


def test_router_artifact_verifies_and_tampering_is_detected(routed_artifact, routed_copy):
    manifest = verify_artifact(routed_artifact)
    assert ROUTER in manifest.files and manifest.router.config["feature_layer"] == 1
    assert manifest.router.train["heldout_accuracy"] >= 0.95
    blob = bytearray((routed_copy / ROUTER).read_bytes())
    blob[-1] ^= 0x01
    (routed_copy / ROUTER).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="router.safetensors") as e:
        verify_artifact(routed_copy)
    assert "checksum" in str(e.value)
    (routed_copy / ROUTER).write_bytes(bytes(blob[:-8]))
    with pytest.raises(ArtifactError, match="router.safetensors.*truncated"):
        verify_artifact(routed_copy)


def test_load_router_rejects_mismatched_experts(routed_artifact):
    manifest = read_manifest(routed_artifact)
    manifest.router.config["experts"] = ["math", "chat", "code"]
    with pytest.raises(ArtifactError, match="router.safetensors.*differ"):
        load_router(routed_artifact, manifest)
    manifest.router.config["experts"] = EXPERT_NAMES
    manifest.router.config["hidden"] = 64
    with pytest.raises(ArtifactError, match="router.safetensors.*does not match"):
        load_router(routed_artifact, manifest)
    assert load_router(routed_artifact, manifest.model_copy(update={"router": None})) is None


# ----------------------------------------------------------------------------- the prompt head (format 2)

def test_head_features_are_the_truncated_prompts_and_ignore_what_follows(art):
    ids = encode_prompts(art.tokenizer, ["add abc fed gab", "jim hij", "purr opq rstu opqr stuo pqrs tuop"])
    many = prefix_pooled_features(art.model, ids, 1, [3, 8, None])
    for k in (3, 8, None):      # one pass serves every head; each equals a pass over the truncated prompts
        alone = pooled_features(art.model, [t[:k] if k else t for t in ids], 1)
        assert (many[k] - alone).abs().max() <= 1e-5
        assert (pooled_features(art.model, ids, 1, max_tokens=k) - alone).abs().max() <= 1e-5
    tails = [art.tokenizer.encode(x, add_special_tokens=False) for x in ("ABCDEF", "zz", "hij hij hij hij")]
    longer = [t + tail for t in ids for tail in tails]            # a continuation appended after the context
    heads = pooled_features(art.model, longer, 1, max_tokens=8)
    assert (heads - pooled_features(art.model, ids, 1, max_tokens=8).repeat_interleave(3, 0)).abs().max() <= 1e-5
    whole = pooled_features(art.model, longer, 1)
    assert (whole - pooled_features(art.model, ids, 1).repeat_interleave(3, 0)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="at least 1"):
        pooled_features(art.model, ids, 1, max_tokens=0)


def test_training_picks_the_cheapest_head_and_reports_the_search(art, routed_artifact, router):
    from router.train import PREFIX_CANDIDATES

    report = read_manifest(routed_artifact).router.train
    # every head separates these tasks: the shortest candidate is the cheapest as accurate as the best
    assert router.config.prefix_tokens == 8 == report["prefix_tokens"]
    assert router.config.version == ROUTER_FORMAT == 2
    longest = max(len(t) for t in encode_prompts(art.tokenizer, [r["prompt"] for r in router_rows()]))
    heads = [k for k in PREFIX_CANDIDATES if k and k < longest] + [min(k for k in PREFIX_CANDIDATES if k and k >= longest)]
    assert list(report["search"]) == [f"1/{k}" for k in heads]      # heads past the longest prompt: one of them
    assert all(a >= 0.95 for a in report["search"].values())
    assert report["layer_search"] == {"1": max(report["search"].values())}


def test_a_continuation_after_the_head_routes_as_its_context(art, router):
    ctx = encode_prompts(art.tokenizer, [r["prompt"] for r in router_rows(4, seed=5)])
    assert min(len(t) for t in ctx) > router.config.prefix_tokens
    tails = [art.tokenizer.encode(x, add_special_tokens=False) for x in ("hij klm", "opq rst tuo", "ABC")]
    base = router.route(router_features(art.model, ctx, router.config))
    joined = router.route(router_features(art.model, [c + t for c in ctx for t in tails], router.config))
    assert torch.allclose(joined.weights, base.weights.repeat_interleave(3, 0), atol=1e-5)
    assert not joined.fallback.any()
    # pooled over every token, the other task's letters pull the routing away or into the fallback
    whole = RouterConfig(**{**router.config.to_dict(), "prefix_tokens": None})
    x = router_features(art.model, [c + t for c in ctx for t in tails], whole)
    assert (x - router_features(art.model, ctx, whole).repeat_interleave(3, 0)).abs().max() > 1e-2


def test_training_with_a_fixed_head_or_every_token(art):
    rows = router_rows(12, seed=6)
    every, rep = train_router(art, rows, layer=1, hidden=16, epochs=60, prefix_tokens=None)
    assert every.config.prefix_tokens is None and rep["search"] == {"1/all": rep["heldout_accuracy"]}
    fixed, rep = train_router(art, rows, layer=1, hidden=16, epochs=60, prefix_tokens=12)
    assert fixed.config.prefix_tokens == 12 and list(rep["search"]) == ["1/12"]
    with pytest.raises(RouterDataError, match="--prefix-tokens"):
        train_router(art, rows, layer=1, prefix_tokens=0)


def test_distance_threshold_has_a_floor_when_a_task_shares_its_whole_head(art, router):
    from router.train import calibrate_distance

    z = router.mlp.centroids
    closest = min(float(torch.dist(z[i], z[j])) for i in range(len(z)) for j in range(len(z)) if i != j)
    closest /= z.shape[1] ** 0.5
    # features exactly at the centroids: every training distance is 0, the quantile too
    x = router.mlp.mean + router.mlp.std * z
    assert calibrate_distance(router.mlp, x) == pytest.approx(0.25 * closest, rel=1e-4)


def test_router_format_1_still_reads_and_a_newer_format_is_refused(routed_artifact):
    manifest = read_manifest(routed_artifact)
    old = {k: v for k, v in manifest.router.config.items() if k not in ("version", "prefix_tokens")}
    cfg = RouterConfig.from_dict(old)        # a format-1 router pools every token, as it was trained
    assert cfg.version == 1 and cfg.prefix_tokens is None
    assert RouterConfig.from_dict({**old, "version": 1, "prefix_tokens": 8}).prefix_tokens is None
    assert RouterConfig.from_dict({**old, "version": 2, "prefix_tokens": 8}).prefix_tokens == 8
    manifest.router.config = old
    assert load_router(routed_artifact, manifest).config.prefix_tokens is None
    manifest.router.config = {**old, "version": 3}
    with pytest.raises(ArtifactError, match=r"router.safetensors: router format 3 .*1\.\.2.*train-router"):
        load_router(routed_artifact, manifest)
    for bad in (0, -4, "8", True):
        with pytest.raises(RouterFormatError, match="prefix_tokens"):
            RouterConfig.from_dict({**old, "version": 2, "prefix_tokens": bad})


def test_cli_prefix_tokens(artifact_copy, tmp_path, capsys):
    from cli.main import main

    data = write_router_jsonl(tmp_path / "rows.jsonl", router_rows(10, seed=8))
    base = ["train-router", str(artifact_copy), "--data", str(data), "--layer", "1", "--epochs", "40",
            "--hidden", "16"]
    assert main(base + ["--prefix-tokens", "all"]) == 0, capsys.readouterr().err
    assert verify_artifact(artifact_copy).router.config["prefix_tokens"] is None
    assert main(base + ["--prefix-tokens", "12"]) == 0, capsys.readouterr().err
    assert verify_artifact(artifact_copy).router.config["prefix_tokens"] == 12
    with pytest.raises(SystemExit) as e:
        main(base + ["--prefix-tokens", "0"])
    assert e.value.code == 2


def test_served_loglikelihood_prompt_routes_as_its_context(routed_artifact):
    """lm-eval's multiple choice: context + each candidate as one echoed prompt; every candidate is scored
    by the context's routing, not by the backbone fallback or the candidate's own style."""
    from tests.conftest import app_client

    with app_client(routed_artifact) as c:
        t = c.app.state.artifact.tokenizer
        ctx = t.encode("add abc dcb gfe")
        prompts = [ctx + t.encode(x, add_special_tokens=False) for x in ("", "hij klm nij", "opqr stuo")]
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1,
                                             "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        routes = r.json()["twin"]["prompts"]
        assert [x["top_expert"] for x in routes] == ["math"] * 3 and not any(x["fallback"] for x in routes)
        assert all(x["weights"] == routes[0]["weights"] for x in routes)


def test_demo_retrains_a_format_1_router_and_keeps_a_current_one(routed_copy, tmp_path):
    """`make demo` on an artifact from before the head: its every-token router is retrained, once."""
    from rich.console import Console

    from twin.artifact import update_artifact
    from zoo.demo import ensure_demo_router

    section = read_manifest(routed_copy).router.model_dump()
    section["config"] = {k: v for k, v in section["config"].items() if k not in ("version", "prefix_tokens")}
    update_artifact(routed_copy, {}, {"router": section})
    assert load_router(routed_copy, verify_artifact(routed_copy)).config.version == 1
    zoo = tmp_path / "zoo"
    for task in EXPERT_NAMES:
        (zoo / "tasks" / task).mkdir(parents=True)
        write_router_jsonl(zoo / "tasks" / task / "router.jsonl", router_rows(12, seed=2, tasks=[task]))
    ensure_demo_router(routed_copy, zoo, console=Console(quiet=True))
    config = verify_artifact(routed_copy).router.config
    assert config["version"] == ROUTER_FORMAT and config["prefix_tokens"] == 8
    before = (routed_copy / "manifest.json").read_text()
    ensure_demo_router(routed_copy, zoo, console=Console(quiet=True))          # current: a cache hit
    assert (routed_copy / "manifest.json").read_text() == before


def test_a_head_shared_by_every_task_makes_the_search_read_further(art):
    """Prompts that all start alike (a system line, a chat template) cannot be told apart by their first 8
    tokens: the search keeps the shortest head that separates them."""
    rows = [{**r, "prompt": "please answer: " + r["prompt"]} for r in router_rows(12, seed=7)]
    router, report = train_router(art, rows, layer=1, hidden=16, epochs=80)
    assert report["search"]["1/8"] < 0.5                      # "<bos>please " is the same for every task
    k = router.config.prefix_tokens
    assert k > 8 and report["search"][f"1/{k}"] >= 0.95 and report["heldout_accuracy"] >= 0.95
    shorter = [a for h, a in report["search"].items() if h.split("/")[1] != "all" and int(h.split("/")[1]) < k]
    assert shorter and all(a < report["heldout_accuracy"] - 0.005 for a in shorter)   # each too inaccurate

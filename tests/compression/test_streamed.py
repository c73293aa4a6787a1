"""The build at real sizes, on tiny shapes: radix-select trims, row-block merges, sharded streamed writes,
copied-through tensors, the streamed gate, preflight, and what a killed or failing build leaves."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli.main import main
from compression.merging import MERGE_METHODS, merge_params, merge_tensor
from compression.merging.select import rank_range_mask
from compression.recipe import load_recipe
from twin.artifact import (
    BACKBONE,
    EXCLUSIVE,
    OWNER,
    ShardWriter,
    index_name,
    load_tensors,
    read_report,
    remove_stale_temps,
    tensor_files,
    verify_artifact,
)
from twin.loading import load_artifact
from zoo.synthetic import SyntheticCheckpoints, write_synthetic

ROOT = Path(__file__).resolve().parents[2]


# ---- selection and merge kernels ------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
def test_rank_range_mask_equals_a_stable_argsort_with_ties(n):
    """bf16 values tie often at the boundary: the radix select keeps exactly the ranks a stable sort gives."""
    g = torch.Generator().manual_seed(n)
    mag = torch.randn(n, generator=g).bfloat16().float().abs()
    order = torch.argsort(mag, stable=True)
    for lo, hi in [(0, n), (n - max(1, n // 5), n), (n // 3, n - n // 4), (0, 0), (n // 2, n // 2 + 1)]:
        want = torch.zeros(n, dtype=torch.bool)
        want[order[lo:hi]] = True
        got = rank_range_mask(mag, lo, hi)
        assert torch.equal(got, want), (lo, hi)
        assert int(got.sum()) == hi - lo


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_row_block_merge_equals_the_whole_tensor_merge(method):
    """merge_tensor in blocks of a few rows (with tie counters and trims carried across blocks) gives
    bit-identical θ* to one block, for every method, with rescaling on where the method has it."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(97, 33, generator=g).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(97, 33, generator=g)).bfloat16() for _ in range(3)]
    rescale = True if "rescale" in MERGE_METHODS[method].options else None
    p = merge_params(method, density=0.3, rescale=rescale, weights=[1.0, 0.5, 2.0])
    whole = merge_tensor("w", base, experts, method, **p)
    blocks = merge_tensor("w", base, experts, method, chunk_elements=3 * 33 * 4, **p)
    assert torch.equal(whole, blocks)
    assert not torch.equal(whole, base.float())


def test_merge_never_modifies_its_inputs():
    base = torch.randn(20, 10)
    experts = [base + 0.1 * torch.randn(20, 10) for _ in range(2)]
    copies = [e.clone() for e in experts]
    merge_tensor("w", base, experts, "ties", **merge_params("ties", density=0.3, rescale=True))
    assert all(torch.equal(a, b) for a, b in zip(experts, copies))


# ---- sharded, streamed writes -----------------------------------------------------------------------
def test_shard_writer_writes_transformers_style_shards_and_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}     # 1 KiB each
    w = ShardWriter(tmp_path, BACKBONE, shard_bytes=3000)
    for k, t in tensors.items():
        w.add(k, t)
    files = w.close()
    assert index_name(BACKBONE) in files and len(files) == 5             # 4 shards of <= 3 tensors + index
    index = json.loads((tmp_path / index_name(BACKBONE)).read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == 10 * 1024
    assert tensor_files(tmp_path, BACKBONE)[0].name == "backbone-00001-of-00004.safetensors"
    got = load_tensors(tmp_path, BACKBONE)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".*part*"))
    # one shard: the plain single-file layout
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one, EXCLUSIVE, shard_bytes=1 << 20)
    w.add("a", torch.ones(3))
    assert w.close() == [EXCLUSIVE] and (one / EXCLUSIVE).is_file()


@pytest.fixture(scope="module")
def synthetic_full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "full"
    write_synthetic(SyntheticCheckpoints("tiny-qwen2", experts=2, dtype="float32"), out)
    return out


@pytest.fixture(scope="module")
def synthetic_lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "lora"
    write_synthetic(SyntheticCheckpoints("tiny-llama", experts=2, lora_rank=4, dtype="float32"), out)
    return out


def test_sharded_build_serves_the_same_model(synthetic_full, tmp_path):
    """Small shards: θ* and the factors in many files; the artifact verifies, loads and equals the
    single-file build tensor for tensor."""
    from compression.build import build_artifact
    recipe = load_recipe(synthetic_full / "recipe.yaml")
    one, many = tmp_path / "one", tmp_path / "many"
    build_artifact(recipe, one, quiet=True)
    build_artifact(recipe, many, quiet=True, shard_bytes=40_000)
    assert len(tensor_files(many, BACKBONE)) > 3 and len(tensor_files(many, EXCLUSIVE)) > 3
    verify_artifact(many)
    for name in (BACKBONE, EXCLUSIVE):
        a, b = load_tensors(one, name), load_tensors(many, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from twin.generate import prompt_logits
    logits = []
    for path in (one, many):
        art = load_artifact(path, device="cpu", dtype="float32")
        logits.append(prompt_logits(art.model, [[3, 7, 11, 5]], torch.tensor([[0.3, 0.7]]))[0])
    assert torch.equal(logits[0], logits[1])


def test_lora_experts_leave_untouched_tensors_unmerged(synthetic_lora, tmp_path):
    """Adapters on the blocks' linears only: embedding, head and norms are θ_0 itself, with no δ_t and
    no factors; every adapted weight has its factors."""
    from compression.build import build_artifact
    from compression.checkpoints import LazyState
    recipe = load_recipe(synthetic_lora / "recipe.yaml")
    m = build_artifact(recipe, tmp_path / "art", quiet=True)
    base = LazyState(synthetic_lora / "base")
    backbone = load_tensors(tmp_path / "art", BACKBONE)
    counts = read_report(tmp_path / "art")["build"]["tensors"]
    untouched = [k for k in base.keys() if "proj" not in k]  # noqa: SIM118 (LazyState is not a dict)
    assert counts["unchanged"] == len(untouched) > 0
    for k in untouched:
        assert torch.equal(backbone[k], base.get(k)) and k not in m.tensors
    assert {k for k in base.keys() if "proj" in k} == set(m.tensors)  # noqa: SIM118


# ---- the streamed gate on real-shape synthetic checkpoints ------------------------------------------
@pytest.mark.parametrize("which", ["synthetic_full", "synthetic_lora"])
def test_build_and_gate_on_synthetic_checkpoints(which, request, tmp_path, capsys):
    src = request.getfixturevalue(which)
    out = tmp_path / "art"
    assert main(["build", str(src / "recipe.yaml"), "-o", str(out), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "build estimate for this machine" in err and "gate: expert e1 (2/2)" in err
    report = read_report(out)
    parity = report["parity"]
    assert parity["backbone_max_abs_logit_diff"] <= 1e-4 and "decode step" in parity["served_path"]
    for entry in parity["experts"].values():
        assert entry["implementation_error"] <= 1e-4
    phases = report["build"]["phases"]
    assert phases["merge_factor_s"] > 0 and phases["gate_s"] > 0 and phases["total_s"] >= phases["gate_s"]
    assert report["build"]["estimate"]["parameters"] > 0


def test_gate_checks_the_decode_step(synthetic_full, tmp_path, capsys, monkeypatch):
    """A fault only in the decode path (the single-token rows of a step) fails the gate: it runs the step."""
    from twin.model import attention
    real = attention._decode_attend

    def wrong(query, keys, values, mask, scaling, softcap):
        return real(query, keys, values, mask, 3.0 * (scaling or query.shape[-1] ** -0.5), softcap)

    monkeypatch.setattr(attention, "_decode_attend", wrong)
    out = tmp_path / "art"
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out)]) == 2
    assert "parity gate" in capsys.readouterr().err and not out.exists()


# ---- preflight -------------------------------------------------------------------------------------
def test_estimate_only_writes_nothing(synthetic_full, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out), "--estimate"]) == 0
    assert "peak memory" in capsys.readouterr().err and not out.exists()


def test_preflight_refuses_with_the_numbers(synthetic_full, tmp_path, capsys, monkeypatch):
    from compression import preflight
    monkeypatch.setattr(preflight, "available_memory", lambda: 100 << 20)
    out = tmp_path / "art"
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "GiB is available now" in err and not out.exists()
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_estimate_tracks_the_shapes(synthetic_full, synthetic_lora):
    from compression.preflight import estimate
    full = estimate(load_recipe(synthetic_full / "recipe.yaml"), threads=1)
    lora = estimate(load_recipe(synthetic_lora / "recipe.yaml"), threads=1)
    assert full.unchanged == 0 and lora.unchanged > 0
    assert full.artifact_bytes > full.parameters * 4         # fp32 θ* plus the factors
    assert full.total_s > 0 and full.gate_peak_bytes > 0 and full.largest == "model.embed_tokens.weight"


# ---- failing and killed builds ----------------------------------------------------------------------
def test_disk_full_exits_2_and_leaves_nothing(synthetic_full, tmp_path, capsys, monkeypatch):
    from twin import artifact

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", full_disk)
    out = tmp_path / "art"
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out), "--skip-parity"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_killed_build_leaves_nothing_loadable_and_is_cleaned_up(synthetic_full, tmp_path):
    """SIGKILL in the middle of a build: no artifact at the target (the temp dir is never renamed), and
    the next build of that target removes the dead writer's temp dir."""
    out = tmp_path / "art"
    child = ("import sys, time\n"
             "import compression.build as b\n"
             "real = b.merge_tensor\n"
             "def slow(*a, **k):\n"
             "    time.sleep(0.2)\n"
             "    return real(*a, **k)\n"
             "b.merge_tensor = slow\n"
             "from cli.main import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", child, "build", str(synthetic_full / "recipe.yaml"), "-o", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".art.tmp-*/" + OWNER)):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    temps = list(tmp_path.glob(".art.tmp-*"))
    assert not out.exists() and len(temps) == 1 and (temps[0] / OWNER).is_file()
    assert remove_stale_temps(out) == temps and not temps[0].exists()


def test_lora_experts_under_a_linear_merge_are_factored_from_their_own_factors(synthetic_lora, tmp_path):
    """task_arithmetic over LoRA adapters: δ_t = τ_t − Σ c_s τ_s is a product of the adapters' factors, so it
    is factored exactly (QR + a small SVD) without a dense δ; B A equals θ_t − θ* (fp32) and the error is 0."""
    from compression.build import build_artifact
    from compression.checkpoints import LazyState, open_expert
    from twin.artifact import stored_factors
    r = load_recipe(synthetic_lora / "recipe.yaml")
    recipe = r.model_copy(update={"merge": r.merge.model_copy(update={"method": "task_arithmetic", "lam": 0.7}),
                                  "dtype": "float32", "rank": r.rank.model_copy(update={"rank": 16})})
    m = build_artifact(recipe, tmp_path / "art", quiet=True)
    report = read_report(tmp_path / "art")["build"]
    assert report["tensors"].get("factors_svd", 0) == 2 * len(m.tensors) > 0
    assert report["tensors"]["randomized_svd"] == report["tensors"]["exact_svd"] == 0
    backbone = load_tensors(tmp_path / "art", BACKBONE)
    exclusive = load_tensors(tmp_path / "art", EXCLUSIVE)
    base = LazyState(synthetic_lora / "base")
    for t, spec in enumerate(recipe.experts):
        expert = open_expert(spec.path, base)
        for name, info in m.tensors.items():
            assert info.rel_error[spec.name] < 1e-6 and info.ranks[spec.name] <= 2 * 4
            B, A = stored_factors(exclusive, name, spec.name)
            want = expert.get(name).float() - backbone[name].float()
            assert torch.allclose(B @ A, want, atol=1e-6, rtol=1e-4)


def test_the_gate_runs_before_the_artifact_is_published(synthetic_full, tmp_path, capsys, monkeypatch):
    """A failing gate publishes nothing: an artifact already at the target stays as it was, and no temp dir
    is left (the gate runs on the temp dir, before the rename)."""
    from compression import parity
    out = tmp_path / "art"
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out), "--skip-parity"]) == 0
    before = verify_artifact(out).files

    def fail(*_a, **_k):
        raise parity.ParityError("parity gate: forced for the test")

    monkeypatch.setattr(parity, "check_parity", fail)
    assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out)]) == 2
    assert "forced for the test" in capsys.readouterr().err
    assert verify_artifact(out).files == before and verify_artifact(out).skip_parity is True
    assert not list(tmp_path.glob(".art.*"))


def test_gate_checks_chunked_prefill_and_mixed_rows(synthetic_full, tmp_path, monkeypatch):
    """Faults the padded forward never had: a prefill chunk that starts mid-prompt attending without its
    mask, and a batch whose rows of different experts get each other's weights. The gate runs the served
    steps (two chunks, two decodes, θ* and every expert as rows of one batch) and refuses both."""
    from twin.model import attention, batch

    out = tmp_path / "art"
    real_attend = attention._attend

    def no_mask(query, keys, values, mask, scaling, softcap, sinks=None):
        if mask is not None:   # only chunks after the first one of a prompt carry a mask
            keys, values = keys[..., : query.shape[2], :], values[..., : query.shape[2], :]
            mask = None
        return real_attend(query, keys, values, mask, scaling, softcap, sinks)

    with monkeypatch.context() as m:
        m.setattr(attention, "_attend", no_mask)
        assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out)]) == 2
    assert not out.exists()

    real_build = batch.FlatBatch.build.__func__

    def swapped(cls, decode, chunks, device=None, bucket=False, weights=None, logits="last"):
        if weights is not None and len(weights) > 1:
            weights = weights[1:] + weights[:1]          # every row takes the next row's weights
        return real_build(cls, decode, chunks, device, bucket, weights, logits)

    with monkeypatch.context() as m:
        m.setattr(batch.FlatBatch, "build", classmethod(swapped))
        assert main(["build", str(synthetic_full / "recipe.yaml"), "-o", str(out)]) == 2
    assert not out.exists()

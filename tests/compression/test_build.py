"""Recipe -> artifact: merged backbone, low-rank exclusive deltas, report, patterns, PEFT experts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from compression.build import build_artifact, keeps_delta
from compression.checkpoints import CheckpointError, LazyState, open_expert
from compression.merging import merge_params, merge_state
from compression.recipe import RankPolicy
from tests.conftest import (
    EXPERT_NAMES,
    TINY_ARTIFACT_RECIPE,
    build_tiny_artifact,
    load_state,
    make_char_tokenizer,
    make_recipe,
    make_tiny_llama,
    make_tiny_model,
    save_char_tokenizer,
)
from twin.artifact import (
    BACKBONE,
    EXCLUSIVE,
    REPORT,
    exclusive_key,
    read_manifest,
    read_report,
    verify_artifact,
)
from twin.manifest import FORMAT_VERSION, Manifest


def load_artifact(path: Path) -> tuple[Manifest, dict, dict]:
    return read_manifest(path), load_file(str(path / BACKBONE)), load_file(str(path / EXCLUSIVE))


def reconstruct(backbone: dict, exclusive: dict, expert: str) -> dict[str, torch.Tensor]:
    """θ_t ≈ θ* + B_t A_t (2-D) or θ* + δ_t (1-D); θ* where no delta was kept."""
    out = {}
    for name, w in backbone.items():
        w = w.float()
        if exclusive_key(name, expert, "A") in exclusive:
            w = w + exclusive[exclusive_key(name, expert, "B")].float() @ exclusive[exclusive_key(name, expert, "A")].float()
        elif exclusive_key(name, expert, "delta") in exclusive:
            w = w + exclusive[exclusive_key(name, expert, "delta")].float()
        out[name] = w
    return out


def np_ties(tv: np.ndarray, density: float, lam: float) -> np.ndarray:
    """Independent TIES reference: per-task top-k by magnitude, mass sign election, disjoint mean."""
    t = tv.shape[0]
    flat = tv.reshape(t, -1).astype(np.float64)
    k = max(1, round(density * flat.shape[1]))
    trimmed = np.zeros_like(flat)
    for i in range(t):
        top = np.argsort(-np.abs(flat[i]), kind="stable")[:k]
        trimmed[i, top] = flat[i, top]
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return (lam * merged).reshape(tv.shape[1:])


@pytest.fixture(scope="module")
def states(tiny_base_dir, tiny_expert_dirs):
    return load_state(tiny_base_dir), {n: load_state(p) for n, p in tiny_expert_dirs.items()}


@pytest.fixture(scope="module")
def ta_full_rank(tiny_base_dir, tiny_expert_dirs, tmp_path_factory) -> Path:
    """task_arithmetic (λ=0.4) at rank 64 ≥ min(d_out, d_in) of every tensor: lossless deltas."""
    return build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path_factory.mktemp("ta") / "art",
                               merge={"method": "task_arithmetic", "lam": 0.4}, rank={"rank": 64})


# ----------------------------------------------------------------------------- layout

def test_artifact_layout_and_manifest(tiny_artifact, tiny_base_dir, states):
    base, _ = states
    manifest = verify_artifact(tiny_artifact)
    for rel in ("manifest.json", BACKBONE, EXCLUSIVE, REPORT, "tokenizer/tokenizer.json"):
        assert (tiny_artifact / rel).is_file(), rel
    assert manifest.format_version == FORMAT_VERSION == 3
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.config["hidden_size"] == 32 and manifest.config["num_key_value_heads"] == 2
    assert manifest.expert_names == EXPERT_NAMES
    assert manifest.experts[0].description == "math expert"
    assert manifest.merge.method == "ties" and manifest.merge.density == 0.5
    assert manifest.rank_policy.rank == 8 and manifest.router is None and manifest.dtype == "float32"
    assert manifest.parity is None and manifest.skip_parity is False and manifest.untied_head is False
    assert set(manifest.tensors) == set(base)  # include "*" keeps every tensor's delta
    up = manifest.tensors["model.layers.0.mlp.up_proj.weight"]
    assert up.shape == [64, 32] and up.kind == "lowrank" and up.factor_dtype == "float32"
    assert set(up.quant_error.values()) == {0.0}  # fp32 factors are stored as computed
    assert manifest.tensors["model.norm.weight"].kind == "dense"
    # the tokenizer travels with the artifact and encodes like the original
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_artifact / "tokenizer"), local_files_only=True)
    text = "hello, world!"
    assert tok(text).input_ids == make_char_tokenizer()(text).input_ids
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_backbone_is_the_ties_merge(tiny_artifact, states):
    base, experts = states
    _, backbone, _ = load_artifact(tiny_artifact)
    p = merge_params("ties", **{k: v for k, v in TINY_ARTIFACT_RECIPE["merge"].items() if k != "method"})
    expected = merge_state(base, [experts[n] for n in EXPERT_NAMES], "ties", **p)
    assert set(backbone) == set(expected)
    for name, w in expected.items():
        assert backbone[name].dtype == torch.float32
        assert_close(backbone[name], w, atol=1e-7, rtol=0)
    # and against an independent numpy TIES on a few tensors
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"):
        tv = np.stack([(experts[n][name] - base[name]).numpy() for n in EXPERT_NAMES])
        ref = base[name].numpy().astype(np.float64) + np_ties(tv, density=0.5, lam=1.0)
        np.testing.assert_allclose(backbone[name].numpy(), ref, atol=1e-6)
    # the shared component moved θ* away from θ0 towards the experts
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (backbone[name] - base[name]).abs().mean() > 1e-3


def test_backbone_is_the_task_arithmetic_merge(ta_full_rank, states):
    base, experts = states
    _, backbone, _ = load_artifact(ta_full_rank)
    expected = merge_state(base, [experts[n] for n in EXPERT_NAMES], "task_arithmetic", lam=0.4)
    for name, w in expected.items():
        assert_close(backbone[name], w, atol=1e-7, rtol=0)
        hand = base[name] + 0.4 * sum(experts[n][name] - base[name] for n in EXPERT_NAMES)
        assert_close(backbone[name], hand, atol=1e-6, rtol=1e-6)


def test_low_rank_reconstruction_within_reported_error(tiny_artifact, states):
    _, experts = states
    manifest, backbone, exclusive = load_artifact(tiny_artifact)
    n_checked = 0
    for expert in EXPERT_NAMES:
        rec = reconstruct(backbone, exclusive, expert)
        for name, info in manifest.tensors.items():
            target = experts[expert][name].float()
            if info.kind != "lowrank":
                continue
            assert info.ranks[expert] == min(8, *info.shape)
            A = exclusive[exclusive_key(name, expert, "A")]
            B = exclusive[exclusive_key(name, expert, "B")]
            assert A.shape == (8, info.shape[1]) and B.shape == (info.shape[0], 8)
            delta = target - backbone[name]
            err = ((target - rec[name]).norm() / delta.norm()).item()
            reported = info.rel_error[expert]
            assert err <= reported + 2e-6
            assert err == pytest.approx(reported, abs=2e-6)
            assert 0.05 < reported < 1.0  # random full-rank deltas: rank 8 is lossy but helps
            n_checked += 1
    assert n_checked == 3 * 16  # 7 matrices per layer × 2 + embed + lm_head


def test_full_rank_reconstruction_is_exact(ta_full_rank, states):
    _, experts = states
    manifest, backbone, exclusive = load_artifact(ta_full_rank)
    for expert in EXPERT_NAMES:
        rec = reconstruct(backbone, exclusive, expert)
        for name, target in experts[expert].items():
            assert_close(rec[name], target.float(), atol=1e-5, rtol=1e-5)
            info = manifest.tensors[name]
            if info.kind == "lowrank":
                assert info.ranks[expert] == min(info.shape)
                assert info.rel_error[expert] < 1e-5


def test_one_dim_deltas_stored_dense_and_exact(tiny_artifact, states):
    _, experts = states
    manifest, backbone, exclusive = load_artifact(tiny_artifact)
    dense = [n for n, i in manifest.tensors.items() if i.kind == "dense"]
    assert sorted(dense) == sorted(n for n, w in backbone.items() if w.ndim == 1)
    assert len(dense) == 5  # 2 norms per layer + final norm
    for expert in EXPERT_NAMES:
        for name in dense:
            d = exclusive[exclusive_key(name, expert, "delta")]
            assert exclusive_key(name, expert, "A") not in exclusive
            assert torch.equal(d, experts[expert][name] - backbone[name])
            assert torch.equal(backbone[name] + d, experts[expert][name])


def test_report_counts_bytes_exactly(tiny_artifact, states):
    base, _ = states
    report = read_report(tiny_artifact)["build"]
    factor = sum(8 * (w.shape[0] + w.shape[1]) * 4 if w.ndim == 2 else w.numel() * 4 for w in base.values())
    dense = sum(w.numel() * 4 for w in base.values())
    assert set(report["experts"]) == set(EXPERT_NAMES)
    for name, s in report["experts"].items():
        assert s["factor_bytes"] == factor
        assert s["dense_delta_bytes"] == dense
        assert s["factor_bytes"] < s["dense_delta_bytes"]
        assert s["ratio"] == pytest.approx(factor / dense, abs=1e-4)
        assert 0.05 < s["mean_rel_error"] < 1.0
    manifest = read_manifest(tiny_artifact)
    for name in EXPERT_NAMES:
        errs = [i.rel_error[name] for i in manifest.tensors.values() if i.kind == "lowrank"]
        assert report["experts"][name]["mean_rel_error"] == pytest.approx(sum(errs) / len(errs), abs=1e-4)
    assert report["merge"]["method"] == "ties" and report["rank_policy"]["rank"] == 8


def test_include_exclude_patterns(tiny_base_dir, tiny_expert_dirs, tmp_path, states):
    base, experts = states
    rank = {"rank": 2, "include": ["model.layers.*"], "exclude": ["*norm*", "*.self_attn.k_proj.*"]}
    out = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "art",
                              merge={"method": "average"}, rank=rank)
    manifest, backbone, exclusive = load_artifact(out)
    kept = {n for n in base if n.startswith("model.layers.") and "norm" not in n and ".k_proj." not in n}
    assert len(kept) == 12
    assert set(manifest.tensors) == kept
    assert {k.split("::")[0] for k in exclusive} == kept
    assert len(exclusive) == len(kept) * 3 * 2  # A and B for every expert
    assert set(backbone) == set(base)  # the backbone still has everything, merged
    avg = merge_state(base, [experts[n] for n in EXPERT_NAMES], "average")
    assert_close(backbone["model.norm.weight"], avg["model.norm.weight"])
    # without a delta, a dropped tensor reconstructs to θ* only
    rec = reconstruct(backbone, exclusive, "math")
    assert torch.equal(rec["model.layers.0.self_attn.k_proj.weight"], backbone["model.layers.0.self_attn.k_proj.weight"])
    s = read_report(out)["build"]["experts"]["math"]
    assert s["dense_delta_bytes"] == sum(base[n].numel() * 4 for n in kept)
    assert s["factor_bytes"] == sum(2 * sum(base[n].shape) * 4 for n in kept)


def test_keeps_delta_globs():
    pol = RankPolicy(include=["model.layers.*", "lm_head.weight"], exclude=["*norm*"])
    assert keeps_delta("model.layers.0.mlp.up_proj.weight", pol)
    assert keeps_delta("lm_head.weight", pol)
    assert not keeps_delta("model.layers.0.input_layernorm.weight", pol)
    assert not keeps_delta("model.embed_tokens.weight", pol)
    assert keeps_delta("anything", RankPolicy())


def test_energy_policy_ranks(tiny_base_dir, tiny_expert_dirs, tmp_path, states):
    _, experts = states
    out = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "art",
                              merge={"method": "task_arithmetic", "lam": 0.3},
                              rank={"rank": None, "energy": 0.8, "max_rank": 12})
    manifest, backbone, exclusive = load_artifact(out)
    seen = set()
    for name, info in manifest.tensors.items():
        if info.kind != "lowrank":
            continue
        for expert in EXPERT_NAMES:
            delta = (experts[expert][name] - backbone[name]).double()
            s2 = torch.linalg.svdvals(delta).pow(2)
            cum = (torch.cumsum(s2, 0) / s2.sum()).tolist()
            want = min(12, next(i + 1 for i, c in enumerate(cum) if c >= 0.8))
            assert info.ranks[expert] == want, (name, expert)
            assert exclusive[exclusive_key(name, expert, "A")].shape[0] == want
            if want < 12:
                assert 1 - info.rel_error[expert] ** 2 >= 0.8 - 1e-4
            seen.add(want)
    assert len(seen) > 1 and 12 in seen and min(seen) < 12  # ranks differ per tensor; the cap binds for some


def test_bfloat16_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path, states):
    base, experts = states
    out = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "art",
                              merge={"method": "task_arithmetic", "lam": 0.5}, rank={"rank": 64}, dtype="bfloat16")
    manifest, backbone, exclusive = load_artifact(out)
    assert manifest.dtype == "bfloat16"
    assert {w.dtype for w in backbone.values()} == {torch.bfloat16}
    assert {w.dtype for w in exclusive.values()} == {torch.bfloat16}
    # computed in bf16 as mergekit computes a bf16 merge: the inputs cast to bf16, bf16 arithmetic
    from compression.merging import merge_tensor
    bf = torch.bfloat16
    for name, w in base.items():
        want = merge_tensor(name, w.to(bf), [experts[n][name].to(bf) for n in EXPERT_NAMES], "task_arithmetic",
                            lam=0.5, out_dtype=bf, compute_dtype=bf)
        assert torch.equal(backbone[name], want)
    rec = reconstruct(backbone, exclusive, "code")
    for name, target in experts["code"].items():
        assert_close(rec[name], target, atol=2e-2, rtol=2e-2)  # bf16 storage precision
    s = read_report(out)["build"]["experts"]["code"]
    assert s["dense_delta_bytes"] == sum(w.numel() * 2 for w in base.values())


def test_dare_build_is_reproducible_and_matches_merge_state(tiny_base_dir, tiny_expert_dirs, tmp_path, states):
    base, experts = states
    merge = {"method": "dare_linear", "density": 0.5, "lam": 0.5, "seed": 3}
    a = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "a", merge=merge, rank={"rank": 1})
    b = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "b", merge=merge, rank={"rank": 1})
    assert (a / BACKBONE).read_bytes() == (b / BACKBONE).read_bytes()
    backbone = load_file(str(a / BACKBONE))
    p = merge_params("dare_linear", density=0.5, lam=0.5, seed=3)
    expected = merge_state(base, [experts[n] for n in EXPERT_NAMES], "dare_linear", **p)
    for name, w in expected.items():
        assert_close(backbone[name], w, atol=1e-7, rtol=0)
    ta = merge_state(base, [experts[n] for n in EXPERT_NAMES], "task_arithmetic", lam=0.5)
    assert not torch.allclose(backbone["lm_head.weight"], ta["lm_head.weight"])


def test_rebuild_replaces_the_output_dir(tiny_base_dir, tiny_expert_dirs, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, out, merge={"method": "average"}, rank={"rank": 1})
    assert not (out / "stale.txt").exists()
    verify_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ----------------------------------------------------------------------------- checkpoint errors

def test_bad_experts_raise_checkpoint_error(tiny_base_dir, tiny_expert_dirs, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="expert not found") as ei:
        build_artifact(make_recipe(tiny_base_dir, {"x": missing}), out, quiet=True)
    assert str(missing) in str(ei.value)
    # an expert lacking a tensor of the base
    partial = tmp_path / "partial"
    partial.mkdir()
    st = load_state(tiny_expert_dirs["math"])
    del st["model.norm.weight"]
    save_file(st, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        build_artifact(make_recipe(tiny_base_dir, {"x": partial}), out, quiet=True)
    # an expert of another shape
    other = make_tiny_llama(tmp_path / "wide", seed=1, tokenizer=False, intermediate_size=48)
    with pytest.raises(CheckpointError, match="shape"):
        build_artifact(make_recipe(tiny_base_dir, {"x": other}), out, quiet=True)
    # a base without a tokenizer
    no_tok = make_tiny_llama(tmp_path / "notok", seed=1, tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        build_artifact(make_recipe(no_tok, {"x": tiny_expert_dirs["math"]}), out, quiet=True)
    assert not out.exists()


# ----------------------------------------------------------------------------- PEFT LoRA experts on Qwen2

LORA_TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def qwen2_lora(tmp_path_factory):
    """A tiny Qwen2 base dir and 3 LoRA adapter dirs + each adapter's merge_and_unload() state."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("qwen2")
    model = make_tiny_model(seed=7, arch="qwen2")
    base_dir = root / "base"
    model.save_pretrained(str(base_dir))
    save_char_tokenizer(base_dir)
    adapters, merged = {}, {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        torch.manual_seed(200 + i)  # lora_A init
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        g = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:  # zero at init; make the adapter do something
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        adapters[name] = root / name
        peft_model.save_pretrained(str(adapters[name]))
        merged[name] = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base_dir, adapters, merged


def test_peft_expert_matches_merge_and_unload(qwen2_lora, tmp_path):
    base_dir, adapters, merged = qwen2_lora
    base = LazyState(base_dir)
    expert = open_expert(adapters["alpha"], base)
    assert expert.scale == 2.0  # lora_alpha / r
    assert len(expert.pairs) == 2 * len(LORA_TARGETS)
    for name in base.keys():  # noqa: SIM118 (LazyState is not a dict)
        assert_close(expert.get(name), merged["alpha"][name], atol=1e-5, rtol=1e-5)
    cfg_path = adapters["alpha"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    rs = tmp_path / "rslora"
    rs.mkdir()
    (rs / "adapter_model.safetensors").write_bytes((adapters["alpha"] / "adapter_model.safetensors").read_bytes())
    (rs / "adapter_config.json").write_text(json.dumps(dict(cfg, use_rslora=True)))
    assert open_expert(rs, base).scale == 8 / 4 ** 0.5


def test_qwen2_lora_experts_end_to_end(qwen2_lora, tmp_path):
    base_dir, adapters, merged = qwen2_lora
    base = load_state(base_dir)
    assert "model.layers.0.self_attn.q_proj.bias" in base  # Qwen2 has q/k/v biases
    out = build_tiny_artifact(base_dir, adapters, tmp_path / "art",
                              merge={"method": "task_arithmetic", "lam": 0.5}, rank={"rank": 12})
    manifest = verify_artifact(out)
    assert manifest.architecture == "Qwen2ForCausalLM"
    _, backbone, exclusive = load_artifact(out)
    names = list(adapters)
    # θ* = θ0 + λ Σ scale·B_t A_t on LoRA targets, θ0 elsewhere
    for pname, w0 in base.items():
        lora = any(f".{t}.weight" in pname for t in LORA_TARGETS)
        expected = w0 + 0.5 * sum(merged[n][pname] - w0 for n in names)
        assert_close(backbone[pname], expected, atol=1e-6, rtol=1e-6)
        if not lora:
            assert torch.equal(backbone[pname], w0), pname
    # δ_t = θ_t − θ* has rank ≤ 3·4 = 12 on LoRA targets (λ=0.5 keeps all three terms) and is 0 elsewhere
    for pname, info in manifest.tensors.items():
        lora = any(f".{t}.weight" in pname for t in LORA_TARGETS)
        for n in names:
            if info.kind == "lowrank":
                assert info.ranks[n] == (12 if lora else 0), pname
                assert info.rel_error[n] < 1e-4
            else:
                assert torch.count_nonzero(exclusive[exclusive_key(pname, n, "delta")]) == 0  # biases/norms
    # θ* + B_t A_t reproduces peft's merge_and_unload() for every tensor
    for n in names:
        rec = reconstruct(backbone, exclusive, n)
        for pname in base:
            assert_close(rec[pname], merged[n][pname], atol=1e-4, rtol=1e-4)
        # and the other experts' weights are not what this expert reconstructs to
        other = names[(names.index(n) + 1) % 3]
        assert not torch.allclose(rec["model.layers.0.mlp.up_proj.weight"],
                                  merged[other]["model.layers.0.mlp.up_proj.weight"], atol=1e-3)


def test_qwen2_reconstruction_runs_like_the_merged_model(qwen2_lora, tmp_path):
    """Loading θ* + B A into the HF model gives the logits of peft's merged model."""
    from transformers import Qwen2ForCausalLM

    base_dir, adapters, merged = qwen2_lora
    out = build_tiny_artifact(base_dir, {"beta": adapters["beta"], "gamma": adapters["gamma"]}, tmp_path / "art",
                              merge={"method": "ties", "density": 0.3}, rank={"rank": 32})
    _, backbone, exclusive = load_artifact(out)
    model = Qwen2ForCausalLM.from_pretrained(str(base_dir)).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    logits = {}
    for n, state in (("rec", reconstruct(backbone, exclusive, "beta")), ("ref", merged["beta"])):
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            logits[n] = model(ids).logits
    assert_close(logits["rec"], logits["ref"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", [
    {"target_modules": ["embed_tokens"]},
    {"target_modules": ["q_proj"], "use_dora": True},
    {"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 16}},
], ids=["embedding", "dora", "rank_pattern"])
def test_unsupported_peft_variants_are_merged_right_or_rejected(tmp_path, extra):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(seed=3)
    model.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, **extra))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:  # A and B (embedding A inits to zero, linear B inits to zero)
                p.copy_(0.1 * torch.randn(p.shape))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ref = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    base = LazyState(tmp_path / "base")
    assert any(not torch.allclose(base.get(k), ref[k]) for k in base.keys())  # noqa: SIM118
    try:
        expert = open_expert(tmp_path / "adapter", base)
    except CheckpointError:
        return  # an explicit refusal is fine
    for name in base.keys():  # noqa: SIM118
        assert_close(expert.get(name), ref[name], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- tied heads

def _served_logits(art, ids: list[int], t: int) -> torch.Tensor:
    """The artifact's model pinned to expert t (w one-hot), prefill of one row: (S, V)."""
    T = len(art.expert_names)
    w = torch.zeros(1, T)
    w[0, t] = 1.0
    from twin.generate import prompt_logits
    return prompt_logits(art.model, [ids], w)[0]


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory):
    """A tied-embedding base; experts: a full fine-tune saved untied with its own head, one that stays
    tied, and a PEFT LoRA adapter with modules_to_save=["lm_head"]. Returns dirs + reference logits fns."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    base_dir = make_tiny_llama(root / "base", seed=5, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_state(base_dir)   # saved tied: one tensor
    g = torch.Generator().manual_seed(77)

    def perturbed(untie: bool):
        m = LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
        if untie:  # a fine-tune that trained its own head: save it untied
            m.config.tie_word_embeddings = False
            m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return m

    experts, refs = {}, {}
    own = perturbed(untie=True)
    experts["own"] = root / "own"
    own.save_pretrained(str(experts["own"]))
    assert "lm_head.weight" in load_state(experts["own"])
    tied = perturbed(untie=False)
    experts["tied"] = root / "tied"
    tied.save_pretrained(str(experts["tied"]))
    assert "lm_head.weight" not in load_state(experts["tied"])
    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir)),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft.eval()
    experts["peft"] = root / "peft"
    peft.save_pretrained(str(experts["peft"]))
    for name, model in (("own", own), ("tied", tied), ("peft", peft)):
        refs[name] = model
    return base_dir, experts, refs


def test_tied_base_with_an_untied_expert_head_is_served_exactly(tied_zoo, tmp_path):
    from transformers import LlamaForCausalLM

    from twin.loading import load_artifact as load_served

    base_dir, experts, refs = tied_zoo
    out = build_tiny_artifact(base_dir, experts, tmp_path / "art",
                              merge={"method": "task_arithmetic", "lam": 0.5}, rank={"rank": 64})
    manifest = verify_artifact(out)
    assert manifest.untied_head and manifest.config["tie_word_embeddings"] is False
    backbone = load_file(str(out / BACKBONE))
    base = load_state(base_dir)
    # θ*'s head: task arithmetic over each checkpoint's head (its own, or its tied embedding), from θ_0's embedding
    heads = {"own": refs["own"].lm_head.weight, "tied": refs["tied"].model.embed_tokens.weight,
             "peft": refs["peft"].base_model.model.lm_head.modules_to_save["default"].weight}
    e0 = base["model.embed_tokens.weight"]
    want = e0 + 0.5 * sum(h.detach() - e0 for h in heads.values())
    assert_close(backbone["lm_head.weight"], want, atol=1e-6, rtol=1e-6)
    assert "lm_head.weight" in manifest.tensors and manifest.tensors["lm_head.weight"].ranks["own"] > 0
    art = load_served(out, device="cpu", dtype="float32")
    ids = art.tokenizer.encode("add two and three")
    for t, name in enumerate(art.expert_names):
        got = _served_logits(art, ids, t)
        model = refs[name] if name == "peft" else LlamaForCausalLM.from_pretrained(str(experts[name])).eval()
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0]
        assert_close(got, ref, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # before this layout the tied embedding served as every expert's head: the "own" expert differs from that
    with torch.inference_mode():
        tied_view = refs["own"].model(torch.tensor([ids])).last_hidden_state[0] @ refs["own"].model.embed_tokens.weight.T
    assert (tied_view - _served_logits(art, ids, 0)).abs().max() > 0.05


def test_tied_base_with_tied_experts_stays_tied(tied_zoo, tmp_path):
    base_dir, experts, _ = tied_zoo
    out = build_tiny_artifact(base_dir, {"tied": experts["tied"]}, tmp_path / "art", rank={"rank": 4})
    manifest = verify_artifact(out)
    assert not manifest.untied_head and manifest.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(out / BACKBONE))


def test_generation_config_is_copied_into_the_artifact(tiny_artifact, tiny_base_dir):
    gc = tiny_base_dir / "generation_config.json"
    assert gc.is_file()
    assert (tiny_artifact / "generation_config.json").read_text() == gc.read_text()
    assert "generation_config.json" in verify_artifact(tiny_artifact).files


# ----------------------------------------------------------------------------- budget + quantised factors

@pytest.fixture(scope="module")
def int8_budget(tiny_base_dir, tiny_expert_dirs, tmp_path_factory) -> Path:
    return build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path_factory.mktemp("int8") / "art",
                               merge={"method": "task_arithmetic", "lam": 0.3},
                               compress={"budget": 0.25, "factor_dtype": "int8"})


def test_budget_bounds_the_exclusive_file_and_spreads_ranks(int8_budget, states):
    base, _ = states
    manifest = verify_artifact(int8_budget)
    dense_experts = 3 * sum(w.numel() * 4 for w in base.values())
    size = (int8_budget / EXCLUSIVE).stat().st_size
    assert 0.23 * dense_experts < size <= 0.25 * dense_experts   # the budget is used, and never exceeded
    build = read_report(int8_budget)["build"]
    assert build["dense_expert_bytes"] == dense_experts and build["budget"]["fraction"] == 0.25
    ranks = {r for info in manifest.tensors.values() if info.kind == "lowrank" for r in info.ranks.values()}
    assert len(ranks) > 1  # ranks follow each delta's spectrum, not one number
    assert {info.factor_dtype for info in manifest.tensors.values() if info.kind == "lowrank"} == {"int8"}


def test_int8_factors_are_stored_with_scales_and_their_error_is_reported(int8_budget, states):
    _, experts = states
    manifest, backbone, exclusive = load_artifact(int8_budget)
    worst = 0.0
    for pname, info in manifest.tensors.items():
        if info.kind != "lowrank":
            continue
        for name in EXPERT_NAMES:
            q = {p: exclusive[exclusive_key(pname, name, p)] for p in ("B", "A", "B_scale", "A_scale")}
            assert q["B"].dtype == q["A"].dtype == torch.int8 and q["B"].shape[1] == info.ranks[name]
            B = q["B"].float() * q["B_scale"][None, :]
            A = q["A"].float() * q["A_scale"][:, None]
            delta = experts[name][pname].float() - backbone[pname]
            # reconstruction error of θ* + B̃ Ã: truncation and dequantisation, each reported
            err = ((delta - B @ A).norm() / delta.norm()).item()
            assert err <= info.rel_error[name] + info.quant_error[name] + 1e-5
            assert 0 < info.quant_error[name] < 0.02
            worst = max(worst, info.quant_error[name])
    assert read_report(int8_budget)["build"]["experts"]["math"]["max_quant_error"] <= worst + 1e-6


def test_lowrank_path_equals_materialised_weights_of_the_stored_factors(int8_budget):
    """The served Twin linear on the loaded (dequantised) factors == x (W* + Σ w_t B̃_t Ã_t)ᵀ built from the raw
    int8 file."""
    from tests.conftest import served_linear
    from twin.artifact import load_exclusive

    manifest, backbone, exclusive = load_artifact(int8_budget)
    lowrank_deltas, _ = load_exclusive(int8_budget, manifest)
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    for pname in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        W = backbone[pname]
        x = torch.randn(3, 5, W.shape[1], generator=g)
        got = served_linear(x, W, None, lowrank_deltas[pname], w)
        for i in range(3):
            Wi = W.clone()
            for t, name in enumerate(EXPERT_NAMES):
                B = exclusive[exclusive_key(pname, name, "B")].float() * exclusive[exclusive_key(pname, name, "B_scale")]
                A = exclusive[exclusive_key(pname, name, "A")].float() * exclusive[exclusive_key(pname, name, "A_scale")][:, None]
                Wi += w[i, t] * (B @ A)
            assert_close(got[i], x[i] @ Wi.T, atol=1e-5, rtol=1e-5)


def test_bf16_factors_in_an_fp32_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path):
    out = build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "art", rank={"rank": 4},
                              compress={"factor_dtype": "bfloat16"})
    manifest, backbone, exclusive = load_artifact(out)
    assert {t.dtype for k, t in exclusive.items() if k.endswith(("::A", "::B"))} == {torch.bfloat16}
    assert {t.dtype for k, t in exclusive.items() if k.endswith("::delta")} == {torch.float32}
    info = manifest.tensors["model.layers.0.mlp.up_proj.weight"]
    assert info.factor_dtype == "bfloat16" and 0 < info.quant_error["code"] < 0.01
    s = read_report(out)["build"]["experts"]["code"]
    assert s["factor_bytes"] == sum(4 * sum(w.shape) * 2 if w.ndim == 2 else w.numel() * 4 for w in backbone.values())


def test_a_budget_below_the_dense_deltas_is_refused_by_field(tiny_base_dir, tiny_expert_dirs, tmp_path):
    from compression.recipe import RecipeError

    with pytest.raises(RecipeError, match="compress.budget") as ei:
        build_tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path / "art", compress={"budget": 0.0001})
    assert "1-D deltas" in str(ei.value)
    assert not (tmp_path / "art").exists()

"""The early refusal: a tiny model of the user's config through build + gate, before any expert is read."""
from __future__ import annotations

import pytest
from transformers import AutoConfig

from compression.probe import ProbeSkipped, linear_kinds, probe_kinds, tiny_config, tiny_model
from compression.recipe import Recipe
from twin.model import UnsupportedModelError

RECIPE = Recipe(base="unused", experts=[{"name": "a", "path": "unused"}])


def test_tiny_config_keeps_one_layer_of_each_kind_and_shrinks_sizes():
    cfg = AutoConfig.for_model("gemma3_text", layer_types=["sliding_attention"] * 5 + ["full_attention"] * 3,
                               num_hidden_layers=8)
    t = tiny_config(cfg)
    assert t.layer_types == ["sliding_attention", "full_attention"] and t.num_hidden_layers == 2
    assert t.hidden_size == 64 and t.vocab_size == 512 and t.sliding_window == 8
    assert cfg.hidden_size != 64 and len(cfg.layer_types) == 8        # the user's config is untouched
    moe = tiny_config(AutoConfig.for_model("mixtral"))
    assert moe.num_local_experts == 4 and moe.num_experts_per_tok == 2


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_supported_families_pass_the_probe(model_type):
    cfg = AutoConfig.for_model(model_type)
    model = tiny_model(cfg)
    for kinds in (None, linear_kinds(model)):          # full fine-tunes; LoRA on every linear
        report = probe_kinds(cfg, kinds, RECIPE, model=model)
        assert all(e["implementation_error"] <= 1e-4 for e in report["experts"].values())


def test_a_layer_the_step_cannot_serve_is_refused_by_name():
    """lfm2's short convolution mixes tokens outside attention; the served step feeds each token as its own
    row, so the conv sees no context. The probe's gate (prefill + decode through the step) finds it."""
    cfg = AutoConfig.for_model("lfm2", layer_types=["conv", "full_attention"] * 2, num_hidden_layers=4)
    model = tiny_model(cfg)
    with pytest.raises(UnsupportedModelError, match="'lfm2' is not served exactly.*decoder block 0"):
        probe_kinds(cfg, linear_kinds(model), RECIPE, model=model)


def test_deltas_on_unwrapped_modules_are_merged_into_the_backbone():
    """Full fine-tunes also change cohere's custom LayerNorm, which no Twin layer wraps: those tensors are merged
    into θ* (every expert served with θ* there), the build says so, and the served step stays exact."""
    cfg = AutoConfig.for_model("cohere")
    report = probe_kinds(cfg, None, RECIPE)
    assert all(e["implementation_error"] <= 1e-4 for e in report["experts"].values())


@pytest.mark.parametrize("model_type", ["gpt_oss", "roberta", "phimoe"])
def test_full_fine_tunes_of_sinks_heads_and_routers_are_served_exactly(model_type):
    """Every tensor moved: the sinks and the routers are merged into θ* (no Twin layer wraps them), the BERT-style
    head's transform and tied decoder bias carry deltas; the gate through the step passes."""
    cfg = AutoConfig.for_model(model_type, **({"is_decoder": True} if model_type == "roberta" else {}))
    report = probe_kinds(cfg, None, RECIPE)
    assert all(e["implementation_error"] <= 1e-4 for e in report["experts"].values())


def test_lora_experts_leave_frozen_modules_alone():
    """LoRA on the linears of a cohere model: the custom norms keep θ_0, so nothing needs wrapping there."""
    cfg = AutoConfig.for_model("cohere")
    model = tiny_model(cfg)
    probe_kinds(cfg, linear_kinds(model), RECIPE, model=model)


def test_a_config_that_cannot_be_shrunk_is_skipped_not_refused(monkeypatch):
    from compression import probe
    monkeypatch.setattr(probe, "MAX_PARAMETERS", 10)
    with pytest.raises(ProbeSkipped, match="parameters"):
        tiny_model(AutoConfig.for_model("llama"))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "minicpm3", "diffllama",
                                        "gpt_neox", "opt", "gpt_oss", "phimoe", "llama4_text", "roberta",
                                        "modernbert-decoder"])
def test_moe_mla_and_renamed_families_are_served_exactly(model_type):
    """MoE experts saved one tensor per expert (loaded fused), MLA (value head ≠ key head), two attention calls
    per layer, renamed heads, attention sinks (GPT-OSS), MoE routers that subclass nn.Linear (PhiMoE, Llama 4),
    BERT-style heads (a transform before the tied decoder, RoBERTa's offset positions, a tied bias): built and
    served through the step, equal to transformers. With LoRA-style experts (linears only) the served expert is
    θ_t itself up to fp32 rounding."""
    cfg = AutoConfig.for_model(model_type, **({"is_decoder": True} if model_type == "roberta" else {}))
    model = tiny_model(cfg)
    report = probe_kinds(cfg, linear_kinds(model), RECIPE, model=model)
    for e in report["experts"].values():
        assert e["implementation_error"] <= 1e-4
        if model_type in ("phimoe", "llama4_text"):   # their routers are linears with a forward of their own:
            assert e["compression_error"] > 1e-4      # the deltas there are merged into θ*, and the gate says so
        else:
            assert e["compression_error"] <= 1e-4 and e["argmax_agreement"] == 1.0


def test_fused_moe_experts_merge_per_checkpoint_tensor(tmp_path):
    """θ* of a fused expert parameter equals the per-expert checkpoint tensors merged one by one (mergekit's
    unit) and stacked/concatenated as transformers loads them."""
    import torch
    from safetensors.torch import save_file

    from compression.build import build_artifact
    from compression.checkpoints import LazyState
    from compression.merging import merge_params, merge_tensor
    from twin.artifact import BACKBONE, load_tensors
    from twin.tokenizer import byte_tokenizer

    cfg = tiny_config(AutoConfig.for_model("qwen3_moe"))
    model = tiny_model(AutoConfig.for_model("qwen3_moe"))
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    byte_tokenizer().save_pretrained(str(base))
    raw = LazyState(base)
    assert any(".experts.0." in k for k in raw.keys())     # noqa: SIM118 (stored one tensor per expert)
    experts = []
    for t in range(2):
        g = torch.Generator().manual_seed(t)
        out = tmp_path / f"e{t}"
        out.mkdir()
        save_file({k: raw.get(k) + 0.05 * torch.randn(raw.raw_shape(k), generator=g)
                   for k in raw.keys()}, str(out / "model.safetensors"))   # noqa: SIM118
        cfg.save_pretrained(str(out))
        experts.append(out)
    recipe = Recipe(base=str(base), experts=[{"name": f"e{t}", "path": str(p)} for t, p in enumerate(experts)],
                    merge={"method": "ties", "density": 0.3})
    build_artifact(recipe, tmp_path / "art", quiet=True)
    backbone = load_tensors(tmp_path / "art", BACKBONE)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert fused in backbone and backbone[fused].ndim == 3
    p = merge_params("ties", density=0.3)
    layout = LazyState(base, cfg).layout
    pieces = {k: merge_tensor(k, raw.get(k), [LazyState(e).get(k) for e in experts], "ties", **p)
              for k in layout.fused[fused].pieces}
    assert torch.equal(backbone[fused], layout.fused[fused].assemble(pieces.__getitem__))


def test_serve_probes_an_artifact_no_gate_certified(tmp_path, tiny_artifact, capsys, monkeypatch):
    """`twinserve serve` of an artifact without a parity result runs the probe on its config: a type the served
    step cannot serve (lfm2's short convolution) exits 2 naming it, before any weight is loaded; the tiny
    Llama artifact passes the probe and goes on to load."""
    from types import SimpleNamespace

    from cli.main import main
    from compression.probe import probe_artifact
    from server import serve_cli

    cfg = AutoConfig.for_model("lfm2", layer_types=["conv", "full_attention"] * 2, num_hidden_layers=4)
    lfm2 = SimpleNamespace(config=cfg.to_dict(), tensors={"model.layers.0.conv.in_proj.weight": None})
    with pytest.raises(UnsupportedModelError, match="'lfm2' is not served exactly.*decoder block 0"):
        probe_artifact(lfm2)

    import cli.main as root

    class Planned(Exception):
        pass

    probed = []

    def plan(settings, manifest):        # the step after the probe: stop there, nothing is loaded
        probed.append("plan")
        raise Planned

    real = root.probe_artifact
    monkeypatch.setattr(serve_cli, "memory_plan", plan)
    monkeypatch.setattr(root, "probe_artifact", lambda m: probed.append(m.config["model_type"]) or real(m))
    with pytest.raises(Planned):
        main(["serve", str(tiny_artifact), "--no-require-parity"])
    assert probed == ["llama", "plan"]   # probed (and passed) before the memory plan

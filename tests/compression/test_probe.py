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

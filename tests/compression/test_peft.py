"""PEFT adapters read exactly: every variant built with the real peft library on a tiny model, and the
read θ_t compared with ``PeftModel.merge_and_unload()`` tensor by tensor (1e-6)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from compression.checkpoints import CheckpointError, LazyState, load_model_state, open_expert
from tests.conftest import make_tiny_model, save_char_tokenizer

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}


def make_adapter(root: Path, arch: str = "llama", seed: int = 0, base_overrides: dict | None = None,
                 safe: bool = True, **lora) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base dir, adapter dir, merge_and_unload() state) for a LoraConfig(**lora) with every trainable
    adapter tensor randomised (peft inits B, trainable tokens and DoRA magnitudes to no-ops)."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(seed=seed, arch=arch, **{**SMALL, **(base_overrides or {})})
    base_dir, adapter_dir = root / "base", root / "adapter"
    model.save_pretrained(str(base_dir))
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, **lora))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=safe)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base_dir, adapter_dir, merged


def assert_reads_like_peft(base_dir: Path, adapter_dir: Path, merged: dict[str, torch.Tensor]) -> int:
    """Every base tensor of the expert equals merge_and_unload()'s; returns how many the adapter changed."""
    base = LazyState(base_dir)
    expert = open_expert(adapter_dir, base)
    changed = 0
    for name in base.keys():  # noqa: SIM118 (LazyState is not a dict)
        assert_close(expert.get(name), merged[name], atol=1e-6, rtol=0, msg=name)
        changed += not torch.equal(base.get(name), merged[name])
    assert changed > 0
    return changed


QKV = ["q_proj", "v_proj"]


@pytest.mark.parametrize("arch,lora", [
    ("llama", {"target_modules": QKV}),
    ("llama", {"target_modules": QKV, "use_rslora": True}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 2, "down_proj": 6},
               "alpha_pattern": {"q_proj": 3, "down_proj": 20}}),
    ("llama", {"target_modules": QKV, "use_dora": True}),
    ("llama", {"target_modules": ["q_proj", "up_proj"], "use_dora": True, "use_rslora": True,
               "rank_pattern": {"up_proj": 2}}),
    ("qwen2", {"target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
    ("llama", {"target_modules": QKV, "trainable_token_indices": [5, 7, 30]}),
    ("llama", {"target_modules": QKV, "trainable_token_indices": {"embed_tokens": [4, 36]}}),
    ("llama", {"target_modules": QKV, "modules_to_save": ["lm_head"]}),
    ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
], ids=["lora", "rslora", "rank_alpha_pattern", "dora", "dora_rslora_pattern", "lora_bias", "trainable_tokens",
        "trainable_tokens_dict", "modules_to_save_lm_head", "modules_to_save_embed", "embedding_lora"])
def test_variant_equals_merge_and_unload(tmp_path, arch, lora):
    assert_reads_like_peft(*make_adapter(tmp_path, arch=arch, **lora))


def test_trainable_tokens_change_only_their_rows(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, target_modules=QKV, trainable_token_indices=[5, 7])
    base = LazyState(base_dir)
    got = open_expert(adapter_dir, base).get("model.embed_tokens.weight")
    changed = (got != base.get("model.embed_tokens.weight")).any(1).nonzero().flatten().tolist()
    assert changed == [5, 7]


def test_bin_adapter_reads_through_weights_only_load(tmp_path):
    base_dir, adapter_dir, merged = make_adapter(tmp_path, safe=False, target_modules=QKV, use_dora=True)
    assert (adapter_dir / "adapter_model.bin").is_file() and not (adapter_dir / "adapter_model.safetensors").exists()
    assert_reads_like_peft(base_dir, adapter_dir, merged)


def test_pickled_code_in_a_bin_adapter_is_refused(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, safe=False, target_modules=QKV)
    torch.save({"x": torch.zeros(1), "f": print}, adapter_dir / "adapter_model.bin")  # not tensors only
    with pytest.raises(CheckpointError, match="cannot read as a tensor-only checkpoint"):
        open_expert(adapter_dir, LazyState(base_dir))


def test_resized_vocabulary_names_the_tensor_and_both_shapes(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(seed=0, **SMALL)
    model.save_pretrained(str(tmp_path / "base"))
    model.resize_token_embeddings(41)  # the adapter's model has 4 added tokens
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=QKV, modules_to_save=["embed_tokens", "lm_head"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(CheckpointError) as ei:
        open_expert(tmp_path / "adapter", LazyState(tmp_path / "base"))
    msg = str(ei.value)
    assert "(41, 16)" in msg and "(37, 16)" in msg and ("embed_tokens" in msg or "lm_head" in msg), msg


def test_trainable_token_id_beyond_the_base_vocabulary(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, target_modules=QKV, trainable_token_indices=[5])
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(cfg, trainable_token_indices=[40])))
    with pytest.raises(CheckpointError, match=r"token ids up to 40.*\(1, 16\).*\(37, 16\)"):
        open_expert(adapter_dir, LazyState(base_dir))


def test_adapter_for_another_base_names_the_tensor_and_both_shapes(tmp_path):
    _, adapter_dir, _ = make_adapter(tmp_path / "a", target_modules=["down_proj"],
                                     base_overrides={"intermediate_size": 48})
    other = tmp_path / "other"
    make_tiny_model(seed=0, **SMALL).save_pretrained(str(other))
    with pytest.raises(CheckpointError) as ei:
        open_expert(adapter_dir, LazyState(other))
    msg = str(ei.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "(16, 48)" in msg and "(16, 32)" in msg, msg


def test_wrong_base_adapter_exits_2_on_build(tmp_path, capsys):
    import yaml

    from cli.main import main

    _, adapter_dir, _ = make_adapter(tmp_path / "a", target_modules=["q_proj"], base_overrides={"hidden_size": 32})
    other = tmp_path / "other"
    make_tiny_model(seed=0, **SMALL).save_pretrained(str(other))
    save_char_tokenizer(other)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(other), "experts": [{"name": "x", "path": str(adapter_dir)}]}))
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "q_proj" in err and "(32, 32)" in err and "(16, 16)" in err, err


def test_rank_pattern_disagreeing_with_the_tensors_is_refused(tmp_path):
    base_dir, adapter_dir, _ = make_adapter(tmp_path, target_modules=QKV, rank_pattern={"v_proj": 2})
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(cfg, rank_pattern={"v_proj": 3})))
    with pytest.raises(CheckpointError, match="v_proj lora_A has rank 2, adapter_config.json says 3"):
        open_expert(adapter_dir, LazyState(base_dir))


def test_non_parameter_buffers_are_ignored(tmp_path):
    base_dir = tmp_path / "base"
    make_tiny_model(seed=0, **SMALL).save_pretrained(str(base_dir))
    f = base_dir / "model.safetensors"
    state = load_file(str(f))
    params = set(state)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(f))
    assert set(LazyState(base_dir).keys()) == params
    assert set(load_model_state(base_dir)) == params
    assert "transformer.h.0.attn.c_attn.bias" not in params  # a real bias would not be caught by the pattern
    from compression.checkpoints import _NON_PARAMETER
    assert not _NON_PARAMETER.search("transformer.h.0.attn.c_attn.bias")

"""Parity with mergekit 0.1.5: golden merged tensors (tests/fixtures/mergekit, made by make_golden.py
with mergekit itself) against twinserve's merges of the same YAML, and the YAML -> Recipe mapping."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

from compression.merging import merge_params, merge_state
from compression.recipe import RecipeError, load_recipe
from twin.artifact import BACKBONE

FIX = Path(__file__).parents[1] / "fixtures" / "mergekit"
EXACT = ["linear_weighted", "linear_raw", "task_arithmetic_weighted", "task_arithmetic_normalized", "ties_d02",
         "ties_d05", "ties_unnormalized", "dare_ties_d1", "dare_linear_d1", "breadcrumbs", "breadcrumbs_ties"]


def state(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIX / "models" / name / "model.safetensors"))


def twinserve_merge(config: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(θ* as twinserve computes it from the mergekit YAML, θ_0)."""
    recipe = load_recipe(FIX / "configs" / f"{config}.yaml")
    base = state(Path(recipe.base).name)
    experts = [state(Path(e.path).name) for e in recipe.experts]
    params = merge_params(recipe.merge.method, **recipe.merge_options())
    return merge_state(base, experts, recipe.merge.method, **params), base


@pytest.mark.parametrize("config", EXACT)
def test_merge_equals_mergekit_golden(config):
    merged, _ = twinserve_merge(config)
    golden = load_file(str(FIX / "golden" / f"{config}.safetensors"))
    assert set(merged) == set(golden)
    for name, g in golden.items():
        assert_close(merged[name], g, atol=1e-6, rtol=0, msg=f"{config}: {name}")


def test_weighted_task_arithmetic_is_far_from_any_uniform_lambda():
    # why per-expert weights matter: the best uniform λ is still far from the 0.5/0.3/0.2 merge
    merged, base = twinserve_merge("task_arithmetic_weighted")
    experts = [state(n) for n in ("math", "code", "chat")]
    name = "model.layers.0.mlp.up_proj.weight"
    target = merged[name] - base[name]
    tv_sum = sum(e[name] - base[name] for e in experts)
    lam = (target * tv_sum).sum() / (tv_sum * tv_sum).sum()  # least-squares λ
    assert (target - lam * tv_sum).norm() / target.norm() > 0.2


def test_dare_below_density_one_matches_mergekit_in_distribution():
    # masks differ (twinserve: seeded per tensor; mergekit: global RNG), the statistics must not
    merged, base = twinserve_merge("dare_linear_d05")
    again, _ = twinserve_merge("dare_linear_d05")
    golden = load_file(str(FIX / "golden" / "dare_linear_d05.safetensors"))
    ta, _ = twinserve_merge("dare_linear_d1")   # same weights at density 1 = weighted task arithmetic
    ratios, corr_ours, corr_mk = [], [], []
    for name, g in golden.items():
        assert torch.equal(merged[name], again[name])  # fixed seed: reproducible
        ours, theirs, full = merged[name] - base[name], g - base[name], (ta[name] - base[name]) / 1.2  # d1 has λ 1.2
        ratios.append((ours.abs().sum() / theirs.abs().sum()).item())
        corr_ours.append(torch.corrcoef(torch.stack([ours.flatten(), full.flatten()]))[0, 1].item())
        corr_mk.append(torch.corrcoef(torch.stack([theirs.flatten(), full.flatten()]))[0, 1].item())
        assert not torch.equal(ours, full)
    big = [i for i, (n, g) in enumerate(golden.items()) if g.numel() >= 256]
    assert all(0.85 < ratios[i] < 1.15 for i in big), ratios          # L1-rescaled: same mass
    assert all(abs(corr_ours[i] - corr_mk[i]) < 0.1 for i in big)     # same agreement with the full sum
    assert 0.5 < sum(corr_ours[i] for i in big) / len(big) < 0.9      # and really sparsified


def test_mergekit_yaml_builds_the_backbone_mergekit_writes(tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "art"
    assert main(["build", str(FIX / "configs" / "ties_d05.yaml"), "-o", str(out), "--rank", "4"]) == 0
    backbone = load_file(str(out / BACKBONE))
    golden = load_file(str(FIX / "golden" / "ties_d05.safetensors"))
    for name, g in golden.items():
        assert_close(backbone[name], g, atol=1e-6, rtol=0, msg=name)
    recipe = load_recipe(FIX / "configs" / "ties_d05.yaml")
    assert [(e.name, e.weight, e.density) for e in recipe.experts] == [
        ("math", 0.5, 0.5), ("code", 0.3, 0.5), ("chat", 0.2, 0.35)]
    assert (recipe.merge.lam, recipe.merge.int8_mask, recipe.merge.density, recipe.dtype) == (0.9, True, 1.0, "float32")


def write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "mk.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


BASE_CFG = {"merge_method": "ties", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}]}


@pytest.mark.parametrize("change,message", [
    ({"merge_method": "slerp"}, "merge_method: 'slerp' is not supported"),
    ({"merge_method": "model_stock"}, "merge_method: 'model_stock' is not supported"),
    ({"merge_method": "passthrough"}, "merge_method: 'passthrough' is not supported"),
    ({"slices": []}, "slices: not supported"),
    ({"base_model": None}, "base_model: required by ties"),
    ({"parameters": {"density": [0.1, 0.5]}}, "parameters.density: per-layer gradients"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter"),
    ({"parameters": {"lambda": 0}}, "merge.lambda"),
    ({"models": [{"model": "a"}]}, "models.0.parameters.weight: required"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "models.0.parameters.gamma"),
    ({"models": [{"model": "other+lora", "parameters": {"weight": 1}}]}, "not the base_model"),
    ({"models": [{"model": "base"}]}, "no model other than base_model"),
    ({"dtype": "float64"}, "dtype: 'float64'"),
    ({"tokenizer_source": "union"}, "tokenizer_source: 'union'"),
])
def test_unsupported_mergekit_configs_name_the_key(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(write(tmp_path, {**BASE_CFG, **change}))


def test_unsupported_method_exits_2_on_the_cli(tmp_path, capsys):
    from cli.main import main

    assert main(["build", str(write(tmp_path, {**BASE_CFG, "merge_method": "slerp"})), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "slerp" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_mapping_details(tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": "m/x", "parameters": {"weight": 2}},
                                                {"model": "n/x", "parameters": {"weight": 1}}],
           "parameters": {"normalize": False}, "dtype": "bfloat16"}
    r = load_recipe(write(tmp_path, cfg))
    assert r.base == str((tmp_path / "m" / "x").resolve())   # linear without a base: the first model's config
    assert [e.name for e in r.experts] == ["x", "x-2"] and r.dtype == "bfloat16" and r.merge.normalize is False
    cfg = {"merge_method": "linear", "base_model": "b", "models": [{"model": "b", "parameters": {"weight": 0.5}},
                                                                   {"model": "a", "parameters": {"weight": 1}}]}
    r = load_recipe(write(tmp_path, cfg))
    assert (r.merge.base_weight, [e.name for e in r.experts]) == (0.5, ["a"])
    cfg = {**BASE_CFG, "models": [{"model": "base+adapters/sql", "parameters": {"weight": 1}}],
           "parameters": {"weight": 0.4}, "tokenizer_source": "tok"}
    r = load_recipe(write(tmp_path, cfg))
    assert r.experts[0].path == str((tmp_path / "adapters" / "sql").resolve())
    assert r.tokenizer == str((tmp_path / "tok").resolve()) and r.merge.density == 1.0

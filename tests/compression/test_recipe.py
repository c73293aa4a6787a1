"""Recipe loading and validation: every error names the offending field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from compression.recipe import Recipe, RecipeError, dump_recipe, load_recipe

GOOD = {"base": "models/base", "experts": [{"name": "math", "path": "experts/math"},
                                            {"name": "code", "path": "/abs/code", "description": "coder"}]}


def write(path: Path, data, fmt: str = "yaml") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    return path


def with_(**kw) -> dict:
    d = json.loads(json.dumps(GOOD))
    for dotted, value in kw.items():
        *parents, leaf = dotted.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


@pytest.mark.parametrize("fmt,name", [("yaml", "recipe.yaml"), ("json", "recipe.json"), ("yaml", "recipe.yml")])
def test_yaml_and_json_load_and_resolve_relative_paths(tmp_path, fmt, name):
    data = with_(merge__method="dare_ties", merge__density=0.5, rank__rank=4, tokenizer="tok", dtype="bfloat16")
    path = write(tmp_path / "sub" / name, data, fmt)
    r = load_recipe(path)
    root = (tmp_path / "sub").resolve()
    assert r.base == str(root / "models" / "base")
    assert r.tokenizer == str(root / "tok")
    assert [e.path for e in r.experts] == [str(root / "experts" / "math"), "/abs/code"]
    assert [e.name for e in r.experts] == ["math", "code"]
    assert r.experts[1].description == "coder"
    assert (r.merge.method, r.merge.density, r.rank.rank, r.dtype) == ("dare_ties", 0.5, 4, "bfloat16")


def test_defaults(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", GOOD))
    assert r.tokenizer is None
    assert (r.merge.method, r.merge.lam, r.merge.density, r.merge.consensus) == ("ties", 1.0, 0.2, "sum")
    assert (r.merge.normalize, r.merge.rescale, r.merge.int8_mask, r.merge.base_weight) == (None, None, False, 0.0)
    assert [(e.weight, e.density) for e in r.experts] == [(1.0, None), (1.0, None)]
    assert (r.rank.rank, r.rank.energy, r.rank.include, r.rank.exclude, r.rank.svd) == (16, None, ["*"], [], "auto")
    assert r.dtype == "float32"


def test_dump_and_reload_round_trip(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", with_(rank__rank=None, rank__energy=0.9, rank__max_rank=8)))
    dump_recipe(r, tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == r


@pytest.mark.parametrize("data,field", [
    (with_(merge__lamda=0.5), "merge.lamda"),
    (with_(extra=1), "extra"),
    (with_(rank__ranks=4), "rank.ranks"),
    (with_(merge__density=1.5), "merge.density"),
    (with_(merge__density=0.0), "merge.density"),
    (with_(merge__lam=0.0), "merge.lam"),
    (with_(merge__lambda=11.0), "merge.lambda"),
    (with_(merge__drop_p=0.5), "merge"),
    (with_(merge__method="dare"), "merge"),
    (with_(merge__method="slerp"), "merge.method"),
    (with_(merge__consensus="median"), "merge.consensus"),
    (with_(merge__normalize="maybe"), "merge.normalize"),
    (with_(merge__gamma=1.0), "merge.gamma"),
    (with_(rank__rank=-1), "rank.rank"),
    (with_(rank__energy=1.5, rank__rank=None), "rank.energy"),
    (with_(rank__rank=4, rank__energy=0.9), "rank"),
    (with_(rank__rank=None), "rank"),
    (with_(rank__svd="fast"), "rank.svd"),
    (with_(dtype="float64"), "dtype"),
    (with_(experts=[]), "experts"),
    (with_(experts=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]), "experts"),
    (with_(experts=[{"name": "ok", "path": "x"}, {"name": "bad name!", "path": "y"}]), "experts.1.name"),
    (with_(experts=[{"name": "-dash", "path": "x"}]), "experts.0.name"),
    (with_(experts=[{"name": "a", "path": ""}]), "experts.0.path"),
    (with_(experts=[{"name": "a"}]), "experts.0.path"),
    (with_(experts=[{"name": "a", "path": "x", "weight": "heavy"}]), "experts.0.weight"),
    (with_(experts=[{"name": "a", "path": "x", "weight": float("nan")}]), "experts.0.weight"),
    (with_(experts=[{"name": "a", "path": "x", "density": 0}]), "experts.0.density"),
    (with_(experts=[{"name": "a", "path": "x", "rank": 3}]), "experts.0.rank"),
    ({"experts": GOOD["experts"]}, "base"),
])
def test_invalid_recipe_names_the_field(tmp_path, data, field):
    path = write(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert f"{field}: " in msg, msg
    assert str(path) in msg


def test_error_messages_are_specific(tmp_path):
    with pytest.raises(RecipeError, match="duplicate expert names: a"):
        load_recipe(write(tmp_path / "d.yaml", with_(experts=[{"name": "a", "path": "x"}, {"name": "a", "path": "y"}])))
    with pytest.raises(RecipeError, match="exactly one of rank.rank and rank.energy"):
        load_recipe(write(tmp_path / "e.yaml", with_(rank__rank=4, rank__energy=0.9)))
    with pytest.raises(RecipeError, match="Extra inputs are not permitted"):
        load_recipe(write(tmp_path / "x.yaml", with_(merge__lamda=0.5)))


def test_unreadable_recipes(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot parse"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{'single': 'quotes'}")
    with pytest.raises(RecipeError, match="cannot parse"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(tmp_path / "empty.yaml")


def test_mergekit_names_weights_and_per_expert_density(tmp_path):
    data = with_(merge__method="ties", merge__lambda=0.7, merge__density=0.3, merge__normalize=False,
                 merge__consensus="count", merge__int8_mask=True)
    data["experts"][0].update(weight=0.5, density=0.6)
    r = load_recipe(write(tmp_path / "r.yaml", data))
    assert (r.merge.lam, r.merge.normalize, r.merge.consensus, r.merge.int8_mask) == (0.7, False, "count", True)
    assert r.merge_options()["weights"] == [0.5, 1.0] and r.merge_options()["densities"] == [0.6, None]
    dump_recipe(r, tmp_path / "again.yaml")
    assert "lambda: 0.7" in (tmp_path / "again.yaml").read_text()  # written with mergekit's name
    assert load_recipe(tmp_path / "again.yaml") == r
    assert load_recipe(write(tmp_path / "old.yaml", with_(merge__lam=0.4))).merge.lam == 0.4  # old spelling


def test_old_dare_recipe_says_what_replaced_it(tmp_path):
    with pytest.raises(RecipeError, match="dare_linear or dare_ties and density: 1 - drop_p"):
        load_recipe(write(tmp_path / "d.yaml", with_(merge__method="dare", merge__drop_p=0.9)))


def test_normalised_linear_with_zero_weight_sum_is_refused(tmp_path):
    data = with_(merge__method="linear")
    data["experts"][0]["weight"], data["experts"][1]["weight"] = 1.0, -1.0
    with pytest.raises(RecipeError, match="weights sum to 0"):
        load_recipe(write(tmp_path / "z.yaml", data))
    data["merge"]["normalize"] = False
    assert load_recipe(write(tmp_path / "ok.yaml", data)).merge.method == "linear"


def test_recipe_is_frozen():
    r = Recipe.model_validate(GOOD)
    with pytest.raises(ValidationError):
        r.base = "other"  # type: ignore[misc]


def test_energy_policy_with_rank_null(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", with_(rank__rank=None, rank__energy=0.95)))
    assert (r.rank.rank, r.rank.energy) == (None, 0.95)


def test_energy_policy_alone_selects_energy(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", with_(rank__energy=0.95)))
    assert (r.rank.rank, r.rank.energy) == (None, 0.95)

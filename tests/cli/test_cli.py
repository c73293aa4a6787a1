"""CLI: bad input exits 2 with a message naming the field or file, never a traceback."""
import json

import pytest
import yaml

from server.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("zoo", "build", "eval", "demo", "train-router", "serve"):
        assert cmd in text


def test_serve_help_documents_settings(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "TWINSERVE_MAX_BATCH_SIZE" in text and "TWINSERVE_API_KEY" in text


def test_build_rejects_unknown_recipe_field(tmp_path, capsys, tiny_base_dir, tiny_expert_dirs):
    recipe = {"base": str(tiny_base_dir), "experts": [{"name": "a", "path": str(tiny_expert_dirs["math"])}],
              "merge": {"method": "ties", "lamda": 0.3}}
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe))
    code, text = run(capsys, "build", str(f), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "merge.lamda" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_build_missing_expert_dir(tmp_path, capsys, tiny_base_dir):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"base": str(tiny_base_dir), "experts": [{"name": "a", "path": "nope"}]}))
    code, text = run(capsys, "build", str(f), "-o", str(tmp_path / "out"))
    assert code == 2 and "nope" in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_build_then_eval_on_tampered_artifact(tmp_path, capsys, artifact_copy):
    data = bytearray((artifact_copy / "exclusive.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (artifact_copy / "exclusive.safetensors").write_bytes(bytes(data))
    code, text = run(capsys, "eval", str(artifact_copy))
    assert code == 2 and "exclusive.safetensors" in text and "Traceback" not in text
    code, text = run(capsys, "serve", str(artifact_copy), "--port", "8999")
    assert code == 2 and "exclusive.safetensors" in text


def test_eval_bad_methods_and_missing_tasks(capsys, tiny_artifact, tmp_path):
    code, text = run(capsys, "eval", str(tiny_artifact), "--methods", "expert,magic")
    assert code == 2 and "magic" in text
    code, text = run(capsys, "eval", str(tiny_artifact), "--tasks", str(tmp_path / "none"))
    assert code == 2 and "--tasks" in text


def test_eval_not_an_artifact(capsys, tmp_path):
    code, text = run(capsys, "eval", str(tmp_path))
    assert code == 2 and "manifest.json" in text


@pytest.mark.parametrize("name", ["qwen2-7b-example.yaml", "llama-3-8b-example.yaml"])
def test_example_recipes_validate(name):
    from pathlib import Path

    from compression.recipe import load_recipe
    recipe = load_recipe(Path(__file__).parents[2] / "deploy" / "recipes" / name)
    assert len(recipe.experts) == 3 and recipe.dtype == "bfloat16"


def test_serve_rejects_bad_settings(capsys, tiny_artifact, monkeypatch):
    monkeypatch.setenv("TWINSERVE_MAX_BATCH_SIZE", "0")
    code, text = run(capsys, "serve", str(tiny_artifact), "--port", "8999")
    assert code == 2 and "TWINSERVE_MAX_BATCH_SIZE" in text and "Traceback" not in text
    monkeypatch.delenv("TWINSERVE_MAX_BATCH_SIZE")
    code, text = run(capsys, "serve", str(tiny_artifact), "--port", "99999")
    assert code == 2 and "--port" in text

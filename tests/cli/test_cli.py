"""CLI: bad input exits 2 with a message naming the field or file, never a traceback."""
import json

import pytest
import yaml

from cli.main import main


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


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_serve_help_states_each_default_once(capsys):
    import re

    from server.settings import Settings
    text = _help(capsys, "serve")
    # argparse wraps the flag list: join each flag's help into one string before checking it
    flags, current = {}, None
    options = text[text.index("options:"):text.index("Settings (")]
    for line in options.splitlines()[1:]:
        m = re.match(r"\s{2}(--[\w-]+)", line)
        if m:
            current = m.group(1)
            flags[current] = line[m.end():]
        elif current:
            flags[current] += " " + line.strip()
    flags = {k: " ".join(re.sub(r"^\s*[A-Z_]+|^\s*\{[^}]*\}", "", v).split()) for k, v in flags.items()}
    for flag in ("--host", "--port", "--mode", "--device", "--dtype", "--max-batch-size", "--max-queue",
                 "--api-key", "--model-name"):
        field = flag[2:].replace("-", "_")
        assert flags[flag].count("(default:") == 1, (flag, flags[flag])
        assert Settings.model_fields[field].description.split()[0] in flags[flag], (flag, flags[flag])
    assert "rows in the running decode batch (default: 16)" in flags["--max-batch-size"]
    assert "waiting requests before 429 (default: 256)" in flags["--max-queue"]
    assert flags["--dtype"].startswith("auto = bfloat16") and flags["--dtype"].endswith("(default: auto)")
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    assert "TWINSERVE_MODEL_NAME             model id in the API (default: artifact dir name)\n" in text


def test_build_and_eval_help_describe_inputs(capsys):
    from bench.quality import METHODS
    from compression.recipe import MergeName
    build = _help(capsys, "build")
    assert "mergekit YAML" in build and "--skip-parity" in build and "Parity gate" in build and "example:" in build
    for method in MergeName.__args__:
        assert method in build, method
    for key in ("base", "experts", "merge", "rank", "compress", "dtype", "tokenizer"):
        assert f"\n  {key} " in build or f"  {key}:" in build, key
    ev = " ".join(_help(capsys, "eval").split())
    assert "DIR/TASK/validation.jsonl and DIR/TASK/test.jsonl" in ev
    assert 'one JSON object per line, {"prompt": str, "target": str}' in ev and "example:" in ev
    for method in METHODS:
        assert method in ev, method


def test_eval_missing_tasks_states_line_format(capsys, tiny_artifact, tmp_path):
    code, text = run(capsys, "eval", str(tiny_artifact), "--tasks", str(tmp_path / "none"))
    assert code == 2 and '{"prompt": str, "target": str}' in text and "validation,test" in text


@pytest.mark.parametrize("body,where", [("foo: [\n", "line 2, column 1"),
                                        ("a: 1\n  b: 2\n", "line 2, column 4"),
                                        ('a: "x\n', "line 2, column 1")])
def test_build_malformed_yaml_is_one_line(tmp_path, capsys, body, where):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    code, text = run(capsys, "build", str(f), "-o", str(tmp_path / "out"))
    assert code == 2
    assert text.count("\n") == 1 and text.startswith("error: cannot parse recipe ")
    assert str(f) in text and where in text and "Traceback" not in text and "^" not in text
    assert not (tmp_path / "out").exists()


def test_build_malformed_json_is_one_line(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text('{"base": ')
    code, text = run(capsys, "build", str(f), "-o", str(tmp_path / "out"))
    assert code == 2 and text.count("\n") == 1 and str(f) in text and "line 1 column 10" in text


# Errors that are not bad input reported by the CLI: HTTP errors of the server (app.py maps them to OpenAI
# JSON) and the engine's back-pressure signal (a 429).
NOT_DOMAIN_ERRORS = {"APIError", "InternalError", "QueueFullError"}


def test_every_domain_error_derives_from_twinserve_error():
    """`twinserve` catches TwinserveError once (exit 2, one line); a new `class XError(...)` in any package
    must derive from it, or a bad input of that kind would end in a traceback."""
    import ast
    import importlib
    from pathlib import Path

    from twin.errors import TwinserveError
    root = Path(__file__).resolve().parents[2]
    found = {}
    for pkg in ("twin", "compression", "router", "server", "zoo", "bench", "loadtest", "cli"):
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                    found[node.name] = getattr(importlib.import_module(module), node.name)
    assert {"ParityError", "ArtifactError", "CheckpointError", "RecipeError", "EvalError", "UnsupportedModelError",
            "UsageError", "RouterDataError", "LoadtestError", "PreflightError", "StartupError", "SyntheticError",
            "LayoutError", "BenchError", "PeerError"} <= set(found)
    bad = sorted(name for name, cls in found.items()
                 if name not in NOT_DOMAIN_ERRORS | {"TwinserveError"} and not issubclass(cls, TwinserveError))
    assert not bad, f"derive these from twin.errors.TwinserveError: {bad}"
    assert issubclass(TwinserveError, ValueError)

"""Zoo smoke test at toy size: layout, HF loadability, determinism, cache hit."""
import json

from transformers import AutoTokenizer, LlamaForCausalLM

from compression.recipe import load_recipe
from zoo.build import ZooSettings, build_zoo, zoo_is_valid
from zoo.tasks import TASKS, make_splits, read_jsonl
from zoo.train import ZooModelConfig

TOY = ZooSettings(seed=3, tasks=("reverse", "upper"), model=ZooModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                  intermediate_size=64, max_position_embeddings=64), pretrain_steps=6, finetune_steps=6,
                  batch_size=8, split_sizes=(("train", 40), ("router", 10), ("validation", 8), ("test", 8)))


def test_task_functions():
    assert TASKS["reverse"].fn("abc") == "cba"
    assert TASKS["shift"].fn("xyz") == "abc"
    assert TASKS["atbash"].fn("az") == "za"
    assert TASKS["swapcase"].fn("aB") == "Ab"
    assert TASKS["rotate"].fn("abcd") == "bcda"
    assert TASKS["double"].fn("ab") == "aabb"
    assert TASKS["lower"].fn("AB") == "ab"


def test_splits_are_disjoint_and_deterministic():
    a = make_splits(TASKS["reverse"], 7, {"train": 50, "router": 10, "validation": 10, "test": 10})
    b = make_splits(TASKS["reverse"], 7, {"train": 50, "router": 10, "validation": 10, "test": 10})
    assert a == b
    prompts = [r["prompt"] for rows in a.values() for r in rows]
    assert len(prompts) == len(set(prompts)) == 80
    assert all(r["target"] == r["prompt"].split(" ", 1)[1][:-1][::-1] for r in a["test"])


def test_toy_zoo_builds_and_caches(tmp_path):
    out = tmp_path / "zoo"
    info = build_zoo(out, TOY)
    assert set(info["experts"]) == {"reverse", "upper"}
    for d in ("base", "experts/reverse", "experts/upper"):
        assert (out / d / "config.json").is_file() and (out / d / "model.safetensors").is_file()
        LlamaForCausalLM.from_pretrained(str(out / d))
    tok = AutoTokenizer.from_pretrained(str(out / "base"))
    assert tok.decode(tok.encode("reverse abc=", add_special_tokens=False)) == "reverse abc="
    rows = read_jsonl(out / "tasks" / "reverse" / "test.jsonl")
    assert len(rows) == 8 and set(rows[0]) == {"prompt", "target", "task"}
    recipe = load_recipe(out / "recipe.yaml")
    assert [e.name for e in recipe.experts] == ["reverse", "upper"]
    assert zoo_is_valid(out, TOY)
    mtime = (out / "zoo.json").stat().st_mtime
    again = build_zoo(out, TOY)
    assert again == json.loads((out / "zoo.json").read_text())
    assert (out / "zoo.json").stat().st_mtime == mtime
    assert not zoo_is_valid(out, ZooSettings(seed=4, tasks=TOY.tasks, model=TOY.model))


def test_demo_chat_template_tokenises_as_the_completion_prompt():
    """The demo's chat template emits <bos> itself (the server adds no special tokens to a rendered template), so a
    one-message chat is exactly the completion prompt: one <bos>, then the text, as the experts were trained."""
    from zoo.tokenizer import make_char_tokenizer

    tok = make_char_tokenizer()
    for text in ("upper twin=", "reverse hello="):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        chat = tok.encode(rendered, add_special_tokens=False)
        assert chat == tok.encode(text) and chat.count(tok.bos_token_id) == 1 and chat[0] == tok.bos_token_id


def test_a_cached_demo_artifact_gets_the_current_chat_template(artifact_copy):
    """`make demo` on an artifact cached before the template emitted <bos>: the template file is replaced through
    an atomic update (checksums stay valid), once."""
    from twin.artifact import read_manifest, update_artifact, verify_artifact
    from zoo.demo import refresh_chat_template
    from zoo.tokenizer import CHAT_TEMPLATE, make_char_tokenizer

    rel = f"{read_manifest(artifact_copy).tokenizer}/{CHAT_TEMPLATE}"
    update_artifact(artifact_copy, {rel: "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    refresh_chat_template(artifact_copy, read_manifest(artifact_copy))
    assert (artifact_copy / rel).read_text() == make_char_tokenizer().chat_template
    before = verify_artifact(artifact_copy).files
    refresh_chat_template(artifact_copy, read_manifest(artifact_copy))   # already current: nothing rewritten
    assert verify_artifact(artifact_copy).files == before

"""Prompt encoding and stop ids exactly as transformers would use them (issue cases: GPT-2-style bos,
generation_config.json with a list of eos ids)."""
from __future__ import annotations

import json
import shutil

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import app_client, make_char_tokenizer
from twin.generate import encode_prompt
from twin.loading import load_artifact


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Defines <|endoftext|> as bos and eos but, like GPT-2's, adds no special token when encoding."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_bos_is_added_exactly_when_the_tokenizer_adds_it():
    gpt2 = gpt2_style_tokenizer()
    assert gpt2.bos_token_id == 0
    assert encode_prompt(gpt2, "hello") == gpt2("hello").input_ids == [8, 5, 12, 12, 15]   # no bos
    llama_like = make_char_tokenizer()
    ids = encode_prompt(llama_like, "ab")
    assert ids == llama_like("ab").input_ids and ids[0] == llama_like.bos_token_id


def test_generation_config_eos_list_stops_generation(routed_artifact, tmp_path):
    art_dir = tmp_path / "tiny"
    shutil.copytree(routed_artifact, art_dir)
    tok = load_artifact(art_dir, device="cpu", dtype="float32").tokenizer
    extra = tok.convert_tokens_to_ids("z")          # an ordinary token listed as a second eos id
    (art_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, extra]}))
    assert load_artifact(art_dir, device="cpu", dtype="float32", verify=False).eos_token_ids == \
        {tok.eos_token_id, extra}
    # logit_bias forces "z" first: generation must stop on it, as transformers' generate would
    body = {"model": "tiny", "prompt": "add abc", "max_tokens": 8, "temperature": 0, "logit_bias": {str(extra): 100}}
    with app_client(art_dir, verify_artifact=False) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] == ""
        (art_dir / "generation_config.json").unlink()
    with app_client(art_dir, verify_artifact=False) as client:   # without it, "z" is just text
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "length" and choice["text"].startswith("z")

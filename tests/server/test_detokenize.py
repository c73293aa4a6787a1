"""Incremental detokenisation equals decoding the whole output, for byte-level BPE and char tokenizers."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from server.sampling import detokenize_step

CORPUS = ["héllo wörld, ça va? naïve café ünïcödé", "the quick brown fox jumps over the lazy dog",
          "日本語のテキスト と emoji 🙂🙃 mixed in", "  leading spaces and\nnewlines\tand tabs  "] * 20


def byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def stream(tokenizer, ids):
    text, p, r = "", 0, 0
    for n in range(1, len(ids) + 1):
        delta, p, r = detokenize_step(tokenizer, ids[:n], p, r, final=n == len(ids))
        text += delta
    return text


@pytest.mark.parametrize("text", CORPUS[:4])
def test_incremental_equals_full_decode_on_real_text(text):
    tok = byte_bpe()
    ids = tok.encode(text, add_special_tokens=False)
    assert stream(tok, ids) == tok.decode(ids) == text


def test_incremental_equals_full_decode_on_random_ids():
    tok = byte_bpe()
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        assert stream(tok, ids) == tok.decode(ids)

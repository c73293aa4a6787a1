"""A tokenizer for checkpoints without one of their own (random real-shape models, the build's probe)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (256 byte tokens, no merges) + <|endoftext|> (256) and <|bos|> (257): encodes any
    text offline. Ids from 258 up (random models emit them) decode to nothing."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|bos|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
    return fast

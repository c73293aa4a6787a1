"""Character-level tokenizer saved as a standard HF tokenizer (AutoTokenizer loads it offline)."""
from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TEMPLATE = "chat_template.jinja"      # where save_pretrained writes the template
CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII + newline


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.add_bos_token = True
    # the template emits <bos> itself, as Llama's and Gemma's do: a chat prompt is then tokenised exactly as the
    # same text sent as a completion (the server adds no special tokens to a rendered template)
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
    return fast

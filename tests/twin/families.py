"""Tiny random checkpoints of every decoder family the transformers backend must serve exactly.

Each family is a transformers config class with its own quirk switched on (GQA, llama3 rope, tied
head, MLP/attention biases, GELU, sliding windows shorter than the test prompts, q/k norms, soft-
capping, Gemma's 1+g norms and scaled embeddings, fused qkv, post-norms, GPT-2 Conv1D and absolute
positions). hidden 64, 2 layers, the 37-token char vocab of tests/conftest.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import CHARS, SPECIALS, save_char_tokenizer

VOCAB = len(SPECIALS) + len(CHARS)
IDS = {t: i for i, t in enumerate(SPECIALS)}
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128,
          "pad_token_id": IDS["<pad>"], "bos_token_id": IDS["<bos>"], "eos_token_id": IDS["<eos>"],
          "tie_word_embeddings": False}
WINDOW = 6  # shorter than every test prompt, so the sliding window really cuts


def _cfg(cls_name: str, **kw):
    import transformers

    return getattr(transformers, cls_name)(**{**COMMON, **kw})


FAMILIES = {
    "llama-gqa-llama3rope": lambda: _cfg("LlamaConfig", rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-tied": lambda: _cfg("LlamaConfig", tie_word_embeddings=True),
    "llama-bias-gelu": lambda: _cfg("LlamaConfig", mlp_bias=True, attention_bias=True, hidden_act="gelu"),
    "mistral-sliding": lambda: _cfg("MistralConfig", sliding_window=WINDOW),
    "qwen2-sliding": lambda: _cfg("Qwen2Config", use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1),
    "qwen3": lambda: _cfg("Qwen3Config", head_dim=16),
    "gemma2": lambda: _cfg("Gemma2Config", head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                           attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True),
    "gemma3": lambda: _cfg("Gemma3TextConfig", head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "phi3": lambda: _cfg("Phi3Config", resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "olmo2": lambda: _cfg("Olmo2Config"),
    "gpt2": lambda: __import__("transformers").GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=IDS["<bos>"],
        eos_token_id=IDS["<eos>"], pad_token_id=IDS["<pad>"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def make_model(family: str, seed: int = 0):
    """A random model of ``family`` in eval mode; every tensor (norms and biases too) jittered to be non-trivial."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_family(family: str, root: Path, experts: int = 2) -> tuple[Path, dict[str, Path]]:
    """base/ (HF dir + char tokenizer) and full fine-tune experts e0.. (every tensor moved) under ``root``."""
    base = make_model(family)
    base_dir = root / "base"
    base.save_pretrained(str(base_dir))
    save_char_tokenizer(base_dir)
    dirs = {}
    for t in range(experts):
        g = torch.Generator().manual_seed(100 + t)
        out = root / f"e{t}"
        out.mkdir(parents=True)
        state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
                 for k, v in base.state_dict().items() if not (base.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        base.config.save_pretrained(str(out))
        dirs[f"e{t}"] = out
    return base_dir, dirs


def load_hf(model_dir: Path):
    """transformers' own model for a saved dir (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

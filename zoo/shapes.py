"""Real model shapes for synthetic checkpoints and benchmarks (no imports: the CLI lists them in --help).

name -> (model_type, config fields), from the published config.json of each model.
"""
from __future__ import annotations


def _shape(model_type: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool,
           max_pos: int, eps: float, **extra) -> tuple[str, dict]:
    return model_type, {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
                        "tie_word_embeddings": tied, "max_position_embeddings": max_pos, "rms_norm_eps": eps, **extra}


SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": _shape("qwen2", 896, 4864, 24, 14, 2, 151936, True, 32768, 1e-6),
    "qwen2.5-1.5b": _shape("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 32768, 1e-6),
    "qwen2.5-7b": _shape("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 32768, 1e-6),
    "llama-3.2-1b": _shape("llama", 2048, 8192, 16, 32, 8, 128256, True, 131072, 1e-5, head_dim=64),
    "llama-3.2-3b": _shape("llama", 3072, 8192, 28, 24, 8, 128256, True, 131072, 1e-5, head_dim=128),
    "llama-3-8b": _shape("llama", 4096, 14336, 32, 32, 8, 128256, False, 8192, 1e-5),
    "mistral-7b": _shape("mistral", 4096, 14336, 32, 32, 8, 32000, False, 32768, 1e-5),
    # seconds, for tests and smoke runs
    "tiny-qwen2": _shape("qwen2", 64, 128, 2, 4, 2, 512, True, 512, 1e-6),
    "tiny-llama": _shape("llama", 64, 128, 2, 4, 2, 512, False, 512, 1e-5),
}

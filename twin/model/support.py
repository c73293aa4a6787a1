"""Which architectures the transformers backend serves, and the error that says why one is not."""
from __future__ import annotations

import re

from transformers import AutoModelForCausalLM, PretrainedConfig

from twin.errors import TwinserveError

# checkpoint tensors that are buffers, not parameters: never part of θ*, never compared
NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class UnsupportedModelError(TwinserveError):
    """The config's architecture (or one of its tensors) cannot be served exactly; the message says which."""


def causal_lm_class(config: PretrainedConfig) -> type:
    """transformers' causal-LM class for ``config``; UnsupportedModelError when it cannot be served exactly."""
    mapping = AutoModelForCausalLM._model_mapping
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {model_type!r} is an encoder-decoder; twinserve serves decoder-only "
                                    f"causal LMs ({supported_summary()})")
    try:
        cls = mapping[type(config)]
    except KeyError:
        raise UnsupportedModelError(f"model_type {model_type!r} has no causal-LM class in transformers "
                                    f"({supported_summary()})") from None
    if not getattr(cls, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"model_type {model_type!r} ({cls.__name__}) does not route attention through "
                                    f"transformers' AttentionInterface, so its keys/values cannot go to twinserve's "
                                    f"slot cache ({supported_summary()})")
    return cls


def check_supported(config: PretrainedConfig) -> None:
    """Raise UnsupportedModelError naming the model_type unless this backend can serve it (call before any merge)."""
    causal_lm_class(config)
    why = stateful_layer(config)
    if why is not None:
        raise UnsupportedModelError(f"model_type {config.model_type!r} cannot be served exactly: {why}")


# Token mixers that keep a state outside attention (Mamba/SSM mixers, short convolutions, linear attention,
# RG-LRU, gated delta nets): the served step feeds each token as its own row and carries only attention's
# keys and values between steps, so these layers would see no context.
_STATEFUL = re.compile(r"Mamba|ShortConv|LinearAttention|Lightning|RGLRU|Rglru|RecurrentBlock|GatedDeltaNet")


def stateful_layer(config: PretrainedConfig) -> str | None:
    """The first decoder-block module that mixes tokens outside attention (a Conv1d or a state-space/linear-
    attention mixer), as "decoder block i: Class (...)", or None. The model is built on the meta device: no
    weights, seconds at any size; a config transformers cannot build is left to the probe."""
    import torch
    from torch import nn

    try:
        with torch.device("meta"):
            model = causal_lm_class(config)._from_config(config)
    except Exception:  # noqa: BLE001 (the probe and the gate decide for configs that do not build here)
        return None
    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList)
                   and len(m) == getattr(config, "num_hidden_layers", -1)), None)
    for i, block in enumerate(blocks or ()):
        for m in block.modules():
            if isinstance(m, nn.Conv1d) or _STATEFUL.search(type(m).__name__):
                return (f"decoder block {i}: {type(m).__name__} mixes tokens outside attention, a state twinserve's "
                        "step does not carry between tokens")
    return None


def supported_model_types() -> list[str]:
    out = []
    for cfg_cls, cls in AutoModelForCausalLM._model_mapping.items():
        if getattr(cls, "_supports_attention_backend", False) and not getattr(cfg_cls, "is_encoder_decoder", False):
            out.append(cfg_cls.model_type)
    return sorted(set(out))


def supported_summary() -> str:
    types = supported_model_types()
    head = ", ".join(t for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                                 "gpt2") if t in types)
    return f"supported: {head} and {len(types) - 9} more decoder-only model_types transformers implements"

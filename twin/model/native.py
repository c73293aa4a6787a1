"""Llama-family decoder in plain torch whose layers carry routed low-rank exclusive deltas.

Every weight-bearing layer takes the batch's expert weights w (N, T), one row per sequence:

    TwinLinear:    y = W* x + b*(w) + B_cat((A_cat x) ⊙ w[:, idx])      b*(w) = b* + w @ Δb
    TwinEmbedding: e = E*[tok] + (B_cat[tok] ⊙ w[:, idx]) @ A_cat
    TwinRMSNorm:   y = rmsnorm(x) ⊙ (g* + w @ Δg)

so sequences routed to different experts share one forward. With w = None the model is the
plain backbone θ*. The KV cache has one slot per sequence; every row carries its own positions.
Supports the configs of Llama, Mistral and Qwen2 (q/k/v biases), read with transformers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from twin.fusion import ExpertWeights, LowRankDeltas, delta_activations, materialize_weight

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


from twin.model.hf import UnsupportedModelError


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_config(cls, cfg: PretrainedConfig) -> ModelArgs:
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {cfg.model_type!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        refuse = {
            "sliding_window": getattr(cfg, "sliding_window", None) is not None
            and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)),
            "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
            "attention_bias (o_proj)": cfg.model_type == "llama" and bool(getattr(cfg, "attention_bias", False)),
            f"hidden_act={getattr(cfg, 'hidden_act', None)!r}": getattr(cfg, "hidden_act", "silu") != "silu",
        }
        bad = [k for k, v in refuse.items() if v]
        if bad:
            raise UnsupportedModelError(f"the native backend does not implement {', '.join(bad)} of this "
                                        f"{cfg.model_type} config; use the transformers backend")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            max_position_embeddings=cfg.max_position_embeddings,
        )


class TwinLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)            # (d_out, d_in)  W*
        self.register_buffer("bias", bias)                # (d_out,) or None
        self.deltas: LowRankDeltas | None = None          # factors of δ_t
        self.bias_deltas: torch.Tensor | None = None      # (T, d_out)

    def forward(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if w is None:
            return y
        if self.deltas is not None and self.deltas.rank:
            y = y + delta_activations(x, self.deltas, w)
        if self.bias_deltas is not None:
            y = y + (w.w @ self.bias_deltas).unsqueeze(1)
        return y


class TwinEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)            # (V, H)
        self.deltas: LowRankDeltas | None = None          # B_cat (V, R), A_cat (R, H)

    def forward(self, tokens: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        e = F.embedding(tokens, self.weight)              # (N, S, H)
        if w is None or self.deltas is None or not self.deltas.rank:
            return e
        b = self.deltas.B_cat[tokens] * w.w[:, self.deltas.idx].unsqueeze(1)   # (N, S, R)
        return e + b @ self.deltas.A_cat


class TwinRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)            # (H,)
        self.eps = eps
        self.deltas: torch.Tensor | None = None           # (T, H)

    def forward(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        g = self.weight
        if w is not None and self.deltas is not None:
            g = (g + w.w @ self.deltas).unsqueeze(1)      # (N, 1, H): per-row gain
        return g * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Per-slot keys and values: (layers, slots, kv_heads, max_seq, head_dim)."""

    def __init__(self, args: ModelArgs, slots: int, max_seq: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (args.num_layers, slots, args.num_kv_heads, max_seq, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype))
        self.slots, self.max_seq = slots, max_seq


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, get):
        super().__init__()
        self.args = args
        bias = args.attention_bias
        self.q_proj = TwinLinear(get("q_proj.weight"), get("q_proj.bias") if bias else None)
        self.k_proj = TwinLinear(get("k_proj.weight"), get("k_proj.bias") if bias else None)
        self.v_proj = TwinLinear(get("v_proj.weight"), get("v_proj.bias") if bias else None)
        self.o_proj = TwinLinear(get("o_proj.weight"))

    def forward(self, x, w, cos, sin, layer: int, cache: KVCache, slots, positions, mask):
        a = self.args
        n, s, _ = x.shape
        q = self.q_proj(x, w).view(n, s, a.num_heads, a.head_dim).transpose(1, 2)     # (N, H, S, hd)
        k = self.k_proj(x, w).view(n, s, a.num_kv_heads, a.head_dim).transpose(1, 2)  # (N, Hkv, S, hd)
        v = self.v_proj(x, w).view(n, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # write this step's keys/values at each row's own slot and positions
        cache.k[layer][slots[:, None], :, positions] = k.transpose(1, 2)
        cache.v[layer][slots[:, None], :, positions] = v.transpose(1, 2)
        length = mask.shape[-1]
        keys = cache.k[layer][slots, :, :length]                                      # (N, Hkv, L, hd)
        values = cache.v[layer][slots, :, :length]
        rep = a.num_heads // a.num_kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)          # (N, H, S, hd)
        return self.o_proj(out.transpose(1, 2).reshape(n, s, a.num_heads * a.head_dim), w)


class MLP(nn.Module):
    def __init__(self, get):
        super().__init__()
        self.gate_proj = TwinLinear(get("gate_proj.weight"))
        self.up_proj = TwinLinear(get("up_proj.weight"))
        self.down_proj = TwinLinear(get("down_proj.weight"))

    def forward(self, x, w):
        return self.down_proj(F.silu(self.gate_proj(x, w)) * self.up_proj(x, w), w)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, get):
        super().__init__()
        self.self_attn = Attention(args, lambda n: get("self_attn." + n))
        self.mlp = MLP(lambda n: get("mlp." + n))
        self.input_layernorm = TwinRMSNorm(get("input_layernorm.weight"), args.rms_norm_eps)
        self.post_attention_layernorm = TwinRMSNorm(get("post_attention_layernorm.weight"), args.rms_norm_eps)

    def forward(self, x, w, cos, sin, layer, cache, slots, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x, w), w, cos, sin, layer, cache, slots, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x, w), w)


class NativeTwinModel(nn.Module):
    """θ* + routed exclusive deltas. Module names mirror the HF checkpoint names (model.layers.0.mlp.up_proj)."""

    def __init__(self, config: PretrainedConfig, state: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.args = args = ModelArgs.from_config(config)

        def getter(prefix):
            def get(name):
                key = prefix + name
                if key not in state:
                    raise KeyError(f"checkpoint has no tensor {key}")
                return state[key]
            return get

        self.embed_tokens = TwinEmbedding(state["model.embed_tokens.weight"])
        self.layers = nn.ModuleList(Block(args, getter(f"model.layers.{i}.")) for i in range(args.num_layers))
        self.norm = TwinRMSNorm(state["model.norm.weight"], args.rms_norm_eps)
        tied = args.tie_word_embeddings or "lm_head.weight" not in state
        self.lm_head = TwinLinear(self.embed_tokens.weight if tied else state["lm_head.weight"])
        self.tied = tied
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.num_experts = 0
        self.expert_names: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ---- names -> modules, for loading deltas ----------------------------------------------------
    def module_for(self, param: str) -> tuple[nn.Module, str]:
        """('model.layers.0.self_attn.q_proj.weight') -> (the TwinLinear, 'weight')."""
        if param == "lm_head.weight":
            return self.lm_head, "weight"
        path, attr = param.rsplit(".", 1)
        path = path.removeprefix("model.")
        mod: nn.Module = self
        for part in path.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        return mod, attr

    def attach_deltas(self, expert_names: list[str], lowrank: dict[str, LowRankDeltas],
                      dense: dict[str, torch.Tensor]) -> None:
        """lowrank: param -> factors of its 2-D deltas; dense: param -> (T, *shape) 1-D deltas."""
        self.expert_names = list(expert_names)
        self.num_experts = len(expert_names)
        for param, d in lowrank.items():
            mod, _ = self.module_for(param)
            mod.deltas = d
        if self.tied and "lm_head.weight" not in lowrank and "model.embed_tokens.weight" in lowrank:
            self.lm_head.deltas = lowrank["model.embed_tokens.weight"]
        for param, d in dense.items():
            mod, attr = self.module_for(param)
            if attr == "bias":
                mod.bias_deltas = d
            else:
                mod.deltas = d

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                w: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                num_layers: int | None = None) -> torch.Tensor:
        """tokens, positions: (N, S) long; slots: (N,) long; w: (N, T) (or ExpertWeights) or None.

        Returns logits (N, S, V), or (N, V) at column ``logits_at`` (N,) of each row. With
        ``num_layers`` it stops after that many blocks and returns the hidden states (N, S, H).
        """
        if w is not None:
            w = (w if isinstance(w, ExpertWeights) else ExpertWeights(w)).to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(tokens, w)
        cos, sin = self.rotary(x, positions)               # (N, S, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        length = int(positions.max()) + 1
        key_pos = torch.arange(length, device=tokens.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)   # (N, 1, S, L)
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for i, block in enumerate(layers):
            x = block(x, w, cos, sin, i, cache, slots, positions, mask)
        if num_layers is not None:
            return x
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at].unsqueeze(1)
        logits = self.lm_head(self.norm(x, w), w)
        return logits[:, 0] if logits_at is not None else logits

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """θ* under HF names (tied lm_head left out, as in tied checkpoints)."""
        out = {}
        for name, buf in self.named_buffers():
            if name.startswith("rotary.") or buf is None:
                continue
            out[name if name.startswith("lm_head.") else "model." + name] = buf
        return out

    def fused(self, w: torch.Tensor) -> NativeTwinModel:
        """Reference path: a new dense model with θ* + Σ_t w_t δ̂_t materialised (w: (T,))."""
        w = w.to(device=self.embed_tokens.weight.device, dtype=self.embed_tokens.weight.dtype)
        state = {}
        for key, t in self.backbone_state().items():
            mod, attr = self.module_for(key)
            if attr == "bias" and getattr(mod, "bias_deltas", None) is not None:
                t = t + w @ mod.bias_deltas
            elif attr == "weight" and isinstance(mod, TwinRMSNorm) and mod.deltas is not None:
                t = t + w @ mod.deltas
            elif attr == "weight" and getattr(mod, "deltas", None) is not None and mod.deltas.rank:
                t = materialize_weight(t, mod.deltas, w)
            state[key] = t
        if not self.tied and self.lm_head.deltas is not None and self.lm_head.deltas.rank:
            state["lm_head.weight"] = materialize_weight(self.lm_head.weight, self.lm_head.deltas, w)
        return NativeTwinModel(self.config, state).eval()

    def new_cache(self, slots: int, max_seq: int, layers: int | None = None) -> KVCache:
        """``layers`` < num_layers makes a cache for a truncated pass (router features)."""
        args = self.args if layers is None else dataclasses.replace(self.args, num_layers=layers)
        return KVCache(args, slots, max_seq, device=self.embed_tokens.weight.device,
                       dtype=self.embed_tokens.weight.dtype)

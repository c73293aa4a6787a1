"""A synthetic artifact of realistic shape, built on the fly with random weights, for throughput benchmarks.

The files are exactly what ``compression.build`` writes (backbone.safetensors, exclusive.safetensors with
``{param}::{expert}::A|B|delta`` keys, router.safetensors, tokenizer/, report.json, manifest.json with
checksums, written atomically with ``atomic_dir`` + ``finalize_manifest``), so the server loads it through
the normal path. The factors are random (B, A scaled small) instead of an SVD of random matrices: the
serving cost depends only on the shapes, and SVD of 8 layers × 7 matrices × 8 experts would take minutes.

Choices (see ``SyntheticSpec``):
- Llama, hidden 1024, 8 layers, 16 heads (head_dim 64, no GQA), intermediate 2816, 8 experts, rank 16
  on every 2-D tensor (embed_tokens and lm_head included, as the default recipe does): per layer, the
  factors add (d_in + d_out)·rank·T parameters per matrix.
- No dense deltas on the RMSNorm gains by default (``norm_deltas=False``), as in an artifact built from
  LoRA experts: the bench's HF + PEFT peer must serve exactly the same model, and PEFT cannot carry a
  per-adapter norm weight in a mixed-adapter batch. ``norm_deltas=True`` adds them (twinserve serves
  them; the PEFT peer is then skipped).
- ``embed_head_deltas=False`` leaves embed_tokens and lm_head without factors (θ* only there), for peers whose
  LoRA cannot target them; the default keeps them, as the default recipe does.
- vocab 8192, not 32000: with 8 layers a 32000×1024 lm_head + embedding would be ~40% of the parameters
  and the benchmark would mostly measure the vocabulary projection; 8192 keeps it at ~14%, closer to the
  per-layer share of a 7B model, which is what the activation-side delta overhead is about.
- Tokenizer: the zoo's char tokenizer (100 ids). Prompts go to the engine as token ids, so its content
  barely matters; ids >= 100 decode to nothing (``tokenizers`` skips unknown ids), which keeps the
  engine's per-token detokenisation working for any generated id < vocab_size.
- Router: a random router MLP (feature layer 2 of 8, as a cheap truncated pass, fallback "none") whose
  standardisation is fitted to real features and whose logits are scaled so weights are soft but
  distinct per prompt; with it every mode goes through the same routing code as a real artifact
  (``RoutingSpec(top_k=2)`` gives top-2), and materialize mode sees a different w for each prompt.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from twin import __version__
from twin.artifact import (
    BACKBONE,
    EXCLUSIVE,
    REPORT,
    ROUTER,
    atomic_dir,
    exclusive_key,
    finalize_manifest,
)
from twin.manifest import Manifest

SYNTHETIC_TASK_PREFIX = "synth"


@dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int = 1024
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 16
    intermediate_size: int = 2816
    vocab_size: int = 8192
    max_position_embeddings: int = 512
    num_experts: int = 8
    rank: int = 16
    router_layer: int = 2
    router_hidden: int = 256
    # the prompt head the router pools (RouterConfig.prefix_tokens): the shortest head train-router tries,
    # which it picks on the demo; None = every token (the format-1 router)
    router_prefix_tokens: int | None = 8
    seed: int = 0
    norm_deltas: bool = False
    embed_head_deltas: bool = True

    @classmethod
    def quick(cls) -> SyntheticSpec:
        """A tiny variant for tests and smoke runs (seconds, not minutes)."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128,
                   vocab_size=512, max_position_embeddings=256, num_experts=4, rank=4, router_layer=1,
                   router_hidden=32)

    @classmethod
    def like(cls, name: str, num_experts: int = 8, rank: int = 16, **overrides) -> SyntheticSpec:
        """A real model's shape (zoo.shapes: qwen2.5-0.5b, llama-3-8b, …) as a Llama-layout synthetic: the same
        hidden size, depth, heads, KV heads, intermediate size and vocabulary; the router reads block 2."""
        from zoo.shapes import SHAPES

        if name not in SHAPES:
            raise ValueError(f"--like: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
        f = SHAPES[name][1]
        fields = {"hidden_size": f["hidden_size"], "num_layers": f["num_hidden_layers"],
                  "num_heads": f["num_attention_heads"], "num_kv_heads": f["num_key_value_heads"],
                  "intermediate_size": f["intermediate_size"], "vocab_size": f["vocab_size"],
                  "max_position_embeddings": min(f["max_position_embeddings"], 4096), "num_experts": num_experts,
                  "rank": rank, "router_layer": min(2, f["num_hidden_layers"])}
        return cls(**{**fields, **overrides})

    @property
    def expert_names(self) -> list[str]:
        return [f"{SYNTHETIC_TASK_PREFIX}{i}" for i in range(self.num_experts)]

    def to_dict(self) -> dict:
        return asdict(self)


def llama_config(spec: SyntheticSpec):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                       max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       architectures=["LlamaForCausalLM"])


def _shapes(spec: SyntheticSpec) -> dict[str, tuple[int, ...]]:
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hd = h // spec.num_heads
    kv = spec.num_kv_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        out.update({
            p + "self_attn.q_proj.weight": (spec.num_heads * hd, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, spec.num_heads * hd),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def random_prompts(spec: SyntheticSpec, n: int, seed: int, min_len: int = 8, max_len: int = 48
                   ) -> list[tuple[str, list[int]]]:
    """n (pseudo-task, token ids) pairs for ``spec``'s artifact; see ``random_token_prompts``."""
    return random_token_prompts(spec.expert_names, spec.vocab_size, n, seed, min_len, max_len)


def random_token_prompts(tasks: list[str], vocab_size: int, n: int, seed: int, min_len: int = 8,
                         max_len: int = 48) -> list[tuple[str, list[int]]]:
    """n (pseudo-task, token ids) pairs, tasks interleaved round-robin; <bos> (id 1) first; mixed lengths.

    Each pseudo-task draws its tokens from its own slice of ids 4..vocab_size-1 (the specials stay
    out), so prompts of one task look alike to a router.
    """
    rng = random.Random(seed)
    span = max(1, (vocab_size - 4) // len(tasks))
    out = []
    for k in range(n):
        t = k % len(tasks)
        length = rng.randint(min_len, max_len)
        lo = min(4 + t * span, vocab_size - 1)
        hi = min(lo + span, vocab_size)
        out.append((tasks[t], [1] + [rng.randrange(lo, hi) for _ in range(length - 1)]))
    return out


def _random_router(spec: SyntheticSpec, backbone: dict[str, torch.Tensor], config) -> tuple[dict, dict]:
    """A random router MLP fitted just enough to give soft, prompt-dependent weights."""
    from router.features import router_features
    from router.model import RouterConfig, RouterMLP
    from twin.model import TwinModel

    torch.manual_seed(spec.seed + 7)
    mlp = RouterMLP(spec.hidden_size, spec.router_hidden, spec.num_experts)
    model = TwinModel(config, backbone).eval()
    ids = [p for _, p in random_prompts(spec, 64, seed=spec.seed + 99)]
    cfg = RouterConfig(experts=spec.expert_names, feature_dim=spec.hidden_size, feature_layer=spec.router_layer,
                       hidden=spec.router_hidden, temperature=1.0, top_k=None, fallback="none",
                       min_confidence=0.0, max_entropy=None, max_distance=None,
                       prefix_tokens=spec.router_prefix_tokens, extra={"synthetic": True})
    x = router_features(model, ids, cfg)
    with torch.no_grad():
        mlp.mean.copy_(x.mean(0))
        mlp.std.copy_(x.std(0).clamp_min(1e-6))
        logits = mlp(x)
        scale = 1.5 / float(logits.std().clamp_min(1e-6))   # logit std ~1.5: soft but distinct weights
        last = mlp.net[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    section = {"config": cfg.to_dict(), "train": {"synthetic": True, "note": "random MLP, not trained"}}
    return state, section


def build_synthetic_artifact(out: str | Path, spec: SyntheticSpec | None = None) -> Manifest:
    """Write a random artifact of ``spec``'s shape to ``out`` (atomically); return the manifest."""
    from zoo.tokenizer import make_char_tokenizer

    spec = spec or SyntheticSpec()
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    t0 = time.perf_counter()
    config = llama_config(spec)
    names = spec.expert_names
    g = torch.Generator().manual_seed(spec.seed)
    backbone: dict[str, torch.Tensor] = {}
    exclusive: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict] = {}
    for pname, shape in _shapes(spec).items():
        if len(shape) == 2:
            backbone[pname] = (0.02 * torch.randn(shape, generator=g)).contiguous()
            d_out, d_in = shape
            r = min(spec.rank, d_out, d_in)
            factors = {}
            for name in names:
                # like SVD factors: A has ~unit rows, B carries the (small) singular values
                factors[exclusive_key(pname, name, "A")] = (torch.randn(r, d_in, generator=g) / d_in ** 0.5)
                factors[exclusive_key(pname, name, "B")] = 0.005 * torch.randn(d_out, r, generator=g)
            # drawn either way, so θ* and the other factors do not depend on the option
            if not spec.embed_head_deltas and pname in ("model.embed_tokens.weight", "lm_head.weight"):
                continue
            exclusive.update(factors)
            tensors[pname] = {"shape": list(shape), "kind": "lowrank", "ranks": {n: r for n in names},
                              "rel_error": {}}
        else:
            backbone[pname] = (1.0 + 0.02 * torch.randn(shape, generator=g)).contiguous()
            if not spec.norm_deltas:
                continue
            for name in names:
                exclusive[exclusive_key(pname, name, "delta")] = 0.01 * torch.randn(shape, generator=g)
            tensors[pname] = {"shape": list(shape), "kind": "dense", "ranks": {}, "rel_error": {}}
    router_state, router_section = _random_router(spec, backbone, config)
    n_backbone = sum(t.numel() for t in backbone.values())
    n_exclusive = sum(t.numel() for t in exclusive.values())
    report = {"build": {"synthetic": spec.to_dict(), "backbone_params": n_backbone,
                        "exclusive_params": n_exclusive, "seconds": round(time.perf_counter() - t0, 2)}}
    manifest = Manifest(
        created_by=f"twinserve {__version__} (bench.synthetic)",
        architecture="LlamaForCausalLM",
        config=config.to_dict(),
        dtype="float32",
        base=None,
        experts=[{"name": n, "description": f"synthetic pseudo-task {n}", "source": None} for n in names],
        merge=None,
        rank_policy={"rank": spec.rank, "energy": None, "max_rank": None, "include": ["*"], "exclude": [],
                     "svd": "none (random factors)"},
        tensors=tensors,
        router=router_section,
        synthetic=spec.to_dict(),
    )
    with atomic_dir(out) as tmp:
        save_file(backbone, str(tmp / BACKBONE))
        save_file(exclusive, str(tmp / EXCLUSIVE))
        (tmp / ROUTER).write_bytes(save(router_state))
        make_char_tokenizer().save_pretrained(str(tmp / "tokenizer"))
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        manifest = finalize_manifest(tmp, manifest)
    return manifest

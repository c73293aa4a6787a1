"""Real-shape checkpoints without a hub: a random base with a real model's config and N experts, streamed
to disk a tensor at a time (``twinserve zoo synthetic --like qwen2.5-1.5b --experts 8 -o DIR``).

The shapes are the published configs (hidden size, layers, heads, KV heads, intermediate size, vocabulary,
tied head, biases); the weights are random, so these checkpoints measure build and serving cost and the
exactness of every step against transformers, not model quality. What is written:

    DIR/base/              config.json, model.safetensors (or shards + index), tokenizer (byte-level BPE)
    DIR/experts/e0 …       full fine-tunes: every tensor θ_0 + δ_t, where a 2-D δ_t is a rank-64 decaying
                           spectrum (s_i ∝ e^{-i/16}) carrying 90 % of its energy plus 10 % dense noise, and
                           ||δ_t|| = ``delta_scale`` · ||θ_0|| per tensor (1-D tensors: noise only);
                           or, with ``lora_rank``, PEFT LoRA adapters (adapter_config.json +
                           adapter_model.safetensors in peft's format) on every linear layer of the blocks
    DIR/recipe.yaml        TIES, density 0.2, rank 64, bf16 — ``twinserve build DIR/recipe.yaml -o ART``
    DIR/mergekit.yaml      the same TIES merge for ``mergekit-yaml`` (full fine-tunes only)

Every tensor is drawn from its own seed (model, tensor name), so the base is regenerated identically for
each expert and memory stays at one shard.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from twin.artifact import ShardWriter, atomic_dir
from twin.errors import TwinserveError
from twin.tokenizer import byte_tokenizer

from .shapes import SHAPES

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DELTA_RANK = 64
NOISE_ENERGY = 0.1


class SyntheticError(TwinserveError):
    """Bad synthetic-checkpoint options (exit 2); the message names the option."""


@dataclass(frozen=True)
class SyntheticCheckpoints:
    like: str
    experts: int = 4
    lora_rank: int | None = None
    layers: int | None = None          # cut the depth (None: the real depth)
    delta_scale: float = 0.01
    dtype: str = "bfloat16"
    seed: int = 0

    def config(self) -> PretrainedConfig:
        if self.like not in SHAPES:
            raise SyntheticError(f"--like: unknown shape {self.like!r}; choose from {', '.join(SHAPES)}")
        model_type, fields = SHAPES[self.like]
        fields = dict(fields, torch_dtype=self.dtype, bos_token_id=257, eos_token_id=256)
        if self.layers is not None:
            fields["num_hidden_layers"] = self.layers
        cfg = AutoConfig.for_model(model_type, **fields)
        cfg.architectures = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
        return cfg


def parameter_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of ``config``'s causal LM (a tied head is not stored)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}   # remove_duplicate: a tied head once


def _gen(seed: int, *parts: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32("/".join(parts).encode())) % (2**63))


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """θ_0[name] in fp32: N(0, 0.02²) weights, unit norm gains, small biases."""
    g = _gen(seed, "base", name)
    if len(shape) == 1:
        if name.endswith("bias"):
            return torch.randn(shape, generator=g) * 0.02
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def expert_delta(name: str, w0: torch.Tensor, t: int, scale: float, seed: int) -> torch.Tensor:
    """δ_t[name] (fp32, ||δ|| = scale·||θ_0||): rank-64 decaying spectrum + 10 % dense noise (2-D)."""
    g = _gen(seed, f"expert{t}", name)
    target = scale * float(torch.linalg.vector_norm(w0))
    noise = torch.randn(w0.shape, generator=g)
    if w0.ndim != 2:
        return noise * (target / float(torch.linalg.vector_norm(noise)))
    d_out, d_in = w0.shape
    r = min(DELTA_RANK, d_out, d_in)
    s = torch.exp(-torch.arange(r, dtype=torch.float32) / 16)
    low = (torch.randn(d_out, r, generator=g) * s) @ torch.randn(r, d_in, generator=g)
    low *= math.sqrt(1 - NOISE_ENERGY) * target / float(torch.linalg.vector_norm(low))
    noise *= math.sqrt(NOISE_ENERGY) * target / float(torch.linalg.vector_norm(noise))
    return low + noise


def lora_pair(name: str, shape: tuple[int, int], t: int, rank: int, alpha: float, scale: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r×d_in), lora_B (d_out×r)) with ||(α/r)·B A|| ≈ scale·||θ_0|| (θ_0 ~ N(0, 0.02²))."""
    g = _gen(seed, f"lora{t}", name)
    d_out, d_in = shape
    a = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
    b = torch.randn(d_out, rank, generator=g)
    ba = (alpha / rank) * float(torch.linalg.matrix_norm(b @ a))
    b *= scale * 0.02 * math.sqrt(d_out * d_in) / ba
    return a, b


def _write_model(out: Path, config: PretrainedConfig, tensors, shard_bytes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    writer = ShardWriter(out, "model.safetensors", shard_bytes)
    for name, t in tensors:
        writer.add(name, t)
    writer.close()


def write_synthetic(spec: SyntheticCheckpoints, out: str | Path, shard_bytes: int = 1 << 30,
                    progress=None) -> dict:
    """Write base + experts + recipes under ``out`` (atomically); return a summary dict."""
    if spec.experts < 1:
        raise SyntheticError("--experts: at least 1")
    if spec.lora_rank is not None and spec.lora_rank < 1:
        raise SyntheticError("--lora: the rank must be at least 1")
    config = spec.config()
    dt = getattr(torch, spec.dtype)
    shapes = parameter_shapes(config)
    seed = spec.seed
    names = [f"e{t}" for t in range(spec.experts)]
    step = progress or (lambda what: None)
    with atomic_dir(out) as tmp:
        step("base")
        _write_model(tmp / "base", config, ((n, base_tensor(n, s, seed).to(dt)) for n, s in shapes.items()),
                     shard_bytes)
        byte_tokenizer().save_pretrained(str(tmp / "base"))
        for t, name in enumerate(names):
            step(name)
            path = tmp / "experts" / name
            if spec.lora_rank is None:
                def full(t=t):
                    for n, s in shapes.items():
                        w0 = base_tensor(n, s, seed).to(dt).float()
                        yield n, (w0 + expert_delta(n, w0, t, spec.delta_scale, seed)).to(dt)
                _write_model(path, config, full(), shard_bytes)
            else:
                _write_lora(path, shapes, t, spec, tmp / "base")
        _write_recipes(tmp, names, spec)
    return {"like": spec.like, "layers": config.num_hidden_layers, "experts": spec.experts,
            "parameters": sum(math.prod(s) for s in shapes.values()), "lora_rank": spec.lora_rank}


def _write_lora(path: Path, shapes: dict, t: int, spec: SyntheticCheckpoints, base: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    r = spec.lora_rank
    alpha = 2.0 * r
    tensors = {}
    for n, s in shapes.items():
        module = n.removesuffix(".weight")
        if len(s) != 2 or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        a, b = lora_pair(n, s, t, r, alpha, spec.delta_scale, spec.seed)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(getattr(torch, spec.dtype))
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(getattr(torch, spec.dtype))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": LORA_TARGETS, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def _write_recipes(root: Path, names: list[str], spec: SyntheticCheckpoints) -> None:
    import yaml

    experts = [{"name": n, "path": f"experts/{n}"} for n in names]
    recipe = {"base": "base", "experts": experts, "merge": {"method": "ties", "density": 0.2},
              "rank": {"rank": 64}, "dtype": spec.dtype}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if spec.lora_rank is None:
        mk = {"merge_method": "ties", "base_model": "base", "dtype": spec.dtype,
              "parameters": {"normalize": True},
              "models": [{"model": f"experts/{n}", "parameters": {"density": 0.2, "weight": 1.0}} for n in names]}
        (root / "mergekit.yaml").write_text(yaml.safe_dump(mk, sort_keys=False))

"""The early refusal: before any expert is read, a tiny random model of the user's config is built and
run through the same build and parity gate as the real one, in seconds.

The tiny config keeps what decides whether twinserve can serve a model exactly — the model_type, one
layer of each kind (``layer_types``), attention variant, norms, rope, MoE routing, biases, tied head —
and shrinks the sizes (hidden 64, 4 heads, 4 MoE experts, a 512-token vocabulary). Two random experts
change the tensors the user's experts change (every tensor for full fine-tunes; the adapted modules for
PEFT adapters), the recipe's own include/exclude patterns apply, and the gate compares the served step —
prefill, then decode — with transformers. A failure names the model_type and the reason; the real
build never starts. A config that cannot be shrunk is not refused for that: the full build's own gate
still certifies it after the merge.
"""
from __future__ import annotations

import copy
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PretrainedConfig

from twin.model import UnsupportedModelError

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 512}
MOE_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MOE_TOPK = ("num_experts_per_tok", "moe_topk", "top_k")
MOE_SIZES = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size")
MLA = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
INDEX_LISTS = ("full_attn_idxs", "mlp_only_layers", "attn_layer_indices", "no_rope_layers_idxs")
MAX_PARAMETERS = 20_000_000   # a shrink that leaves more than this (an unknown size key) is not probed


class ProbeSkipped(Exception):
    """The config could not be shrunk into a tiny model; the full build's gate decides instead."""


def _set(cfg, name: str, value) -> None:
    if getattr(cfg, name, None) is not None:
        setattr(cfg, name, value)


def tiny_config(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with small sizes and one decoder layer of each kind (two when all are alike)."""
    cfg = copy.deepcopy(config)
    heads = getattr(config, "num_attention_heads", None) or 4
    kv = getattr(config, "num_key_value_heads", None)
    for k, v in TINY.items():
        _set(cfg, k, v)
    if kv is not None:
        cfg.num_key_value_heads = 4 if kv == heads else (1 if kv == 1 else 2)
    _set(cfg, "head_dim", 16)
    for k in MOE_COUNTS:
        _set(cfg, k, 4)
    for k in MOE_TOPK:
        if isinstance(getattr(cfg, k, None), int):
            setattr(cfg, k, min(2, getattr(cfg, k)))
    if any(getattr(cfg, k, None) for k in MOE_COUNTS) and getattr(cfg, "num_experts_per_tok", 0) is None:
        cfg.num_experts_per_tok = 2
    for k in MOE_SIZES:
        _set(cfg, k, 64)
    for k in ("n_group", "topk_group"):      # grouped expert routing (DeepSeek): one group of all experts
        if isinstance(getattr(cfg, k, None), int):
            setattr(cfg, k, 1)
    for k, v in MLA.items():
        _set(cfg, k, v)
    if getattr(cfg, "qk_rope_head_dim", None) is not None and getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = cfg.qk_rope_head_dim      # MLA: the rotary part is what head_dim sizes
    if isinstance(getattr(cfg, "sliding_window", None), int):
        cfg.sliding_window = 8
    if getattr(cfg, "max_position_embeddings", None):
        cfg.max_position_embeddings = max(64, min(cfg.max_position_embeddings, 4096))
    if isinstance(getattr(cfg, "rotary_dim", None), int):
        cfg.rotary_dim = min(cfg.rotary_dim, 16)
    if isinstance(getattr(cfg, "first_k_dense_replace", None), int):
        cfg.first_k_dense_replace = min(cfg.first_k_dense_replace, 1)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        # one layer of each kind: from every per-layer list (layer_types, mlp_layer_types, …), first occurrences
        d = config.to_dict()
        index_lists = {k: v for k, v in d.items() if k in INDEX_LISTS and isinstance(v, list)}
        per_layer = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and k not in index_lists}
        kinds = [v for v in per_layer.values() if all(isinstance(x, (str, bool)) for x in v)]
        keep = {seq.index(x) for seq in kinds for x in seq} | {0}
        for v in index_lists.values():   # one layer in and one out of each index list
            inside = [i for i in v if isinstance(i, int) and 0 <= i < n]
            outside = [i for i in range(n) if i not in inside]
            keep |= set(inside[:1]) | set(outside[:1])
        keep = sorted(i for i in keep if i < n)[:8]
        if len(keep) < 2 and n > 1:      # two alike layers at least: the second reads the first's output
            keep = sorted({*keep, next(i for i in range(n) if i not in keep)})
        for k, v in per_layer.items():
            setattr(cfg, k, [v[i] for i in keep])
        for k, v in index_lists.items():
            setattr(cfg, k, [keep.index(i) for i in v if i in keep])
        cfg.num_hidden_layers = len(keep)
    for k in TOKEN_IDS:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v >= 256:
            setattr(cfg, k, 256 + TOKEN_IDS.index(k) % 2)
        elif isinstance(v, list):
            setattr(cfg, k, [min(256, i) for i in v])
    return cfg


def tiny_model(config: PretrainedConfig):
    """A random fp32 model of ``tiny_config(config)``; ProbeSkipped when it cannot be made."""
    from transformers import AutoModelForCausalLM

    try:
        tiny = tiny_config(config)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny).parameters())
    except Exception as e:  # noqa: BLE001 (any failure to construct means: cannot probe, not: refuse)
        raise ProbeSkipped(f"{type(e).__name__}: {str(e)[:200]}") from None
    if size > MAX_PARAMETERS:
        raise ProbeSkipped(f"the smallest model twinserve can make of this config has {size:,} parameters")
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny, dtype=torch.float32).eval()
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3, 4, 5, 6]]))     # transformers itself runs the tiny config
    except Exception as e:  # noqa: BLE001
        raise ProbeSkipped(f"{type(e).__name__}: {str(e)[:200]}") from None
    return model


def _layer_pattern(name: str) -> str:
    """model.layers.7.mlp.up_proj.weight -> model.layers.*.mlp.up_proj.weight (a tensor kind, any depth)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def changed_kinds(experts) -> set[str] | None:
    """Tensor kinds the user's experts change: None (all of them) when any expert is a full fine-tune."""
    from .checkpoints import PeftExpert

    kinds: set[str] = set()
    for e in experts:
        if not isinstance(e, PeftExpert):
            return None
        names = set(e.pairs) | set(e.replaced) | set(e.tokens) | {n.removesuffix(".weight") + ".bias" for n, p in
                                                                  e.pairs.items() if "bias" in p}
        kinds.update(_layer_pattern(n) for n in names)
    return kinds


def probe(config: PretrainedConfig, experts: list, recipe, workdir: str | Path | None = None) -> dict:
    """Build + gate a tiny model of ``config`` whose experts change what ``experts`` change;
    UnsupportedModelError (naming the type and the reason) when it is not served exactly, ProbeSkipped when
    no tiny model of the config can be made."""
    return probe_kinds(config, changed_kinds(experts), recipe, workdir)


def linear_kinds(model) -> set[str]:
    """Tensor kinds of every nn.Linear weight and bias of ``model``: what LoRA-on-all-linear experts change."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.add(_layer_pattern(name + ".weight"))
            out.add(_layer_pattern(name + ".bias"))
    return out


def probe_kinds(config: PretrainedConfig, kinds: set[str] | None, recipe, workdir: str | Path | None = None,
                model=None) -> dict:
    """``probe`` for experts that change the tensor kinds ``kinds`` (None: every tensor)."""
    from safetensors.torch import save_file

    from twin.tokenizer import byte_tokenizer

    from .build import build_artifact
    from .experts import expert_tensors
    from .parity import ParityError, check_parity
    from .recipe import Recipe

    model_type = getattr(config, "model_type", "?")
    if model is None:
        model = tiny_model(config)
    tiny = model.config
    root = Path(tempfile.mkdtemp(prefix="twinserve-probe-", dir=workdir))
    try:
        base = root / "base"
        try:
            model.save_pretrained(str(base))
            byte_tokenizer().save_pretrained(str(base))
            type(tiny).from_pretrained(str(base))
        except Exception as e:  # noqa: BLE001 (the tiny config does not round-trip: our shrink, not the model)
            raise ProbeSkipped(f"{type(e).__name__}: {str(e)[:200]}") from None
        from compression.checkpoints import CheckpointError, LazyState
        state = LazyState(base)                     # the checkpoint's own keys, as a user's experts store them
        try:
            layout = LazyState(base, tiny).layout
        except CheckpointError as e:       # a stored layout transformers converts in a way twinserve cannot read
            raise UnsupportedModelError(f"model_type {model_type!r} cannot be served: {str(e).split(': ', 1)[-1]}") from None
        model_name = {} if layout is None else (
            {raw: name for name, raw in layout.simple.items()}
            | {piece: name for name, f in layout.fused.items() for piece in f.pieces})
        specs = []
        for t in range(2):
            g = torch.Generator().manual_seed(100 + t)
            out = root / f"e{t}"
            out.mkdir()
            tensors = {}
            for k in state.keys():  # noqa: SIM118 (LazyState is not a dict)
                w = state.get(k)
                if kinds is None or _layer_pattern(model_name.get(k, k)) in kinds:
                    w = w + 0.05 * torch.randn(w.shape, generator=g).to(w.dtype)
                tensors[k] = w.contiguous()
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
            tiny.save_pretrained(str(out))
            specs.append({"name": f"e{t}", "path": str(out)})
        full_rank = max(64, tiny.hidden_size * 4, getattr(tiny, "intermediate_size", 0) or 0)
        rank = recipe.rank.model_dump() | {"rank": full_rank, "energy": None, "max_rank": None, "svd": "exact"}
        tiny_recipe = Recipe(base=str(base), experts=specs, merge={"method": "task_arithmetic", "lam": 0.5},
                             rank=rank, dtype="float32")
        art = root / "art"
        try:
            build_artifact(tiny_recipe, art, quiet=True)
            report = check_parity(art, expert_tensors)
        except (ParityError, UnsupportedModelError) as e:
            raise UnsupportedModelError(f"model_type {model_type!r} is not served exactly (found by a tiny model "
                                        f"of this config, before any merge work): {e}") from None
        except Exception as e:  # noqa: BLE001 (a crash on the tiny model is a refusal with its reason)
            raise UnsupportedModelError(f"model_type {model_type!r} cannot be served (a tiny model of this config "
                                        f"fails in twinserve, before any merge work): {type(e).__name__}: "
                                        f"{str(e)[:300]}") from None
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def probe_artifact(manifest) -> None:
    """`twinserve serve`'s early refusal for an artifact no gate certified (built with --skip-parity, or outside
    the CLI): the probe on the artifact's config, with experts that change the tensor kinds its deltas touch.
    UnsupportedModelError names the type and the reason; a config no tiny model can be made of passes."""
    from twin.loading import config_from_manifest

    from .recipe import Recipe

    config = config_from_manifest(manifest)
    kinds = {_layer_pattern(n) for n in manifest.tensors} or None
    try:
        model = tiny_model(config)
        probe_kinds(config, kinds, Recipe(base="unused", experts=[{"name": "a", "path": "unused"}]), model=model)
    except ProbeSkipped:
        return

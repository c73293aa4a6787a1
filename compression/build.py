"""Recipe -> artifact: merge shared knowledge into θ*, keep each expert's exclusive δ_t as SVD factors.

Sizes: with ``compress.budget`` the factors of every 2-D δ_t share one global byte budget, spread by
singular-value energy (compression.lowrank.allocate_ranks); otherwise the rank policy fixes r per
tensor. Factors are stored as ``compress.factor_dtype`` (int8 with per-component scales, bf16, ...).
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from twin import __version__
from twin.artifact import BACKBONE, EXCLUSIVE, REPORT, atomic_dir, exclusive_key, finalize_manifest
from twin.manifest import Manifest, TensorEntry

from .checkpoints import CheckpointError, LazyState, PeftExpert, load_config, open_expert
from .lowrank import allocate_ranks, dequantized_error, quantize_factors, truncated_svd
from .merging import merge_params, merge_tensor
from .recipe import RankPolicy, Recipe, RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_CONFIG = "generation_config.json"
# safetensors header bytes per stored tensor besides its name (dtype, shape, offsets), kept out of the budget
HEADER_BYTES_PER_TENSOR = 72


def keeps_delta(name: str, policy: RankPolicy) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in policy.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in policy.exclude))


def tied_head(config: PretrainedConfig) -> tuple[str, str] | None:
    """(head, embedding) parameter names when ``config`` ties the LM head to the input embedding."""
    if not getattr(config, "tie_word_embeddings", False):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return next(iter(tied.items()), None)


def _has(src, name: str) -> bool:
    """Whether a checkpoint has tensor ``name`` of its own (a PEFT adapter: in modules_to_save or its base)."""
    own = list(src.replaced) + src.base.keys() if isinstance(src, PeftExpert) else src.keys()
    return name in own


class CheckpointSources:
    """Base and expert tensors by name. When the base ties its head but an expert does not, ``head``
    is read from each checkpoint's own head or, where it has none, from its embedding (what its tied
    model computes), so θ* gets an untied head and δ_t of the head is taken against it.

    ``config`` is the base's (tied) config; ``untie`` forces the untied layout (None: detect it).
    """

    def __init__(self, base: LazyState, experts: list, config: PretrainedConfig, untie: bool | None = None):
        self.base, self.experts = base, experts
        pair = tied_head(config)
        if untie is None:
            untie = pair is not None and not _has(base, pair[0]) and any(_has(e, pair[0]) for e in experts)
        self.untie = bool(untie) and pair is not None
        self.head, self.embed = pair if self.untie else (None, None)
        self.keys = base.keys() + ([self.head] if self.untie else [])

    def read(self, src, name: str) -> torch.Tensor:
        return src.get(self.embed if name == self.head and not _has(src, name) else name)

    def all(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.read(self.base, name), [self.read(e, name) for e in self.experts]


def build_artifact(recipe: Recipe, out: str | Path, quiet: bool = False,
                   zoo_fingerprint: str | None = None) -> Manifest:
    """Build the artifact for ``recipe`` into ``out`` atomically; return the manifest.

    Raises CheckpointError (unreadable base/expert/tokenizer) or RecipeError (a budget too small for
    the dense 1-D deltas), each naming the path or field.
    """
    t0 = time.perf_counter()
    dtype = DTYPES[recipe.dtype]
    esize = torch.finfo(dtype).bits // 8
    factor_dtype = recipe.compress.factor_dtype or recipe.dtype
    config = load_config(recipe.base)
    base = LazyState(recipe.base)
    experts = [open_expert(e.path, base) for e in recipe.experts]
    names = [e.name for e in recipe.experts]
    tok_dir = recipe.tokenizer or recipe.base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tok_dir}: cannot load tokenizer: {e}") from None
    params = merge_params(recipe.merge.method, **recipe.merge_options())  # per-expert weights + densities
    policy = recipe.rank
    src = CheckpointSources(base, experts, config)
    if src.untie:
        config.tie_word_embeddings = False

    backbone: dict[str, torch.Tensor] = {}
    exclusive: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorEntry] = {}
    per_expert = {n: {"factor_bytes": 0, "dense_delta_bytes": 0, "errors": [], "quant_errors": []} for n in names}
    spectra: dict[tuple[str, str], torch.Tensor] = {}   # (param, expert) -> singular values (budget only)
    dense_expert_bytes = 0

    def store_factors(pname: str, name: str, delta: torch.Tensor, rank: int | None, energy: float | None) -> None:
        lr = truncated_svd(delta, rank=rank, energy=energy, max_rank=policy.max_rank, method=policy.svd)
        stored = quantize_factors(lr, factor_dtype)
        for part, t in stored.tensors().items():
            exclusive[exclusive_key(pname, name, part)] = t
        norm = torch.linalg.matrix_norm(delta.float()).item()
        qerr = dequantized_error(lr, stored, norm) if factor_dtype != "float32" else 0.0
        info = tensors[pname]
        info.ranks[name] = lr.rank
        info.rel_error[name] = round(lr.rel_error, 6)
        info.quant_error[name] = round(qerr, 6)
        s = per_expert[name]
        s["factor_bytes"] += stored.nbytes
        s["errors"].append(lr.rel_error)
        s["quant_errors"].append(qerr)

    for pname in tqdm(src.keys, desc="merge + SVD", unit="tensor", disable=quiet):
        w0, ws = src.all(pname)
        theta_star = merge_tensor(pname, w0, ws, recipe.merge.method, **params)  # fp32
        backbone[pname] = theta_star.to(dtype).contiguous()
        dense_expert_bytes += len(names) * w0.numel() * esize
        if not keeps_delta(pname, policy):
            continue
        tensors[pname] = TensorEntry(shape=list(w0.shape), kind="lowrank" if w0.ndim == 2 else "dense",
                                     factor_dtype=factor_dtype if w0.ndim == 2 else None)
        for name, w in zip(names, ws):
            delta = w.float() - backbone[pname].float()  # δ_t = θ_t − θ* (as stored, so rounding is corrected)
            per_expert[name]["dense_delta_bytes"] += delta.numel() * esize
            if delta.ndim != 2:
                exclusive[exclusive_key(pname, name, "delta")] = delta.to(dtype).contiguous()
                per_expert[name]["factor_bytes"] += delta.numel() * esize
            elif recipe.compress.budget is not None:
                spectra[(pname, name)] = torch.linalg.svdvals(delta)
            else:
                store_factors(pname, name, delta, policy.rank, policy.energy)

    budget = None
    if recipe.compress.budget is not None:
        budget = _budget(recipe, dense_expert_bytes, exclusive, spectra)
        shapes = {k: tuple(tensors[k[0]].shape) for k in spectra}
        ranks = allocate_ranks(spectra, shapes, budget["factor_bytes"], factor_dtype, policy.max_rank)
        for pname in tqdm(list(dict.fromkeys(p for p, _ in spectra)), desc="budgeted SVD", unit="tensor",
                          disable=quiet):
            _, ws = src.all(pname)
            for name, w in zip(names, ws):
                store_factors(pname, name, w.float() - backbone[pname].float(), ranks[(pname, name)], None)

    report_experts = {}
    for name, s in per_expert.items():
        errs, qerrs = s.pop("errors"), s.pop("quant_errors")
        report_experts[name] = dict(s, ratio=round(s["factor_bytes"] / max(1, s["dense_delta_bytes"]), 4),
                                    mean_rel_error=round(sum(errs) / max(1, len(errs)), 4),
                                    max_quant_error=round(max(qerrs, default=0.0), 6))
    report = {"build": {"experts": report_experts, "seconds": round(time.perf_counter() - t0, 2),
                        "merge": recipe.merge.model_dump(), "rank_policy": policy.model_dump(),
                        "compress": recipe.compress.model_dump(), "factor_dtype": factor_dtype,
                        "dense_expert_bytes": dense_expert_bytes, "budget": budget,
                        "untied_head": src.untie}}
    manifest = Manifest(
        created_by=f"twinserve {__version__}",
        architecture=(config.architectures or [type(config).__name__])[0],
        config=config.to_dict(),
        dtype=recipe.dtype,
        base=recipe.base,
        experts=[{"name": e.name, "description": e.description, "source": e.path} for e in recipe.experts],
        merge=recipe.merge.model_dump(),
        rank_policy=dict(policy.model_dump(), **recipe.compress.model_dump()),
        tensors=tensors,
        recipe=recipe.model_dump(mode="json"),
        untied_head=src.untie,
        zoo_fingerprint=zoo_fingerprint,
    )
    with atomic_dir(out) as tmp:
        save_file(backbone, str(tmp / BACKBONE))
        save_file(exclusive, str(tmp / EXCLUSIVE))
        tokenizer.save_pretrained(str(tmp / manifest.tokenizer))
        if (Path(recipe.base) / GENERATION_CONFIG).is_file():  # eos ids (int or list) for generation
            shutil.copyfile(Path(recipe.base) / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        manifest = finalize_manifest(tmp, manifest)
    if not quiet:
        print_build_table(report)
    return manifest


def _budget(recipe: Recipe, dense_expert_bytes: int, exclusive: dict, spectra: dict) -> dict:
    """Bytes left for the 2-D factors once the dense 1-D deltas and the file header are paid."""
    total = int(recipe.compress.budget * dense_expert_bytes)
    dense = sum(t.numel() * t.element_size() for t in exclusive.values())
    parts = ("B", "A", "B_scale", "A_scale") if (recipe.compress.factor_dtype or recipe.dtype) == "int8" else ("B", "A")
    keys = list(exclusive) + [exclusive_key(p, n, part) for p, n in spectra for part in parts]
    header = sum(len(k) + HEADER_BYTES_PER_TENSOR for k in keys)
    left = total - dense - header
    if left < 0:
        raise RecipeError(f"compress.budget: {recipe.compress.budget} of {dense_expert_bytes:,} dense expert bytes "
                          f"is {total:,} B, less than the {dense + header:,} B the dense 1-D deltas need")
    return {"fraction": recipe.compress.budget, "bytes": total, "dense_delta_bytes": dense, "factor_bytes": left}


def print_build_table(report: dict, console: Console | None = None) -> None:
    b = report["build"]
    table = Table(title=f"exclusive knowledge per expert (factors: {b.get('factor_dtype', '?')})")
    for col in ("expert", "factor bytes", "dense delta bytes", "ratio", "mean rel. error", "max quant. error"):
        table.add_column(col, justify="right" if col != "expert" else "left")
    for name, s in b["experts"].items():
        table.add_row(name, f"{s['factor_bytes']:,}", f"{s['dense_delta_bytes']:,}", f"{s['ratio']:.3f}",
                      f"{s['mean_rel_error']:.4f}", f"{s.get('max_quant_error', 0.0):.5f}")
    (console or Console()).print(table)

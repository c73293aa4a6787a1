"""Recipe -> artifact: merge shared knowledge into θ*, keep each expert's exclusive δ_t as SVD factors."""
from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from twin import __version__
from twin.artifact import BACKBONE, EXCLUSIVE, REPORT, atomic_dir, exclusive_key, finalize_manifest
from .checkpoints import CheckpointError, LazyState, load_config, open_expert
from .lowrank import truncated_svd
from .merging import merge_params, merge_tensor
from .recipe import RankPolicy, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keeps_delta(name: str, policy: RankPolicy) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in policy.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in policy.exclude))


def build_artifact(recipe: Recipe, out: str | Path, quiet: bool = False, extra_manifest: dict | None = None) -> dict:
    """Build the artifact for ``recipe`` into ``out`` atomically; return the manifest."""
    t0 = time.perf_counter()
    dtype = DTYPES[recipe.dtype]
    esize = torch.finfo(dtype).bits // 8
    config = load_config(recipe.base)
    base = LazyState(recipe.base)
    experts = [open_expert(e.path, base) for e in recipe.experts]
    names = [e.name for e in recipe.experts]
    tok_dir = recipe.tokenizer or recipe.base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tok_dir}: cannot load tokenizer: {e}") from None
    params = merge_params(recipe.merge.method, **recipe.merge.model_dump(exclude={"method"}))
    policy = recipe.rank

    backbone: dict[str, torch.Tensor] = {}
    exclusive: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict] = {}
    per_expert = {n: {"factor_bytes": 0, "dense_delta_bytes": 0, "errors": []} for n in names}
    for pname in tqdm(base.keys(), desc="merge + SVD", unit="tensor", disable=quiet):
        w0 = base.get(pname)
        ws = [e.get(pname) for e in experts]
        theta_star = merge_tensor(pname, w0, ws, recipe.merge.method, **params)  # fp32
        backbone[pname] = theta_star.to(dtype).contiguous()
        if not keeps_delta(pname, policy):
            continue
        info = {"shape": list(w0.shape), "kind": "lowrank" if w0.ndim == 2 else "dense", "ranks": {}, "rel_error": {}}
        for name, w in zip(names, ws):
            delta = w.float() - backbone[pname].float()  # δ_t = θ_t − θ* (as stored, so rounding is corrected)
            stats = per_expert[name]
            stats["dense_delta_bytes"] += delta.numel() * esize
            if delta.ndim == 2:
                lr = truncated_svd(delta, rank=policy.rank, energy=policy.energy, max_rank=policy.max_rank,
                                   method=policy.svd)
                exclusive[exclusive_key(pname, name, "A")] = lr.A.to(dtype).contiguous()
                exclusive[exclusive_key(pname, name, "B")] = lr.B.to(dtype).contiguous()
                info["ranks"][name] = lr.rank
                info["rel_error"][name] = round(lr.rel_error, 6)
                stats["factor_bytes"] += (lr.A.numel() + lr.B.numel()) * esize
                stats["errors"].append(lr.rel_error)
            else:
                exclusive[exclusive_key(pname, name, "delta")] = delta.to(dtype).contiguous()
                stats["factor_bytes"] += delta.numel() * esize
        tensors[pname] = info

    report_experts = {}
    for name, s in per_expert.items():
        errs = s.pop("errors")
        report_experts[name] = dict(s, ratio=round(s["factor_bytes"] / max(1, s["dense_delta_bytes"]), 4),
                                    mean_rel_error=round(sum(errs) / max(1, len(errs)), 4))
    report = {"build": {"experts": report_experts, "seconds": round(time.perf_counter() - t0, 2),
                        "merge": recipe.merge.model_dump(), "rank_policy": policy.model_dump()}}
    manifest = {
        "created_by": f"twinserve {__version__}",
        "architecture": (config.architectures or [type(config).__name__])[0],
        "config": config.to_dict(),
        "dtype": recipe.dtype,
        "base": recipe.base,
        "experts": [{"name": e.name, "description": e.description, "source": e.path} for e in recipe.experts],
        "merge": recipe.merge.model_dump(),
        "rank_policy": policy.model_dump(),
        "tensors": tensors,
        "recipe": recipe.model_dump(mode="json"),
        "router": None,
        **(extra_manifest or {}),
    }
    with atomic_dir(out) as tmp:
        save_file(backbone, str(tmp / BACKBONE))
        save_file(exclusive, str(tmp / EXCLUSIVE))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        manifest = finalize_manifest(tmp, manifest)
    if not quiet:
        print_build_table(report)
    return manifest


def print_build_table(report: dict, console: Console | None = None) -> None:
    table = Table(title="exclusive knowledge per expert")
    for col in ("expert", "factor bytes", "dense delta bytes", "ratio", "mean rel. error"):
        table.add_column(col, justify="right" if col != "expert" else "left")
    for name, s in report["build"]["experts"].items():
        table.add_row(name, f"{s['factor_bytes']:,}", f"{s['dense_delta_bytes']:,}", f"{s['ratio']:.3f}",
                      f"{s['mean_rel_error']:.4f}")
    (console or Console()).print(table)

"""Recipe -> artifact: merge shared knowledge into θ*, keep each expert's exclusive δ_t as SVD factors.

Sizes: with ``compress.budget`` the factors of every 2-D δ_t share one global byte budget, spread by
singular-value energy (compression.lowrank.allocate_ranks); otherwise the rank policy fixes r per
tensor. Factors are stored as ``compress.factor_dtype`` (int8 with per-component scales, bf16, ...).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from twin import __version__
from twin.artifact import (
    BACKBONE,
    EXCLUSIVE,
    REPORT,
    ArtifactError,
    LazyTensors,
    ShardWriter,
    atomic_dir,
    exclusive_key,
    finalize_manifest,
    read_manifest,
)
from twin.manifest import Manifest, TensorEntry
from twin.util import DTYPES

from .checkpoints import CheckpointError, LazyState, PeftExpert, load_config, open_expert
from .lowrank import (
    allocate_ranks,
    dequantized_error,
    quantize_factors,
    spectrum,
    truncated_svd,
    truncated_svd_of_product,
)
from .merging import merge_params, merge_tensor
from .recipe import RankPolicy, Recipe, RecipeError

GENERATION_CONFIG = "generation_config.json"
# safetensors header bytes per stored tensor besides its name (dtype, shape, offsets), kept out of the budget
HEADER_BYTES_PER_TENSOR = 72
# θ* and the factors are written in shards of about this size as they are produced (the most the writer holds)
SHARD_BYTES = 1 << 29
# a tensor's T expert copies (checkpoint dtype) are held in memory when they fit this; larger ones (a
# 152k-row embedding) are merged in row blocks read from the mmaps
HELD_BYTES = 1 << 30


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

    def name_in(self, src, name: str) -> str:
        return self.embed if name == self.head and not _has(src, name) else name

    def read(self, src, name: str) -> torch.Tensor:
        return src.get(self.name_in(src, name))

    def rows(self, src, name: str) -> _Rows:
        return _Rows(src, self.name_in(src, name), self.base.shape(self.name_in(self.base, name)))

    def unchanged(self, name: str) -> bool:
        """No expert changes ``name`` (LoRA adapters that leave it alone): θ* = θ_0 there and every δ_t = 0."""
        return all(self.name_in(e, name) == self.name_in(self.base, name) and e.unchanged(self.name_in(e, name))
                   for e in self.experts)


class _Rows:
    """One checkpoint's tensor as the streamed merge reads it (compression.merging.TensorRows)."""

    def __init__(self, src, name: str, shape: tuple[int, ...]):
        self.src, self.name, self.shape = src, name, tuple(shape)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.src.rows(self.name, lo, hi)

    def full(self) -> torch.Tensor:
        return self.src.get(self.name)


def build_artifact(recipe: Recipe, out: str | Path, quiet: bool = False,
                   zoo_fingerprint: str | None = None, shard_bytes: int = SHARD_BYTES,
                   before_publish=None) -> Manifest:
    """Build the artifact for ``recipe`` into ``out`` atomically; return the manifest.

    ``before_publish(tmp)`` runs on the finished artifact in its temp dir before it is renamed into place
    (the parity gate): if it raises, nothing is published and an artifact already at ``out`` is untouched;
    if the process dies there, no artifact without a gate result ever appears at ``out``.

    Streamed: one tensor in flight. Each tensor of θ* is merged in row blocks from the checkpoints'
    mmaps (``merge_tensor`` with row readers), each δ_t = θ_t − θ* is factored while θ* is in hand, and
    both are appended to sharded safetensors files in the temp dir as they are produced. Tensors no expert
    changes (a LoRA adapter's embedding) are copied through: no merge, no δ_t. With ``compress.budget`` a
    first pass writes θ* and keeps each δ_t's leading spectrum; a second re-reads θ* from the temp dir to
    factor at the allocated ranks.

    Raises CheckpointError (unreadable base/expert/tokenizer) or RecipeError (a budget too small for
    the dense 1-D deltas), each naming the path or field.
    """
    t0 = time.perf_counter()
    dtype = DTYPES[recipe.dtype]
    esize = torch.finfo(dtype).bits // 8
    factor_dtype = recipe.compress.factor_dtype or recipe.dtype
    config = load_config(recipe.base)
    base = LazyState(recipe.base, config)
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

    tensors: dict[str, TensorEntry] = {}
    per_expert = {n: {"factor_bytes": 0, "dense_delta_bytes": 0, "errors": [], "quant_errors": []} for n in names}
    spectra: dict[tuple[str, str], torch.Tensor] = {}   # (param, expert) -> leading singular values (budget only)
    counts = {"tensors": len(src.keys), "unchanged": 0, "randomized_svd": 0, "exact_svd": 0}
    dense_expert_bytes = 0
    dense_bytes = 0          # exclusive bytes of the 1-D deltas (budget accounting)
    n_keys = 0               # exclusive tensors written (budget accounting: header bytes)
    phases: dict[str, float] = {}
    merged_only: dict[str, str] = {}     # tensors the experts change that no Twin layer can carry -> reason
    refusal = delta_refusals(config)
    coeffs = linear_coefficients(recipe.merge.method, params, len(experts)) \
        if all(isinstance(e, PeftExpert) for e in experts) else None

    def store_factors(ew: ShardWriter, pname: str, name: str, delta: torch.Tensor | None, rank: int | None,
                      energy: float | None, lr=None) -> None:
        """Factor ``delta`` (or store ``lr``, already factored from an adapter's factors) and record it."""
        nonlocal n_keys
        if lr is None:
            lr = truncated_svd(delta, rank=rank, energy=energy, max_rank=policy.max_rank, method=policy.svd)
        counts[f"{lr.method}_svd"] = counts.get(f"{lr.method}_svd", 0) + 1
        stored = quantize_factors(lr, factor_dtype)
        for part, t in stored.tensors().items():
            ew.add(exclusive_key(pname, name, part), t)
            n_keys += 1
        norm = float(torch.linalg.vector_norm(delta)) if delta is not None else \
            float(torch.linalg.matrix_norm(lr.B @ lr.A)) / max(1e-30, (1 - lr.rel_error ** 2) ** 0.5)
        qerr = dequantized_error(lr, stored, norm) if factor_dtype != "float32" else 0.0
        info = tensors[pname]
        info.ranks[name] = lr.rank
        info.rel_error[name] = round(lr.rel_error, 6)
        info.quant_error[name] = round(qerr, 6)
        s = per_expert[name]
        s["factor_bytes"] += stored.nbytes
        s["errors"].append(lr.rel_error)
        s["quant_errors"].append(qerr)

    def deltas(pname: str, theta_star: torch.Tensor, held: list | None = None):
        """(expert, δ_t = θ_t − θ* as stored (so rounding is corrected), fp32), one expert at a time."""
        for t, (name, e) in enumerate(zip(names, experts)):
            w = held[t] if held is not None else src.rows(e, pname).full()
            yield name, w.to(torch.float32, copy=True).sub_(theta_star)

    in_bytes = sum(math.prod(base.shape(src.name_in(base, k))) for k in src.keys) * (len(names) + 1) * esize
    with write_errors(out), atomic_dir(out) as tmp:
        bw = ShardWriter(tmp, BACKBONE, shard_bytes)
        ew = ShardWriter(tmp, EXCLUSIVE, shard_bytes)
        bar = tqdm(total=in_bytes, desc="merge + factor", unit="B", unit_scale=True, unit_divisor=1024,
                   disable=quiet, smoothing=0.05)
        for pname in src.keys:
            b0 = src.rows(base, pname)
            numel = math.prod(b0.shape)
            bar.set_postfix_str(pname, refresh=False)
            dense_expert_bytes += len(names) * numel * esize
            if src.unchanged(pname):     # θ* = θ_0, δ_t = 0: nothing to merge or factor
                bw.add(pname, b0.full().to(dtype))
                counts["unchanged"] += 1
                bar.update(numel * (len(names) + 1) * esize)
                continue
            merged: dict = {}
            # θ_t in memory when all T fit the working set: read (or, for an adapter, formed) once for the
            # merge and again for δ_t, instead of row block by row block and then once more
            held = [src.rows(e, pname).full() for e in experts] \
                if len(experts) * numel * esize <= HELD_BYTES and not base.pieces(src.name_in(base, pname)) else None
            theta_star = merge_pieces(pname, src, recipe.merge.method, dtype, merged,
                                      dict(params, tie_break=recipe.merge.tie_break)) \
                if base.pieces(src.name_in(base, pname)) else \
                merge_tensor(pname, b0, held or [src.rows(e, pname) for e in experts], recipe.merge.method,
                             out_dtype=dtype, stats=merged, compute_dtype=dtype,
                             tie_break=recipe.merge.tie_break, **params)
            bw.add(pname, theta_star)
            why = refusal(pname)
            if not merged["changed"] and torch.equal(theta_star, b0.full().to(dtype)):
                counts["unchanged"] += 1      # every θ_t = θ_0 = θ* here (a frozen tensor): no δ_t to keep
            elif keeps_delta(pname, policy) and why is not None:
                merged_only[pname] = why      # no Twin layer can carry it: θ* serves every expert there
            elif keeps_delta(pname, policy):
                tensors[pname] = TensorEntry(shape=list(b0.shape), kind="lowrank" if len(b0.shape) == 2 else "dense",
                                             factor_dtype=factor_dtype if len(b0.shape) == 2 else None)
                lora = lora_products(pname, src, coeffs) \
                    if coeffs is not None and len(b0.shape) == 2 and recipe.compress.budget is None else None
                if lora is not None:      # δ_t = P_t Q_t exactly: factored from the adapters' own factors
                    for name, (P, Q) in zip(names, lora):
                        per_expert[name]["dense_delta_bytes"] += numel * esize
                        store_factors(ew, pname, name, None, None, None, lr=truncated_svd_of_product(
                            P, Q, rank=policy.rank, energy=policy.energy, max_rank=policy.max_rank))
                    del theta_star, held
                    bar.update(numel * (len(names) + 1) * esize)
                    continue
                for name, delta in deltas(pname, theta_star, held):
                    per_expert[name]["dense_delta_bytes"] += delta.numel() * esize
                    if delta.ndim != 2:
                        ew.add(exclusive_key(pname, name, "delta"), delta.to(dtype))
                        per_expert[name]["factor_bytes"] += delta.numel() * esize
                        dense_bytes += delta.numel() * esize
                        n_keys += 1
                    elif recipe.compress.budget is not None:
                        spectra[(pname, name)] = spectrum(delta, policy.max_rank, policy.svd)
                    else:
                        store_factors(ew, pname, name, delta, policy.rank, policy.energy)
                    del delta
            del theta_star, held
            bar.update(numel * (len(names) + 1) * esize)
        bar.close()
        backbone_files = bw.close()

        budget = None
        if recipe.compress.budget is not None:
            budget = _budget(recipe, dense_expert_bytes, dense_bytes, n_keys, spectra)
            shapes = {k: tuple(tensors[k[0]].shape) for k in spectra}
            ranks = allocate_ranks(spectra, shapes, budget["factor_bytes"], factor_dtype, policy.max_rank)
            written = LazyTensors(tmp, BACKBONE)
            todo = list(dict.fromkeys(p for p, _ in spectra))
            for pname in tqdm(todo, desc="budgeted factors", unit="tensor", disable=quiet):
                theta_star = written.get(pname)
                for name, delta in deltas(pname, theta_star):
                    store_factors(ew, pname, name, delta, ranks[(pname, name)], None)
        exclusive_files = ew.close()
        phases["merge_factor_s"] = round(time.perf_counter() - t0, 2)
        t_write = time.perf_counter()

        report_experts = {}
        for name, s in per_expert.items():
            errs, qerrs = s.pop("errors"), s.pop("quant_errors")
            report_experts[name] = dict(s, ratio=round(s["factor_bytes"] / max(1, s["dense_delta_bytes"]), 4),
                                        mean_rel_error=round(sum(errs) / max(1, len(errs)), 4),
                                        max_rel_error=round(max(errs, default=0.0), 4),
                                        max_quant_error=round(max(qerrs, default=0.0), 6))
        report = {"build": {"experts": report_experts, "seconds": None, "phases": phases,
                            "merge": recipe.merge.model_dump(), "rank_policy": policy.model_dump(),
                            "compress": recipe.compress.model_dump(), "factor_dtype": factor_dtype,
                            "dense_expert_bytes": dense_expert_bytes, "budget": budget,
                            "untied_head": src.untie, "tensors": counts, "merged_only": merged_only,
                            "files": {"backbone": backbone_files, "exclusive": exclusive_files}}}
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
        tokenizer.save_pretrained(str(tmp / manifest.tokenizer))
        if (Path(recipe.base) / GENERATION_CONFIG).is_file():  # eos ids (int or list) for generation
            shutil.copyfile(Path(recipe.base) / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        phases["checksum_s"] = 0.0
        report["build"]["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        manifest = finalize_manifest(tmp, manifest)
        phases["checksum_s"] = round(time.perf_counter() - t_write, 2)
        report["build"]["seconds"] = round(time.perf_counter() - t0, 2)
        if not quiet:
            print_build_table(report)
        if before_publish is not None:
            before_publish(tmp)
            manifest = read_manifest(tmp)
    return manifest


class _Raw:
    """One checkpoint tensor of a fused parameter, as the merge reads it (compression.merging.TensorRows)."""

    def __init__(self, src, key: str):
        self.src = src.base if isinstance(src, PeftExpert) else src    # an adapter leaves fused experts alone
        self.key, self.shape = key, tuple(self.src.raw_shape(key))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.src.raw_rows(self.key, lo, hi)


def merge_pieces(name: str, src: CheckpointSources, method: str, dtype, stats: dict, params: dict) -> torch.Tensor:
    """θ* of a fused parameter (MoE experts) merged piece by piece — each checkpoint tensor on its own, as
    mergekit merges them — then assembled as the model class loads it."""
    fused = src.base.layout.fused[name]
    merged, changed = {}, False
    for key in fused.pieces:
        st: dict = {}
        merged[key] = merge_tensor(key, _Raw(src.base, key), [_Raw(e, key) for e in src.experts], method,
                                   out_dtype=dtype, stats=st, compute_dtype=dtype, **params)
        changed = changed or st["changed"]
    stats["changed"] = changed
    return fused.assemble(merged.pop)


def linear_coefficients(method: str, params: dict, T: int) -> list[float] | None:
    """c_t with θ* = θ_0 + Σ_t c_t τ_t, for the merges that are linear in the task vectors (None otherwise)."""
    w = params.get("weights") or [1.0] * T
    if method == "task_arithmetic":
        scale = params.get("lam", 1.0) / (sum(w) if params.get("normalize") else 1.0)
        return [scale * x for x in w]
    if method == "average":
        return [x / sum(w) for x in w]
    if method == "linear" and params.get("normalize", True):
        return [x / (sum(w) + params.get("base_weight", 0.0)) for x in w]
    return None


def lora_products(name: str, src: CheckpointSources, coeffs: list[float]) -> list | None:
    """Per expert t, (P_t, Q_t) with δ_t = θ_t − θ* = τ_t − Σ_s c_s τ_s = P_t Q_t, from the adapters' own
    factors (τ_s = scale_s B_s A_s), when every adapter leaves ``name`` alone or adapts it with a plain LoRA
    pair (no DoRA, fan_in_fan_out, embedding LoRA, token rows or replacement); else None. θ*'s rounding to the
    artifact dtype is not in δ_t here (it is in the gate's compression column)."""
    pairs = []
    for e in src.experts:
        key = src.name_in(e, name)
        if e.unchanged(key):
            pairs.append(None)
            continue
        parts = e.pairs.get(key)
        if (parts is None or set(parts) - {"A", "B", "bias"} or e.fan_in_fan_out or key in e.replaced
                or key in e.tokens or key in e.base_layers):
            return None
        pairs.append((parts["B"].float() * e.scales[key], parts["A"].float()))
    if all(p is None for p in pairs):
        return None
    out = []
    for t, own in enumerate(pairs):
        Ps, Qs = [], []
        for s, other in enumerate(pairs):
            if other is None:
                continue
            c = (1.0 if s == t else 0.0) - coeffs[s]
            Ps.append(c * other[0])
            Qs.append(other[1])
        out.append((torch.cat(Ps, 1), torch.cat(Qs, 0)))
    return out


def delta_refusals(config: PretrainedConfig):
    """name -> why that tensor cannot carry a routed δ_t in the served model (None: a Twin layer serves it),
    from transformers' model class for ``config`` on the meta device."""
    from twin.model.layers import delta_refusal
    from twin.model.support import causal_lm_class

    with torch.device("meta"):
        model = causal_lm_class(config)._from_config(config)
    return lambda name: delta_refusal(model, name)


@contextlib.contextmanager
def write_errors(out: str | Path):
    """A write that fails (disk full, permissions) exits 2 naming the artifact; atomic_dir has already removed
    the temp dir, so nothing half-written is left."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ArtifactError(f"{out}: cannot write the artifact: {e}; nothing was left behind") from None


def _budget(recipe: Recipe, dense_expert_bytes: int, dense: int, n_dense_keys: int, spectra: dict) -> dict:
    """Bytes left for the 2-D factors once the dense 1-D deltas and the file header are paid."""
    total = int(recipe.compress.budget * dense_expert_bytes)
    parts = ("B", "A", "B_scale", "A_scale") if (recipe.compress.factor_dtype or recipe.dtype) == "int8" else ("B", "A")
    keys = [exclusive_key(p, n, part) for p, n in spectra for part in parts]
    header = sum(len(k) + HEADER_BYTES_PER_TENSOR for k in keys) + n_dense_keys * (HEADER_BYTES_PER_TENSOR + 64)
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
    merged_only = b.get("merged_only") or {}
    if merged_only:
        first, why = next(iter(merged_only.items()))
        table.caption = (f"{len(merged_only)} tensors the experts change are merged into θ* without exclusive deltas "
                         f"(e.g. {first}: {why}); the gate's compression column shows what that costs")
    (console or Console()).print(table)

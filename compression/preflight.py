"""Before any merge work: read the shapes, estimate peak memory, disk and time for this machine, and refuse
with the numbers when the build cannot fit.

Memory follows the streamed build (compression.build) and gate (compression.parity), in bytes per entry n of
the largest tensor:
  merge      trims read τ_t whole once: θ_0 and τ_t in fp32, |τ_t|, the checkpoint copies: ~(12 + 2·e)·n
             (DARE also keeps one drop mask per expert: + T·n); the row blocks of the mix: ~4 × 128 MiB
  factor     θ*, θ_t as stored and δ_t, θ* in fp32: ~(8 + 2·e)·n, plus the range finder's (d_out + d_in)·q
  writers    one shard buffer each for θ* and the factors (2 × shard size)
  gate       one unit in fp32 at a time: the largest of a decoder block and the embedding/head, three copies
             (θ*, B A, their sum) while the materialised reference loads it, plus the factors of that unit
Time comes from three rates measured here in about a second (a TIES block, a randomized SVD, a GEMM),
so the estimate follows this machine and the threads given, not a table.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from twin.errors import TwinserveError
from twin.util import available_memory, human_bytes, human_count

from .lowrank import OVERSAMPLE, POWER_ITERS, use_randomized
from .recipe import Recipe

GiB = 1 << 30
BASELINE_BYTES = 700 << 20     # interpreter, torch, transformers, tokenizer: measured RSS before any tensor
GATE_TOKENS = 120              # the gate's prompts, about (3 prompts of up to 48 tokens)


class PreflightError(TwinserveError):
    """The build would not fit this machine (exit 2); the message gives the estimate and the limit."""


@dataclass
class Estimate:
    peak_bytes: int
    merge_peak_bytes: int
    gate_peak_bytes: int
    artifact_bytes: int
    merge_s: float
    factor_s: float
    gate_s: float
    tensors: int
    unchanged: int
    parameters: int
    largest: str

    @property
    def total_s(self) -> float:
        return self.merge_s + self.factor_s + self.gate_s

    def to_json(self) -> dict:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _rates(threads: int | None) -> dict[str, float]:
    """Entries/s of a 4-expert TIES merge block, flop/s of svd_lowrank and of an fp32 GEMM, measured now."""
    from .merging import merge_params, merge_tensor

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(512, 2048, generator=g)
        experts = [base + 0.01 * torch.randn(512, 2048, generator=g) for _ in range(4)]
        p = merge_params("ties", density=0.2)
        merge_tensor("calibration", base, experts, "ties", **p)        # warm-up
        t = time.perf_counter()
        merge_tensor("calibration", base, experts, "ties", **p)
        merge_rate = base.numel() * 4 / (time.perf_counter() - t)      # entries × experts per second
        d = torch.randn(1536, 1536, generator=g)
        torch.svd_lowrank(d, q=72, niter=POWER_ITERS)
        t = time.perf_counter()
        torch.svd_lowrank(d, q=72, niter=POWER_ITERS)
        svd_rate = (2 * POWER_ITERS + 2) * 2 * d.numel() * 72 / (time.perf_counter() - t)
        a, b = torch.randn(128, 1536, generator=g), torch.randn(1536, 4096, generator=g)
        a @ b
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        gemm_rate = 4 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return {"merge": merge_rate, "svd": svd_rate, "gemm": gemm_rate}


def estimate(recipe: Recipe, threads: int | None = None, shard_bytes: int = 1 << 29,
             skip_parity: bool = False) -> Estimate:
    """Shapes only (checkpoint headers, no tensor data) plus a one-second calibration."""
    from twin.util import DTYPES

    from .build import CheckpointSources, keeps_delta
    from .checkpoints import LazyState, load_config, open_expert
    from .lowrank import FACTOR_BYTES
    from .merging import MERGE_METHODS

    config = load_config(recipe.base)
    base = LazyState(recipe.base, config)
    experts = [open_expert(e.path, base) for e in recipe.experts]
    src = CheckpointSources(base, experts, config)
    T = len(experts)
    e = torch.finfo(DTYPES[recipe.dtype]).bits // 8
    fbytes = FACTOR_BYTES[recipe.compress.factor_dtype or recipe.dtype]
    rank = recipe.rank.rank or recipe.rank.max_rank or 64
    sparsify = MERGE_METHODS[recipe.merge.method].sparsify
    rates = _rates(threads)
    merge_peak = artifact = params = unchanged = 0
    merge_s = factor_s = 0.0
    largest, largest_n = "", 0
    block_params: dict[str, int] = {}
    for name in src.keys:
        shape = base.shape(src.name_in(base, name))
        n = math.prod(shape)
        params += n
        artifact += n * e
        if n > largest_n:
            largest, largest_n = name, n
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        if block is not None:
            block_params[block] = block_params.get(block, 0) + n
        if src.unchanged(name):
            unchanged += 1
            continue
        per = (8 + 2 * e) * n + (T * n if sparsify == "bernoulli" else 0)
        work = (12 + 2 * e) * n if sparsify else 0
        if sparsify in ("magnitude", "outliers") and recipe.merge.tie_break == "argsort":
            work += 20 * n        # mergekit's argsort: int64 indices, the sorted copy, the mask
        blocks = min(4 * (128 << 20), 4 * 4 * T * n)     # the row blocks of the mix (T stacked fp32 τ, masks)
        merge_peak = max(merge_peak, max(work, per) + blocks)
        merge_s += n * T / rates["merge"]
        if not keeps_delta(name, recipe.rank):
            continue
        if len(shape) == 2:
            d_out, d_in = shape
            r = min(rank, d_out, d_in)
            artifact += T * r * (d_out + d_in) * fbytes
            if use_randomized((d_out, d_in), r, recipe.rank.svd):
                q = r + OVERSAMPLE
                factor_s += T * (2 * POWER_ITERS + 4) * 2 * n * q / rates["svd"]
            else:
                factor_s += T * 4 * n * min(d_out, d_in) / rates["svd"]   # LAPACK's gesdd, roughly
        else:
            artifact += T * n * e
    merge_peak += min(2 * shard_bytes, artifact) + BASELINE_BYTES
    # the gate: three reference passes and two served steps per expert (+ θ* once), each reading every
    # weight (bf16 -> fp32 at ~1 GB/s) and multiplying it by the gate's tokens
    vocab_unit = config.vocab_size * config.hidden_size
    unit = max([vocab_unit, *block_params.values()])
    gate_peak = 0 if skip_parity else 3 * 4 * unit + 4 * T * rank * (config.vocab_size + config.hidden_size) \
        + BASELINE_BYTES + 4 * GATE_TOKENS * config.vocab_size * 3
    passes = 3 + 5 * T
    gate_s = 0.0 if skip_parity else passes * (params * 4 / 1e9 + 2 * params * GATE_TOKENS / rates["gemm"])
    return Estimate(max(merge_peak, gate_peak), merge_peak, gate_peak, artifact, merge_s, factor_s, gate_s,
                    len(src.keys), unchanged, params, largest)


def check(est: Estimate, out: str | Path) -> None:
    """PreflightError when the estimate exceeds the memory available now or the free disk at ``out``."""
    mem = available_memory()
    if est.peak_bytes > mem:
        where = "the parity gate" if est.gate_peak_bytes > est.merge_peak_bytes else f"the merge of {est.largest}"
        raise PreflightError(f"not enough memory: the build needs about {est.peak_bytes / GiB:.1f} GiB at its "
                             f"peak ({where}), {mem / GiB:.1f} GiB is available now"
                             + (" (--skip-parity lowers the peak to "
                                f"{est.merge_peak_bytes / GiB:.1f} GiB)" if est.gate_peak_bytes > est.merge_peak_bytes
                                and est.merge_peak_bytes <= mem else ""))
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if est.artifact_bytes * 1.05 > free:
        raise PreflightError(f"not enough disk at {parent}: the artifact needs about "
                             f"{est.artifact_bytes / GiB:.1f} GiB (written to a temp dir beside it), "
                             f"{free / GiB:.1f} GiB is free")


def print_estimate(est: Estimate, console) -> None:
    from rich.table import Table

    def fmt_s(s: float) -> str:
        return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"

    t = Table(title=f"build estimate for this machine ({human_count(est.parameters)} parameters, {est.tensors} "
                    f"tensors, {est.unchanged} unchanged by every expert)")
    for col in ("peak memory", "artifact on disk", "merge", "factor (SVD)", "parity gate", "total"):
        t.add_column(col, justify="right")
    t.add_row(human_bytes(est.peak_bytes), human_bytes(est.artifact_bytes), fmt_s(est.merge_s),
              fmt_s(est.factor_s), fmt_s(est.gate_s), fmt_s(est.total_s))
    console.print(t)

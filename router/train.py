"""Labelled prompts -> router weights in the artifact, with a held-out accuracy report.

The feature layer L_r and the prompt head K the features pool over (``prefix_tokens``) are chosen by
measurement: every candidate (L_r, K) is scored on the held-out split and the cheapest one within
``layer_tolerance`` of the best accuracy wins, cost = L_r × the mean head length (the router pass runs
min(len, K) tokens through L_r blocks). A short head keeps the pass cheap on long prompts and makes the
feature blind to whatever follows the head: a loglikelihood request's appended continuation.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save

from twin.artifact import ROUTER, update_artifact
from twin.errors import TwinserveError
from twin.generate import encode_prompts

from .features import prefix_pooled_features
from .model import FALLBACKS, Router, RouterConfig, RouterMLP

MIN_PER_TASK = 5
# candidate prompt heads K (tokens) for the features; None = the whole prompt. The search keeps the
# cheapest one as accurate as the best; heads shorter than 8 tokens are not tried (too little of a real
# prompt to tell its task, and nothing left to tell a prompt of no task from one of a known task)
PREFIX_CANDIDATES: tuple[int | None, ...] = (8, 16, 32, 64, 128, 256, None)


class RouterDataError(TwinserveError):
    """Labelled router data that cannot be used; names the line or the task."""


def read_labelled(path: str | Path, experts: list[str], max_per_task: int = 200, seed: int = 0) -> list[dict]:
    """JSONL rows {"prompt": str, "task": expert name}; at most ``max_per_task`` per task (seeded sample)."""
    path = Path(path)
    if not path.is_file():
        raise RouterDataError(f"router data not found: {path}")
    rows: list[dict] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise RouterDataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise RouterDataError(f"{path}:{n}: expected a JSON object with prompt and task")
        prompt, task = row.get("prompt"), row.get("task")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RouterDataError(f"{path}:{n}: field 'prompt' must be a non-empty string")
        if task not in experts:
            raise RouterDataError(f"{path}:{n}: field 'task' is {task!r}, not an expert of this artifact "
                                  f"(experts: {', '.join(experts)})")
        rows.append({"prompt": prompt, "task": task})
    counts = Counter(r["task"] for r in rows)
    few = [f"{t} ({counts.get(t, 0)})" for t in experts if counts.get(t, 0) < MIN_PER_TASK]
    if few:
        raise RouterDataError(f"{path}: too few labelled prompts for: {', '.join(few)}; "
                              f"need at least {MIN_PER_TASK} per expert")
    rng = random.Random(seed)
    out = []
    for t in experts:
        mine = [r for r in rows if r["task"] == t]
        rng.shuffle(mine)
        out += mine[:max_per_task]
    return out


def stratified_split(rows: list[dict], heldout: float, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    train, test = [], []
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task"], []).append(i)
    for idx in by_task.values():
        rng.shuffle(idx)
        k = max(1, round(len(idx) * heldout))
        test += idx[:k]
        train += idx[k:]
    return train, test


def fit_mlp(x: torch.Tensor, y: torch.Tensor, num_experts: int, hidden: int, epochs: int = 200,
            lr: float = 3e-3, seed: int = 0) -> RouterMLP:
    torch.manual_seed(seed)
    mlp = RouterMLP(x.shape[1], hidden, num_experts)
    mlp.mean.copy_(x.mean(0))
    mlp.std.copy_(x.std(0).clamp_min(1e-4))
    z = mlp.standardise(x)
    for t in range(num_experts):
        mlp.centroids[t] = z[y == t].mean(0)
    opt = torch.optim.AdamW(mlp.net.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(epochs):  # full batch: a few hundred prompts
        loss = torch.nn.functional.cross_entropy(mlp(x), y, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mlp.eval()


def confusion(y_true: torch.Tensor, y_pred: torch.Tensor, names: list[str]) -> dict:
    m = {a: {b: 0 for b in names} for a in names}
    for t, p in zip(y_true.tolist(), y_pred.tolist()):
        m[names[t]][names[p]] += 1
    return m


def calibrate_distance(mlp: RouterMLP, x: torch.Tensor, quantile: float = 0.995, margin: float = 1.5,
                       floor: float = 0.25) -> float:
    """Distance threshold: a margin above the ``quantile`` of training prompts' nearest-centroid distance,
    and at least ``floor`` × the distance between the two closest task centroids (prompts of one task can
    share their whole head, so the quantile can be ~0: a threshold of ~0 would send rounding noise, or a
    bf16 model's features, to the fallback)."""
    with torch.no_grad():
        d = mlp.centroid_distance(x)
        c = mlp.centroids
        sep = torch.cdist(c, c) / math.sqrt(c.shape[-1])
        sep = sep[~torch.eye(len(c), dtype=torch.bool)]
    closest = float(sep.min()) if sep.numel() else 0.0
    return max(float(torch.quantile(d, quantile)) * margin, floor * closest)


def train_router(art, rows: list[dict], layer: int | str = "auto", hidden: int = 256, heldout: float = 0.2,
                 epochs: int = 200, seed: int = 0, fallback: str = "backbone", min_confidence: float = 0.5,
                 layer_tolerance: float = 0.005, prefix_tokens: int | str | None = "auto",
                 console: Console | None = None) -> tuple[Router, dict]:
    """art: a LoadedArtifact. Returns the router and its report (accuracy, confusion, layer/head search).

    ``prefix_tokens``: "auto" searches PREFIX_CANDIDATES; an int fixes the head; None pools every token."""
    if fallback not in FALLBACKS:
        raise RouterDataError(f"fallback must be one of {', '.join(FALLBACKS)}")
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    names = art.expert_names
    num_layers = art.model.args.num_layers
    y = torch.tensor([names.index(r["task"]) for r in rows])
    tr, te = stratified_split(rows, heldout, seed)
    ids = encode_prompts(art.tokenizer, [r["prompt"] for r in rows])
    if layer == "auto":
        candidates = list(range(1, num_layers + 1))
    else:
        if not 1 <= int(layer) <= num_layers:
            raise RouterDataError(f"--layer must be in 1..{num_layers} or auto, got {layer}")
        candidates = [int(layer)]
    if prefix_tokens == "auto":
        longest = max(len(t) for t in ids)
        # heads at or past the longest training prompt give the same features: keep the shortest of them
        prefixes = [k for k in PREFIX_CANDIDATES if k is not None and k < longest]
        prefixes.append(next((k for k in PREFIX_CANDIDATES if k is not None and k >= longest), None))
    else:
        if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or int(prefix_tokens) < 1):
            raise RouterDataError(f"--prefix-tokens must be a positive number, all or auto, got {prefix_tokens}")
        prefixes = [None if prefix_tokens is None else int(prefix_tokens)]

    def mean_head(k: int | None) -> float:
        return sum(len(t) if k is None else min(len(t), k) for t in ids) / len(ids)
    search: dict[tuple[int, int | None], float] = {}
    fitted: dict[tuple[int, int | None], tuple[RouterMLP, torch.Tensor]] = {}
    for L in candidates:
        with console.status(f"router: features at layer {L}/{num_layers} (heads {prefixes}) and MLP fits"):
            feats = prefix_pooled_features(art.model, ids, L, prefixes)
            for k, x in feats.items():
                mlp = fit_mlp(x[tr], y[tr], len(names), hidden, epochs, seed=seed)
                with torch.no_grad():
                    acc = (mlp(x[te]).argmax(-1) == y[te]).float().mean().item()
                search[(L, k)] = round(acc, 4)
                fitted[(L, k)] = (mlp, x)
    best = max(search.values())
    chosen = min((c for c, a in search.items() if a >= best - layer_tolerance),
                 key=lambda c: (c[0] * mean_head(c[1]), c[0]))
    L, k = chosen
    mlp, x = fitted[chosen]
    with torch.no_grad():
        pred = mlp(x[te]).argmax(-1)
    cfg = RouterConfig(experts=names, feature_dim=x.shape[1], feature_layer=L, hidden=hidden,
                       fallback=fallback, min_confidence=min_confidence,
                       max_distance=calibrate_distance(mlp, x[tr]), prefix_tokens=k)
    report = {
        "heldout_accuracy": round((pred == y[te]).float().mean().item(), 4),
        "feature_layer": L,
        "prefix_tokens": k,
        "num_layers": num_layers,
        # best accuracy over the heads at each layer (as format 1 reported it), then every (layer, head)
        "layer_search": {str(c): max(a for (cl, _), a in search.items() if cl == c) for c in candidates},
        "search": {f"{cl}/{'all' if ck is None else ck}": a for (cl, ck), a in search.items()},
        "train_size": len(tr), "heldout_size": len(te),
        "confusion": confusion(y[te], pred, names),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return Router(cfg, mlp), report


def save_router(path: str | Path, router: Router, report: dict) -> dict:
    """Write router.safetensors and the manifest's router section atomically (checksums updated)."""
    blob = save({k: v.contiguous() for k, v in router.mlp.state_dict().items()})
    section = {"config": router.config.to_dict(), "train": report}
    return update_artifact(path, {ROUTER: blob}, {"router": section})


def print_router_report(report: dict, names: list[str], console: Console) -> None:
    k = report.get("prefix_tokens")
    console.print(f"router: feature layer {report['feature_layer']}/{report['num_layers']} · prompt head "
                  f"{'all tokens' if k is None else f'{k} tokens'} · held-out top-1 "
                  f"[bold]{report['heldout_accuracy']:.3f}[/] on {report['heldout_size']} prompts · "
                  f"search (layer/head: accuracy) {report.get('search', report['layer_search'])}")
    table = Table(title="held-out confusion (rows: true task, columns: routed expert)")
    table.add_column("true \\ routed")
    for n in names:
        table.add_column(n[:8], justify="right")
    for a in names:
        table.add_row(a, *[str(report["confusion"][a][b]) for b in names])
    console.print(table)


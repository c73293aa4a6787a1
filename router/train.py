"""Labelled prompts -> router weights in the artifact, with a held-out accuracy report.

The feature layer L_r is chosen by measurement: every candidate layer is scored on the held-out
split and the shallowest one within ``layer_tolerance`` of the best accuracy wins (cheapest routing
that is as accurate).
"""
from __future__ import annotations

import json
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

from .features import prompt_features
from .model import FALLBACKS, Router, RouterConfig, RouterMLP

MIN_PER_TASK = 5


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


def calibrate_distance(mlp: RouterMLP, x: torch.Tensor, quantile: float = 0.995, margin: float = 1.5) -> float:
    """Distance threshold: a margin above the ``quantile`` of training prompts' nearest-centroid distance."""
    with torch.no_grad():
        d = mlp.centroid_distance(x)
    return float(torch.quantile(d, quantile)) * margin


def train_router(art, rows: list[dict], layer: int | str = "auto", hidden: int = 256, heldout: float = 0.2,
                 epochs: int = 200, seed: int = 0, fallback: str = "backbone", min_confidence: float = 0.5,
                 layer_tolerance: float = 0.005, console: Console | None = None) -> tuple[Router, dict]:
    """art: a LoadedArtifact. Returns the router and its report (accuracy, confusion, layer search)."""
    if fallback not in FALLBACKS:
        raise RouterDataError(f"fallback must be one of {', '.join(FALLBACKS)}")
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    names = art.expert_names
    num_layers = art.model.args.num_layers
    y = torch.tensor([names.index(r["task"]) for r in rows])
    tr, te = stratified_split(rows, heldout, seed)
    prompts = [r["prompt"] for r in rows]
    if layer == "auto":
        candidates = list(range(1, num_layers + 1))
    else:
        if not 1 <= int(layer) <= num_layers:
            raise RouterDataError(f"--layer must be in 1..{num_layers} or auto, got {layer}")
        candidates = [int(layer)]
    search: dict[int, float] = {}
    fitted: dict[int, tuple[RouterMLP, torch.Tensor]] = {}
    for L in candidates:
        with console.status(f"router: features at layer {L}/{num_layers} and MLP fit"):
            x = prompt_features(art.model, art.tokenizer, prompts, L)
            mlp = fit_mlp(x[tr], y[tr], len(names), hidden, epochs, seed=seed)
            with torch.no_grad():
                acc = (mlp(x[te]).argmax(-1) == y[te]).float().mean().item()
        search[L] = round(acc, 4)
        fitted[L] = (mlp, x)
    best = max(search.values())
    chosen = min(L for L, a in search.items() if a >= best - layer_tolerance)
    mlp, x = fitted[chosen]
    with torch.no_grad():
        pred = mlp(x[te]).argmax(-1)
    cfg = RouterConfig(experts=names, feature_dim=x.shape[1], feature_layer=chosen, hidden=hidden,
                       fallback=fallback, min_confidence=min_confidence,
                       max_distance=calibrate_distance(mlp, x[tr]))
    report = {
        "heldout_accuracy": round((pred == y[te]).float().mean().item(), 4),
        "feature_layer": chosen,
        "num_layers": num_layers,
        "layer_search": {str(k): v for k, v in search.items()},
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
    console.print(f"router: feature layer {report['feature_layer']}/{report['num_layers']} · held-out top-1 "
                  f"[bold]{report['heldout_accuracy']:.3f}[/] on {report['heldout_size']} prompts · "
                  f"layer search {report['layer_search']}")
    table = Table(title="held-out confusion (rows: true task, columns: routed expert)")
    table.add_column("true \\ routed")
    for n in names:
        table.add_column(n[:8], justify="right")
    for a in names:
        table.add_row(a, *[str(report["confusion"][a][b]) for b in names])
    console.print(table)


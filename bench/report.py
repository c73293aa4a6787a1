"""Ratios, targets, the rich tables and the atomic JSON write of ``twinserve bench``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

RATIO_KEYS = ("lowrank_vs_backbone_throughput", "lowrank_top2_vs_backbone_throughput",
              "lowrank_vs_materialize_throughput", "memory_vs_backbone")

# targets for the synthetic artifact at batch 16 on CPU: (comparison, bound)
TARGETS = {
    "lowrank_vs_backbone_throughput": (">=", 0.75),
    "lowrank_top2_vs_backbone_throughput": (">=", 0.85),
    "lowrank_vs_materialize_throughput": (">=", 10.0),
    "memory_vs_backbone": ("<=", 1.3),
}

RATIO_NOTE = ("throughput = generated tokens/s of the same closed-loop mix. backbone, lowrank and lowrank_top2 "
              "are compared at batch_size (concurrency = engine max_batch_size); materialize always runs at "
              "batch 1 (the engine fuses a dense model per request), so lowrank_vs_materialize compares lowrank "
              "at batch_size with materialize at batch 1. memory_vs_backbone = tensor bytes held by the lowrank "
              "engine / by the backbone engine at batch_size (weights + deltas + KV cache + router + fused LRU).")


def _find(runs: list[dict], label: str, mode: str, batch: int | None) -> dict | None:
    for r in runs:
        if r["artifact"] == label and r["mode"] == mode and (batch is None or r["batch_size"] == batch):
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def compute_ratios(runs: list[dict], label: str, batch: int) -> dict:
    bb, lr = _find(runs, label, "backbone", batch), _find(runs, label, "lowrank", batch)
    top2, mat = _find(runs, label, "lowrank_top2", batch), _find(runs, label, "materialize", None)
    tps = lambda r: None if r is None else r["tokens_per_s"]
    mem = lambda r: None if r is None else r["memory_bytes"]
    return {
        "lowrank_vs_backbone_throughput": _div(tps(lr), tps(bb)),
        "lowrank_top2_vs_backbone_throughput": _div(tps(top2), tps(bb)),
        "lowrank_vs_materialize_throughput": _div(tps(lr), tps(mat)),
        "memory_vs_backbone": _div(mem(lr), mem(bb)),
        "batch_size": batch,
        "materialize_batch_size": 1,
        "note": RATIO_NOTE,
    }


def check_targets(ratios: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = ratios.get(key)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out[key] = {"target": f"{op} {bound}", "value": v, "pass": ok}
    return out


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def print_runs(report: dict, console: Console) -> None:
    table = Table(title="twinserve bench: closed loop, greedy, ignore_eos "
                        f"({report['config']['max_tokens']} tokens per request)")
    for col in ("artifact", "mode", "batch", "requests", "tok/s", "req/s", "p50 s", "p99 s", "TTFT p50 s",
                "memory MiB", "RSS MiB"):
        table.add_column(col, justify="left" if col in ("artifact", "mode") else "right")
    for r in report["runs"]:
        table.add_row(r["artifact"], r["mode"], str(r["batch_size"]), str(r["requests"]), f"{r['tokens_per_s']:.1f}",
                      f"{r['requests_per_s']:.2f}", f"{r['p50_s']:.3f}", f"{r['p99_s']:.3f}",
                      f"{r['ttft_p50_s']:.3f}", _mib(r["memory_bytes"]), _mib(r["rss_bytes"]))
    console.print(table)
    for s in report["config"].get("skipped", []):
        console.print(f"[yellow]skipped[/] {s['artifact']} {s['mode']}: {s['reason']}")


def print_ratios(report: dict, console: Console) -> None:
    table = Table(title="ratios (lowrank* and backbone at the batch size shown; materialize at batch 1)")
    table.add_column("artifact")
    table.add_column("batch", justify="right")
    for k in RATIO_KEYS:
        table.add_column(k.replace("_throughput", " tput").replace("_", " "), justify="right")
    targets = report.get("targets") or {}
    for label, key in (("synthetic", "ratios"), ("demo", "demo_ratios")):
        ratios = report.get(key)
        if not ratios:
            continue
        cells = []
        for k in RATIO_KEYS:
            v = ratios.get(k)
            cell = "n/a" if v is None else f"{v:.3f}"
            if key == "ratios" and k in targets and targets[k]["pass"] is not None:
                cell += "  [green]PASS[/]" if targets[k]["pass"] else "  [red]MISS[/]"
            cells.append(cell)
        table.add_row(label, str(ratios["batch_size"]), *cells)
    console.print(table)
    if targets:
        console.print("targets (synthetic): " + " · ".join(
            f"{k} {t['target']}: {'n/a' if t['value'] is None else format(t['value'], '.3f')} "
            f"{'PASS' if t['pass'] else 'MISS' if t['pass'] is not None else ''}" for k, t in targets.items()))
    for label, eq in report["config"].get("equivalence", {}).items():
        console.print(f"{label}: pinned expert {eq['expert']}: lowrank (batch {eq['lowrank_batch_size']}) and "
                      f"materialize (batch 1) gave identical greedy outputs for {eq['identical']}/{eq['requests']} "
                      f"requests")

"""Ratios, targets, the rich tables and the atomic JSON write of ``twinserve bench``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

RATIO_KEYS = ("lowrank_vs_backbone_throughput", "lowrank_top2_vs_backbone_throughput",
              "lowrank_vs_peft_mixed_throughput", "backbone_vs_hf_generate_throughput", "memory_vs_backbone",
              "backbone_roofline_fraction")

# targets for the synthetic artifact at batch 16 on CPU (issue 13): (comparison, bound)
TARGETS = {
    "lowrank_vs_backbone_throughput": (">=", 0.85),
    "lowrank_top2_vs_backbone_throughput": (">=", 0.9),
    "lowrank_vs_peft_mixed_throughput": (">=", 1.5),
    "backbone_vs_hf_generate_throughput": (">=", 1.3),
    "backbone_roofline_fraction": (">=", 0.7),
    "memory_vs_backbone": ("<=", 1.3),
}
# greedy outputs that must be token-for-token identical (report["identity"] entries)
IDENTITY_TARGETS = ("lowrank_pinned_vs_materialize", "batch1_vs_batch_max")

RATIO_NOTE = ("throughput = generated tokens/s of the same closed-loop mix at batch_size (concurrency = engine "
              "max_batch_size; the transformers peers run static batches of batch_size). lowrank = router "
              "weights (soft), lowrank_top2 = top-2; peft_mixed = HF transformers + PEFT, one LoRA adapter per "
              "expert, each row its task's adapter (adapter_names); hf_generate = transformers generate of θ*. "
              "memory_vs_backbone = tensor bytes held by the lowrank engine / by the backbone engine (weights + "
              "deltas + KV cache + router). backbone_roofline_fraction = backbone decode step's matmul FLOP/s "
              "(2·M·Σ d_out·d_in / step seconds) over the torch.mm peak at the same shapes, M = batch_size. "
              "materialize is still timed (runs, batch 1) as the correctness oracle; it has no ratio target.")


def _find(runs: list[dict], label: str, mode: str, batch: int | None) -> dict | None:
    for r in runs:
        if r["artifact"] == label and r["mode"] == mode and (batch is None or r["batch_size"] == batch):
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def compute_ratios(runs: list[dict], label: str, batch: int, roofline: dict | None = None) -> dict:
    """The issue-13 ratios of one artifact at ``batch`` (None where a run is missing)."""
    get = {m: _find(runs, label, m, batch) for m in ("backbone", "lowrank", "lowrank_top2", "peft_mixed",
                                                       "hf_generate")}
    tps = lambda m: None if get[m] is None else get[m]["tokens_per_s"]
    mem = lambda m: None if get[m] is None else get[m]["memory_bytes"]
    return {
        "lowrank_vs_backbone_throughput": _div(tps("lowrank"), tps("backbone")),
        "lowrank_top2_vs_backbone_throughput": _div(tps("lowrank_top2"), tps("backbone")),
        "lowrank_vs_peft_mixed_throughput": _div(tps("lowrank"), tps("peft_mixed")),
        "backbone_vs_hf_generate_throughput": _div(tps("backbone"), tps("hf_generate")),
        "memory_vs_backbone": _div(mem("lowrank"), mem("backbone")),
        "backbone_roofline_fraction": None if roofline is None else roofline["backbone_roofline_fraction"],
        "batch_size": batch,
        "note": RATIO_NOTE,
    }


def _all_identical(entry: dict | None) -> tuple[str | None, bool | None]:
    """'k/n' over an identity entry (one check, or one per mode) and whether every output matched."""
    if not entry:
        return None, None
    parts = [entry] if "identical" in entry else list(entry.values())
    same, n = sum(p["identical"] for p in parts), sum(p["requests"] for p in parts)
    return f"{same}/{n}", (same == n) if n else None


def check_targets(ratios: dict, identity: dict | None = None, dtype: str = "float32") -> dict:
    """Ratio targets, and greedy-identity targets. Identity is a target of the full-precision path only: in
    bf16, fused weights (materialize) and activation-side deltas (lowrank) round differently, as do GEMMs
    blocked for batch 1 and batch 16, so a near-tie argmax may flip. bf16 identity is reported, not judged."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = ratios.get(key)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out[key] = {"target": f"{op} {bound}", "value": v, "pass": ok}
    for key in IDENTITY_TARGETS:
        v, ok = _all_identical((identity or {}).get(key))
        if dtype != "float32":
            ok = None
        out[key] = {"target": "all identical" + ("" if dtype == "float32" else " (fp32 only)"), "value": v,
                    "pass": ok}
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
    table = Table(title=f"ratios (batch {(report.get('ratios') or report.get('demo_ratios') or {}).get('batch_size')})")
    table.add_column("artifact")
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
        table.add_row(label, *cells)
    console.print(table)
    if targets:
        def value(v) -> str:
            return "n/a" if v is None else v if isinstance(v, str) else format(v, ".3f")

        console.print("targets (synthetic): " + " · ".join(
            f"{k} {t['target']}: {value(t['value'])} "
            f"{'PASS' if t['pass'] else 'MISS' if t['pass'] is not None else ''}" for k, t in targets.items()))
    for label, key in (("synthetic", "identity"), ("demo", "demo_identity")):
        for name, entry in (report.get(key) or {}).items():
            v, _ = _all_identical(entry)
            detail = "" if "identical" in entry else " (" + ", ".join(
                f"{m} {d['identical']}/{d['requests']}" for m, d in entry.items()) + ")"
            console.print(f"{label}: {name}: {v} identical greedy outputs{detail}")

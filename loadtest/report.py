"""Statistics over the results, the JSON report (written atomically), the terminal table and the plot.

Latencies are reported in milliseconds. Percentiles are `twin.util.percentile` (linear interpolation, numpy's
default), the definition the server's /v1/stats uses too. Accuracies count successful requests only.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from twin.util import atomic_write, percentile

from .client import Result

SCHEMA_VERSION = 1
PERCENTILES = (50, 95, 99)
NO_EXPERT = "(none)"  # the server routed but named no top expert (e.g. fallback to the backbone)


def distribution(values: list[float], scale: float = 1000.0) -> dict:
    """``{n, mean, min, max, p50, p95, p99}`` of ``values`` (seconds) in ms (``scale``)."""
    out: dict = {"n": len(values)}
    vs = [v * scale for v in values]
    out["mean"] = sum(vs) / len(vs) if vs else None
    out["min"] = min(vs) if vs else None
    out["max"] = max(vs) if vs else None
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(vs, p)
    return out


def _latency(results: list[Result]) -> dict:
    ok = [r for r in results if r.ok]
    return {
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def routing_section(results: list[Result]) -> dict:
    """Accuracy of ``top_expert`` against the row's label, and the confusion matrix (rows = label)."""
    routed = [r for r in results if r.ok and r.labeled and r.routing is not None]
    labels = sorted({r.task for r in routed})
    predicted = {r.top_expert or NO_EXPERT for r in routed}
    columns = labels + sorted(predicted - set(labels))
    confusion = {t: {c: 0 for c in columns} for t in labels}
    for r in routed:
        confusion[r.task][r.top_expert or NO_EXPERT] += 1
    correct = sum(1 for r in routed if r.top_expert == r.task)
    return {"accuracy": _ratio(correct, len(routed)), "n": len(routed), "correct": correct,
            "labels": labels, "columns": columns, "confusion": confusion,
            "matrix": [[confusion[t][c] for c in columns] for t in labels]}


def _errors(results: list[Result]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return dict(sorted(errors.items()))


def _task_section(rs: list[Result]) -> dict:
    ok = [r for r in rs if r.ok]
    scored = [r for r in ok if r.target is not None]
    routed = [r for r in ok if r.labeled and r.routing is not None]
    em = sum(1 for r in scored if r.correct)
    hit = sum(1 for r in routed if r.top_expert == r.task)
    return {"requests": len(rs), "ok": len(ok), "errors": _errors(rs),
            "exact_match": _ratio(em, len(scored)), "scored": len(scored),
            "routing_accuracy": _ratio(hit, len(routed)), "routed": len(routed),
            "output_tokens": sum(r.tokens for r in ok),
            "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
            "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None])}


def summarize(results: list[Result], wall_s: float, config: dict | None = None,
              workload: dict | None = None, stopped_by: str | None = None) -> dict:
    """The whole report as a JSON-ready dict."""
    ok = [r for r in results if r.ok]
    scored = [r for r in ok if r.target is not None]
    tokens = sum(r.tokens for r in ok)
    by_task: dict[str, list[Result]] = {}
    for r in results:
        by_task.setdefault(r.task, []).append(r)
    routing = routing_section(results)
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config or {},
        "workload": workload or {},
        "summary": {
            "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "duration_s": wall_s, "stopped_by": stopped_by,
            "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "exact_match": _ratio(sum(1 for r in scored if r.correct), len(scored)),
            "routing_accuracy": routing["accuracy"],
        },
        "latency": _latency(results),
        "errors": _errors(results),
        "tasks": {t: _task_section(rs) for t, rs in sorted(by_task.items())},
        "routing": routing,
        "results": [{"index": r.index, "task": r.task, "start_s": r.start, "status": r.status,
                     "error": r.error, "message": r.message,
                     "ttft_ms": None if r.ttft is None else r.ttft * 1000,
                     "e2e_ms": None if r.e2e is None else r.e2e * 1000,
                     "tokens": r.tokens, "top_expert": r.top_expert, "correct": r.correct} for r in results],
    }


def write_json(report: dict, path: str | Path) -> None:
    atomic_write(path, json.dumps(report, indent=2) + "\n")


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_summary(report: dict, console: Console) -> None:
    s, lat = report["summary"], report["latency"]
    t = Table(title=f"loadtest: {s['ok']}/{s['requests']} ok in {s['duration_s']:.1f} s, "
                    f"{_fmt(s['throughput_rps'], '.2f')} req/s, {_fmt(s['output_tokens_per_s'], '.1f')} tok/s")
    t.add_column("task", no_wrap=True)
    for col in ("reqs", "errs", "EM", "route", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99"):
        t.add_column(col, justify="right")
    for name, ts in report["tasks"].items():
        t.add_row(name, str(ts["requests"]), str(ts["requests"] - ts["ok"]), _fmt(ts["exact_match"], ".3f"),
                  _fmt(ts["routing_accuracy"], ".3f"), _fmt(ts["ttft_ms"]["p50"]), _fmt(ts["ttft_ms"]["p99"]),
                  _fmt(ts["e2e_ms"]["p50"]), _fmt(ts["e2e_ms"]["p99"]))
    t.add_section()
    t.add_row("all", str(s["requests"]), str(s["failed"]), _fmt(s["exact_match"], ".3f"),
              _fmt(s["routing_accuracy"], ".3f"), _fmt(lat["ttft_ms"]["p50"]), _fmt(lat["ttft_ms"]["p99"]),
              _fmt(lat["e2e_ms"]["p50"]), _fmt(lat["e2e_ms"]["p99"]))
    console.print(t)
    lines = [f"{k.split('_')[0].upper():>5} ms  p50 {_fmt(v['p50'], '.2f')}  p95 {_fmt(v['p95'], '.2f')}  "
             f"p99 {_fmt(v['p99'], '.2f')}  (n={v['n']})" for k, v in lat.items()]
    console.print("\n".join(lines))
    if report["errors"]:
        console.print("[red]errors:[/] " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items()))


def plot(report: dict, path: str | Path) -> None:
    """PNG: e2e latency CDF per task (left), routing confusion heatmap (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    by_task: dict[str, list[float]] = {}
    for r in report["results"]:
        if r["error"] is None and r["e2e_ms"] is not None:
            by_task.setdefault(r["task"], []).append(r["e2e_ms"])
    for task, xs in sorted(by_task.items()):
        xs = sorted(xs)
        ax1.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{task} (n={len(xs)})")
    ax1.set(xlabel="end-to-end latency (ms)", ylabel="fraction of requests", title="latency CDF per task",
            ylim=(0, 1.02))
    ax1.grid(alpha=0.3)
    if by_task:
        ax1.legend(fontsize=8)
    rt = report["routing"]
    if rt["labels"]:
        m = rt["matrix"]
        im = ax2.imshow(m, cmap="Blues", aspect="auto")
        ax2.set_xticks(range(len(rt["columns"])), rt["columns"], rotation=45, ha="right")
        ax2.set_yticks(range(len(rt["labels"])), rt["labels"])
        peak = max(max(row) for row in m) or 1
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax2.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
        fig.colorbar(im, ax=ax2)
        acc = rt["accuracy"]
        ax2.set_title(f"routing confusion (accuracy {_fmt(acc, '.3f')})")
    else:
        ax2.text(0.5, 0.5, "no routing information", ha="center", va="center")
        ax2.set_axis_off()
    ax2.set(xlabel="top_expert", ylabel="label")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    plt.close(fig)

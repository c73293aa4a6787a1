"""`twinserve eval`: greedy exact match per task for experts, base, static merges and Twin.

Static merges (task_arithmetic, ties, dare_ties) get their λ searched on the validation split, as the
papers do, so the comparison with Twin is fair. Twin runs through the batched activation-side
path with every prompt of every task mixed in the same batches.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compression.checkpoints import LazyState, load_model_state, open_expert
from compression.merging import merge_params, merge_state
from twin.artifact import BACKBONE, EXCLUSIVE, read_report, tensor_files, update_artifact
from twin.errors import TwinserveError
from twin.generate import greedy_generate
from twin.loading import LoadedArtifact, build_model, load_artifact
from twin.manifest import Manifest
from zoo.tasks import read_jsonl

BASELINE_GRID = {
    "task_arithmetic": [{"lam": x} for x in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"lam": x, "density": 0.2} for x in (0.5, 1.0, 1.5)],
    "dare_ties": [{"lam": x, "density": 0.5} for x in (0.3, 0.5, 1.0)],
}
METHODS = ("expert", "base", "task_arithmetic", "ties", "dare_ties", "twin_oracle", "twin_router")


class EvalError(TwinserveError):
    pass


SPLIT_FORMAT = ("DIR/TASK/{validation,test}.jsonl, one folder per expert, one JSON object per line: "
                '{"prompt": str, "target": str}')


def find_tasks_dir(manifest: Manifest, tasks: str | Path | None) -> Path:
    if tasks is not None:
        p = Path(tasks)
    elif manifest.base is not None:  # the demo zoo keeps tasks/ beside base/
        p = Path(manifest.base).parent / "tasks"
    else:
        raise EvalError(f"the artifact records no base model dir; pass --tasks DIR with {SPLIT_FORMAT}")
    if not p.is_dir():
        raise EvalError(f"task splits not found at {p}; pass --tasks DIR with {SPLIT_FORMAT}")
    return p


def load_split(tasks_dir: Path, experts: list[str], split: str, limit: int | None) -> dict[str, list[dict]]:
    out = {}
    for name in experts:
        f = tasks_dir / name / f"{split}.jsonl"
        if not f.is_file():
            raise EvalError(f"{f}: missing (one split per expert named like the expert)")
        rows = read_jsonl(f)
        out[name] = rows[:limit] if limit else rows
    return out


def exact_match(preds: list[str], rows: list[dict]) -> float:
    return sum(p == r["target"].strip() for p, r in zip(preds, rows)) / max(1, len(rows))


def score_model(model, tokenizer, data: dict[str, list[dict]], w_for: Callable[[str, list[dict]], torch.Tensor] | None = None,
                max_new_tokens: int = 24) -> dict[str, float]:
    """Exact match per task, all tasks mixed in the same batches (w_for(task, rows) -> (n, T) weights)."""
    prompts, owners, ws = [], [], []
    for task, rows in data.items():
        prompts += [r["prompt"] for r in rows]
        owners += [task] * len(rows)
        if w_for is not None:
            ws.append(w_for(task, rows))
    w = torch.cat(ws) if ws else None
    preds = greedy_generate(model, tokenizer, prompts, w, max_new_tokens=max_new_tokens)
    scores = {}
    i = 0
    for task, rows in data.items():
        scores[task] = exact_match(preds[i:i + len(rows)], rows)
        i += len(rows)
    return scores


def evaluate(path: str | Path, tasks: str | Path | None = None, limit: int | None = None,
             methods: tuple[str, ...] = METHODS, write: bool = True, console: Console | None = None,
             router_weights: Callable | None = None, router_details: bool = True,
             dtype: str = "float32") -> dict:
    """``dtype``: the serving dtype to score (float32, or bfloat16 to measure what bf16 serving costs)."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    art = load_artifact(path, device="cpu", dtype=dtype)
    names = art.expert_names
    tasks_dir = find_tasks_dir(art.manifest, tasks)
    test = load_split(tasks_dir, names, "test", limit)
    val = load_split(tasks_dir, names, "validation", limit)
    m = art.manifest
    results: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict] = {}

    def dense_model(state):
        return build_model(art.config, state, None, "cpu", art.model.dtype, with_experts=False)

    need_dense = {"expert", "base", "task_arithmetic", "ties", "dare_ties"} & set(methods)
    if need_dense:
        base_state = load_model_state(m.base)
        lazy = LazyState(m.base)
        expert_states = []
        for e in m.experts:
            ex = open_expert(e.source, lazy)
            expert_states.append({k: ex.get(k) for k in base_state})
    if "expert" in methods:
        results["expert"] = {}
        for name, state in zip(names, expert_states):
            with console.status(f"expert {name}"):
                results["expert"][name] = score_model(dense_model(state), art.tokenizer, {name: test[name]})[name]
    if "base" in methods:
        with console.status("base"):
            results["base"] = score_model(dense_model(base_state), art.tokenizer, test)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        if method not in methods:
            continue
        best = None
        for params in BASELINE_GRID[method]:
            with console.status(f"{method} {params} (validation)"):
                state = merge_state(base_state, expert_states, method, **merge_params(method, **params))
                model = dense_model(state)
                v = score_model(model, art.tokenizer, val)
                mean = sum(v.values()) / len(v)
            if best is None or mean > best[0]:
                best = (mean, params, model)
        chosen[method] = best[1]
        with console.status(f"{method} {best[1]} (test)"):
            results[method] = score_model(best[2], art.tokenizer, test)
    eye = torch.eye(len(names))
    if "twin_oracle" in methods:
        with console.status("twin oracle (one-hot on the true task, batched low-rank path)"):
            results["twin_oracle"] = score_model(art.model, art.tokenizer, test,
                                                 lambda task, rows: eye[names.index(task)].expand(len(rows), -1))
    router_section = None
    w_router = router_weights(art) if ("twin_router" in methods and router_weights is not None) else None
    if w_router is not None:
        with console.status("twin router (learned routing, batched low-rank path)"):
            results["twin_router"] = score_model(art.model, art.tokenizer, test, w_router)
            router_section = router_report(art, test) if router_details else None

    quality = build_quality(results, names)
    report = read_report(path)
    report["quality"] = quality
    report["quality"]["baseline_params"] = chosen
    report["quality"]["test_size_per_task"] = {n: len(r) for n, r in test.items()}
    report["storage_bytes"] = storage_bytes(art)
    if router_section is not None:
        report["router"] = router_section
    report["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        update_artifact(path, {"report.json": json.dumps(report, indent=2)})
    print_quality_table(report, names, console)
    return report


def storage_bytes(art: LoadedArtifact) -> dict[str, int]:
    """File sizes of θ* and the exclusive modules, and what T dense experts take: T × the bytes of θ*'s
    tensors (every expert has θ*'s tensors, stored as the artifact stores weights). Works for any artifact."""
    per_expert = 0
    for f in tensor_files(art.path, BACKBONE):   # safetensors: u64 header length, JSON header, tensor data
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        per_expert += sum(end - start for k, v in header.items() if k != "__metadata__"
                          for start, end in [v["data_offsets"]])

    def size(name: str) -> int:
        return sum(f.stat().st_size for f in tensor_files(art.path, name))
    return {"backbone": size(BACKBONE), "exclusive": size(EXCLUSIVE), "dense_experts": len(art.expert_names) * per_expert}


def router_report(art: LoadedArtifact, test: dict[str, list[dict]]) -> dict:
    from router.evaluate import continuation_report, cost_fraction_of_prefill, unknown_prompt_report
    from router.features import router_prompt_features
    from router.model import load_router

    router = load_router(art.path, art.manifest)
    train = art.manifest.router.train
    rows = [r for rs in test.values() for r in rs]
    names = art.expert_names
    x = router_prompt_features(art.model, art.tokenizer, [r["prompt"] for r in rows], router.config)
    routed = router.route(x)
    truth = torch.tensor([names.index(r["task"]) for r in rows])
    return {
        "heldout_accuracy": train["heldout_accuracy"],
        "test_top1_accuracy": round(float((routed.top == truth).float().mean()), 4),
        "test_fallback_rate": round(float(routed.fallback.float().mean()), 4),
        "feature_layer": router.config.feature_layer,
        "prefix_tokens": router.config.prefix_tokens,
        "num_layers": art.model.args.num_layers,
        "cost_fraction_of_prefill": round(cost_fraction_of_prefill(art, router, [r["prompt"] for r in rows[:256]]), 4),
        "confusion": train["confusion"],
        "unknown_prompts": unknown_prompt_report(art, router),
        "appended_continuations": continuation_report(art, router, rows),
    }


def build_quality(results: dict[str, dict[str, float]], names: list[str]) -> dict:
    """{"tasks": {task: {method: score}}, "normalized": {method: mean(score / expert score)}}."""
    tasks = {n: {meth: round(r[n], 4) for meth, r in results.items() if n in r} for n in names}
    normalized = {}
    if "expert" in results:
        for meth, r in results.items():
            vals = [r[n] / results["expert"][n] for n in names if n in r and results["expert"][n] > 0]
            if vals:
                normalized[meth] = round(sum(vals) / len(vals), 4)
    return {"tasks": tasks, "normalized": normalized}


def print_quality_table(report: dict, names: list[str], console: Console) -> None:
    q = report["quality"]
    methods = [m for m in METHODS if any(m in q["tasks"][n] for n in names)]
    table = Table(title="greedy exact match on the test split")
    table.add_column("task")
    for meth in methods:
        table.add_column(meth, justify="right")
    for n in names:
        table.add_row(n, *[f"{q['tasks'][n][m]:.3f}" if m in q["tasks"][n] else "" for m in methods])
    table.add_row("[bold]normalised[/]", *[f"[bold]{q['normalized'][m]:.3f}[/]" if m in q["normalized"] else ""
                                            for m in methods])
    console.print(table)
    s = report["storage_bytes"]
    ratio = s["exclusive"] / s["dense_experts"] if s.get("dense_experts") else float("nan")
    r = report.get("router")
    if r:
        k = r.get("prefix_tokens")
        cont = r.get("appended_continuations", {})
        console.print(f"router: held-out top-1 {r['heldout_accuracy']:.3f} · test top-1 {r['test_top1_accuracy']:.3f} · "
                      f"feature layer {r['feature_layer']}/{r['num_layers']} · prompt head "
                      f"{'all tokens' if k is None else f'{k} tokens'} · cost {r['cost_fraction_of_prefill']:.3f} "
                      f"of a prefill · fallback on unknown prompts {r['unknown_prompts']['fallback_rate']:.2f} "
                      f"(test prompts {r['test_fallback_rate']:.3f})"
                      + (f" · routed as its context with a continuation appended {cont['same_routing_rate']:.3f}"
                         if "same_routing_rate" in cont else ""))
    console.print(f"storage: backbone {s['backbone']:,} B · exclusive factors {s['exclusive']:,} B · "
                  f"dense experts {s['dense_experts']:,} B · exclusive/dense experts = {ratio:.3f}")


def rank_sweep(path: str | Path, ranks: list[int], tasks: str | Path | None = None, limit: int | None = None,
               console: Console | None = None, router_weights: Callable | None = None) -> list[dict]:
    """Rebuild the artifact's recipe at each fixed rank (no budget; factors stored as the recipe stores them)
    and score Twin."""
    def variant(recipe, r):
        return recipe.model_copy(update={"rank": recipe.rank.model_copy(update={"rank": r, "energy": None}),
                                         "compress": recipe.compress.model_copy(update={"budget": None})})
    return _sweep(path, "rank", ranks, variant, tasks, limit, console, router_weights)


def budget_sweep(path: str | Path, fractions: list[float], factor_dtype: str | None = None,
                 tasks: str | Path | None = None, limit: int | None = None, console: Console | None = None,
                 router_weights: Callable | None = None) -> list[dict]:
    """Rebuild the artifact's recipe at each byte budget (fraction of the dense experts; factors as the
    recipe stores them unless ``factor_dtype``) and score Twin: the curve bytes fraction -> normalised score."""
    def variant(recipe, f):
        update = {"budget": f} if factor_dtype is None else {"budget": f, "factor_dtype": factor_dtype}
        return recipe.model_copy(update={"compress": recipe.compress.model_copy(update=update)})
    return _sweep(path, "budget", fractions, variant, tasks, limit, console, router_weights)


def _sweep(path, label: str, values: list, variant: Callable, tasks, limit, console, router_weights) -> list[dict]:
    """Rebuild ``variant(recipe, v)`` for each v in temp dirs, score twin_oracle (and twin_router with the
    artifact's own router: θ* and so the router's features are the same in every variant)."""
    import tempfile

    from compression.build import build_artifact
    from compression.recipe import Recipe
    from twin.artifact import ROUTER, verify_artifact

    console = console or Console(stderr=True)
    manifest = verify_artifact(path)
    if manifest.recipe is None:
        raise EvalError(f"{path}: manifest has no recipe; rebuild it with this version to sweep")
    recipe = Recipe.model_validate(manifest.recipe)
    tasks = str(find_tasks_dir(manifest, tasks))  # checked once, before any rebuild
    methods = ("expert", "twin_oracle") + (("twin_router",) if manifest.router and router_weights else ())
    rows = []
    quiet = Console(quiet=True)
    for v in values:
        with tempfile.TemporaryDirectory() as tmp, console.status(f"{label} {v}: build + {', '.join(methods[1:])}"):
            out = Path(tmp) / "a"
            build_artifact(variant(recipe, v), out, quiet=True)
            if "twin_router" in methods:
                update_artifact(out, {ROUTER: (Path(path) / ROUTER).read_bytes()}, {"router": manifest.router})
            rep = evaluate(out, tasks=tasks, limit=limit, methods=methods, write=False, console=quiet,
                           router_weights=router_weights, router_details=False)
            s, norm = rep["storage_bytes"], rep["quality"]["normalized"]
            rows.append({label: v, "twin_oracle_normalized": norm["twin_oracle"],
                         "twin_router_normalized": norm.get("twin_router"),
                         "exclusive_bytes": s["exclusive"], "dense_experts_bytes": s["dense_experts"],
                         "exclusive_fraction": round(s["exclusive"] / s["dense_experts"], 4)})
    table = Table(title=f"{label} sweep: Twin normalised score vs exclusive bytes")
    for col in (label, "fraction of dense experts", "exclusive bytes", "twin_oracle", "twin_router"):
        table.add_column(col, justify="right")
    for row in rows:
        router = row["twin_router_normalized"]
        table.add_row(str(row[label]), f"{row['exclusive_fraction']:.3f}", f"{row['exclusive_bytes']:,}",
                      f"{row['twin_oracle_normalized']:.3f}", "" if router is None else f"{router:.3f}")
    console.print(table)
    return rows

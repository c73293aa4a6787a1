"""`twinserve` command line: thin wrappers over the packages. Bad input exits with code 2 and a message."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


class UsageError(ValueError):
    pass


def _known_errors() -> tuple[type[BaseException], ...]:
    from bench.quality import EvalError
    from compression.checkpoints import CheckpointError
    from compression.parity import ParityError
    from compression.preflight import PreflightError
    from compression.recipe import RecipeError
    from loadtest.workload import LoadtestError
    from router.train import RouterDataError
    from server.memory import StartupError
    from twin.artifact import ArtifactError
    from twin.model import UnsupportedModelError
    from zoo.synthetic import SyntheticError
    return (StartupError, PreflightError, SyntheticError, ParityError, ArtifactError, CheckpointError, RecipeError, EvalError, UnsupportedModelError, UsageError,
            RouterDataError, LoadtestError)


# ---- subcommands -------------------------------------------------------------------------------
def cmd_zoo(args) -> int:
    if args.kind == "synthetic":
        return cmd_zoo_synthetic(args)
    from zoo.build import ZooSettings, build_zoo
    build_zoo(args.output, ZooSettings(seed=args.seed), force=args.force, console=console)
    return 0


def cmd_zoo_synthetic(args) -> int:
    import time

    from zoo.synthetic import SyntheticCheckpoints, write_synthetic
    if args.like is None:
        raise UsageError("zoo synthetic: --like is required (e.g. --like qwen2.5-0.5b)")
    spec = SyntheticCheckpoints(like=args.like, experts=args.experts, lora_rank=args.lora, layers=args.layers,
                                delta_scale=args.delta_scale, dtype=args.dtype, seed=args.seed)
    t0 = time.perf_counter()
    info = write_synthetic(spec, args.output,
                           progress=lambda what: console.print(f"[dim]{time.perf_counter() - t0:7.1f} s[/] writing {what}"))
    kind = f"LoRA r{args.lora} adapters" if args.lora else "full fine-tunes"
    console.print(f"[green]wrote[/] {args.output}: {args.like} ({info['layers']} layers, "
                  f"{info['parameters'] / 1e9:.2f} B parameters) + {args.experts} {kind} in "
                  f"{time.perf_counter() - t0:.0f} s; build with: twinserve build {args.output}/recipe.yaml -o ART")
    return 0


def cmd_build(args) -> int:
    import torch

    from compression.preflight import check, estimate, print_estimate
    from compression.recipe import load_recipe
    recipe = load_recipe(args.recipe)
    if args.rank is not None:
        recipe = recipe.model_copy(update={"rank": recipe.rank.model_copy(update={"rank": args.rank, "energy": None})})
    if args.threads:
        torch.set_num_threads(args.threads)
    check_base_supported(recipe.base)   # before any merge work: seconds, not the whole build
    est = estimate(recipe, threads=args.threads, skip_parity=args.skip_parity)
    print_estimate(est, console)
    if args.estimate:
        return 0
    check(est, args.output)
    build_with_parity(recipe, args.output, skip_parity=args.skip_parity, estimate=est.to_json())
    console.print(f"[green]artifact written[/] {args.output}")
    return 0


def build_with_parity(recipe, out, skip_parity: bool = False, estimate: dict | None = None,
                      **build_kwargs) -> None:
    """Refuse an unserveable base in seconds, build, then run the parity gate (removing the artifact when
    the served model differs from transformers) and record its result and the phase times."""
    import shutil
    import time

    from compression.build import build_artifact
    from compression.experts import expert_tensors
    from compression.parity import ParityError, check_parity, record_parity
    check_base_supported(recipe.base)   # before any merge work: seconds, not the whole build
    t0 = time.perf_counter()
    quiet = build_kwargs.get("quiet", False)

    def phase(what: str) -> None:
        if not quiet:
            console.print(f"[dim]{time.perf_counter() - t0:8.1f} s[/] {what}")

    probe_recipe(recipe, phase)

    phase("merge + factor (θ* and the δ_t factors, streamed to the artifact's shards)")
    build_artifact(recipe, out, **build_kwargs)
    if skip_parity:
        record_parity(out, None, skipped=True, extra={"estimate": estimate})
        console.print("[yellow]parity gate skipped (--skip-parity, recorded in the manifest)[/]")
        return
    t_gate = time.perf_counter()
    phase("parity gate (served step vs transformers, one decoder block resident at a time)")
    try:
        report = check_parity(out, expert_tensors, console=None if quiet else console,
                              progress=lambda what: phase(f"  gate: {what}"))
    except ParityError:
        shutil.rmtree(out, ignore_errors=True)   # never leave an artifact that serves wrong logits
        raise
    gate_s = round(time.perf_counter() - t_gate, 2)
    record_parity(out, report, extra={"gate_s": gate_s, "total_s": round(time.perf_counter() - t0, 2),
                                      "estimate": estimate})
    phase(f"done: gate {gate_s:.0f} s")


def probe_recipe(recipe, phase) -> None:
    """The early refusal (compression.probe): a tiny model of the base's config through build + gate."""
    from compression.checkpoints import LazyState, load_config, open_expert
    from compression.probe import ProbeSkipped, probe
    config = load_config(recipe.base)
    base = LazyState(recipe.base, config)
    experts = [open_expert(e.path, base) for e in recipe.experts]
    try:
        probe(config, experts, recipe)
        phase(f"probe: a tiny {config.model_type} model is served exactly (build + gate), so the real build starts")
    except ProbeSkipped as e:
        phase(f"[yellow]probe skipped[/] (no tiny model of this config: {e}); the build's own gate decides")


def check_base_supported(base: str) -> None:
    """UnsupportedModelError (exit 2) naming the base's model_type when the server could not serve it."""
    from transformers import AutoConfig

    from twin.model import check_supported
    try:
        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"base model {base}: cannot read its config.json: {e}") from None
    check_supported(config)


def cmd_eval(args) -> int:
    from bench.quality import METHODS, evaluate
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"--methods: unknown method(s) {', '.join(bad)} (known: {', '.join(METHODS)})")
    if args.sweep_ranks:
        from bench.quality import rank_sweep
        try:
            ranks = [int(x) for x in args.sweep_ranks.split(",")]
        except ValueError:
            raise UsageError(f"--sweep-ranks: expected comma-separated integers, got {args.sweep_ranks!r}") from None
        if any(r < 1 for r in ranks):
            raise UsageError("--sweep-ranks: ranks must be >= 1")
        rows = rank_sweep(args.artifact, ranks, tasks=args.tasks, limit=args.limit, console=console,
                          router_weights=_router_weights())
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    if args.sweep_budget:
        from bench.quality import budget_sweep
        try:
            fractions = [float(x) for x in args.sweep_budget.split(",")]
        except ValueError:
            raise UsageError(f"--sweep-budget: expected comma-separated fractions, got {args.sweep_budget!r}") from None
        if any(not 0 < f <= 1 for f in fractions):
            raise UsageError("--sweep-budget: fractions must be in (0, 1]")
        rows = budget_sweep(args.artifact, fractions, tasks=args.tasks, limit=args.limit, console=console,
                            router_weights=_router_weights())
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    report = evaluate(args.artifact, tasks=args.tasks, limit=args.limit, methods=methods,
                      write=not args.no_write and args.dtype == "float32", console=console,
                      router_weights=_router_weights(), dtype=args.dtype)
    if args.json:
        print(json.dumps(report["quality"], indent=2))
    return 0


def _router_weights():
    from router.evaluate import router_weight_fn
    return router_weight_fn


def cmd_demo(args) -> int:
    """zoo (cached) -> artifact (cached, parity-gated) -> router -> eval."""
    from compression.recipe import load_recipe
    from twin.artifact import ArtifactError, read_report, verify_artifact
    from zoo.build import ZooSettings, build_zoo
    info = build_zoo(args.zoo, ZooSettings(seed=args.seed), console=console)
    recipe = load_recipe(Path(args.zoo) / "recipe.yaml")
    out = Path(args.output)
    fresh = False
    try:
        m = verify_artifact(out)
        fresh = m.recipe == recipe.model_dump(mode="json") and m.zoo_fingerprint == info["fingerprint"]
    except ArtifactError:
        pass
    if fresh:
        console.print(f"[green]artifact cache hit[/] {out}")
    else:
        build_with_parity(recipe, out, zoo_fingerprint=info["fingerprint"])
    from router.train import ensure_demo_router
    ensure_demo_router(out, Path(args.zoo), console=console)
    report = read_report(out)
    if "quality" not in report or args.reeval:
        from bench.quality import evaluate
        evaluate(out, console=console, router_weights=_router_weights())
    else:
        from bench.quality import print_quality_table
        print_quality_table(report, verify_artifact(out).expert_names, console)
    return 0


# ---- parser ------------------------------------------------------------------------------------
def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinserve", description="Twin-Merging inference server: compress experts "
                                "into a shared backbone + low-rank exclusive deltas, route per prompt, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from zoo.shapes import SHAPES
    z = sub.add_parser("zoo", help="build the demo model zoo, or real-shape random checkpoints (zoo synthetic)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="twinserve zoo -o DIR: the demo zoo (tiny Llama base + one expert per synthetic "
                                   "task, trained here).\ntwinserve zoo synthetic --like SHAPE -o DIR: a random base "
                                   "with a real model's config and N experts\n(full fine-tunes or --lora adapters), "
                                   "streamed to disk a tensor at a time, plus DIR/recipe.yaml\n(and DIR/mergekit.yaml "
                                   "for full fine-tunes). Nothing is downloaded.",
                       epilog="examples:\n  twinserve zoo -o artifacts/zoo\n"
                              "  twinserve zoo synthetic --like qwen2.5-1.5b --experts 8 -o /data/q15\n"
                              "  twinserve zoo synthetic --like llama-3-8b --experts 4 --lora 16 -o /data/l8")
    z.add_argument("kind", nargs="?", choices=["demo", "synthetic"], default="demo",
                   help="demo (default) or synthetic")
    z.add_argument("-o", "--output", required=True, help="output directory (e.g. artifacts/zoo)")
    z.add_argument("--seed", type=int, default=0, help="seed for data and training / random weights (default 0)")
    z.add_argument("--force", action="store_true", help="demo: rebuild even if a valid cached zoo exists")
    z.add_argument("--like", default=None, metavar="SHAPE",
                   help=f"synthetic: the model shape, one of {', '.join(SHAPES)}")
    z.add_argument("--experts", type=positive_int, default=4, help="synthetic: number of experts (default 4)")
    z.add_argument("--lora", type=positive_int, default=None, metavar="RANK",
                   help="synthetic: experts are PEFT LoRA adapters of this rank on every linear layer of the "
                        "blocks (default: full fine-tunes)")
    z.add_argument("--layers", type=positive_int, default=None,
                   help="synthetic: keep only this many decoder blocks (default: the real depth)")
    z.add_argument("--delta-scale", type=float, default=0.01,
                   help="synthetic: ||δ_t|| / ||θ_0|| per tensor (default 0.01)")
    z.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="synthetic: checkpoint dtype (default bfloat16)")
    z.set_defaults(fn=cmd_zoo)

    b = sub.add_parser(
        "build", help="recipe (YAML/JSON) -> artifact: merge, exclusive deltas, truncated SVD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build an artifact from a recipe: merge the experts into the shared backbone θ*, take each "
                    "expert's exclusive\ndelta δ_t = θ_t − θ* and store it as truncated-SVD factors B_t A_t.\n\n"
                    "Recipe keys (YAML or JSON; relative paths resolve against the recipe's folder):\n"
                    "  base        base model dir (HF format)\n"
                    "  experts     list of {name, path, description, weight, density}; path is an HF model dir\n"
                    "              (full fine-tune) or a PEFT LoRA adapter dir\n"
                    "  merge       {method, lambda, density, normalize, rescale, consensus, gamma, base_weight, "
                    "seed}\n"
                    "              method: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,\n"
                    "              breadcrumbs_ties, average (mergekit's semantics; default ties)\n"
                    "  rank        {rank: 16} or {energy: 0.95, max_rank: 64}; include / exclude tensor globs\n"
                    "  compress    {budget: exclusive bytes as a fraction of the dense experts' bytes,\n"
                    "              factor_dtype: float32 | bfloat16 | float16 | int8 (default: dtype)}\n"
                    "  dtype       float32 | bfloat16 | float16;  tokenizer: dir (default: base)\n"
                    "A mergekit YAML (merge_method: ..., base_model, models, parameters) is accepted as is.\n\n"
                    "Parity gate: after the build every expert (and θ*) is served from the artifact and compared "
                    "with\ntransformers' own forward of θ* + δ̂_t; an implementation error above 1e-4 (fp32, "
                    "relative logits)\nremoves the artifact and exits 2. --skip-parity skips it (recorded in the "
                    "manifest).",
        epilog="example:\n"
               "  twinserve build deploy/recipes/llama-3-8b-example.yaml -o artifacts/llama3 --rank 32\n"
               "  twinserve build mergekit-ties.yaml -o artifacts/merged --skip-parity\n"
               "where deploy/recipes/llama-3-8b-example.yaml is:\n"
               "  base: /models/Meta-Llama-3-8B\n"
               "  experts:\n"
               "    - {name: sql, path: /adapters/llama3-8b-sql-lora}\n"
               "    - {name: summarize, path: /adapters/llama3-8b-summarize-lora}\n"
               "  merge: {method: dare_ties, density: 0.1, lambda: 1.0}\n"
               "  rank: {energy: 0.95, max_rank: 64}\n"
               "  dtype: bfloat16")
    b.add_argument("recipe", help="recipe file (see deploy/recipes/) or a mergekit config (merge_method: ...)")
    b.add_argument("-o", "--output", required=True, help="artifact directory (written atomically)")
    b.add_argument("--rank", type=positive_int, default=None, help="override the recipe's fixed rank")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="torch compute threads (default: torch's choice; on a busy 2-core machine 1 is often "
                        "several times faster than 2)")
    b.add_argument("--estimate", action="store_true",
                   help="print the estimate (peak memory, disk, time for this machine) and exit without building")
    b.add_argument("--skip-parity", action="store_true",
                   help="skip the parity gate (each expert served by the artifact through the engine's step vs "
                        "transformers' forward, streamed one decoder block at a time, so it fits wherever the build "
                        "does; it reads every weight about 5 times per expert). Recorded in the manifest")
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser(
        "eval", help="quality table: experts, base, TA, TIES, DARE, Twin (oracle and router)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score an artifact per task by exact match of greedy generations on the test split, for each "
                    "method:\n"
                    "  expert            each dense fine-tuned expert on its own task (upper bound)\n"
                    "  base              the base model\n"
                    "  task_arithmetic   static merges, hyper-parameters chosen on the validation split\n"
                    "  ties, dare_ties\n"
                    "  twin_oracle       the artifact with w = one-hot on the true task\n"
                    "  twin_router       the artifact with the router's w (needs a trained router)\n"
                    "The table (rows: tasks, columns: methods; a normalised row = mean of score / expert score) "
                    "and the\nstorage bytes are printed and written into the artifact's report.json.\n\n"
                    "Task splits: DIR/TASK/validation.jsonl and DIR/TASK/test.jsonl, one folder per expert, named "
                    "like the\nexpert; one JSON object per line, {\"prompt\": str, \"target\": str} (other "
                    "keys are ignored). A\nprediction counts when the greedy text, cut at <eos> or a newline and stripped, "
                    "equals target.\n"
                    "Errors (a missing split, an unknown method) exit 2 with a one-line message.",
        epilog="example:\n"
               "  twinserve eval artifacts/demo --tasks artifacts/zoo/tasks --limit 50 "
               "--methods expert,ties,twin_oracle,twin_router\n"
               "where artifacts/zoo/tasks/reverse/test.jsonl holds lines such as\n"
               "  {\"prompt\": \"reverse gwni=\", \"target\": \"inwg\"}")
    e.add_argument("artifact", help="artifact directory")
    e.add_argument("--tasks", default=None, help="task splits DIR/TASK/{validation,test}.jsonl "
                   "(default: tasks/ beside the artifact's base model)")
    e.add_argument("--limit", type=positive_int, default=None, help="at most this many prompts per task and split")
    e.add_argument("--methods", default=None, help="comma-separated subset of: expert, base, task_arithmetic, ties, "
                   "dare_ties, twin_oracle, twin_router (default: all)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="serving dtype to score (bfloat16: what bf16 serving costs in quality)")
    e.add_argument("--no-write", action="store_true", help="do not write the results into report.json")
    e.add_argument("--json", action="store_true", help="also print the quality section as JSON on stdout")
    e.add_argument("--sweep-ranks", default=None, metavar="R1,R2,...",
                   help="instead: rebuild the artifact's recipe at these ranks and score twin_oracle at each")
    e.add_argument("--sweep-budget", default=None, metavar="F1,F2,...",
                   help="instead: rebuild the artifact's recipe at these byte budgets (fractions of the dense "
                        "experts) and score twin_oracle / twin_router at each")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="build (or reuse) the demo zoo and artifact, train the router, evaluate")
    d.add_argument("--zoo", default="artifacts/zoo", help="zoo directory (default artifacts/zoo)")
    d.add_argument("-o", "--output", default="artifacts/demo", help="artifact directory (default artifacts/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--reeval", action="store_true", help="re-run the evaluation even if report.json has one")
    d.set_defaults(fn=cmd_demo)

    from bench.cli import register as register_bench
    from loadtest.cli import register as register_loadtest
    from router.cli import register as register_router
    from server.serve_cli import register as register_serve
    for register in (register_router, register_serve, register_loadtest, register_bench):
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except _known_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

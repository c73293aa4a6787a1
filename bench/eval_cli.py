"""`twinserve eval`: the quality table of an artifact (bench.quality), or a rank / byte-budget sweep.
Registered into the `twinserve` command line (cli.main) through ``register(sub)``."""
from __future__ import annotations

import argparse
import json

from rich.console import Console

from twin.errors import UsageError, positive_int

console = Console(stderr=True)


def cmd_eval(args) -> int:
    from bench.quality import METHODS, evaluate
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"--methods: unknown method(s) {', '.join(bad)} (known: {', '.join(METHODS)})")
    sweep = None
    if args.sweep_ranks:
        from bench.quality import rank_sweep
        points = _list(args.sweep_ranks, "--sweep-ranks", int, "integers", lambda r: r >= 1, "ranks must be >= 1")
        sweep = rank_sweep
    elif args.sweep_budget:
        from bench.quality import budget_sweep
        points = _list(args.sweep_budget, "--sweep-budget", float, "fractions", lambda f: 0 < f <= 1,
                       "fractions must be in (0, 1]")
        sweep = budget_sweep
    if sweep is not None:
        rows = sweep(args.artifact, points, tasks=args.tasks, limit=args.limit, console=console,
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


def _list(text: str, flag: str, cast, kind: str, ok, rule: str) -> list:
    """A comma-separated option as a list of ``cast`` values, each passing ``ok``; UsageError naming the flag."""
    try:
        values = [cast(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated {kind}, got {text!r}") from None
    if not all(ok(v) for v in values):
        raise UsageError(f"{flag}: {rule}")
    return values


def _router_weights():
    from router.evaluate import router_weight_fn
    return router_weight_fn


def register(sub) -> argparse.ArgumentParser:
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
    return e

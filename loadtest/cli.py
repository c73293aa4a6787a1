"""``twinserve loadtest``: stream a task mix at a running server and report latency, errors and accuracy.

Registered into the `twinserve` command line (cli.main) through ``register(sub)``. Bad input (unknown task in --mix, missing
files, bad numbers) prints ``error: ...`` on stderr and returns 2; a run in which no request
succeeded returns 1 (the report is still written); otherwise 0.
"""
from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .workload import DEFAULT_TASKS_DIR, LoadtestError

HELP = "stream a heterogeneous task mix at a running server; latency, errors, accuracy and routing report"
EPILOG = """\
examples:
  twinserve loadtest --url http://127.0.0.1:8000 --concurrency 8 --requests 200 --out artifacts/load.json
  twinserve loadtest --url http://127.0.0.1:8000 --rate 5 --duration 60 --mix reverse=2,upper=1 \\
      --out load.json --plot load.png

Requests go only to --url (no proxies from the environment, no redirects, no retries). The run stops at
--requests sent or --duration seconds, whichever comes first; requests in flight then finish, each
bounded by --timeout. Exit status: 0, 1 when no request succeeded, 2 on bad input."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", metavar="URL", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, metavar="N", default=100, help="send at most this many requests (default 100)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, metavar="C", default=None,
                      help="closed loop: this many requests in flight at all times (default 1)")
    load.add_argument("--rate", type=float, metavar="R", default=None,
                      help="open loop: Poisson arrivals at this many requests/s (seeded)")
    p.add_argument("--duration", type=float, metavar="S", default=300.0,
                   help="stop sending after this many seconds (default 300)")
    p.add_argument("--mix", default=None, metavar="TASK=P,...",
                   help="task proportions, e.g. reverse=2,upper=1 (default: all tasks equally)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, metavar="FILE.jsonl",
                     help="prompts from a JSONL file: rows {prompt, label|task[, target]}")
    src.add_argument("--tasks", default=None, metavar="DIR",
                     help=f"prompts from DIR/TASK/test.jsonl (default {DEFAULT_TASKS_DIR})")
    p.add_argument("--max-tokens", type=int, metavar="M", default=16, help="max_tokens per request (default 16)")
    p.add_argument("--model", metavar="NAME", default="demo", help="model name sent in each request (default demo)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("TWINSERVE_API_KEY"),
                   help="bearer token (default: $TWINSERVE_API_KEY); never written to the report")
    p.add_argument("--seed", type=int, metavar="SEED", default=0, help="seed for the prompt draw and the arrivals (default 0)")
    p.add_argument("--timeout", type=float, metavar="S", default=60.0,
                   help="per-request limit in seconds, stream included (default 60)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="write the JSON report here (atomically)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also write a PNG: latency CDF per task and the routing confusion heatmap")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("loadtest", help=HELP, description=HELP[0].upper() + HELP[1:] + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=cmd_loadtest)
    return p


def cmd_loadtest(args, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    try:
        return _run(args, console)
    except LoadtestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, console: Console) -> int:
    from .report import plot, print_summary, summarize, write_json
    from .runner import RunConfig, run
    from .workload import build_workload

    cfg = RunConfig(url=args.url, requests=args.requests, duration=args.duration, concurrency=args.concurrency,
                    rate=args.rate, max_tokens=args.max_tokens, model=args.model, api_key=args.api_key,
                    seed=args.seed, timeout=args.timeout).validate()
    workload = build_workload(args.mix, data=args.data, tasks_dir=args.tasks)
    for name in ("out", "plot"):
        path = getattr(args, name)
        if path is not None and os.path.isdir(path):
            raise LoadtestError(f"--{name} is a directory: {path}")

    load = f"rate {cfg.rate:g}/s" if cfg.mode == "open" else f"concurrency {cfg.concurrency}"
    console.print(f"loadtest {cfg.url}: {load}, up to {cfg.requests} requests / {cfg.duration:g} s, "
                  f"mix {', '.join(f'{t}={w:.2f}' for t, w in workload.weights.items())}")
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=args.no_progress)
    errors = 0
    with progress:
        bar = progress.add_task("requests", total=cfg.requests)

        def on_result(res) -> None:
            nonlocal errors
            errors += not res.ok
            progress.update(bar, advance=1, description=f"requests ({errors} errors)" if errors else "requests")

        outcome = run(workload, cfg, on_result)

    report = summarize(outcome.results, outcome.wall_s, config=cfg.public(), workload=workload.describe(),
                       stopped_by=outcome.stopped_by)
    write_json(report, args.out)
    print_summary(report, console)
    console.print(f"[green]report written[/] {args.out}")
    if args.plot:
        plot(report, args.plot)
        console.print(f"[green]plot written[/] {args.plot}")
    return 0 if report["summary"]["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (``python -m loadtest``), the same options as ``twinserve loadtest``."""
    p = argparse.ArgumentParser(prog="twinserve-loadtest", description=HELP, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=cmd_loadtest)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)

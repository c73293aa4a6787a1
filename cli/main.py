"""`twinserve` entry point: builds the parser from every package's ``register(sub)`` and runs the command.

Bad input exits with code 2 and a one-line ``error: <message>``: every domain error derives from
twin.errors.TwinserveError and is caught here, once.
"""
from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from twin.errors import TwinserveError

console = Console(stderr=True)


def read_expert_state(manifest, t: int):
    """Mode `expert` of `twinserve serve`: expert t's full state, read from the artifact's checkpoint sources
    by compression/ (injected into server/, which does not import compression/)."""
    from compression.experts import read_expert_state as read
    return read(manifest, t)


def probe_artifact(manifest) -> None:
    """`twinserve serve` of an artifact no parity gate certified: compression's probe of its model type
    (injected into server/ as the expert reader is)."""
    from compression.probe import probe_artifact as probe
    probe(manifest)


def evaluate_demo(artifact, again: bool, console) -> None:
    """`twinserve demo`'s last step: bench's quality eval routed by the artifact's router (``again``), or the table
    report.json already holds (zoo/ builds the demo, bench/ evaluates it; neither imports the other's way up)."""
    from bench.quality import evaluate, print_quality_table
    from router.evaluate import router_weight_fn
    from twin.artifact import read_report, verify_artifact

    if again:
        evaluate(artifact, console=console, router_weights=router_weight_fn)
    else:
        print_quality_table(read_report(artifact), verify_artifact(artifact).expert_names, console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinserve", description="Twin-Merging inference server: compress experts "
                                "into a shared backbone + low-rank exclusive deltas, route per prompt, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from bench.cli import register as register_bench
    from bench.eval_cli import register as register_eval
    from compression.cli import register as register_build
    from loadtest.cli import register as register_loadtest
    from router.cli import register as register_router
    from server.serve_cli import register as register_serve
    from zoo.cli import register as register_zoo
    from zoo.demo import register as register_demo
    for register in (register_zoo, register_build, register_eval, register_router):
        register(sub)
    register_demo(sub, evaluate=evaluate_demo)
    register_serve(sub, expert_reader=read_expert_state, prober=probe_artifact)
    for register in (register_loadtest, register_bench):
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
    except TwinserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`twinserve zoo`: the demo model zoo, or real-shape random checkpoints (`twinserve zoo synthetic`).
Registered into the `twinserve` command line (cli.main) through ``register(sub)``."""
from __future__ import annotations

import argparse

from rich.console import Console

from twin.errors import UsageError, positive_int

console = Console(stderr=True)


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


def register(sub) -> argparse.ArgumentParser:
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
    return z

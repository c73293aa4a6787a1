"""`twinserve train-router`."""
from __future__ import annotations

from rich.console import Console


def cmd_train_router(args) -> int:
    from twin.loading import load_artifact

    from .train import print_router_report, read_labelled, save_router, train_router
    console = Console(stderr=True)
    art = load_artifact(args.artifact, device="cpu", dtype="float32")
    rows = read_labelled(args.data, art.expert_names, max_per_task=args.max_per_task, seed=args.seed)
    layer = args.layer if args.layer == "auto" else int(args.layer)
    prefix = {"auto": "auto", "all": None}[args.prefix_tokens] if args.prefix_tokens in ("auto", "all") \
        else int(args.prefix_tokens)
    router, report = train_router(art, rows, layer=layer, hidden=args.hidden, heldout=args.heldout,
                                  epochs=args.epochs, seed=args.seed, fallback=args.fallback,
                                  min_confidence=args.min_confidence, prefix_tokens=prefix, console=console)
    save_router(args.artifact, router, report)
    print_router_report(report, art.expert_names, console)
    console.print(f"[green]router written[/] {args.artifact}/router.safetensors")
    return 0


def _layer(v: str) -> str:
    if v != "auto" and not v.isdigit():
        import argparse
        raise argparse.ArgumentTypeError("must be 'auto' or a layer number")
    return v


def _prefix(v: str) -> str:
    if v not in ("auto", "all") and not (v.isdigit() and int(v) >= 1):
        import argparse
        raise argparse.ArgumentTypeError("must be 'auto', 'all' or a positive number of tokens")
    return v


def _fraction(v: str) -> float:
    import argparse
    f = float(v)
    if not 0.0 < f < 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return f


def register(sub) -> None:
    p = sub.add_parser("train-router", help="train the prompt router from labelled prompts; stored in the artifact",
                       description="Train the router that weights the experts per prompt: features are θ*'s hidden "
                                   "state after its first L_r blocks averaged over the prompt's first K tokens; a small "
                                   "MLP maps them to w. L_r and K are searched (the cheapest pair as accurate as the "
                                   "best on held-out prompts), the fallback threshold is calibrated, and the router is "
                                   "written into the artifact (a new manifest, atomically).")
    p.add_argument("artifact", help="artifact directory (updated atomically)")
    p.add_argument("--data", required=True, help="JSONL with fields prompt and task (task = an expert name)")
    p.add_argument("--max-per-task", type=int, default=200, help="use at most N prompts per task (default 200)")
    p.add_argument("--layer", type=_layer, default="auto",
                   help="feature layer L_r, or 'auto' to pick the shallowest layer as accurate as the best")
    p.add_argument("--prefix-tokens", type=_prefix, default="auto",
                   help="the prompt head K the features pool over: N tokens, 'all', or 'auto' to pick the cheapest "
                        "head as accurate as the best (default); a continuation appended after the head does not "
                        "change the routing, and the router pass runs at most K tokens")
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width (default 256)")
    p.add_argument("--heldout", type=_fraction, default=0.2, help="held-out fraction for accuracy (default 0.2)")
    p.add_argument("--epochs", type=int, default=200, help="full-batch training epochs (default 200)")
    p.add_argument("--fallback", choices=["backbone", "uniform", "none"], default="backbone",
                   help="where uncertain prompts go (default backbone: shared knowledge only)")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="top weight below this counts as uncertain (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the MLP's init (default 0)")
    p.set_defaults(fn=cmd_train_router)

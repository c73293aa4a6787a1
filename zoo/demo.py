"""`twinserve demo` (`make demo`): zoo (cached) -> artifact (cached, parity-gated) -> router -> eval.
Registered into the `twinserve` command line (cli.main) through ``register(sub, evaluate=...)``: the eval
step is bench's (`twinserve eval`), which the composition root passes in, so zoo/ never imports bench/."""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def cmd_demo(args, evaluate: Callable[[Path, bool, Console], None]) -> int:
    """zoo (cached) -> artifact (cached, parity-gated) -> router -> eval. ``evaluate(artifact, again, console)``
    runs the quality eval (``again``: even when report.json already has one) or prints the stored table."""
    from compression.cli import build_with_parity
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
        refresh_chat_template(out, m)
    else:
        build_with_parity(recipe, out, zoo_fingerprint=info["fingerprint"])
    ensure_demo_router(out, Path(args.zoo), console=console)
    evaluate(out, "quality" not in read_report(out) or args.reeval, console)
    return 0


def refresh_chat_template(artifact: Path, manifest) -> None:
    """A demo artifact cached before its chat template emitted <bos> gets the current template (the artifact
    is updated atomically and re-checksummed); chat prompts then tokenise as completion prompts do."""
    from twin.artifact import update_artifact
    from zoo.tokenizer import CHAT_TEMPLATE, make_char_tokenizer

    rel = f"{manifest.tokenizer}/{CHAT_TEMPLATE}"
    template = make_char_tokenizer().chat_template
    path = artifact / rel
    if not path.is_file() or path.read_text() != template:
        update_artifact(artifact, {rel: template})
        console.print(f"chat template updated: {path}")


def ensure_demo_router(artifact: Path, zoo: Path, console: Console | None = None) -> None:
    """`make demo`: train the router from the zoo's router split unless the artifact already has one of the
    current format (an older router is retrained: a format-1 router pools every prompt token)."""
    from router.model import ROUTER_FORMAT
    from router.train import print_router_report, save_router, train_router
    from twin.artifact import ROUTER, verify_artifact
    from twin.loading import load_artifact
    from zoo.build import load_task_split

    console = console or Console(stderr=True)
    section = verify_artifact(artifact).router
    if section is not None and section.config.get("version", 1) == ROUTER_FORMAT:
        console.print(f"[green]router cache hit[/] {artifact / ROUTER}")
        return
    if section is not None:
        console.print(f"router format {section.config.get('version', 1)} → {ROUTER_FORMAT}: retraining {artifact / ROUTER}")
    art = load_artifact(artifact, device="cpu", dtype="float32", verify=False)
    rows = load_task_split(zoo, "router", art.expert_names)
    router, report = train_router(art, rows, console=console)
    save_router(artifact, router, report)
    print_router_report(report, art.expert_names, console)


def register(sub, evaluate: Callable[[Path, bool, Console], None]) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help="build (or reuse) the demo zoo and artifact, train the router, evaluate",
                       description="The demo end to end (what `make demo` and `make run` run): a tiny Llama and 8 "
                                   "single-task experts (the zoo, cached by its settings), the artifact built from "
                                   "them with the parity gate (cached by recipe and zoo), the router trained on the "
                                   "zoo's router split, and the quality table of `twinserve eval`.")
    d.add_argument("--zoo", default="artifacts/zoo", help="zoo directory (default artifacts/zoo)")
    d.add_argument("-o", "--output", default="artifacts/demo", help="artifact directory (default artifacts/demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the zoo's data and training (default 0)")
    d.add_argument("--reeval", action="store_true", help="re-run the evaluation even if report.json has one")
    d.set_defaults(fn=functools.partial(cmd_demo, evaluate=evaluate))
    return d

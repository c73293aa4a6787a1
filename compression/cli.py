"""`twinserve build`: recipe -> artifact, with the early refusals (base config, probe, preflight) and the
parity gate. Registered into the `twinserve` command line (cli.main) through ``register(sub)``."""
from __future__ import annotations

import argparse

from rich.console import Console

from twin.errors import UsageError, positive_int

console = Console(stderr=True)


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
    """Refuse an unserveable base in seconds, build, then run the parity gate on the artifact before it is
    published (a build whose served model differs from transformers leaves nothing at ``out``, and an
    artifact already there untouched) and record its result and the phase times."""
    import time

    from compression.build import build_artifact
    from compression.experts import expert_tensors
    from compression.parity import check_parity, record_parity
    check_base_supported(recipe.base)   # before any merge work: seconds, not the whole build
    t0 = time.perf_counter()
    quiet = build_kwargs.get("quiet", False)

    def phase(what: str) -> None:
        if not quiet:
            console.print(f"[dim]{time.perf_counter() - t0:8.1f} s[/] {what}")

    probe_recipe(recipe, phase)

    phase("merge + factor (θ* and the δ_t factors, streamed to the artifact's shards)")

    def gate(tmp) -> None:
        """On the finished artifact in its temp dir: it is renamed into place only after this passes."""
        if skip_parity:
            record_parity(tmp, None, skipped=True, extra={"estimate": estimate})
            console.print("[yellow]parity gate skipped (--skip-parity, recorded in the manifest)[/]")
            return
        t_gate = time.perf_counter()
        phase("parity gate (served step vs transformers, one decoder block resident at a time)")
        report = check_parity(tmp, expert_tensors, console=None if quiet else console,
                              progress=lambda what: phase(f"  gate: {what}"))
        gate_s = round(time.perf_counter() - t_gate, 2)
        record_parity(tmp, report, extra={"gate_s": gate_s, "total_s": round(time.perf_counter() - t0, 2),
                                          "estimate": estimate})
        phase(f"done: gate {gate_s:.0f} s")

    build_artifact(recipe, out, before_publish=gate, **build_kwargs)


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


def _method_list() -> str:
    from .merging import MERGE_METHODS

    names = list(MERGE_METHODS)
    return ",\n              ".join(", ".join(names[i:i + 6]) for i in range(0, len(names), 6))


def register(sub) -> argparse.ArgumentParser:
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
                    f"              method: {_method_list()} (mergekit's semantics; default ties)\n"
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
    return b

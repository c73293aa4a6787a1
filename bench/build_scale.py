"""Build at real sizes, side by side with mergekit, in one command; the checkpoints are made on the fly and
deleted afterwards.

    python -m bench.build_scale --like qwen2.5-1.5b --experts 8 --mergekit /opt/mk/bin/mergekit-yaml \\
        --workdir /data/scale --out scale.json

1. ``twinserve zoo synthetic`` writes the base and the experts (full fine-tunes, or ``--lora R`` adapters);
2. ``twinserve build`` (estimate, merge + factor, write, parity gate) runs as a child process;
3. with ``--mergekit``, ``mergekit-yaml`` runs the same TIES merge of the same checkpoints (full fine-tunes);
4. a table: wall seconds and peak RSS of each (from the kernel's rusage of each child, what
   ``/usr/bin/time -v`` reports), the ratio, the build's own phase times and its estimate.
Every child gets ``--threads`` compute threads (OMP_NUM_THREADS too, for mergekit).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_child(cmd: list[str], log: Path, threads: int, cwd: Path | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (bytes) and the exit code, from wait4's rusage."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"cmd": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": os.waitstatus_to_exitcode(status), "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.build_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", default="qwen2.5-0.5b", help="shape (twinserve zoo synthetic --like; default qwen2.5-0.5b)")
    p.add_argument("--experts", type=int, default=4, help="number of experts (default 4)")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="PEFT LoRA experts of rank R (default: full)")
    p.add_argument("--layers", type=int, default=None, help="cut the depth (default: the real depth)")
    p.add_argument("--threads", type=int, default=1, help="compute threads for each child (default 1)")
    p.add_argument("--mergekit", default=None, metavar="MERGEKIT_YAML",
                   help="path of mergekit-yaml (its own venv): run mergekit's TIES on the same checkpoints")
    p.add_argument("--workdir", required=True, help="where checkpoints and artifacts go (deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, art, mk = work / "checkpoints", work / "artifact", work / "mergekit-out"
    beside = Path(sys.executable).parent / "twinserve"      # the venv's console script, PATH or not
    twinserve = [str(beside)] if beside.exists() else [shutil.which("twinserve") or "twinserve"]
    results: dict = {"like": args.like, "experts": args.experts, "lora": args.lora, "layers": args.layers,
                     "threads": args.threads}
    try:
        gen = [*twinserve, "zoo", "synthetic", "--like", args.like, "--experts", str(args.experts), "-o", str(ckpt)]
        gen += ["--lora", str(args.lora)] if args.lora else []
        gen += ["--layers", str(args.layers)] if args.layers else []
        if not (ckpt / "recipe.yaml").is_file():
            console.print(f"writing checkpoints: {' '.join(gen)}")
            results["generate"] = run_child(gen, work / "generate.log", args.threads)
        console.print("twinserve build …")
        results["twinserve"] = run_child([*twinserve, "build", str(ckpt / "recipe.yaml"), "-o", str(art), "--threads",
                                          str(args.threads)], work / "build.log", args.threads)
        report = art / "report.json"
        if report.is_file():
            b = json.loads(report.read_text())
            results["phases"] = b["build"].get("phases")
            results["estimate"] = b["build"].get("estimate")
            results["parity"] = {k: v["implementation_error"] for k, v in b["parity"]["experts"].items()}
        if args.mergekit and not args.lora:
            console.print("mergekit-yaml …")
            results["mergekit"] = run_child([args.mergekit, "mergekit.yaml", str(mk), "--lazy-unpickle", "--copy-tokenizer",
                                             "--no-cuda", "--device", "cpu", "--random-seed", "0",
                                             "--no-write-model-card"],   # the card looks paths up on the hub
                                            work / "mergekit.log", args.threads, cwd=ckpt)
    finally:
        if not args.keep:
            for d in (ckpt, art, mk):
                shutil.rmtree(d, ignore_errors=True)
    print_results(results, console)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if results["twinserve"]["exit"] == 0 else 1


def print_results(r: dict, console: Console) -> None:
    t = Table(title=f"{r['like']} × {r['experts']} {'LoRA r' + str(r['lora']) if r['lora'] else 'full fine-tunes'}, "
                    f"{r['threads']} thread(s)")
    for col in ("what", "wall", "peak RSS", "exit"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for key, label in (("twinserve", "twinserve build (merge + factor + write + gate)"),
                       ("mergekit", "mergekit-yaml TIES (merge only)")):
        if key in r:
            x = r[key]
            t.add_row(label, f"{x['seconds']:.0f} s", f"{x['peak_rss_bytes'] / 2**30:.2f} GiB", str(x["exit"]))
    if "mergekit" in r:
        t.caption = f"wall ratio twinserve / mergekit: {r['twinserve']['seconds'] / r['mergekit']['seconds']:.2f}"
    console.print(t)
    if r.get("phases"):
        console.print(f"phases: {r['phases']}")


if __name__ == "__main__":
    sys.exit(main())

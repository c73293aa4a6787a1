"""lm-eval multiple choice on the demo through a live server: routed (``model=NAME``) beside pinned
(``model=NAME:<task>`` on that task's documents only), per task and overall.

Runs lm-evaluation-harness's ``lm_eval`` (from its own environment) as a subprocess, once routed and once per
task pinned (``--samples`` selects that task's documents), over the task in ``bench/lm_eval_tasks``
with its data files pointed at ``--zoo``. Every score comes from lm-eval's own per-sample output.

    python -m bench.lm_eval_mc --lm-eval LM_EVAL --url http://127.0.0.1:8011/v1/completions \\
        --tokenizer artifacts/demo/tokenizer --zoo artifacts/zoo
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = "twinserve_demo_mc"
GEN_TASK = "twinserve_demo_gen"


def task_dir(zoo: Path, out: Path) -> Path:
    """A copy of the task folder whose data files are ``zoo``'s test splits (absolute paths)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS_DIR / "utils.py", out / "utils.py")
    for task in (TASK, GEN_TASK):
        text = (TASKS_DIR / f"{task}.yaml").read_text()
        text = text.replace("artifacts/zoo/tasks/*/test.jsonl", str(zoo.resolve() / "tasks" / "*" / "test.jsonl"))
        (out / f"{task}.yaml").write_text(text)
    return out


def run_lm_eval(lm_eval: str, model: str, url: str, tokenizer: str, include: Path, out: Path,
                samples: list[int] | None = None, limit: int | None = None, concurrent: int = 2,
                task: str = TASK) -> list[dict]:
    """One lm_eval run of ``task``; returns its per-sample records (doc and the metric: acc or exact_match)."""
    args = [lm_eval, "run", "--model", "local-completions", "--model_args",
            (f"model={model},base_url={url},tokenizer_backend=huggingface,tokenizer={tokenizer},"
             f"add_bos_token=True,max_length=128,num_concurrent={concurrent}"),
            "--batch_size", "16", "--tasks", task, "--include_path", str(include),
            "--output_path", str(out), "--log_samples"]
    if samples is not None:
        args += ["--samples", json.dumps({task: samples})]
    elif limit:
        args += ["--limit", str(limit)]
    env = dict(os.environ, PYTHONPATH=str(TASKS_DIR.parent.parent))
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lm_eval wrote no samples under {out}")
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def by_task(records: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in records:
        out.setdefault(r["doc"]["task"], []).append(float(r["acc"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own environment)")
    p.add_argument("--url", required=True, help="the server's /v1/completions URL")
    p.add_argument("--tokenizer", required=True, help="the artifact's tokenizer folder")
    p.add_argument("--zoo", required=True, type=Path, help="the demo zoo (its tasks/*/test.jsonl)")
    p.add_argument("--model", default="demo", help="served model name (default demo)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default all)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.add_argument("--gen", action="store_true", help="also the generate_until task, routed (exact match)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        include = task_dir(a.zoo, tmp / "tasks")
        routed = run_lm_eval(a.lm_eval, a.model, a.url, a.tokenizer, include, tmp / "routed")
        routed_tasks = by_task(routed)
        pinned_tasks: dict[str, list[float]] = {}
        for task in sorted(routed_tasks):
            idx = [r["doc_id"] for r in routed if r["doc"]["task"] == task]
            idx = idx[:a.limit] if a.limit else idx
            recs = run_lm_eval(a.lm_eval, f"{a.model}:{task}", a.url, a.tokenizer, include, tmp / f"pinned_{task}",
                               samples=idx)
            assert all(r["doc"]["task"] == task for r in recs), "--samples selected another task's documents"
            pinned_tasks[task] = [float(r["acc"]) for r in recs]
            if a.limit:
                routed_tasks[task] = routed_tasks[task][:a.limit]
        gen = None
        if a.gen:
            recs = run_lm_eval(a.lm_eval, a.model, a.url, a.tokenizer, include, tmp / "gen", limit=a.limit,
                               task=GEN_TASK)
            gen = sum(float(r["exact_match"]) for r in recs) / max(1, len(recs))

    def mean(xs):
        return sum(xs) / max(1, len(xs))
    result = {"tasks": {t: {"routed": round(mean(routed_tasks[t]), 4), "pinned": round(mean(pinned_tasks[t]), 4),
                            "docs": len(routed_tasks[t])} for t in sorted(routed_tasks)}}
    r_all = mean([x for xs in routed_tasks.values() for x in xs])
    p_all = mean([x for xs in pinned_tasks.values() for x in xs])
    result.update(routed=round(r_all, 4), pinned=round(p_all, 4), ratio=round(r_all / max(p_all, 1e-9), 4))
    if gen is not None:
        result["gen_exact_match_routed"] = round(gen, 4)
    print(f"{'task':10s} {'routed':>7s} {'pinned':>7s} docs")
    for t, v in result["tasks"].items():
        print(f"{t:10s} {v['routed']:7.4f} {v['pinned']:7.4f} {v['docs']}")
    print(f"{'all':10s} {r_all:7.4f} {p_all:7.4f}  routed/pinned {result['ratio']:.4f}")
    if gen is not None:
        print(f"{GEN_TASK} (routed) exact_match {gen:.4f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

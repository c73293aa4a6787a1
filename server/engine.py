"""The async engine: glue between HTTP (events per request), the scheduler and the model runner.

Every tick runs in one worker thread, so the event loop stays free for HTTP:
  1. ``Scheduler.schedule`` decides the step: rows that were cancelled or timed out leave; running rows
     decode one token; prompts are prefilled in chunks within the per-step token budget;
  2. newly admitted requests are routed (``ModelRunner.route``: one batched truncated pass);
  3. ``ModelRunner.step`` runs the whole plan as one forward (decode tokens and prefill chunks together)
     and samples the rows that need a token;
  4. the engine appends tokens, detokenises incrementally, applies stop sequences and emits events.
Events a request receives (server/events.py), in order: Routed, PromptLogprobs when it asked for them,
TextDelta per emitted piece, then Finished or Failed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from router.model import Router
from twin.loading import LoadedArtifact

from .errors import APIError, Draining, InternalError, NotReady, QueueFull, RequestTimeout
from .events import Event, Failed, Finished, PromptLogprobs, Routed, TextDelta
from .metrics import Metrics
from .modes import MODES
from .runner import ModelRunner
from .sampling import SamplingParams, TokenLogprob, detokenize_step, find_stop, safe_prefix_len
from .scheduler import Plan, QueueFullError, Scheduler
from .settings import Settings
from .specs import RoutingSpec

__all__ = ["Engine", "Request", "RoutingSpec", "SamplingParams"]

log = logging.getLogger("twinserve.engine")
_ids = itertools.count()
DEFAULT_MAX_LEN = 2048


@dataclass(eq=False)  # identity: `in`/remove on running lists must never compare fields (tensors inside)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    routing: RoutingSpec
    deadline: float
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # runtime state, owned by the engine thread (tensors live in the runner, keyed by id)
    slot: int = -1
    num_computed: int = 0    # prompt tokens in the KV cache (the scheduler advances it chunk by chunk)
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    text: str = ""
    prefix_offset: int = 0   # incremental detokenisation window: generated[prefix_offset:read_offset]
    read_offset: int = 0     # is already in text and gives the next token its context
    next_token: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)   # not yet emitted (params.logprobs set)
    ended_on_eos: bool = False   # the eos token counts as a completion token, as in the OpenAI API
    first_token_at: float | None = None
    admitted_at: float | None = None

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, art: LoadedArtifact, router: Router | None, settings: Settings, metrics: Metrics,
                 runner: ModelRunner | None = None, memory_plan=None):
        self.art, self.router, self.settings, self.metrics = art, router, settings, metrics
        self.tokenizer = art.tokenizer
        self.names = art.expert_names
        self.mode = MODES[settings.mode]
        self.max_batch = 1 if self.mode.per_request else settings.max_batch_size
        ctx = art.config.max_position_embeddings
        # KV cache: slots × max_len positions (a KV budget sets max_len: server.memory.plan)
        self.max_len = memory_plan.positions if memory_plan is not None else \
            min(settings.max_model_len or DEFAULT_MAX_LEN, ctx)
        self.scheduler = Scheduler(self.max_batch, settings.max_tokens_per_step, settings.max_queue,
                                   per_request=self.mode.per_request)
        self.runner = runner or ModelRunner(art, router, self.mode, self.max_batch, self.max_len,
                                            settings.materialize_cache)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinserve-engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.accepting = False
        self.ready = False
        self._drain_deadline: float | None = None
        self._stopped = False
        self.eos_ids = art.eos_token_ids

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def free_slots(self) -> list[int]:
        return sorted(self.scheduler._free)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.warmup, self.tokenizer)
        self.accepting = True
        self.ready = True
        self._task = asyncio.create_task(self._loop(), name="twinserve-engine")

    async def drain(self, drain_s: float | None = None, abort: Callable[[], bool] | None = None) -> bool:
        """Stop admitting and wait until every admitted request (running or queued) has finished, up to
        drain_s (default: drain_timeout_s) from the first call, or until ``abort()``. True when idle.

        While draining, ``accepting`` is False and ``ready`` still True (/ready answers 503 "draining")."""
        self.accepting = False
        limit = time.monotonic() + (self.settings.drain_timeout_s if drain_s is None else drain_s)
        if self._drain_deadline is None or (drain_s is not None and limit < self._drain_deadline):
            self._drain_deadline = limit   # an explicit drain_s can only shorten a drain under way
        while not self.scheduler.idle and time.monotonic() < self._drain_deadline and not (abort and abort()):
            await asyncio.sleep(0.05)
        return self.scheduler.idle

    async def stop(self, drain_s: float | None = None) -> None:
        """Drain (see ``drain``; a drain already under way keeps its deadline), then stop the loop; requests
        still admitted get a "shutting down" error. Once only: later calls return at once."""
        if self._stopped:
            return
        await self.drain(drain_s)
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in self.scheduler.drain():
            self.runner.release(req)
            req.emit(Failed(NotReady("server is shutting down")))
        self._executor.shutdown(wait=True)
        self.runner.close()  # free the KV cache now, not when the last reference goes

    # ---- API for routes -------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not self.accepting:
            if self.ready:   # started, now draining for shutdown
                raise Draining("draining: the server is shutting down")
            raise NotReady("server is not accepting requests (starting or shutting down)")
        try:
            self.scheduler.submit(req)
        except QueueFullError:
            raise QueueFull(f"request queue is full ({self.settings.max_queue} waiting); retry later",
                            headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(len(self.waiting))
        self._wake.set()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self._wake.set()

    @property
    def load(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.running), "max_batch_size": self.max_batch}

    # ---- loop -----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.scheduler.idle:
                self._wake.clear()
                await self._wake.wait()
            try:
                await loop.run_in_executor(self._executor, self._step)
            except Exception as e:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed")
                for req in list(self.running):
                    self._release(req)
                    req.emit(Failed(InternalError(f"engine error: {type(e).__name__}")))
            self.metrics.set_running(len(self.running))
            self.metrics.queue_depth.set(len(self.waiting))

    def _step(self) -> None:
        now = time.perf_counter()
        plan = self.scheduler.schedule(now)
        for req in plan.cancelled:
            self._finish(req, "cancelled")
        for req in plan.expired:
            if req in plan.queued_expired:
                req.emit(Failed(RequestTimeout("request timed out while queued")))
            else:
                self._fail(req, RequestTimeout(f"request exceeded the {self.settings.request_timeout_s:g} s timeout"))
        if plan.admitted:
            for req in plan.admitted:
                req.admitted_at = now
                self.metrics.queue_wait.observe(now - req.arrival)
            self._route(plan)
        if plan.empty:
            return
        t0 = time.perf_counter()
        out = self.runner.step(plan)
        phase = "mixed" if out.prefill_tokens and out.decode_tokens else "prefill" if out.prefill_tokens else "decode"
        self.metrics.step_seconds.labels(phase).observe(time.perf_counter() - t0)
        self.metrics.step_tokens.labels(phase).inc(out.prefill_tokens + out.decode_tokens)
        self.metrics.prompt_tokens.inc(out.prefill_tokens)
        for req, records in out.prompt_logprobs:
            req.emit(PromptLogprobs(records))
        self._accept(out.sampled)

    def _route(self, plan: Plan) -> None:
        infos = self.runner.route(plan.admitted, self.settings.router_top_k, self.settings.router_temperature)
        routed = [r for r in plan.admitted if r.id in infos]
        for r in routed:
            d = infos[r.id]
            if d.source == "router":
                self.metrics.router_latency.observe(d.router_ms / 1000)
            for n, x in d.weights.items():
                if x:
                    self.metrics.expert_mass.labels(n).inc(x)
            if d.fallback:  # served by the fallback, not by the router's best guess
                self.metrics.fallbacks.inc()
                self.metrics.record_route(None)
            else:
                if d.top_expert:
                    self.metrics.expert_top1.labels(d.top_expert).inc()
                self.metrics.record_route(d.top_expert or "(backbone)")
            r.emit(Routed(d))

    def _accept(self, sampled: list[tuple[Request, int, TokenLogprob | None]]) -> None:
        now = time.perf_counter()
        for r, tok, rec in sampled:
            if r.first_token_at is None:
                r.first_token_at = now
                self.metrics.ttft.observe(now - r.arrival)
            if r.params.max_tokens == 0:   # echo scoring: the prompt's logprobs were the whole answer
                self._finish(r, "length")
                continue
            if tok in self.eos_ids and not r.params.ignore_eos:
                self._detokenize(r, final=True)   # held-back bytes of a partial character are output too
                r.ended_on_eos = True
                self.metrics.generation_tokens.inc()   # usage bills the eos token: the counter counts it too
                if rec is not None:  # the eos token is reported (clients such as lm-eval count on it)
                    rec.offset = len(r.text)
                    r.logprobs.append(rec)
                self._finish(r, "stop")
                continue
            if rec is not None:
                rec.offset = len(r.text)
                r.logprobs.append(rec)
            r.generated.append(tok)
            r.next_token = tok
            self.metrics.generation_tokens.inc()
            self._detokenize(r)
            cut = find_stop(r.text, r.params.stop)
            if cut is not None:
                r.text = r.text[:cut]
                self._finish(r, "stop")
            elif len(r.generated) >= r.params.max_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_len:
                self._detokenize(r, final=True)
                self._finish(r, "length")
            else:
                safe = safe_prefix_len(r.text, r.params.stop)
                if safe > r.sent:
                    self._emit_text(r, safe)

    def _emit_text(self, r: Request, upto: int) -> None:
        """Send text[sent:upto] with the logprobs of the tokens that start before ``upto``."""
        n = sum(1 for rec in r.logprobs if rec.offset is not None and rec.offset < upto)
        if upto == len(r.text):
            n = len(r.logprobs)
        r.emit(TextDelta(r.text[r.sent:upto], r.logprobs[:n]))
        r.logprobs = r.logprobs[n:]
        r.sent = upto

    def _detokenize(self, r: Request, final: bool = False) -> None:
        delta, r.prefix_offset, r.read_offset = detokenize_step(self.tokenizer, r.generated, r.prefix_offset,
                                                                r.read_offset, final)
        r.text += delta

    # ---- leaving the batch ----------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        self.scheduler.release(req)
        self.runner.release(req)   # drops the row's tensors (and its hold on a fused model)

    def _finish(self, req: Request, reason: str) -> None:
        self._release(req)
        now = time.perf_counter()
        self.metrics.finished.labels(reason).inc()
        if reason == "cancelled":
            return
        if len(req.text) > req.sent or req.logprobs:
            self._emit_text(req, len(req.text))
        e2e = now - req.arrival
        self.metrics.e2e.observe(e2e)
        n = len(req.generated) + req.ended_on_eos
        if n > 1 and req.first_token_at is not None:
            self.metrics.tpot.observe((now - req.first_token_at) / (n - 1))
        self.metrics.record_done(None if req.first_token_at is None else req.first_token_at - req.arrival, e2e)
        req.emit(Finished(reason, len(req.prompt_ids), n))

    def _fail(self, req: Request, err: APIError) -> None:
        self._release(req)
        self.metrics.finished.labels(err.code or "error").inc()
        req.emit(Failed(err))


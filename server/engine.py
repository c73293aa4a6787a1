"""Async engine with continuous batching and per-row expert weights.

Requests wait in a bounded queue. Every engine step (run in one worker thread so the event loop
stays free for HTTP) does, in order:
  1. drop cancelled and timed-out rows and free their KV slots;
  2. admit waiting requests while slots and the prefill token budget allow; route the ones without
     explicit weights in one batched truncated pass; prefill them together (each row with its own w)
     and sample their first token;
  3. one decode step over the rows that were already running, each row with its own w.
Admitted rows join the decode batch at the next step; finished rows leave at once.
Events a request receives, in order: ("routing", dict), ("prompt_logprobs", list) when it asked for
them, ("text", (str, [TokenLogprob])) per emitted piece, then ("done", dict) or ("error", APIError).
Modes `materialize` and `expert` fuse a dense model per request (LRU cache) and run batch 1.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from router.features import pooled_features
from router.model import Router
from twin.generate import length_buckets
from twin.loading import LoadedArtifact
from twin.model import TwinModel

from .errors import APIError, InternalError, NotReady, QueueFull, RequestTimeout
from .metrics import Metrics
from .sampling import (
    SamplingParams,
    TokenLogprob,
    detokenize_step,
    find_stop,
    make_generator,
    prompt_logprobs,
    safe_prefix_len,
    sample_rows,
)
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
    # runtime state, owned by the engine thread
    w: torch.Tensor | None = None
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    text: str = ""
    prefix_offset: int = 0   # incremental detokenisation window: generated[prefix_offset:read_offset]
    read_offset: int = 0     # is already in text and gives the next token its context
    next_token: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)   # not yet emitted (params.logprobs set)
    ended_on_eos: bool = False   # the eos token counts as a completion token, as in the OpenAI API
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    admitted_at: float | None = None
    model: TwinModel | None = None

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    def __init__(self, art: LoadedArtifact, router: Router | None, settings: Settings, metrics: Metrics):
        self.art, self.router, self.settings, self.metrics = art, router, settings, metrics
        self.model = art.model
        self.tokenizer = art.tokenizer
        self.names = art.expert_names
        self.mode = settings.mode
        self.device = self.model.device
        self.per_request = self.mode in ("materialize", "expert")
        self.max_batch = 1 if self.per_request else settings.max_batch_size
        ctx = art.config.max_position_embeddings
        self.max_len = min(settings.max_model_len or DEFAULT_MAX_LEN, ctx)  # KV cache: slots × max_len
        self.cache = self.model.new_cache(self.max_batch, self.max_len)
        self.free_slots = list(range(self.max_batch))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._fused: collections.OrderedDict = collections.OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinserve-engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.accepting = False
        self.ready = False
        self.eos_ids = art.eos_token_ids

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup)
        self.accepting = True
        self.ready = True
        self._task = asyncio.create_task(self._loop(), name="twinserve-engine")

    def _warmup(self) -> None:
        prompt = self.tokenizer.encode("warm up", add_special_tokens=False)[:4] or [0]
        model = self._model_for(torch.full((len(self.names),), 1.0 / max(1, len(self.names))))
        cache = model.new_cache(1, 16)
        with torch.inference_mode():
            model(torch.tensor([prompt], device=self.device), torch.arange(len(prompt), device=self.device)[None],
                  cache, torch.zeros(1, dtype=torch.long, device=self.device), None)

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish (up to drain_s), then stop the loop."""
        self.accepting = False
        self.ready = False
        drain_s = self.settings.drain_timeout_s if drain_s is None else drain_s
        t_end = time.monotonic() + drain_s
        while (self.running or self.waiting) and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in list(self.waiting) + self.running:
            req.emit("error", NotReady("server is shutting down"))
        self.waiting.clear()
        self.running.clear()
        self._executor.shutdown(wait=True)
        self._fused.clear()
        self.cache = None  # free the KV cache now, not when the last reference goes

    # ---- API for routes -------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not self.accepting:
            raise NotReady("server is not accepting requests (starting or shutting down)")
        if len(self.waiting) >= self.settings.max_queue:
            raise QueueFull(f"request queue is full ({self.settings.max_queue} waiting); retry later",
                            headers={"Retry-After": "1"})
        self.waiting.append(req)
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
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                await loop.run_in_executor(self._executor, self._step)
            except Exception as e:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed")
                for req in list(self.running):  # _release removes from self.running
                    self._release(req)
                    req.emit("error", InternalError(f"engine error: {type(e).__name__}"))
                self.running.clear()
            self.metrics.set_running(len(self.running))
            self.metrics.queue_depth.set(len(self.waiting))

    @torch.inference_mode()
    def _step(self) -> None:
        now = time.perf_counter()
        for req in list(self.running):
            if req.cancelled:
                self._finish(req, "cancelled")
            elif now > req.deadline:
                self._fail(req, RequestTimeout(f"request exceeded the {self.settings.request_timeout_s:g} s timeout"))
        admitted = self._admit(now)
        previous = [r for r in self.running if r not in admitted]
        if admitted:
            self._route(admitted)
            self._prefill(admitted)
        if previous:
            self._decode(previous)

    def _admit(self, now: float) -> list[Request]:
        admitted: list[Request] = []
        budget = self.settings.max_tokens_per_step
        while self.waiting and self.free_slots:
            req = self.waiting[0]
            if req.cancelled or now > req.deadline:
                self.waiting.popleft()
                if not req.cancelled:
                    req.emit("error", RequestTimeout("request timed out while queued"))
                continue
            if admitted and len(req.prompt_ids) > budget:
                break
            if self.per_request and (self.running or admitted):
                break
            self.waiting.popleft()
            budget -= len(req.prompt_ids)
            req.slot = self.free_slots.pop()
            req.admitted_at = now
            self.metrics.queue_wait.observe(now - req.arrival)
            admitted.append(req)
            self.running.append(req)
        return admitted

    # ---- routing --------------------------------------------------------------------------------
    def _route(self, reqs: list[Request]) -> None:
        need = [r for r in reqs if r.routing.weights is None and self.mode != "backbone" and self.router is not None]
        info: dict[int, dict] = {}
        if need:
            t0 = time.perf_counter()
            pad = self.tokenizer.pad_token_id or 0
            feats = pooled_features(self.model, [r.prompt_ids for r in need], self.router.config.feature_layer,
                                    pad).cpu()  # the router MLP is tiny and lives on the CPU
            default_k, default_t = self.settings.router_top_k, self.settings.router_temperature
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(need):
                key = (r.routing.top_k or default_k, r.routing.temperature or default_t)
                groups.setdefault(key, []).append(i)
            for (k, temp), idx in groups.items():
                out = self.router.route(feats[idx], temperature=temp, top_k=k)
                for j, i in enumerate(idx):
                    r = need[i]
                    r.w = out.weights[j].to(self.device)
                    info[r.id] = {"top_expert": self.names[int(out.top[j])], "entropy": round(float(out.entropy[j]), 4),
                                  "fallback": bool(out.fallback[j]), "source": "router"}
            dt = time.perf_counter() - t0
            self.metrics.router_latency.observe(dt)
            for r in need:
                info[r.id]["router_ms"] = round(dt * 1000 / len(need), 3)
        for r in reqs:
            if r.id not in info:
                if self.mode == "backbone":
                    r.w = None
                    info[r.id] = {"top_expert": None, "entropy": 0.0, "fallback": False, "router_ms": 0.0,
                                  "source": "backbone"}
                elif r.routing.weights is not None:
                    r.w = torch.as_tensor(r.routing.weights, dtype=torch.float32).to(self.device)
                    info[r.id] = {"top_expert": self.names[int(r.w.argmax())] if float(r.w.sum()) > 0 else None,
                                  "entropy": _entropy(r.w), "fallback": False, "router_ms": 0.0, "source": "request"}
                else:  # no router in the artifact: uniform weights
                    r.w = torch.full((len(self.names),), 1.0 / len(self.names), device=self.device)
                    info[r.id] = {"top_expert": None, "entropy": _entropy(r.w), "fallback": True, "router_ms": 0.0,
                                  "source": "uniform"}
            routing = info[r.id]
            weights = r.w.tolist() if r.w is not None else [0.0] * len(self.names)
            routing["weights"] = {n: round(x, 6) for n, x in zip(self.names, weights)}
            for n, x in zip(self.names, weights):
                if x:
                    self.metrics.expert_mass.labels(n).inc(x)
            if routing["fallback"]:  # served by the fallback, not by the router's best guess
                self.metrics.fallbacks.inc()
                self.metrics.record_route(None)
            else:
                if routing["top_expert"]:
                    self.metrics.expert_top1.labels(routing["top_expert"]).inc()
                self.metrics.record_route(routing["top_expert"] or "(backbone)")
            r.emit("routing", routing)

    # ---- model calls ----------------------------------------------------------------------------
    def _model_for(self, w: torch.Tensor | None) -> TwinModel:
        if not self.per_request:
            return self.model
        if self.mode == "expert":
            t = int(w.argmax()) if w is not None and float(w.sum()) > 0 else -1
            key = ("expert", t)
        else:
            t = None
            key = tuple(round(float(x), 2) for x in w) if w is not None else None
        m = self._fused.get(key)
        if m is None:
            if self.mode == "expert":
                m = self.art.expert_model(t) if t >= 0 else self.model
            else:
                m = self.model.fused(w) if w is not None else self.model  # exact w; the key only caches
            self._fused[key] = m
            while len(self._fused) > self.settings.materialize_cache:
                self._fused.popitem(last=False)
        self._fused.move_to_end(key)
        return m

    def _weights(self, reqs: list[Request]) -> torch.Tensor | None:
        if self.per_request or self.mode == "backbone":
            return None
        return torch.stack([r.w for r in reqs])

    def _prefill(self, reqs: list[Request]) -> None:
        for group in length_buckets([len(r.prompt_ids) for r in reqs]):
            self._prefill_group([reqs[i] for i in group])

    def _prefill_group(self, reqs: list[Request]) -> None:
        model = self._model_for(reqs[0].w) if self.per_request else self.model
        n = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r.prompt_ids + [pad] * (n - len(r.prompt_ids)) for r in reqs], device=self.device)
        pos = torch.arange(n, device=self.device).expand(len(reqs), n).contiguous()
        lengths = torch.tensor([len(r.prompt_ids) for r in reqs], device=self.device)
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        if any(r.params.prompt_logprobs is not None for r in reqs):
            # echo with logprobs: the logits at every prompt position, only for groups that ask
            full = model(ids, pos, self.cache, slots, self._weights(reqs))                  # (N, S, V)
            logits = full[torch.arange(len(reqs), device=self.device), lengths - 1]         # (N, V)
            for i, r in enumerate(reqs):
                if r.params.prompt_logprobs is not None:
                    r.emit("prompt_logprobs", prompt_logprobs(full[i], r.prompt_ids, r.params.prompt_logprobs))
            del full
        else:
            logits = model(ids, pos, self.cache, slots, self._weights(reqs), logits_at=lengths - 1)
        for r in reqs:
            r.model = model
            r.generator = make_generator(r.params, self.device)
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self._accept(reqs, logits)

    def _decode(self, reqs: list[Request]) -> None:
        model = reqs[0].model if self.per_request else self.model
        tokens = torch.tensor([[r.next_token] for r in reqs], device=self.device)
        pos = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in reqs], device=self.device)
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        logits = model(tokens, pos, self.cache, slots, self._weights(reqs))[:, -1]
        self._accept(reqs, logits)

    def _accept(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens, records = sample_rows(logits, [r.params for r in reqs], [r.generator for r in reqs],
                                      [r.generated for r in reqs])
        now = time.perf_counter()
        for r, tok, rec in zip(reqs, tokens, records):
            if r.first_token_at is None:
                r.first_token_at = now
                self.metrics.ttft.observe(now - r.arrival)
            if tok in self.eos_ids and not r.params.ignore_eos:
                self._detokenize(r, final=True)   # held-back bytes of a partial character are output too
                r.ended_on_eos = True
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
        r.emit("text", (r.text[r.sent:upto], r.logprobs[:n]))
        r.logprobs = r.logprobs[n:]
        r.sent = upto

    def _detokenize(self, r: Request, final: bool = False) -> None:
        delta, r.prefix_offset, r.read_offset = detokenize_step(self.tokenizer, r.generated, r.prefix_offset,
                                                                r.read_offset, final)
        r.text += delta

    # ---- leaving the batch ----------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        req.model = None  # do not keep a fused model alive through a finished request
        if req in self.running:
            self.running.remove(req)
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1

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
        req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids), "completion_tokens": n})

    def _fail(self, req: Request, err: APIError) -> None:
        self._release(req)
        self.metrics.finished.labels(err.code or "error").inc()
        req.emit("error", err)


def _entropy(w: torch.Tensor) -> float:
    p = w.float() / w.float().sum().clamp_min(1e-12)
    return round(float(-(p * p.clamp_min(1e-12).log()).sum()), 4) + 0.0  # no -0.0 in JSON

"""Prometheus metrics (names prefixed twinserve_) and a rolling JSON view for dashboards."""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from twin.util import percentile

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WINDOW_S = 300.0
# what an engine step carried: prompt chunks only, decode tokens only, or both (one forward)
STEP_PHASES = ("prefill", "decode", "mixed")


class Metrics:
    def __init__(self, experts: list[str], mode: str, model: str):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("twinserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.e2e = Histogram("twinserve_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("twinserve_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("twinserve_time_per_output_token_seconds", "mean time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram("twinserve_queue_wait_seconds", "arrival to admission", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.prompt_tokens = Counter("twinserve_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("twinserve_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("twinserve_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("twinserve_running_batch_size", "rows in the running decode batch", registry=r)
        self.router_latency = Histogram("twinserve_router_latency_seconds", "router features + MLP per admitted batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        # one engine step = one forward (vLLM's iteration): prefill chunks only, decode tokens only, or both
        self.step_seconds = Histogram("twinserve_engine_step_seconds", "one engine step (one model forward + "
                                      "sampling) by the kind of tokens it carried", ["phase"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.step_tokens = Counter("twinserve_engine_step_tokens", "tokens carried by engine steps", ["phase"],
                                   registry=r)
        self.expert_mass = Counter("twinserve_expert_weight_mass", "sum of routing weight per expert", ["expert"],
                                   registry=r)
        self.expert_top1 = Counter("twinserve_expert_top1", "requests whose top expert is this one", ["expert"],
                                   registry=r)
        self.fallbacks = Counter("twinserve_router_fallbacks", "requests routed to the fallback", registry=r)
        self.finished = Counter("twinserve_finished_requests", "finished requests by reason", ["reason"], registry=r)
        self.memory = Gauge("twinserve_memory_bytes", "planned resident bytes by kind (weights, factors, kv_cache)",
                            ["kind"], registry=r)
        self.load_seconds = Gauge("twinserve_load_seconds", "artifact verify + load + engine setup at startup",
                                  registry=r)
        self.memory_plan: dict = {}
        self.info = Info("twinserve_fusion", "fusion mode and model", registry=r)
        self.info.info({"mode": mode, "model": model, "experts": ",".join(experts)})
        for phase in STEP_PHASES:
            self.step_seconds.labels(phase)
            self.step_tokens.labels(phase)
        for e in experts:  # export zeros so dashboards see every expert from the start
            self.expert_mass.labels(e)
            self.expert_top1.labels(e)
        self._lock = threading.Lock()
        self._done: deque = deque()     # (time, ttft, e2e)
        self._routed: deque = deque()   # (time, top expert or None)
        self._batch = 0

    # rolling window for /v1/stats
    def engine_seconds(self) -> dict[str, float]:
        """Seconds spent so far in the router pass and in engine steps by phase (prefill, decode, mixed)."""
        get = self.registry.get_sample_value
        out = {"router": get("twinserve_router_latency_seconds_sum") or 0.0}
        for phase in STEP_PHASES:
            out[phase] = get("twinserve_engine_step_seconds_sum", {"phase": phase}) or 0.0
        return out

    def record_done(self, ttft: float | None, e2e: float) -> None:
        with self._lock:
            self._done.append((time.time(), ttft, e2e))
            self._trim()

    def record_route(self, top: str | None) -> None:
        with self._lock:
            self._routed.append((time.time(), top))
            self._trim()

    def set_running(self, n: int) -> None:
        self.running.set(n)
        self._batch = n

    def _trim(self) -> None:
        cut = time.time() - WINDOW_S
        for q in (self._done, self._routed):
            while q and q[0][0] < cut:
                q.popleft()

    def set_memory(self, plan: dict, load_s: float) -> None:
        self.memory_plan = dict(plan, load_seconds=round(load_s, 2))
        for kind, key in (("weights", "weights_bytes"), ("factors", "factors_bytes"), ("kv_cache", "kv_bytes")):
            self.memory.labels(kind).set(plan[key])
        self.load_seconds.set(load_s)

    def stats(self, window_s: float = 60.0) -> dict:
        now = time.time()
        with self._lock:
            self._trim()
            done = [d for d in self._done if d[0] >= now - window_s]
            routed = list(self._routed)
        ttfts = [d[1] for d in done if d[1] is not None]
        e2es = [d[2] for d in done]
        share: dict[str, int] = {}
        for _, top in routed:
            key = top or "(fallback)"
            share[key] = share.get(key, 0) + 1
        total = sum(share.values()) or 1
        return {
            "window_s": window_s,
            "requests_per_s": round(len(done) / window_s, 3),
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),   # twin.util.percentile, as the
            "e2e_p50_s": _pct(e2es, 50), "e2e_p99_s": _pct(e2es, 99),       # load tester and the bench
            "running_batch_size": self._batch,
            "queue_depth": int(self.queue_depth._value.get()),
            "routing_share": {k: round(v / total, 4) for k, v in sorted(share.items())},
            "routing_window_s": WINDOW_S,
            "memory": self.memory_plan,
        }


def _pct(values: list[float], p: float) -> float | None:
    v = percentile(values, p)
    return None if v is None else round(v, 4)

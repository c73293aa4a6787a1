"""Drive the load: closed loop (C workers, each sends its next request when the last one ends) or
open loop (Poisson arrivals at R requests/s, seeded, independent of how fast the server answers).

Both stop issuing at ``requests`` sent or ``duration`` seconds, whichever comes first; requests in
flight then finish, each bounded by its own ``timeout``. The prompt sequence depends only on the seed,
so a closed-loop and an open-loop run with the same seed send the same prompts in the same order.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .client import Result, check_url, make_client, stream_completion
from .workload import LoadtestError, Workload

OPEN_LOOP_MAX_CONNECTIONS = 1024  # open-loop cap on requests in flight (the pool queues the rest)


@dataclass
class RunConfig:
    url: str
    requests: int = 100
    duration: float = 300.0
    concurrency: int | None = None   # closed loop when set
    rate: float | None = None        # open loop (Poisson) when set
    max_tokens: int = 16
    model: str = "demo"
    api_key: str | None = None
    seed: int = 0
    timeout: float = 60.0

    def validate(self) -> RunConfig:
        self.url = check_url(self.url)
        if self.concurrency is not None and self.rate is not None:
            raise LoadtestError("give either --concurrency or --rate, not both")
        if self.concurrency is None and self.rate is None:
            self.concurrency = 1
        if self.requests < 1:
            raise LoadtestError(f"--requests must be >= 1, got {self.requests}")
        if not self.duration > 0:
            raise LoadtestError(f"--duration must be > 0 seconds, got {self.duration}")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadtestError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not (0 < self.rate < float("inf")):
            raise LoadtestError(f"--rate must be a positive number of requests/s, got {self.rate}")
        if self.max_tokens < 1:
            raise LoadtestError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not self.timeout > 0:
            raise LoadtestError(f"--timeout must be > 0 seconds, got {self.timeout}")
        return self

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def public(self) -> dict:
        """The settings for the report (the API key itself is never written)."""
        d = asdict(self)
        d["api_key"] = bool(self.api_key)
        d["mode"] = self.mode
        return d


def poisson_offsets(rate: float, n: int, rng: random.Random, horizon: float | None = None) -> list[float]:
    """Send times (s from start) of at most ``n`` Poisson arrivals at ``rate``/s, cut at ``horizon``."""
    out: list[float] = []
    t = 0.0
    while len(out) < n:
        t += rng.expovariate(rate)
        if horizon is not None and t > horizon:
            break
        out.append(t)
    return out


@dataclass
class RunOutcome:
    results: list[Result]
    wall_s: float      # run start to the last answer
    stopped_by: str    # "requests" or "duration"


async def run_async(workload: Workload, cfg: RunConfig,
                    on_result: Callable[[Result], None] | None = None) -> RunOutcome:
    cfg.validate()
    prompt_rng = random.Random(f"{cfg.seed}:prompts")
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration

    async def one(i: int) -> None:
        row = workload.sample(prompt_rng)  # drawn at issue time, in issue order -> seed-determined
        res = await stream_completion(client, cfg.url, row, index=i, model=cfg.model, max_tokens=cfg.max_tokens,
                                      api_key=cfg.api_key, timeout=cfg.timeout, t0=t0)
        results.append(res)
        if on_result is not None:
            on_result(res)

    issued = 0
    max_conn = cfg.concurrency if cfg.mode == "closed" else OPEN_LOOP_MAX_CONNECTIONS
    async with make_client(max_conn, cfg.timeout) as client:
        if cfg.mode == "closed":
            async def worker() -> None:
                nonlocal issued
                while issued < cfg.requests and time.perf_counter() < deadline:
                    i = issued
                    issued += 1
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            offsets = poisson_offsets(cfg.rate, cfg.requests, random.Random(f"{cfg.seed}:arrivals"),
                                      horizon=cfg.duration)
            tasks: list[asyncio.Task] = []
            for i, off in enumerate(offsets):
                delay = t0 + off - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                issued += 1
            await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return RunOutcome(results=results, wall_s=wall,
                      stopped_by="requests" if issued >= cfg.requests else "duration")


def run(workload: Workload, cfg: RunConfig, on_result: Callable[[Result], None] | None = None) -> RunOutcome:
    return asyncio.run(run_async(workload, cfg, on_result))

"""Soak test: mixed load with interleaved malformed requests and client disconnects, bounded in time.

Starts `twinserve serve ARTIFACT` on 127.0.0.1 itself (so it can read the server's RSS), then for
``--minutes`` keeps ``--concurrency`` workers busy. Each worker request is, by a seeded draw:
a well-formed streaming completion (most), a malformed request (bad JSON, out-of-range field,
unknown expert, prompt over the context limit: each must get a 4xx), or a streaming request the
client abandons after its first chunk. Reports unintended 5xx (goal 0), p99 drift and RSS drift
between the first and last measurement windows (goal within ±10 %).

    python -m loadtest.soak artifacts/demo --minutes 10 --out artifacts/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from twin.util import free_port, percentile, rss_bytes

from .client import make_client, stream_completion
from .report import write_json
from .workload import build_workload

MALFORMED = [
    ("bad_json", lambda m: (b"{not json", "application/json")),
    ("temperature", lambda m: (json.dumps({"model": m, "prompt": "x", "temperature": 9}).encode(), "application/json")),
    ("unknown_expert", lambda m: (json.dumps({"model": m, "prompt": "x", "twin": {"expert": "nope"}}).encode(),
                                  "application/json")),
    ("too_long", lambda m: (json.dumps({"model": m, "prompt": "a" * 5000}).encode(), "application/json")),
    ("missing_prompt", lambda m: (json.dumps({"model": m}).encode(), "application/json")),
]


async def wait_ready(base: str, timeout: float = 120.0) -> None:
    async with httpx.AsyncClient(trust_env=False) as c:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            try:
                if (await c.get(f"{base}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"server at {base} not ready after {timeout} s")


async def soak(base: str, pid: int, model: str, minutes: float, concurrency: int, window_s: float,
               max_tokens: int, seed: int, tasks: str | None) -> dict:
    workload = build_workload(tasks_dir=tasks)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    t_end = t0 + minutes * 60
    windows: list[dict] = []
    cur = {"e2e": [], "ok": 0}
    counts = {"ok": 0, "malformed": 0, "malformed_4xx": 0, "disconnects": 0, "unintended_5xx": 0, "other_errors": 0}
    statuses: dict[str, int] = {}
    client = make_client(concurrency * 2, 60.0)

    async def malformed() -> None:
        _name, make = MALFORMED[rng.randrange(len(MALFORMED))]
        body, ctype = make(model)
        r = await client.post(f"{base}/v1/completions", content=body, headers={"content-type": ctype})
        counts["malformed"] += 1
        statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
        if 400 <= r.status_code < 500 and "error" in r.json():
            counts["malformed_4xx"] += 1
        elif r.status_code >= 500:
            counts["unintended_5xx"] += 1

    async def disconnect() -> None:
        row = workload.sample(rng)
        body = {"model": model, "prompt": row.prompt, "max_tokens": 64, "stream": True}
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                counts["unintended_5xx"] += 1
            async for _ in r.aiter_lines():
                break  # leave after the first line: the server must cancel and free the slot
        counts["disconnects"] += 1

    async def normal() -> None:
        res = await stream_completion(client, base, workload.sample(rng), model=model, max_tokens=max_tokens)
        statuses[str(res.status)] = statuses.get(str(res.status), 0) + 1
        if res.ok:
            counts["ok"] += 1
            cur["e2e"].append(res.e2e)
        elif res.status is not None and res.status >= 500:
            counts["unintended_5xx"] += 1
        else:
            counts["other_errors"] += 1

    async def worker() -> None:
        while time.perf_counter() < t_end:
            u = rng.random()
            try:
                await (malformed() if u < 0.1 else disconnect() if u < 0.15 else normal())
            except httpx.HTTPError:
                counts["other_errors"] += 1

    async def sampler() -> None:
        while time.perf_counter() < t_end:
            await asyncio.sleep(window_s)
            e2e = cur["e2e"]
            cur["e2e"] = []
            windows.append({"t_s": round(time.perf_counter() - t0, 1), "requests": len(e2e),
                            "p99_s": percentile(e2e, 99), "p50_s": percentile(e2e, 50), "rss_bytes": rss_bytes(pid)})
            w = windows[-1]
            print(f"[{w['t_s']:7.1f} s] ok={counts['ok']} 5xx={counts['unintended_5xx']} "
                  f"p99={w['p99_s']} rss={w['rss_bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)

    try:
        await asyncio.gather(sampler(), *[worker() for _ in range(concurrency)])
    finally:
        await client.aclose()
    measured = [w for w in windows[1:] if w["p99_s"] is not None] or windows  # first window is warm-up
    first, last = measured[0], measured[-1]
    return {
        "minutes": minutes, "concurrency": concurrency, "window_s": window_s, "counts": counts, "statuses": statuses,
        "unintended_5xx": counts["unintended_5xx"],
        "p99_drift": round(last["p99_s"] / first["p99_s"] - 1, 4) if first["p99_s"] else None,
        "rss_drift": round(last["rss_bytes"] / first["rss_bytes"] - 1, 4),
        "windows": windows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="artifact to serve (the server is started on 127.0.0.1)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tasks", default=None, help="task splits dir (default artifacts/zoo/tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not (0 < args.minutes <= 120):
        p.error("--minutes must be in (0, 120]")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", args.artifact, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base))
        model = Path(args.artifact).resolve().name
        report = asyncio.run(soak(base, server.pid, model, args.minutes, args.concurrency, args.window,
                                  args.max_tokens, args.seed, args.tasks))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    write_json(report, args.out)
    print(json.dumps({k: report[k] for k in ("unintended_5xx", "p99_drift", "rss_drift", "counts")}, indent=2))
    return 0 if report["unintended_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

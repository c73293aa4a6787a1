"""Locust version of ``twinserve loadtest``: the same task mix, streamed completions, TTFT as a custom event.

    pip install locust
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        --twin-mix reverse=2,upper=1 --twin-tasks artifacts/zoo/tasks

Each user sends streaming POST /v1/completions back to back (closed loop; -u users = concurrency).
Besides the request itself (named by task), every answer fires custom events named by task:
request_type "TTFT" (time to the first non-empty text chunk), "E2E" (until data: [DONE]) and
"ROUTING" (a failure when twin.routing.top_expert differs from the prompt's label).
Options also read the environment: TWIN_MIX, TWIN_DATA, TWIN_TASKS, TWIN_MAX_TOKENS, TWIN_MODEL,
TWIN_API_KEY, TWIN_SEED.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, events, task
from locust.exception import StopUser

try:
    from loadtest.workload import DEFAULT_TASKS_DIR, LoadtestError, build_workload
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest.workload import DEFAULT_TASKS_DIR, LoadtestError, build_workload

_state: dict = {}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--twin-mix", env_var="TWIN_MIX", default="", help="task proportions, e.g. reverse=2,upper=1")
    parser.add_argument("--twin-data", env_var="TWIN_DATA", default="", help="JSONL {prompt, label|task[, target]}")
    parser.add_argument("--twin-tasks", env_var="TWIN_TASKS", default=DEFAULT_TASKS_DIR,
                        help="DIR/TASK/test.jsonl (used when --twin-data is not given)")
    parser.add_argument("--twin-max-tokens", env_var="TWIN_MAX_TOKENS", type=int, default=16)
    parser.add_argument("--twin-model", env_var="TWIN_MODEL", default="demo")
    parser.add_argument("--twin-api-key", env_var="TWIN_API_KEY", default="", is_secret=True)
    parser.add_argument("--twin-seed", env_var="TWIN_SEED", type=int, default=0)


@events.init.add_listener
def _load_workload(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    try:
        _state["workload"] = build_workload(opts.twin_mix or None, data=opts.twin_data or None,
                                            tasks_dir=opts.twin_tasks)
    except LoadtestError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _state["rng"] = random.Random(f"{opts.twin_seed}:prompts")


def _fire(environment, kind: str, name: str, seconds: float, exc: Exception | None = None) -> None:
    environment.events.request.fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                                    response_length=0, exception=exc, context={})


class TwinUser(HttpUser):
    """One closed-loop client: streaming completions, one after another."""

    @task
    def completion(self) -> None:
        workload, opts = _state.get("workload"), self.environment.parsed_options
        if workload is None:
            raise StopUser()
        row = workload.sample(_state["rng"])
        body = {"model": opts.twin_model, "prompt": row.prompt, "max_tokens": opts.twin_max_tokens,
                "temperature": 0, "stream": True}
        headers = {"Accept": "text/event-stream"}
        if opts.twin_api_key:
            headers["Authorization"] = f"Bearer {opts.twin_api_key}"
        t0 = time.perf_counter()
        ttft, text, top, done = None, "", None, False
        with self.client.post("/v1/completions", json=body, headers=headers, stream=True, catch_response=True,
                              name=f"/v1/completions [{row.task}]") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                for raw in resp.iter_lines(decode_unicode=True):
                    if not raw or not raw.startswith("data:"):
                        continue
                    payload = raw[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    routing = (chunk.get("twin") or {}).get("routing")
                    if top is None and isinstance(routing, dict):
                        top = routing.get("top_expert") or "(none)"
                    piece = ((chunk.get("choices") or [{}])[0] or {}).get("text")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        text += piece
            except Exception as e:  # noqa: BLE001 - broken stream or bad JSON: one failure, no retry
                resp.failure(f"{type(e).__name__}: {e}")
                return
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
            resp.success()
        e2e = time.perf_counter() - t0
        if ttft is not None:
            _fire(self.environment, "TTFT", row.task, ttft)
        _fire(self.environment, "E2E", row.task, e2e)
        if top is not None and row.labeled:
            miss = None if top == row.task else AssertionError(f"routed to {top}")
            _fire(self.environment, "ROUTING", row.task, 0.0, miss)

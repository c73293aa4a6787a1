"""Opt-in: twinserve on a local Ray Serve cluster (deploy/ray/serve_app.py) with 2 replicas.

    TWINSERVE_TEST_RAY=1 .venv/bin/python -m pytest -m ray tests/deploy/test_ray.py

Needs `pip install "ray[serve]"` (about 500 MB). Uses the tiny routed test artifact (or
TWINSERVE_TEST_RAY_ARTIFACT=DIR, e.g. artifacts/demo) and sends requests through Ray's HTTP proxy on
127.0.0.1:<free port>. About 30-60 s on 2 CPU cores, most of it Ray start-up.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from twin.util import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.environ.get("TWINSERVE_TEST_RAY") != "1",
                       reason="opt-in: set TWINSERVE_TEST_RAY=1 (starts a local Ray cluster)"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='ray not installed (pip install "ray[serve]")'),
]

APP = "twinserve-test"
REPLICAS = 2


def _port_outside_ray_range() -> int:
    for _ in range(50):
        port = free_port()
        if not 10002 <= port <= 19999:   # Ray's worker port range on the dev VM
            return port
    raise RuntimeError("no free port outside 10002-19999")


@pytest.fixture(scope="module")
def artifact(request) -> tuple[Path, str]:
    """(artifact dir, model id)."""
    explicit = os.environ.get("TWINSERVE_TEST_RAY_ARTIFACT")
    if explicit:
        path = Path(explicit).resolve()
        return path, path.name
    return request.getfixturevalue("routed_artifact"), "tiny"


@pytest.fixture(scope="module")
def ray_serve(artifact):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from deploy.ray.serve_app import DEPLOYMENT_NAME, TwinServe, settings_overrides

    path, model = artifact
    port = _port_outside_ray_range()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
                                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = settings_overrides({"artifact": str(path), "model_name": model, "device": "cpu",
                                       "dtype": "float32", "threads": 1, "max_batch_size": 8,
                                       "drain_timeout_s": 2.0})
        t0 = time.monotonic()
        app = TwinServe.options(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1}).bind(settings)
        serve.run(app, name=APP, route_prefix="/")
        startup_s = time.monotonic() - t0
        yield {"url": f"http://127.0.0.1:{port}", "model": model, "serve": serve,
               "deployment": DEPLOYMENT_NAME, "startup_s": startup_s}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_two_replicas_running(ray_serve):
    status = ray_serve["serve"].status()
    app = status.applications[APP]
    assert str(app.status).endswith("RUNNING"), app
    dep = app.deployments[ray_serve["deployment"]]
    running = {str(k).split(".")[-1]: v for k, v in dep.replica_states.items()}
    assert running.get("RUNNING") == REPLICAS, dep.replica_states
    print(f"ray serve: {REPLICAS} replicas running {ray_serve['startup_s']:.1f} s after serve.run")


def test_ops_endpoints_through_the_proxy(ray_serve):
    import httpx

    with httpx.Client(base_url=ray_serve["url"], timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ray_serve["model"] in ids
        metrics = c.get("/metrics").text
        assert "twinserve_requests_total" in metrics and "twinserve_time_to_first_token_seconds_bucket" in metrics


def test_concurrent_completions_spread_over_replicas(ray_serve):
    import httpx

    async def one(client: httpx.AsyncClient, i: int):
        r = await client.post("/v1/completions", json={"model": ray_serve["model"], "prompt": f"hello {i}",
                                                       "max_tokens": 8, "temperature": 0})
        return r

    async def burst(n: int):
        async with httpx.AsyncClient(base_url=ray_serve["url"], timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    seen: set[str] = set()
    for _ in range(5):       # power-of-two-choices routing: a burst or two reaches both replicas
        responses = asyncio.run(burst(16))
        for r in responses:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion"
            assert isinstance(body["choices"][0]["text"], str)
            assert body["usage"]["completion_tokens"] >= 1
            assert "routing" in body["twin"]
            seen.add(r.headers["x-twinserve-replica"])
        if len(seen) == REPLICAS:
            break
    assert len(seen) == REPLICAS, f"requests reached only {seen}"


def test_streaming_through_the_proxy(ray_serve):
    import httpx

    events = []
    body = {"model": ray_serve["model"], "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client(base_url=ray_serve["url"], timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events.extend(line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert "routing" in chunks[0]["twin"]


def test_errors_keep_the_openai_shape(ray_serve):
    import httpx

    with httpx.Client(base_url=ray_serve["url"], timeout=30) as c:
        r = c.post("/v1/completions", json={"model": "no-such-model", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}

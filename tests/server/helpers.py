"""Helpers shared by the server tests: an engine without HTTP, request shortcuts, engine knobs, SSE parsing."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import types

from server.app import load_state
from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import EXPERT_NAMES, router_prompt, server_settings

# held-out prompts of each router task (the router never saw these exact ones)
_rng = random.Random(2024)
TASK_PROMPTS = {t: [router_prompt(t, _rng) for _ in range(4)] for t in EXPERT_NAMES}
UNKNOWN_PROMPT = "zzzz yyyy xxxx wwww"       # letters of no task: far from every centroid -> fallback


@contextlib.asynccontextmanager
async def running_engine(artifact, **overrides):
    """(service, engine) over the artifact, started inside the running event loop; stopped on exit."""
    holder = types.SimpleNamespace(state=types.SimpleNamespace())
    await asyncio.to_thread(load_state, holder, server_settings(artifact, **overrides))
    engine = holder.state.engine
    await engine.start()
    try:
        yield holder.state.service, engine
    finally:
        await engine.stop(drain_s=1.0)


async def _run(svc, call) -> dict:
    """One choice's result, its routing as the API shows it."""
    from server.protocol import Routing

    (r,) = await svc.collect(call)
    return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "routing": Routing.of(r.routing).model_dump(),
            "entries": r.entries}


async def complete(svc, prompt, model: str = "tiny", **fields) -> dict:
    """One non-streaming completion through Service/Engine: {"text", "finish_reason", usage..., "routing",
    "entries" (logprobs)}."""
    fields.setdefault("temperature", 0.0)
    return await _run(svc, svc.completion_call(CompletionRequest(model=model, prompt=prompt, **fields)))


async def chat(svc, content: str, model: str = "tiny", **fields) -> dict:
    fields.setdefault("temperature", 0.0)
    body = ChatCompletionRequest(model=model, messages=[{"role": "user", "content": content}], **fields)
    return await _run(svc, svc.chat_call(body))


def record_batches(engine) -> dict[str, list[int]]:
    """Wrap the runner's step to record, per step, the prefill chunks and the decode rows it carried."""
    sizes: dict[str, list[int]] = {"prefill": [], "decode": []}
    orig = engine.runner.step

    def wrapped(plan):
        if plan.chunks:
            sizes["prefill"].append(len(plan.chunks))
        if plan.decode:
            sizes["decode"].append(len(plan.decode))
        return orig(plan)
    engine.runner.step = wrapped
    return sizes


def wrap_step(engine, before) -> None:
    """Call ``before(plan)`` in the engine thread ahead of every model runner step."""
    orig = engine.runner.step

    def wrapped(plan):
        before(plan)
        return orig(plan)
    engine.runner.step = wrapped


def make_long(engine, delay_s: float = 0.0) -> None:
    """Every request runs to max_tokens (no <eos>), each step takes at least ``delay_s``."""
    engine.eos_ids = set()
    if delay_s:
        wrap_step(engine, lambda plan: time.sleep(delay_s))


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def await_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def engine_idle(engine) -> bool:
    return not engine.running and not engine.waiting and sorted(engine.free_slots) == list(range(engine.max_batch))


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE body (iterable of lines); "[DONE]" kept as the string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(resp, status: int, param: object = ..., type_: str | None = None) -> dict:
    """OpenAI error shape {"error": {message, type, param, code}}, no traceback; returns the error dict.

    ``param`` is checked when given (None included); ``...`` skips the check.
    """
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    for marker in ("Traceback", 'File "', "site-packages", ".py\", line"):
        assert marker not in resp.text, resp.text
    if param is not ...:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err

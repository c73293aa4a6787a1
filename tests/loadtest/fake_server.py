"""A tiny OpenAI-compatible streaming server (starlette + uvicorn in a thread) for the load-test tests.

POST /v1/completions with prompt "TASK INPUT=" routes to ``MISROUTE.get(TASK, TASK)`` and answers with
that task's function applied to INPUT (so a mis-routed prompt also gets a wrong answer), streamed as
SSE: a first chunk with empty text carrying ``twin.routing``, then ``chars_per_chunk`` characters per
chunk, a last chunk with finish_reason (and usage unless disabled), then ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from zoo.tasks import TASKS

MISROUTE = {"shift": "upper"}  # "shift" prompts are deliberately routed to (and answered by) "upper"


@dataclass
class FakeState:
    reject_every: int = 0         # every k-th request (1-based count) gets 429
    api_key: str | None = None    # when set, other bearer tokens get 401
    delay: float = 0.0005         # seconds between text chunks
    chars_per_chunk: int = 1
    usage: bool = True
    count: int = 0
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


def _error(status: int, message: str, etype: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": etype, "param": None, "code": None}},
                        status_code=status, headers=headers)


def answer(prompt: str) -> tuple[str, str]:
    """(top_expert, text) for a prompt "TASK INPUT="."""
    task, _, rest = prompt.partition(" ")
    x = rest.removesuffix("=")
    routed = MISROUTE.get(task, task)
    fn = TASKS[routed].fn if routed in TASKS else (lambda s: s)
    return routed, fn(x)


def make_app(state: FakeState) -> Starlette:
    async def completions(request: Request):
        state.count += 1
        n = state.count
        state.headers.append(dict(request.headers))
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _error(401, "invalid API key", "authentication_error")
        body = await request.json()
        state.bodies.append(body)
        if state.reject_every and n % state.reject_every == 0:
            return _error(429, "queue full", "rate_limit_error", {"Retry-After": "1"})
        expert, text = answer(body["prompt"])
        max_tokens = int(body.get("max_tokens", 16))
        finish = "length" if len(text) > max_tokens else "stop"
        text = text[:max_tokens]
        routing = {"weights": {expert: 1.0}, "top_expert": expert, "entropy": 0.0, "fallback": False,
                   "router_ms": 0.1, "source": "router"}
        base = {"id": f"cmpl-{n}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", "demo")}

        def chunk(t: str, finish_reason=None, **extra) -> bytes:
            c = dict(base, choices=[{"index": 0, "text": t, "finish_reason": finish_reason, "logprobs": None}],
                     **extra)
            return f"data: {json.dumps(c)}\n\n".encode()

        async def gen():
            yield chunk("", twin={"routing": routing})
            k = state.chars_per_chunk
            for i in range(0, len(text), k):
                await asyncio.sleep(state.delay)
                yield chunk(text[i:i + k])
            extra = {"usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(text),
                               "total_tokens": len(body["prompt"]) + len(text)}} if state.usage else {}
            yield chunk("", finish, **extra)
            yield b"data: [DONE]\n\n"

        if not body.get("stream"):
            return _error(400, "this fake only streams", "invalid_request_error")
        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


class FakeServer:
    """``with FakeServer() as srv: srv.url`` — serves on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, state: FakeState | None = None):
        self.state = state or FakeState()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(self.state), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()

"""Thin HTTP routes: parse -> service/engine -> shape the OpenAI response."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import APIError, Unauthorized
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .service import Service

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}
router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


async def check_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(svc: Service, req, http: Request, chat: bool, model: str, include_usage: bool) -> StreamingResponse:
    """Submit, wait for the routing event (errors before it become HTTP errors), then stream SSE."""
    svc.engine.submit(req)
    events = svc.events(req, http.is_disconnected)
    try:
        kind, routing = await events.__anext__()   # raises APIError (504, ...) before any byte is sent
    except StopAsyncIteration:  # the client left before admission
        return Response(status_code=499)
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}

    async def body() -> AsyncIterator[str]:
        first = chunk(None, None, first=True)
        first["twin"] = {"routing": routing}
        yield _sse(first)
        try:
            async for kind, payload in events:
                if kind == "text":
                    yield _sse(chunk(payload, None))
                elif kind == "done":
                    yield _sse(chunk(None, payload["finish_reason"]))
                    if include_usage:
                        yield _sse({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                                    "usage": _usage(payload)})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
             dependencies=[Depends(check_api_key)], tags=["openai"])
async def completions(body: CompletionRequest, http: Request, svc: Service = Depends(service)):
    if body.suffix:
        from .errors import BadRequest
        raise BadRequest("suffix is not supported", param="suffix")
    req = svc.make_request(body.prompt, body)
    if body.stream:
        return await _stream(svc, req, http, False, body.model, body.include_usage)
    text, done, routing = await svc.run(req, http.is_disconnected)
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "usage": _usage(done), "twin": {"routing": routing},
            "choices": [{"index": 0, "text": (body.prompt + text) if body.echo else text,
                         "finish_reason": done["finish_reason"], "logprobs": None}]}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             dependencies=[Depends(check_api_key)], tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, http: Request, svc: Service = Depends(service)):
    req = svc.make_request(svc.chat_prompt(body.messages), body)
    if body.stream:
        return await _stream(svc, req, http, True, body.model, body.include_usage)
    text, done, routing = await svc.run(req, http.is_disconnected)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "usage": _usage(done), "twin": {"routing": routing},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done["finish_reason"]}]}


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(check_api_key)],
            tags=["openai"])
async def models(http: Request, svc: Service = Depends(service)):
    created = http.app.state.created
    return {"object": "list", "data": [ModelCard(id=m, created=created) for m in svc.model_ids()]}


@router.get("/health", tags=["ops"])
async def health():
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def ready(http: Request):
    engine = getattr(http.app.state, "engine", None)
    if engine is None or not engine.ready:
        return JSONResponse({"error": {"message": "not ready", "type": "server_error", "param": None,
                                       "code": "not_ready"}}, status_code=503)
    return {"status": "ready", **engine.load}


@router.get("/metrics", tags=["ops"])
async def metrics(http: Request):
    return Response(generate_latest(http.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", tags=["ops"])
async def stats(http: Request, window: float = 60.0):
    svc: Service = http.app.state.service
    window = min(max(window, 5.0), 300.0)
    return {"model": svc.model_name, "mode": svc.engine.mode, "experts": svc.names,
            **http.app.state.metrics.stats(window)}

"""Thin HTTP routes: parse -> service/engine -> shape the OpenAI response."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import APIError, NotFound, Unauthorized
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Routing,
    TokenizeRequest,
    TokenizeResponse,
    TwinInfo,
    Usage,
)
from .service import Call, Piece, Service

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 429, 500, 503, 504)}
router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


async def check_api_key(request: Request) -> None:
    """Authorization: Bearer KEY when an API key is set; the scheme is case-insensitive (RFC 9110 11.1), the
    key is compared in constant time."""
    key = request.app.state.settings.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _gone(http: Request):
    """A coroutine function that returns once the client has disconnected: it waits on the ASGI receive channel
    (the body is read already, so the next message is http.disconnect), instead of polling for it."""
    async def wait() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
    return wait


def _twin(decisions: list) -> TwinInfo:
    return TwinInfo(routing=Routing.of(decisions[0]),
                    prompts=[Routing.of(d) for d in decisions] if len(decisions) > 1 else None)


async def _stream(svc: Service, call: Call, http: Request, chat: bool, model: str,
                  include_usage: bool) -> Response:
    """Submit, wait for the first event (errors before it become HTTP errors), then stream SSE chunks."""
    svc.submit(call)
    pieces = svc.pieces(call, _gone(http))
    try:
        first = await pieces.__anext__()   # raises APIError (504, ...) before any byte is sent
    except StopAsyncIteration:  # the client left before admission
        return Response(status_code=499)
    cid, created = _id(chat), int(time.time())

    def chunk(p: Piece) -> str:
        twin = _twin([p.routing]) if p.kind == "routing" else None
        finish = p.finish_reason if p.kind == "done" else None
        if chat:
            delta = ChatDelta(role="assistant", content="") if p.kind == "routing" else ChatDelta(content=p.text or None)
            lp = ChatLogprobs.build(p.entries) if call.logprobs and p.kind == "text" else None
            c = ChatCompletionChunk(id=cid, created=created, model=model, twin=twin, choices=[
                ChatChunkChoice(index=p.index, delta=delta, finish_reason=finish, logprobs=lp)])
        else:
            lp = CompletionLogprobs.build(p.entries) if call.logprobs and p.kind == "text" else None
            c = CompletionChunk(id=cid, created=created, model=model, twin=twin, choices=[
                CompletionChoice(index=p.index, text=p.text, finish_reason=finish, logprobs=lp)])
        return f"data: {c.model_dump_json()}\n\n"

    async def body() -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            yield chunk(first)
            async for p in pieces:
                if p.kind == "text" and not p.text and not p.entries:
                    continue
                completion_tokens += p.completion_tokens
                yield chunk(p)
            if include_usage:
                usage = Usage(**svc.usage(call, completion_tokens))
                c = (ChatCompletionChunk if chat else CompletionChunk)(id=cid, created=created, model=model,
                                                                       choices=[], usage=usage)
                yield f"data: {c.model_dump_json()}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await pieces.aclose()   # an aborted response cancels its unfinished choices now, not at GC
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
             dependencies=[Depends(check_api_key)], tags=["openai"])
async def completions(body: CompletionRequest, http: Request, svc: ServiceDep):
    prompts = await asyncio.to_thread(svc.completion_prompts, body)   # a huge prompt must not block the loop
    call = svc.completion_call(body, prompts)
    if body.stream:
        return await _stream(svc, call, http, False, body.model, body.include_usage)
    results = await svc.collect(call, _gone(http))
    return CompletionResponse(
        id=_id(False), created=int(time.time()), model=body.model,
        usage=Usage(**svc.usage(call, call.completion_tokens)),
        twin=_twin([results[k * call.n].routing for k in range(len(call.prompts))]),
        choices=[CompletionChoice(index=r.index, text=r.text, finish_reason=r.finish_reason,
                                  logprobs=CompletionLogprobs.build(r.entries) if call.logprobs else None)
                 for r in results])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             dependencies=[Depends(check_api_key)], tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, http: Request, svc: ServiceDep):
    prompt = await asyncio.to_thread(svc.chat_encode, body.messages)
    call = svc.chat_call(body, prompt)
    if body.stream:
        return await _stream(svc, call, http, True, body.model, body.include_usage)
    results = await svc.collect(call, _gone(http))
    return ChatCompletionResponse(
        id=_id(True), created=int(time.time()), model=body.model,
        usage=Usage(**svc.usage(call, call.completion_tokens)), twin=_twin([results[0].routing]),
        choices=[ChatChoice(index=r.index, message=ChatResponseMessage(content=r.text), finish_reason=r.finish_reason,
                            logprobs=ChatLogprobs.build(r.entries) if call.logprobs else None)
                 for r in results])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, dependencies=[Depends(check_api_key)],
             tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, svc: ServiceDep):
    """Token ids as the server counts them (vLLM's shape); ``messages`` are rendered with the chat template."""
    if body.model is not None:
        svc.check_model(body.model)
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await asyncio.to_thread(svc.encode, body.prompt, add)
    else:   # exactly the ids a chat completion of these messages is given (and billed for)
        ids = (await asyncio.to_thread(svc.chat_encode, body.messages, body.add_generation_prompt is not False,
                                       body.add_special_tokens)).ids
    return TokenizeResponse(count=len(ids), max_model_len=svc.engine.max_len, tokens=ids,
                            token_strs=[svc.token_text(t) for t in ids] if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS,
             dependencies=[Depends(check_api_key)], tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, svc: ServiceDep):
    if body.model is not None:
        svc.check_model(body.model)
    def decode() -> str:
        svc.check_ids(body.tokens, "tokens")
        return svc.tokenizer.decode(body.tokens, skip_special_tokens=True)
    return DetokenizeResponse(prompt=await asyncio.to_thread(decode))


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[Depends(check_api_key)],
            tags=["openai"])
async def models(http: Request, svc: ServiceDep):
    created = http.app.state.created
    return {"object": "list", "data": [ModelCard(id=m, created=created) for m in svc.model_ids()]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS,
            dependencies=[Depends(check_api_key)], tags=["openai"])
async def model(model_id: str, http: Request, svc: ServiceDep):
    """One model (openai's client.models.retrieve); 404 for an unknown id."""
    if model_id not in svc.model_ids():
        raise NotFound(f"model {model_id!r} does not exist; available: {', '.join(svc.model_ids())}",
                       param="model")
    return ModelCard(id=model_id, created=http.app.state.created)


@router.get("/health", tags=["ops"])
async def health():
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
async def ready(http: Request):
    engine = getattr(http.app.state, "engine", None)
    if engine is None or not engine.ready:
        return JSONResponse({"error": {"message": "not ready", "type": "server_error", "param": None,
                                       "code": "not_ready"}}, status_code=503)
    if not engine.accepting:   # draining for shutdown: in-flight requests finish, new ones get 503
        return JSONResponse({"error": {"message": "draining: the server is shutting down", "type": "server_error",
                                       "param": None, "code": "draining"}}, status_code=503)
    return {"status": "ready", **engine.load}


@router.get("/metrics", tags=["ops"])
async def metrics(http: Request):
    return Response(generate_latest(http.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", tags=["ops"], dependencies=[Depends(check_api_key)])
async def stats(http: Request, window: float = 60.0):
    svc: Service = http.app.state.service
    window = min(max(window, 5.0), 300.0)
    return {"model": svc.model_name, "mode": svc.engine.mode.name, "experts": svc.names,
            **http.app.state.metrics.stats(window)}

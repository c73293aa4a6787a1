"""create_app(settings): load the artifact at startup, run the engine, map every error to OpenAI JSON."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twin import __version__
from twin.errors import TwinserveError

from .errors import APIError, InternalError, PayloadTooLarge
from .memory import StartupError
from .settings import Settings

log = logging.getLogger("twinserve")
startup_log = logging.getLogger("uvicorn.error")   # printed with uvicorn's own startup lines


def load_state(app: FastAPI, settings: Settings, expert_reader: Callable | None = None,
               verified: bool = False) -> None:
    """Blocking: verify and load the artifact, router, metrics, engine; attach them to app.state.
    ``verified``: the caller has just checked the checksums (`twinserve serve`): they are not computed twice."""
    from router.model import load_router
    from twin.loading import load_artifact

    from .engine import Engine
    from .metrics import Metrics
    from .service import Service

    if settings.mode == "expert" and expert_reader is None:
        raise StartupError("mode `expert` serves each expert's own checkpoint and needs an expert reader: "
                           "create_app(settings, expert_reader=compression.experts.read_expert_state) "
                           "(`twinserve serve` passes it)")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    from twin.artifact import check_json_files, read_manifest

    from .memory import memory_plan
    t0 = time.perf_counter()
    plan = memory_plan(settings, read_manifest(settings.artifact))
    check_json_files(settings.artifact)   # a damaged tokenizer.json named, not a bare parser error
    art = load_artifact(settings.artifact, device=settings.device, dtype=settings.dtype,
                        verify=settings.verify_artifact and not verified, with_experts=settings.mode != "backbone",
                        expert_reader=expert_reader,
                        prepack_batch=settings.max_batch_size if settings.prepack and settings.max_batch_size >= 4
                        else None)
    router = load_router(art.path, art.manifest)
    name = settings.model_name or Path(settings.artifact).resolve().name
    metrics = Metrics(art.expert_names, settings.mode, name)
    engine = Engine(art, router, settings, metrics, memory_plan=plan)
    load_s = time.perf_counter() - t0
    metrics.set_memory(plan.to_json(), load_s)
    served = str(art.model.dtype).removeprefix("torch.")
    if settings.dtype == "auto" and art.model.device.type == "cpu" and art.manifest.dtype != served:
        if served == "bfloat16":
            startup_log.info("the artifact is %s; served in bfloat16 (this CPU has native bf16 dot products: "
                             "AVX512-BF16/AMX); --dtype float32 keeps %s", art.manifest.dtype, art.manifest.dtype)
        else:
            startup_log.info("the artifact is %s; served in %s (this CPU has no native bf16 dot products: "
                             "AVX512-BF16/AMX); --dtype bfloat16 forces it", art.manifest.dtype, served)
    startup_log.info("loaded in %.1f s: %s", load_s, plan.summary())
    app.state.artifact = art
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.service = Service(engine, settings, name)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc) -> list[str]:
    """A pydantic error location as the client's field path: no "body", no union-member tags such as
    "list[int]" or "function-after[...]" (``prompt.list[int].3`` -> ``prompt.3``)."""
    return [str(x) for x in loc if x not in ("body", "query", "path", "header")
            and not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]


class CountRequests:
    """Pure ASGI middleware counting requests by route and status.

    Unlike ``@app.middleware("http")`` it passes every ``receive`` message through unchanged, so a handler's
    ``request.is_disconnected()`` sees the client go away and a non-streaming request is cancelled. A request
    whose client disconnected before its response was complete is counted as status "499" (nginx's "client
    closed request"), whatever status its response started with (a stream starts with 200).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"status": 500, "complete": False, "gone": False}

        async def watch_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["complete"]:
                state["gone"] = True
            return message

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, watch_receive, send_status)
        except (ClientDisconnect, OSError):   # ASGI 2.4 servers: a send to a gone client raises
            state["gone"] = True
            raise
        finally:
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                route = scope.get("route")
                status = "499" if state["gone"] else str(state["status"])
                metrics.requests.labels(getattr(route, "path", "unmatched"), status).inc()


class LimitBody:
    """Pure ASGI middleware: a request body over ``max_bytes`` (by Content-Length, or counted as it arrives
    when chunked) raises a 413 HTTPException from the route's body read, so the app's handler answers it
    in OpenAI's shape. (starlette's own limit answers 413 in plain text.)"""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            if too_large:
                raise StarletteHTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


class OneLineStartupRefusal:
    """Pure ASGI middleware: when the app's startup refuses (a domain error: a bad artifact file, settings
    that cannot fit), the lifespan failure uvicorn logs is that one line, not starlette's traceback; with
    ``quiet`` nothing is logged (`twinserve serve` prints the refusal itself and exits 2)."""

    def __init__(self, app: ASGIApp, quiet: bool = False):
        self.app, self.quiet = app, quiet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_refusal(message: Message) -> None:
            refusal = getattr(scope["app"].state, "startup_error", None) if "app" in scope else None
            if message["type"] == "lifespan.startup.failed" and refusal is not None:
                message = {**message, "message": "" if self.quiet else f"refusing to start: {refusal}"}
            await send(message)

        await self.app(scope, receive, send_refusal)


def create_app(settings: Settings | None = None, expert_reader: Callable | None = None, verified: bool = False,
               report_startup_error: bool = True) -> FastAPI:
    """The app for ``settings`` (default: from TWINSERVE_* variables); the artifact loads in its lifespan.

    ``expert_reader(manifest, t)`` -> expert t's full state under HF names: what mode `expert` serves
    (compression.experts.read_expert_state; the caller passes it, as server/ does not import compression/).
    Other modes never call it; mode `expert` without one refuses to start.
    ``verified``: the caller verified the artifact's checksums just now (not computed again).
    A refusal at startup (TwinserveError, or a file that cannot be read) is kept in ``app.state.startup_error``
    and logged as one line (``report_startup_error`` False: not logged; the caller reports it).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await asyncio.to_thread(load_state, app, settings, expert_reader, verified)
        except TwinserveError as e:
            app.state.startup_error = e
            raise
        except OSError as e:   # a file the server cannot read (permissions, I/O error): named, one line
            app.state.startup_error = StartupError(f"{e.filename or settings.artifact}: cannot read: "
                                                   f"{e.strerror or e}")
            raise
        await app.state.engine.start()
        startup_log.info("twinserve ready: %s (%s mode, %s experts)", settings.artifact, settings.mode,
                 len(app.state.artifact.expert_names))
        yield
        await app.state.engine.stop()

    app = FastAPIOffline(title="twinserve", version=__version__, lifespan=lifespan,
                         description="OpenAI-compatible server for Twin-Merging: a shared backbone plus "
                                     "router-weighted low-rank exclusive experts, per request, in one batch.")
    app.state.settings = settings
    app.state.created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":   # loc is ("body", character offset): not a field
            where = first.get("loc", ("body", "?"))[-1]
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse({"error": {"message": f"request body is not valid JSON ({reason} at character "
                                                      f"{where})", "type": "invalid_request_error", "param": None,
                                           "code": "invalid_json"}}, status_code=400)
        param = ".".join(_field_path(first.get("loc", ()))) or None
        msg = "; ".join(f"{'.'.join(_field_path(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": param,
                                       "code": "invalid_value"}}, status_code=400)

    @app.exception_handler(StarletteHTTPException)  # unknown path, wrong method, unparsable body: OpenAI shape too
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:   # LimitBody, raised while the route reads the body
            limit = settings.max_request_bytes
            return JSONResponse(PayloadTooLarge(f"request body exceeds the server's limit of {limit} bytes "
                                                f"({limit / 2**20:g} MiB; TWINSERVE_MAX_REQUEST_BYTES / "
                                                "--max-request-bytes)").body(), status_code=413)
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(InternalError(f"internal error ({type(exc).__name__})").body(), status_code=500)

    app.add_middleware(LimitBody, max_bytes=settings.max_request_bytes)   # inside CountRequests: 413s counted
    app.add_middleware(CountRequests)
    app.add_middleware(OneLineStartupRefusal, quiet=not report_startup_error)
    if settings.allowed_origins:   # CORS off by default; outermost, so error responses carry its headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers)

    from .routes import router
    app.include_router(router)
    from .playground import mount_playground
    mount_playground(app)
    return app

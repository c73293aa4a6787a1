"""Browser playground: one static page at / and /playground, its assets under /static (no CDN, no build step).

The page only talks to this server's own API (/v1/stats, /v1/models, /v1/completions, /v1/chat/completions),
so it works offline; a Content-Security-Policy header pins every fetch, script and style to the same origin.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
# /docs (Swagger UI) and /redoc come from fastapi_offline with same-origin assets, but their HTML uses inline
# scripts/styles, and ReDoc's sidebar still points an <img> at cdn.redoc.ly: this policy keeps both pages fully
# offline (the logo is refused and ReDoc hides it) without breaking them.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'self'")
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class DocsCSP:
    """Pure ASGI middleware: add DOCS_CSP to the /docs and /redoc HTML responses; other paths pass untouched."""

    def __init__(self, app, paths: frozenset[str] = DOCS_PATHS, policy: str = DOCS_CSP):
        self.app, self.paths, self.policy = app, paths, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)

        async def send_with_csp(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("content-security-policy", self.policy)
            await send(message)

        await self.app(scope, receive, send_with_csp)


def mount_playground(app: FastAPI) -> None:
    """Add GET / and GET /playground (the page) and /static (its assets); none of them is in the OpenAPI schema.
    Also pins /docs and /redoc to same-origin resources (DocsCSP)."""
    app.add_middleware(DocsCSP)
    if not INDEX.is_file():  # a broken install without package data: serve the API only
        return

    async def playground() -> FileResponse:
        return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    for path in ("/", "/playground"):
        app.add_api_route(path, playground, methods=["GET", "HEAD"], include_in_schema=False,
                          name="playground" if path == "/" else "playground_alias")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

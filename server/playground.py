"""Browser playground: one static page at / and /playground, its assets under /static (no CDN, no build step).

The page only talks to this server's own API (/v1/stats, /v1/models, /v1/completions, /v1/chat/completions),
so it works offline; a Content-Security-Policy header pins every fetch, script and style to the same origin.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def mount_playground(app: FastAPI) -> None:
    """Add GET / and GET /playground (the page) and /static (its assets); none of them is in the OpenAPI schema."""
    if not INDEX.is_file():  # a broken install without package data: serve the API only
        return

    async def playground() -> FileResponse:
        return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    for path in ("/", "/playground"):
        app.add_api_route(path, playground, methods=["GET"], include_in_schema=False,
                          name="playground" if path == "/" else "playground_alias")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

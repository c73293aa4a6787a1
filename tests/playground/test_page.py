"""Fast checks of the playground mount (no browser, no model: the app's lifespan is not started)."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


@pytest.fixture(scope="module")
def client():
    # Without `with TestClient(...)` the lifespan (artifact loading) never runs: static routes need no model.
    return TestClient(create_app(Settings(artifact="/nonexistent-artifact")))


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>twinserve playground</title>" in r.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert asset in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, no external fonts
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp


def test_head_request(client):
    assert client.head("/").status_code == 200


@pytest.mark.parametrize("asset,ctype", [("app.js", "javascript"), ("app.css", "text/css"),
                                         ("favicon.svg", "image/svg+xml")])
def test_static_assets(client, asset, ctype):
    r = client.get(f"/static/{asset}")
    assert r.status_code == 200
    assert ctype in r.headers["content-type"]
    assert r.content


def test_no_external_urls_in_assets():
    """Every asset is self-contained: no URL other than the SVG XML namespace (an identifier, never fetched)."""
    from server.playground import STATIC_DIR

    files = [f for f in STATIC_DIR.rglob("*") if f.is_file()]
    assert {"index.html", "app.js", "app.css"} <= {f.name for f in files}
    for f in files:
        text = f.read_text().replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", text, re.IGNORECASE), f.name


def test_app_js_uses_the_api(client):
    js = client.get("/static/app.js").text
    for needle in ("/v1/stats", "/v1/completions", "/v1/chat/completions", "getReader", "twin", "Bearer"):
        assert needle in js


def test_static_missing_file_is_404(client):
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/../playground.py").status_code == 404


def test_not_in_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/playground"} & set(paths)
    assert not [p for p in paths if p.startswith("/static")]
    assert "/v1/completions" in paths


def test_docs_are_offline(client):
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        assert "twinserve" in html
        assert "cdn.jsdelivr.net" not in html and "fonts.googleapis.com" not in html
        csp = client.get(path).headers["content-security-policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp
    assert "content-security-policy" not in client.get("/openapi.json").headers

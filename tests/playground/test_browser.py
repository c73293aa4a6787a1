"""End-to-end playground test in a real (Debian) Chromium driven by Playwright.

Starts `twinserve serve` on 127.0.0.1 with a free port (the demo artifact when artifacts/demo exists, else the
tiny test artifact), streams a routed request, pins another expert, runs a side-by-side compare, checks the live
stats panel, /docs and /redoc, and that the browser never contacted a non-loopback host. The screenshot goes to
test-artifacts/playground.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from twin.util import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "artifacts" / "demo"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "test-artifacts" / "playground.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STARTUP_TIMEOUT_S = 60

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

if sync_playwright is None:
    pytest.skip("playwright is not importable (pip install playwright)", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """(base_url, info): a live `twinserve serve` subprocess; info = {"demo": bool, "experts": [...]}."""
    if (DEMO / "manifest.json").is_file():
        artifact, demo = DEMO, True
    else:  # no demo built (artifacts/ is git-ignored): the tiny 3-expert test artifact from tests/conftest.py
        artifact, demo = request.getfixturevalue("tiny_artifact"), False
    port = free_port()
    log = tmp_path_factory.mktemp("playground") / "server.log"
    env = dict(os.environ, TWINSERVE_THREADS="1", TWINSERVE_LOG_LEVEL="warning", TOKENIZERS_PARALLELISM="false",
               TWINSERVE_REQUIRE_PARITY="false")   # the tiny test artifact is built without the parity gate
    env.pop("TWINSERVE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", str(artifact), "--host", "127.0.0.1",
                                 "--port", str(port), "--model-name", "demo" if demo else "tiny"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get_json(f"{base}/ready")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        experts = _get_json(f"{base}/v1/stats")["experts"]
        yield base, {"demo": demo, "experts": experts}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser_page():
    """(page, log): log["requests"] every request URL the page made, log["external"] the ones that reached the
    network for a non-loopback host (aborted here), log["csp_blocked"] the ones the page's CSP refused before any
    network access, log["errors"] page errors and console errors."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1366, "height": 900}, device_scale_factor=1,
                                      color_scheme="light", service_workers="block")
        log: dict[str, list[str]] = {"requests": [], "external": [], "csp_blocked": [], "errors": []}
        requests, external, errors = log["requests"], log["external"], log["errors"]

        def guard(route):
            url = route.request.url
            parts = urlsplit(url)
            if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOOPBACK:
                external.append(url)
                route.abort()
            else:
                route.continue_()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("requestfailed", lambda r: log["csp_blocked"].append(r.url) if r.failure == "csp" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.set_default_timeout(30_000)
        try:
            yield page, log
        finally:
            context.close()
            browser.close()


def _bars(page, panel: str) -> dict[str, float]:
    return page.eval_on_selector_all(
        f"{panel} [data-role=bars] li[data-expert]",
        "els => Object.fromEntries(els.map(e => [e.dataset.expert, Number(e.dataset.weight)]))")


def _output(page, panel: str) -> str:
    return page.inner_text(f"{panel} [data-role=output]")


def _run(page, action, panels=("#panel-a",)):
    """Do `action` (which starts a streamed request) and wait until every panel finished streaming; returns the
    (first) request's JSON body."""
    with page.expect_response(lambda r: "/completions" in r.url and r.request.method == "POST") as resp:
        action()
    r = resp.value
    assert r.status == 200, r.text()
    assert r.headers["content-type"].startswith("text/event-stream")
    for panel in panels:
        page.wait_for_function(
            "sel => ['done', 'error', 'stopped'].includes(document.querySelector(sel).dataset.state)", arg=panel)
        state = page.get_attribute(panel, "data-state")
        assert state == "done", f"{panel}: {state}: {page.inner_text(panel + ' [data-role=status]')}"
    return r.request.post_data_json


def test_playground_end_to_end(served, browser_page):
    base, info = served
    page, log = browser_page
    requests, external, errors = log["requests"], log["external"], log["errors"]
    experts, demo = info["experts"], info["demo"]
    prompt = "reverse hello=" if demo else "hello world."
    routed_expert = "reverse" if demo else None
    pinned = "upper" if demo else experts[-1]
    t0 = time.monotonic()

    # ---- the page loads and fills its expert pickers from the API
    page.goto(f"{base}/")
    assert page.title() == "twinserve playground"
    page.wait_for_selector(f"#expert option[value='pin:{pinned}']", state="attached")
    assert page.eval_on_selector_all("#expert option", "os => os.map(o => o.value)") == \
        [""] + [f"pin:{e}" for e in experts] + ["custom"]
    assert page.inner_text("#expert option:first-child") == "router (auto)"

    # every form control has an accessible name
    unlabelled = page.eval_on_selector_all(
        "input, select, textarea, button",
        "els => els.filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') "
        "&& !(e.textContent || '').trim()).map(e => e.id || e.outerHTML.slice(0, 60))")
    assert unlabelled == []

    # ---- routed request, submitted with Ctrl+Enter from the prompt box (keyboard path)
    page.fill("#prompt", prompt)
    _run(page, lambda: page.press("#prompt", "Control+Enter"))
    routed_text = _output(page, "#panel-a")
    assert routed_text.strip()
    routed = _bars(page, "#panel-a")
    assert list(routed) == experts
    assert page.inner_text("#panel-a [data-role=source]") in ("router", "uniform")
    if demo:
        assert routed_text == "olleh"
        assert max(routed, key=routed.get) == routed_expert and routed[routed_expert] > 0.5
        assert page.inner_text("#panel-a [data-role=top]") == routed_expert
        assert page.inner_text("#panel-a [data-role=fallback]") == "no"
        assert page.get_attribute(f"#panel-a li[data-expert={routed_expert}]", "class") == "top"
    for field in ("top", "entropy", "fallback", "router-ms"):
        assert page.inner_text(f"#panel-a [data-role={field}]") != "–"

    # ---- pin another expert: bars become one-hot and the output changes
    page.select_option("#expert", f"pin:{pinned}")
    body = _run(page, lambda: page.click("#send"))
    assert body["twin"] == {"expert": pinned} and body["stream"] is True and body["prompt"] == prompt
    pinned_bars = _bars(page, "#panel-a")
    assert pinned_bars[pinned] == 1.0
    assert all(w == 0.0 for name, w in pinned_bars.items() if name != pinned)
    assert pinned_bars != routed
    assert page.inner_text("#panel-a [data-role=source]") == "request"
    assert page.inner_text("#panel-a [data-role=tag]") == f"pinned: {pinned}"
    pinned_text = _output(page, "#panel-a")
    if demo:
        assert pinned_text == "HELLO"
    assert pinned_text != routed_text

    # ---- custom weights via sliders
    page.select_option("#expert", "custom")
    assert page.is_visible("#sliders")
    page.fill(f"#slider-list input[data-expert={experts[0]}]", "0.75")
    page.fill(f"#slider-list input[data-expert={experts[1]}]", "0.25")
    body = _run(page, lambda: page.click("#send"))
    assert body["twin"]["experts"][experts[0]] == 0.75 and body["twin"]["experts"][experts[1]] == 0.25
    custom = _bars(page, "#panel-a")
    assert custom[experts[0]] == pytest.approx(0.75, abs=1e-3)
    assert custom[experts[1]] == pytest.approx(0.25, abs=1e-3)
    page.select_option("#expert", "")
    assert not page.is_visible("#sliders")

    # ---- compare: routed and pinned side by side (two panels, one request each, batched together)
    page.select_option("#compare-expert", pinned)
    _run(page, lambda: page.click("#compare"), panels=("#panel-a", "#panel-b"))
    assert page.is_visible("#panel-b")
    assert _bars(page, "#panel-b")[pinned] == 1.0
    assert _bars(page, "#panel-a") == routed
    assert _output(page, "#panel-a") == routed_text
    assert _output(page, "#panel-b") == pinned_text
    assert page.inner_text("#panel-b-title") == f"Pinned · {pinned}"

    # ---- chat mode streams too; the optional API key goes out as a Bearer token
    page.click("label[for=kind-chat]")
    assert page.is_checked("#kind-chat")
    assert page.inner_text("#prompt-label") == "User message"
    page.fill("#api-key", "sk-playground-test")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as chat_req:
        _run(page, lambda: page.click("#send"))
    assert chat_req.value.headers.get("authorization") == "Bearer sk-playground-test"
    body = chat_req.value.post_data_json
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": prompt}]
    assert "twin" not in body  # router (auto) sends no override
    assert _output(page, "#panel-a").strip()
    page.fill("#api-key", "")
    page.click("label[for=kind-completion]")

    # ---- live panel: /v1/stats numbers and routing share bars
    page.wait_for_selector("#share-bars li[data-expert]")
    page.wait_for_function("document.querySelector('#kpi-ttft50').textContent.includes('ms') "
                           "|| document.querySelector('#kpi-ttft50').textContent.endsWith(' s')")
    assert page.inner_text("#kpi-rps") != "–"
    assert page.inner_text("#kpi-queue").isdigit()
    if demo:
        assert page.query_selector(f"#share-bars li[data-expert={routed_expert}]") is not None

    # ---- screenshot (the compare view), back in completion mode with the pinned+routed panels
    page.select_option("#compare-expert", pinned)
    page.fill("#prompt", prompt)
    _run(page, lambda: page.click("#compare"), panels=("#panel-a", "#panel-b"))
    page.wait_for_timeout(400)  # let the bar transitions finish
    page.evaluate("document.activeElement && document.activeElement.blur()")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000

    assert errors == [], errors
    assert not [u for u in requests if urlsplit(u).hostname not in LOOPBACK and urlsplit(u).scheme != "data"]

    # ---- /docs (Swagger UI) and /redoc render offline from same-origin assets
    before = len(requests)
    page.goto(f"{base}/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "twinserve" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/completions']")
    docs_requests = requests[before:]
    assets = [u for u in docs_requests if u.endswith((".js", ".css"))]
    assert assets and all(u.startswith(f"{base}/") for u in assets), assets

    page.goto(f"{base}/redoc")
    page.wait_for_selector("h1:has-text('twinserve')", timeout=30_000)
    page.wait_for_selector("text=API docs by Redocly")  # sidebar footer: its logo <img> points at cdn.redoc.ly

    # nothing reached a non-loopback host; anything that tried (ReDoc's logo) was refused by the docs CSP
    assert external == [], f"requests to non-loopback hosts: {external}"
    tried = {u for u in requests if urlsplit(u).scheme in ("http", "https") and urlsplit(u).hostname not in LOOPBACK}
    assert tried <= set(log["csp_blocked"]), tried - set(log["csp_blocked"])
    # ... and the CSP broke nothing else on the docs pages (no refused script, style, fetch or worker)
    refused = [e for e in errors if "Content Security Policy" in e and "cdn.redoc.ly" not in e]
    assert refused == [], refused
    assert time.monotonic() - t0 < 60


def test_docs_assets_are_same_origin(served):
    """The docs HTML itself references only same-origin assets (no CDN)."""
    base, _ = served
    for path in ("/docs", "/redoc"):
        with urllib.request.urlopen(f"{base}{path}", timeout=5) as r:
            html = r.read().decode()
        assert "twinserve" in html
        assert "https://" not in html and "http://" not in html.replace(base, "")


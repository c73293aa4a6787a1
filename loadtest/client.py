"""One streaming completion request -> a ``Result`` with its timings, text, routing and error (if any).

Timings use ``time.perf_counter`` from just before the request is sent:
TTFT = first chunk with non-empty text, ITL = gaps between consecutive non-empty chunks,
e2e = until ``data: [DONE]`` (or the stream's end), TPOT = (e2e - TTFT) / (tokens - 1).
No retries: whatever the server answers is recorded once.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .workload import LoadtestError, Row

CONN_ERROR = "conn_error"
TIMEOUT = "timeout"
PROTOCOL_ERROR = "protocol_error"   # 200 but not a well-formed SSE stream ending in [DONE]
STREAM_ERROR = "stream_error"       # an in-band {"error": ...} event


@dataclass
class Result:
    index: int
    task: str
    labeled: bool = True
    target: str | None = None
    start: float = 0.0                # seconds since the run started
    status: int | None = None         # HTTP status, None when no response arrived
    error: str | None = None          # None on success; "429", "conn_error", "timeout", ...
    message: str | None = None        # error detail (server's error.message or the exception)
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunks: int = 0                   # chunks with non-empty text
    usage_tokens: int | None = None   # usage.completion_tokens, when the server sent usage
    text: str = ""
    finish_reason: str | None = None
    top_expert: str | None = None
    routing: dict | None = None       # twin.routing of the first chunk carrying it

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)

    @property
    def correct(self) -> bool | None:
        if not self.ok or self.target is None:
            return None
        return self.text.strip() == self.target.strip()


def check_url(url: str) -> str:
    """An explicit http(s)://host[:port] base URL (no trailing slash, no /v1 suffix needed)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadtestError(f"--url must be an explicit http(s)://HOST:PORT URL, got {url!r}")
    if parts.query or parts.fragment:
        raise LoadtestError(f"--url must not carry a query or fragment: {url!r}")
    base = url.strip().rstrip("/")
    return base.removesuffix("/v1")


def make_client(max_connections: int, timeout: float) -> httpx.AsyncClient:
    """No proxies or other settings from the environment, no redirects, a bounded connection pool."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), trust_env=False, follow_redirects=False,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))


def request_body(row: Row, model: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": row.prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace")


async def _consume(resp: httpx.Response, res: Result, t_send: float) -> None:
    last: float | None = None
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event:/id: fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            res.error, res.message = PROTOCOL_ERROR, f"bad SSE data: {payload[:100]!r}"
            return
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            res.error, res.message = STREAM_ERROR, _error_message(payload.encode())
            return
        twin = chunk.get("twin")
        if res.routing is None and isinstance(twin, dict) and isinstance(twin.get("routing"), dict):
            res.routing = twin["routing"]
            res.top_expert = res.routing.get("top_expert")
        choices = chunk.get("choices") or []
        if choices and isinstance(choices[0], dict):
            c = choices[0]
            text = c.get("text")
            if text is None and isinstance(c.get("delta"), dict):  # chat-shaped chunks
                text = c["delta"].get("content")
            if text:
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - t_send
                else:
                    res.itl.append(now - last)
                last = now
                res.chunks += 1
                res.text += text
            if c.get("finish_reason"):
                res.finish_reason = c["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            res.usage_tokens = usage["completion_tokens"]
    if not done:
        res.error, res.message = PROTOCOL_ERROR, "stream ended without data: [DONE]"


async def stream_completion(client: httpx.AsyncClient, base_url: str, row: Row, *, index: int = 0,
                            model: str = "demo", max_tokens: int = 16, api_key: str | None = None,
                            timeout: float = 60.0, t0: float | None = None) -> Result:
    """Send ``row`` once as a streaming completion and measure it; never raises for server/network faults."""
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t_send = time.perf_counter()
    res = Result(index=index, task=row.task, labeled=row.labeled, target=row.target,
                 start=t_send - (t0 if t0 is not None else t_send))

    async def go() -> None:
        async with client.stream("POST", f"{base_url}/v1/completions", headers=headers,
                                 json=request_body(row, model, max_tokens)) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error, res.message = str(resp.status_code), _error_message(await resp.aread())
                return
            await _consume(resp, res, t_send)

    try:
        await asyncio.wait_for(go(), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        res.error, res.message = TIMEOUT, f"no complete answer within {timeout:g} s ({type(e).__name__})"
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
            httpx.NetworkError) as e:
        res.error, res.message = CONN_ERROR, f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        res.error, res.message = PROTOCOL_ERROR, f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t_send
    return res

"""Client-facing defects of issue 20, one test (or parametrised group) each: a chat template's own <bos>, lone
surrogates and non-ASCII digits, auth on every /v1 route, CORS, the `twin` field's edge cases,
GET /v1/models/{id}, signed seeds and top_p 0, a body sent without Content-Type: application/json,
/tokenize with no messages, /ready while draining, disconnects in /metrics, the body limit and
tokenisation off the event loop."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.conftest import app_client, live_server, server_settings

from .helpers import TASK_PROMPTS, assert_openai_error, complete, make_long, running_engine, wait_for

P = TASK_PROMPTS
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def c(routed_artifact):
    """A TestClient that answers a server error with its 500 response (as a real client sees it)."""
    with TestClient(create_app(server_settings(routed_artifact)), raise_server_exceptions=False) as client:
        yield client


def raw_post(client, path: str, raw: bytes, **headers):
    return client.post(path, content=raw, headers={"content-type": "application/json", **headers})


# ----------------------------------------------------------------------------- 1. one <bos> from a chat template

def test_chat_template_that_writes_bos_gets_no_second_bos(routed_artifact):
    with TestClient(create_app(server_settings(routed_artifact)), raise_server_exceptions=False) as client:
        tok = client.app.state.service.tokenizer
        tok.chat_template = BOS_TEMPLATE
        msgs = [{"role": "user", "content": "add abc"}]
        expected = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert expected.count(tok.bos_token_id) == 1

        r = client.post("/tokenize", json={"messages": msgs, "return_token_strs": True}).json()
        assert r["tokens"] == expected and r["token_strs"].count("<bos>") == 1 and r["token_strs"][0] == "<bos>"
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 1})
        assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected) == r["count"]
        # asked for explicitly, the tokenizer's own special tokens are still added
        again = client.post("/tokenize", json={"messages": msgs, "add_special_tokens": True}).json()
        assert again["tokens"] == [tok.bos_token_id] + expected
        # without a template, the "role: content" fallback carries no <bos> of its own: the tokenizer adds one
        tok.chat_template = None
        plain = client.post("/tokenize", json={"messages": msgs, "return_token_strs": True}).json()
        assert plain["token_strs"].count("<bos>") == 1


def test_chat_template_errors_are_400_naming_messages(routed_artifact):
    with TestClient(create_app(server_settings(routed_artifact)), raise_server_exceptions=False) as client:
        client.app.state.service.tokenizer.chat_template = \
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}]})
        assert "system message must come first" in assert_openai_error(r, 400, param="messages")["message"]


# ----------------------------------------------------------------------------- 2. lone surrogates, non-ASCII digits

@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "ab\\ud83d", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ab", "\\udc00cd"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "stop": ["\\ud83d"], "max_tokens": 2}', "stop.0"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "ab\\ud83d"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"model": "tiny\\ud83d", "messages": [{"role": "user", "content": "ab"}]}', "model"),
    ("/tokenize", b'{"prompt": "ab\\ud83d"}', "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud83dab"}]}', "messages.0.content"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ab", "logit_bias": {"\\ud83d": 1}}', "logit_bias"),
])
def test_lone_surrogate_is_400_naming_the_field(c, path, raw, param):
    err = assert_openai_error(raw_post(c, path, raw), 400, param=param, type_="invalid_request_error")
    assert "surrogate" in err["message"]


def test_paired_surrogates_are_text(c):
    r = raw_post(c, "/tokenize", b'{"prompt": "a\\ud83d\\ude00"}')   # one emoji, as JSON escapes it
    assert r.status_code == 200 and r.json()["count"] >= 2


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "\uff11", " 3", "+3", "1" * 30])
def test_logit_bias_key_must_be_ascii_digits(c, key):
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2, "logit_bias": {key: 1}})
    assert "token ids" in assert_openai_error(r, 400, param="logit_bias")["message"]


# ----------------------------------------------------------------------------- 3. auth

def test_every_v1_route_requires_the_api_key(routed_artifact, monkeypatch):
    import server.routes

    compared = []
    real = server.routes.hmac.compare_digest
    monkeypatch.setattr(server.routes.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with app_client(routed_artifact, api_key="s3cret") as client:
        routes = [(r.path, min(r.methods)) for r in server.routes.router.routes if r.path.startswith("/v1/")]
        assert ("/v1/stats", "GET") in routes and len(routes) >= 5
        for path, method in routes:
            url = path.replace("{model_id:path}", "tiny")
            r = client.request(method, url, json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
            assert_openai_error(r, 401, type_="authentication_error")
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer s3cret", "  Bearer   s3cret "):
            assert client.get("/v1/stats", headers={"Authorization": header}).status_code == 200, header
        for header in ("Bearer s3cre", "Basic s3cret", "s3cret", "Bearer", "Bearer s3cret extra",
                       "Bearer s3cr\u00e9t"):
            r = client.get("/v1/models", headers={"Authorization": header.encode("latin-1")})
            assert_openai_error(r, 401)
        assert compared   # constant-time comparison
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


# ----------------------------------------------------------------------------- 4. CORS

def test_cors_allows_only_the_listed_origins(routed_artifact, c):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    with app_client(routed_artifact, allowed_origins=["https://ok.example"]) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
        ok = client.get("/v1/models", headers={"Origin": "https://ok.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
        err = client.post("/v1/completions", json={"model": "nope", "prompt": "a"}, headers={"Origin": "https://ok.example"})
        assert err.status_code == 404 and err.headers["access-control-allow-origin"] == "https://ok.example"
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "https://evil.example"}).headers
    # the default: CORS off, for every origin
    assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "https://ok.example"}).headers
    r = c.options("/v1/chat/completions", headers={"Origin": "https://ok.example", **preflight})
    assert "access-control-allow-origin" not in r.headers


def test_cors_settings_from_the_environment_and_flags(monkeypatch):
    from server.serve_cli import register
    from server.settings import Settings

    assert Settings().allowed_origins == [] and Settings().allowed_methods == ["*"]
    monkeypatch.setenv("TWINSERVE_ALLOWED_ORIGINS", '["https://a.example", "https://b.example"]')
    monkeypatch.setenv("TWINSERVE_ALLOWED_HEADERS", '["authorization"]')
    s = Settings()
    assert s.allowed_origins == ["https://a.example", "https://b.example"] and s.allowed_headers == ["authorization"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "art", "--allowed-origins", '["https://a.example"]',
                              "--allowed-methods", "GET,POST", "--max-request-bytes", "2048"])
    assert args.allowed_origins == ["https://a.example"] and args.allowed_methods == ["GET", "POST"]
    assert args.max_request_bytes == 2048


# ----------------------------------------------------------------------------- 5. the twin field

@pytest.mark.parametrize("body,param,needle", [
    ({"twin": {"experts": {}}}, "twin.experts", "weight > 0"),
    ({"twin": {"experts": {"math": 0, "code": 0.0}}}, "twin.experts", "weight > 0"),
    ({"twin": {"experts": {"math": -0.5, "code": 1}}}, "twin.experts", "math"),
    ({"twin": {"experts": {"math": "1"}}}, "twin.experts.math", "number"),
    ({"twin": {"experts": {"math": True}}}, "twin.experts.math", "number"),
    ({"model": "tiny:"}, "model", "no expert"),
    ({"model": "tiny:math", "twin": {"top_k": 2}}, "twin.top_k", "cannot apply"),
    ({"model": "tiny:math", "twin": {"temperature": 2.0}}, "twin.temperature", "cannot apply"),
    ({"twin": {"expert": "math", "top_k": 1}}, "twin.top_k", "cannot apply"),
    ({"twin": {"expert": "math", "temperature": 0.5}}, "twin.temperature", "cannot apply"),
    ({"twin": {"experts": {"math": 1}, "top_k": 1}}, "twin.top_k", "cannot apply"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_twin_field_edge_cases_are_400_naming_the_field(c, path, body, param, needle):
    req = {"model": "tiny", "max_tokens": 1, **body}
    req.update({"prompt": "ab"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "ab"}]})
    err = assert_openai_error(c.post(path, json=req), 400, param=param, type_="invalid_request_error")
    assert needle in err["message"]


def test_twin_weights_that_are_valid_still_work(c):
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 1,
                                        "twin": {"experts": {"math": 3, "code": 1.0, "chat": 0}}})
    assert r.status_code == 200 and r.json()["twin"]["routing"]["weights"] == {"math": 0.75, "code": 0.25, "chat": 0.0}
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 1,
                                        "twin": {"top_k": 1, "temperature": 2.0}})
    assert r.status_code == 200 and r.json()["twin"]["routing"]["source"] == "router"


# ----------------------------------------------------------------------------- 6. GET /v1/models/{id}

def test_models_retrieve(server, c):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    for mid in ("tiny", "tiny:math"):
        m = oai.models.retrieve(mid)
        assert m.id == mid and m.object == "model" and m.owned_by == "twinserve" and m.created > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    err = assert_openai_error(c.get("/v1/models/tiny:nope"), 404, param="model", type_="not_found_error")
    assert err["code"] == "model_not_found"


# ----------------------------------------------------------------------------- 7. seed, top_p

def test_seed_takes_any_signed_int64(c):
    def text(seed):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": P["chat"][0], "max_tokens": 8,
                                            "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(-1) == text(-1)
    assert text(-2**63) == text(-2**63) and text(2**63 - 1) == text(2**63 - 1)
    assert_openai_error(c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "seed": 2**63}), 400,
                        param="seed")
    assert_openai_error(c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "seed": -2**63 - 1}), 400,
                        param="seed")


def test_top_p_zero_is_greedy(c):
    def run(**fields):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": P["code"][0], "max_tokens": 8, **fields})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = run(temperature=0)
    assert run(temperature=1.0, top_p=0) == greedy == run(temperature=1.0, top_p=0, seed=7)
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                             "max_tokens": 2, "top_p": 0})
    assert r.status_code == 200


# ----------------------------------------------------------------------------- 8. Content-Type

@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_json_body_without_json_content_type_names_the_content_type(c, path, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = c.post(path, content=b'{"model": "tiny", "prompt": "ab"}', headers=headers)
    err = assert_openai_error(r, 415, param=None)
    assert "Content-Type" in err["message"] and "application/json" in err["message"]
    assert "valid dictionary" not in err["message"]


# ----------------------------------------------------------------------------- 9. /tokenize with no messages

def test_tokenize_empty_messages_is_400(c):
    assert_openai_error(c.post("/tokenize", json={"messages": []}), 400, param="messages")
    c.app.state.service.tokenizer.chat_template = "{{ messages[0]['content'] }}"   # would index an empty list
    try:
        assert_openai_error(c.post("/tokenize", json={"messages": []}), 400, param="messages")
    finally:
        c.app.state.service.tokenizer.chat_template = None


# ----------------------------------------------------------------------------- 10. /ready while draining

def test_ready_is_503_while_draining(c):
    engine = c.app.state.engine
    assert c.get("/ready").status_code == 200
    engine.accepting = False      # what Engine.stop does first; in-flight requests go on
    try:
        err = assert_openai_error(c.get("/ready"), 503, type_="server_error")
        assert err["code"] == "draining"
        assert_openai_error(c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1}), 503)
        assert c.get("/health").status_code == 200
    finally:
        engine.accepting = True
    assert c.get("/ready").status_code == 200


def test_engine_stays_ready_but_not_accepting_while_it_drains(routed_artifact):
    async def main():
        async with running_engine(routed_artifact) as (svc, engine):
            make_long(engine, delay_s=0.02)
            job = asyncio.create_task(complete(svc, P["chat"][0], max_tokens=20))
            await asyncio.sleep(0.1)
            stop = asyncio.create_task(engine.stop(drain_s=10))
            await asyncio.sleep(0.05)
            assert engine.ready and not engine.accepting
            assert (await job)["finish_reason"] == "length"   # drained, not dropped
            await stop
            assert not engine.ready
    asyncio.run(main())


# ----------------------------------------------------------------------------- 11. disconnects in /metrics

def _requests(metrics, status: str) -> float:
    return metrics.requests.labels("/v1/completions", status)._value.get()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnected_requests_are_counted_as_499(routed_artifact, stream):
    with live_server(routed_artifact) as s:
        engine, metrics = s.app.state.engine, s.app.state.metrics
        make_long(engine, delay_s=0.05)
        body = json.dumps({"model": "tiny", "prompt": "add abc", "max_tokens": 100, "temperature": 0,
                           "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")   # the stream has started
        wait_for(lambda: len(engine.running) == 1, what="the request to run")
        sock.close()
        wait_for(lambda: _requests(metrics, "499") == 1, timeout=10, what="the 499 count")
        wait_for(lambda: not engine.running, what="the cancel")
        assert _requests(metrics, "200") == 0 and _requests(metrics, "400") == 0
        # a request that completes is still a 200
        ok = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2,
                                                         "stream": stream}, timeout=30)
        assert ok.status_code == 200
        wait_for(lambda: _requests(metrics, "200") == 1, what="the 200 count")   # counted once the app returns
        assert _requests(metrics, "499") == 1


# ----------------------------------------------------------------------------- 12. body limit, off-loop encoding

def test_request_body_over_the_limit_is_413_naming_it(routed_artifact):
    with app_client(routed_artifact, max_request_bytes=4096) as client:
        big = {"model": "tiny", "prompt": "a" * 5000, "max_tokens": 1}
        err = assert_openai_error(client.post("/v1/completions", json=big), 413)
        assert "4096 bytes" in err["message"] and "max-request-bytes" in err["message"]
        chunks = iter([json.dumps(big).encode()[i:i + 1000] for i in range(0, 5100, 1000)])   # no Content-Length
        r = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
        assert_openai_error(r, 413)
        assert client.post("/v1/completions", json={**big, "prompt": "a" * 100}).status_code == 200
        from prometheus_client.parser import text_string_to_metric_families
        counted = {tuple(sorted(x.labels.items())): x.value for f in text_string_to_metric_families(
            client.get("/metrics").text) for x in f.samples if x.name == "twinserve_requests_total"}
        assert counted[(("endpoint", "/v1/completions"), ("status", "413"))] == 2


def test_tokenisation_runs_off_the_event_loop(routed_artifact):
    with live_server(routed_artifact) as s:
        tok = s.app.state.service.tokenizer
        release, entered = threading.Event(), threading.Event()
        real = tok.encode

        def slow_encode(text, *args, **kwargs):
            if "zzslow" in text:
                entered.set()
                release.wait(20)
            return real(text, *args, **kwargs)

        tok.encode = slow_encode
        results = {}

        def send(name, path, body):
            results[name] = httpx.post(s.url + path, json=body, timeout=60)

        threads = [threading.Thread(target=send, args=("completion", "/v1/completions",
                                                       {"model": "tiny", "prompt": "zzslow", "max_tokens": 1})),
                   threading.Thread(target=send, args=("chat", "/v1/chat/completions",
                                    {"model": "tiny", "messages": [{"role": "user", "content": "zzslow"}],
                                     "max_tokens": 1}))]
        try:
            for t in threads:
                t.start()
            assert entered.wait(20)
            time.sleep(0.2)
            t0 = time.monotonic()
            health = httpx.get(s.url + "/health", timeout=5)   # the loop is free while a prompt is encoded
            other = httpx.post(s.url + "/tokenize", json={"prompt": "ab"}, timeout=5)
            assert health.status_code == 200 and other.status_code == 200 and time.monotonic() - t0 < 5
        finally:
            release.set()
            for t in threads:
                t.join(60)
            tok.encode = real
        assert results["completion"].status_code == 200 and results["chat"].status_code == 200


# ----------------------------------------------------------------------------- echoed prompt offsets

@pytest.mark.parametrize("prompt", ["café ok", "a\u00a0b 😀 c", "Upper éé x"])
def test_echo_text_offsets_index_the_echoed_prompt(c, prompt):
    """Characters the tokenizer maps to <unk> (é, an emoji, a no-break space, capitals here) decode to no
    text; each token's offset is still where its own character starts in the echoed prompt."""
    out = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1,
                                          "max_tokens": 2, "temperature": 0}).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    tok = c.app.state.service.tokenizer
    enc = tok(prompt, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    assert choice["text"].startswith(prompt)
    assert lp["text_offset"][0] == 0 and lp["tokens"][0] == "<bos>"
    assert lp["text_offset"][1:n] == [s for s, _ in enc["offset_mapping"][1:]] == list(range(len(prompt)))
    for off, token in zip(lp["text_offset"][1:n], lp["tokens"][1:n]):   # every prompt token at its character
        assert token == "<unk>" or choice["text"][off] == token
    # generated tokens continue after the echoed prompt, never before it
    assert all(o >= len(prompt) for o in lp["text_offset"][n:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


# ----------------------------------------------------------------------------- generation_tokens_total

def _generated_total(client) -> float:
    text = client.get("/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("twinserve_generation_tokens_total")))


def test_generation_tokens_total_counts_what_usage_bills(c):
    """An answer that ends on <eos> is billed the <eos> token (as OpenAI does): /metrics counts it too."""
    eos = c.app.state.service.tokenizer.eos_token_id
    before = _generated_total(c)
    billed = 0
    for body in ({"logit_bias": {str(eos): 100}, "max_tokens": 5},       # the first token is <eos>
                 {"max_tokens": 4, "logit_bias": {str(eos): -100}}):    # never <eos>: ends on length
        out = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "temperature": 0, **body}).json()
        billed += out["usage"]["completion_tokens"]
    assert billed == 1 + 4
    assert _generated_total(c) - before == billed

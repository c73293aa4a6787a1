"""HTTP API: the official openai client against a live server, error shapes, auth, probes, metrics, fuzzing."""
from __future__ import annotations

import json

import openai
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from server.app import create_app
from tests.conftest import EXPERT_NAMES, app_client, server_settings

from .helpers import TASK_PROMPTS, UNKNOWN_PROMPT, assert_openai_error, sse_events, wait_for

P = TASK_PROMPTS
LONG = P["chat"][2]      # routed to chat; greedy text runs to max_tokens (no early <eos>)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)


# ----------------------------------------------------------------------------- openai client

def test_completions_streaming_equals_non_streaming(oai):
    resp = oai.completions.create(model="tiny", prompt=LONG, max_tokens=16, temperature=0)
    assert resp.object == "text_completion" and resp.model == "tiny" and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and len(choice.text) >= 8
    assert resp.usage.prompt_tokens == len(LONG) + 1          # char tokenizer + <bos>
    assert resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16
    routing = resp.model_extra["twin"]["routing"]
    assert routing["source"] == "router" and routing["top_expert"] == "chat" and routing["fallback"] is False
    assert set(routing["weights"]) == set(EXPERT_NAMES) and sum(routing["weights"].values()) == pytest.approx(1, abs=1e-4)

    chunks = list(oai.completions.create(model="tiny", prompt=LONG, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].model_extra["twin"]["routing"]["weights"] == routing["weights"]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_chat_streaming_equals_non_streaming(oai):
    msgs = [{"role": "user", "content": P["chat"][0]}]
    resp = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    msg = resp.choices[0].message
    assert msg.role == "assistant" and len(msg.content) >= 6
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 12
    assert resp.model_extra["twin"]["routing"]["top_expert"] == "chat"

    chunks = list(oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_models_list(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["tiny"] + [f"tiny:{n}" for n in EXPERT_NAMES]
    assert all(m.owned_by == "twinserve" for m in oai.models.list())


def test_extra_body_pins_the_expert(oai):
    raw = oai.completions.with_raw_response.create(model="tiny", prompt=P["chat"][3], max_tokens=8, temperature=0,
                                                   extra_body={"twin": {"expert": "math"}})
    data = json.loads(raw.text)
    routing = data["twin"]["routing"]
    assert routing["source"] == "request" and routing["top_expert"] == "math" and routing["fallback"] is False
    assert routing["weights"] == {"math": 1.0, "code": 0.0, "chat": 0.0}
    assert routing["entropy"] == 0.0
    parsed = raw.parse()
    assert parsed.model_extra["twin"]["routing"] == routing
    # the same as pinning with the model id, and not what the router picks (chat)
    by_id = oai.completions.create(model="tiny:math", prompt=P["chat"][3], max_tokens=8, temperature=0)
    routed = oai.completions.create(model="tiny", prompt=P["chat"][3], max_tokens=8, temperature=0)
    assert by_id.choices[0].text == parsed.choices[0].text
    assert routed.model_extra["twin"]["routing"]["top_expert"] == "chat"
    assert routed.choices[0].text != parsed.choices[0].text
    # explicit weights are normalised
    soft = oai.completions.create(model="tiny", prompt=P["chat"][3], max_tokens=2,
                                  extra_body={"twin": {"experts": {"code": 3, "chat": 1}}})
    assert soft.model_extra["twin"]["routing"]["weights"] == {"math": 0.0, "code": 0.75, "chat": 0.25}


def test_streaming_with_stop_equals_non_streaming(oai):
    full = oai.completions.create(model="tiny", prompt=P["chat"][3], max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    ref = oai.completions.create(model="tiny", prompt=P["chat"][3], max_tokens=16, temperature=0, stop=[stop])
    assert ref.choices[0].finish_reason == "stop" and ref.choices[0].text == full[:full.index(stop)]
    chunks = list(oai.completions.create(model="tiny", prompt=P["chat"][3], max_tokens=16, temperature=0,
                                         stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_client_raises_typed_errors(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    extra_body={"twin": {"expert": "nope"}}, stream=True)
    assert e.value.body["param"] == "twin.expert"


# ----------------------------------------------------------------------------- error paths

def post(client, body, path="/v1/completions", **kw):
    return client.post(path, json=body, **kw)


def test_malformed_json_body(client):
    r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "hi",',
                    headers={"content-type": "application/json"})
    assert_openai_error(r, 400, type_="invalid_request_error")
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    r = client.post("/v1/completions", content=b"\x10\xffI\xfe\x1ej", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)     # not even UTF-8: FastAPI raises an HTTPException, still OpenAI-shaped


def test_unknown_path_and_wrong_method_are_openai_shaped(client):
    assert_openai_error(client.get("/v1/nope"), 404)
    r = client.get("/v1/completions")
    assert_openai_error(r, 405)
    assert "POST" in r.headers["allow"]


@pytest.mark.parametrize("body,param,needle", [
    ({"model": "tiny"}, "prompt", "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt", "empty"),
    ({"model": "tiny", "prompt": []}, "prompt", "empty"),
    ({"model": "tiny", "prompt": ["a", ""]}, "prompt", "prompt 1 is empty"),
    ({"model": "tiny", "prompt": [[1, 2], []]}, "prompt", "prompt 1 is empty"),
    ({"model": "tiny", "prompt": [5, -1]}, "prompt", ">= 0"),
    ({"model": "tiny", "prompt": [5, 37]}, "prompt", "vocabulary"),
    ({"model": "tiny", "prompt": ["a", 5]}, "prompt", "prompt"),
    ({"model": "tiny", "prompt": "hi", "temperature": 5}, "temperature", "temperature"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, "n", "n"),
    ({"model": "tiny", "prompt": "hi", "n": 3, "best_of": 2}, "best_of", "must be >= n"),
    ({"model": "tiny", "prompt": "hi", "n": 1, "best_of": 2, "stream": True}, "best_of", "stream"),
    ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, "top_p", "top_p"),    # 0 is allowed: greedy
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 2_000_000}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "4 stop"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 21}, "logprobs", "logprobs"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"99": 1}}, "logit_bias", "vocabulary"),
    ({"model": "tiny", "prompt": "hi", "twin": {"expert": "math", "experts": {"math": 1}}}, "twin",
     "either twin.experts or twin.expert"),
    ({"model": "tiny", "prompt": "hi", "twin": {"experts": {"math": -1}}}, "twin.experts", "math"),
    ({"model": "tiny", "prompt": "hi", "twin": {"bogus": 1}}, "twin.bogus", "bogus"),
    ({"model": "tiny", "prompt": "hi", "twin": {"expert": "nope"}}, "twin.expert", "nope"),
    ({"model": "tiny", "prompt": "hi", "twin": {"experts": {"nope": 1}}}, "twin.experts", "nope"),
    ({"model": "tiny", "prompt": "hi", "twin": {"top_k": 4}}, "twin.top_k", "3"),
    ({"model": "tiny:math", "prompt": "hi", "twin": {"expert": "code"}}, "twin", "not both"),
    ({"model": "tiny", "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"model": "tiny", "prompt": "hi", "suffix": "x"}, "suffix", "suffix"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, body, param, needle):
    err = assert_openai_error(post(client, body), 400, param=param, type_="invalid_request_error")
    assert needle in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0"),
    ({"model": "tiny", "messages": [{"role": "user", "content": None}]}, "messages.0"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format.type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_bad_chat_fields_are_400(client, body, param):
    assert_openai_error(post(client, body, "/v1/chat/completions"), 400, param=param)


@pytest.mark.parametrize("model", ["gpt-4", "tiny:nope", "tiny-x:math"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(client, model, path):
    body = {"model": model, "max_tokens": 2, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    err = assert_openai_error(post(client, body, path), 404, param="model", type_="not_found_error")
    assert err["code"] == "model_not_found" and "math" in err["message"]   # lists what exists


def test_prompt_longer_than_the_context_is_400_naming_the_limit(client):
    err = assert_openai_error(post(client, {"model": "tiny", "prompt": "a" * 200, "max_tokens": 1}), 400,
                              param="prompt")
    assert err["code"] == "context_length_exceeded" and "128" in err["message"] and "201" in err["message"]
    err = assert_openai_error(post(client, {"model": "tiny", "prompt": "a" * 200, "stream": True}), 400)
    assert "128" in err["message"]


def test_max_tokens_beyond_the_context_is_400(client):
    err = assert_openai_error(post(client, {"model": "tiny", "prompt": "hello", "max_tokens": 200}), 400,
                              param="max_tokens")
    assert err["code"] == "context_length_exceeded" and "128" in err["message"] and "200" in err["message"]
    ok = post(client, {"model": "tiny", "prompt": "hello", "max_tokens": 128 - 6, "temperature": 0})
    assert ok.status_code == 200     # exactly at the limit is fine


def test_extreme_but_valid_values_do_not_break_the_engine(client):
    """Edge values the schema allows must not turn into NaN probabilities (500 for the whole batch)."""
    r = post(client, {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 1e-300})
    assert r.status_code == 200, r.text
    r = post(client, {"model": "tiny", "prompt": "hi", "max_tokens": 3, "twin": {"experts": {"math": 1e39, "code": 1}}})
    assert r.status_code == 200, r.text
    assert r.json()["twin"]["routing"]["weights"] == {"math": 1.0, "code": 0.0, "chat": 0.0}
    r = post(client, {"model": "tiny", "prompt": "hi", "max_tokens": 3, "seed": 2**63 - 1, "top_k": 1_000_000,
                      "top_p": 1e-9, "twin": {"temperature": 1e-9}})
    assert r.status_code == 200, r.text


def test_more_choices_than_the_queue_holds_is_400(routed_artifact):
    with app_client(routed_artifact, max_queue=4) as c:
        err = assert_openai_error(post(c, {"model": "tiny", "prompt": ["ab", "cd", "ef"], "n": 2, "max_tokens": 1}),
                                  400, param="n")
        assert "6 choices" in err["message"] and "queue of 4" in err["message"]
        assert post(c, {"model": "tiny", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 1}).status_code == 200


def test_api_key(routed_artifact):
    with app_client(routed_artifact, api_key="s3cret") as c:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            err = assert_openai_error(post(c, body, headers=headers), 401, type_="authentication_error")
            assert err["code"] == "invalid_api_key"
        assert_openai_error(c.get("/v1/models"), 401)
        ok = post(c, body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_health_and_ready(client, routed_artifact):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "waiting": 0, "running": 0, "max_batch_size": 8}
    # before the lifespan has run (artifact not loaded) the server is alive but not ready
    cold = TestClient(create_app(server_settings(routed_artifact)))
    assert cold.get("/health").status_code == 200
    assert_openai_error(cold.get("/ready"), 503, type_="server_error")


# ----------------------------------------------------------------------------- metrics and stats

def scrape(client) -> dict[tuple, float]:
    text = client.get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests(client):
    before = scrape(client)
    for name in EXPERT_NAMES:  # every expert is exported from the start
        assert ("twinserve_expert_top1_total", (("expert", name),)) in before
    for p in (LONG, P["math"][0], P["code"][0]):
        assert post(client, {"model": "tiny", "prompt": p, "max_tokens": 5, "temperature": 0}).status_code == 200
    assert post(client, {"model": "tiny", "prompt": UNKNOWN_PROMPT, "max_tokens": 2}).status_code == 200
    assert post(client, {"model": "nope", "prompt": "hi"}).status_code == 404
    after = scrape(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("twinserve_requests_total", endpoint="/v1/completions", status="200") == 4
    assert delta("twinserve_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta("twinserve_time_to_first_token_seconds_count") == 4
    assert delta("twinserve_e2e_request_latency_seconds_count") == 4
    assert delta("twinserve_queue_wait_seconds_count") == 4
    assert delta("twinserve_router_latency_seconds_count") == 4
    for name in ("chat", "math", "code"):   # the fallback request counts as a fallback, not as its argmax
        assert delta("twinserve_expert_top1_total", expert=name) == 1
        assert delta("twinserve_expert_weight_mass_total", expert=name) > 0.5
    # three routed requests with weights summing to 1, the fallback one with all-zero weights
    assert sum(delta("twinserve_expert_weight_mass_total", expert=n) for n in EXPERT_NAMES) == pytest.approx(3, abs=1e-3)
    assert delta("twinserve_router_fallbacks_total") == 1
    assert delta("twinserve_prompt_tokens_total") == sum(len(p) + 1 for p in (LONG, P["math"][0], P["code"][0],
                                                                              UNKNOWN_PROMPT))
    gen = delta("twinserve_generation_tokens_total")
    assert 1 <= gen <= 17
    # every prompt token went through a prefill (or mixed) step; each decode token precedes a generated one
    phases = ("prefill", "decode", "mixed")
    step_tokens = sum(delta("twinserve_engine_step_tokens_total", phase=ph) for ph in phases)
    decode_tokens = step_tokens - delta("twinserve_prompt_tokens_total")
    assert 0 <= decode_tokens <= gen
    assert delta("twinserve_engine_step_seconds_count", phase="prefill") + \
        delta("twinserve_engine_step_seconds_count", phase="mixed") >= 1
    assert sum(delta("twinserve_engine_step_seconds_sum", phase=ph) for ph in phases) > 0
    assert delta("twinserve_finished_requests_total", reason="length") + \
        delta("twinserve_finished_requests_total", reason="stop") == 4
    info = [k for k in after if k[0] == "twinserve_fusion_info"]
    assert info and dict(info[0][1]) == {"mode": "lowrank", "model": "tiny", "experts": "math,code,chat"}
    wait_for(lambda: scrape(client)[("twinserve_running_batch_size", ())] == 0, what="the running gauge")
    assert after[("twinserve_queue_depth", ())] == 0


def test_stats_routing_share(routed_artifact):
    with app_client(routed_artifact) as client:        # a fresh app: the rolling window holds only these
        empty = client.get("/v1/stats").json()
        assert empty["routing_share"] == {} and empty["ttft_p50_s"] is None
        for p in (P["math"][1], P["code"][1], P["chat"][1], P["chat"][2], UNKNOWN_PROMPT):
            assert post(client, {"model": "tiny", "prompt": p, "max_tokens": 2}).status_code == 200
        stats = client.get("/v1/stats").json()
        wait_for(lambda: client.get("/v1/stats").json()["running_batch_size"] == 0, what="the running gauge")
    assert stats["model"] == "tiny" and stats["mode"] == "lowrank" and stats["experts"] == EXPERT_NAMES
    share = stats["routing_share"]
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3)
    assert share == {"math": 0.2, "code": 0.2, "chat": 0.4, "(fallback)": 0.2}
    assert stats["requests_per_s"] == pytest.approx(5 / 60, abs=1e-3)
    assert stats["ttft_p50_s"] is not None and stats["e2e_p99_s"] >= stats["e2e_p50_s"] > 0
    assert stats["queue_depth"] == 0


def test_streaming_sse_wire_format(client):
    r = post(client, {"model": "tiny", "prompt": LONG, "max_tokens": 4, "stream": True, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_events(r.text.splitlines())
    assert events[-1] == "[DONE]"
    assert "twin" in events[0] and events[0]["choices"][0]["text"] == ""
    assert all("twin" not in e for e in events[1:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------- schemathesis

@pytest.fixture(scope="module")
def api_schema(routed_artifact):
    """The app's own OpenAPI schema, called in-process (schemathesis runs the lifespan and ends it per test)."""
    app = create_app(server_settings(routed_artifact, drain_timeout_s=0.5))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def openai_error_shape(ctx, response, case):
    """Custom check: every 4xx body is OpenAI-shaped and carries no traceback."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert "Traceback" not in response.text


MODEL_IDS = ["tiny", "tiny:math", "tiny:code", "tiny:chat", "tiny"]


def short_generation(case, positive: bool) -> None:
    """Keep decoding short (the point is validation and engine robustness, not long outputs); in positive
    mode use existing model ids, or every generated request would be a 404."""
    if isinstance(case.body, dict):
        if positive and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL_IDS[len(case.body["model"]) % len(MODEL_IDS)]
        if positive and isinstance(case.body.get("messages"), list):   # the schema cannot say "content may be
            for m in case.body["messages"]:                             # null only for assistant"
                if isinstance(m, dict) and m.get("content") is None and m.get("role") != "assistant":
                    m["content"] = "hi"
        for key in ("max_tokens", "max_completion_tokens"):
            v = case.body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 4 < v <= 128:
                case.body[key] = 4


POS, NEG = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
FUZZ = [("/v1/completions", "POST", POS, 30), ("/v1/completions", "POST", NEG, 25),
        ("/v1/chat/completions", "POST", POS, 30), ("/v1/chat/completions", "POST", NEG, 25),
        ("/tokenize", "POST", POS, 15), ("/tokenize", "POST", NEG, 10),
        ("/detokenize", "POST", POS, 10), ("/detokenize", "POST", NEG, 10),
        ("/v1/models", "GET", POS, 3)]   # GET /v1/models has no inputs to make invalid


@pytest.mark.parametrize("path,method,mode,examples", FUZZ, ids=[f"{m} {p} {g.value}" for p, m, g, _ in FUZZ])
def test_fuzz_no_server_errors(api_schema, path, method, mode, examples):
    operation = api_schema[path][method]
    seen = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        short_generation(case, mode == schemathesis.GenerationMode.POSITIVE)
        response = case.call_and_validate(checks=[not_a_server_error], additional_checks=[openai_error_shape])
        seen.append(response.status_code)

    run()
    assert seen and all(code < 500 for code in seen)
    if path.startswith("/v1/") and method == "POST" and mode == schemathesis.GenerationMode.POSITIVE:
        assert 200 in seen            # valid requests were generated and served

"""The OpenAI API as real clients use it: token-id and batched prompts, n / best_of, logprobs (echo too),
nullable fields, logit_bias and penalties, chat content parts, /tokenize, lm-evaluation-harness's request
shapes, disconnects of non-streaming requests, detokeniser flushes. Logprobs are checked against a
direct forward pass of the served model."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time

import openai
import pytest
import torch

from server.sampling import adjust_logits
from server.specs import SamplingParams
from tests.conftest import app_client, live_server
from twin.generate import greedy_generate, prompt_logits

from .helpers import TASK_PROMPTS, complete, engine_idle, make_long, running_engine, sse_events, wait_for
from .test_detokenize import byte_bpe

P = TASK_PROMPTS
MATH = torch.tensor([1.0, 0.0, 0.0])      # w of model "tiny:math"
SPECIALS = {"<pad>", "<unk>", "<bos>", "<eos>"}   # in logprobs, not in text


@pytest.fixture(scope="module")
def app(routed_artifact):
    with app_client(routed_artifact) as c:
        yield c


def tok(app):
    return app.app.state.artifact.tokenizer


def ref_logprobs(app, ids: list[int], w: torch.Tensor | None = MATH) -> torch.Tensor:
    """(S, V) log_softmax of the served model's logits over ``ids`` (row i predicts ids[i + 1])."""
    model = app.app.state.artifact.model
    logits = prompt_logits(model, [ids], None if w is None else w[None])[0]
    return torch.log_softmax(logits.float(), -1)


@contextlib.contextmanager
def no_eos(app):
    """Generation runs to max_tokens (the tiny random model may end on <eos> at once)."""
    engine = app.app.state.engine
    eos, engine.eos_ids = engine.eos_ids, set()
    try:
        yield
    finally:
        engine.eos_ids = eos


def post(app, body, path="/v1/completions"):
    r = app.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- prompts, echo, logprobs

def test_token_prompts_echo_logprobs_equal_a_direct_forward_pass(app):
    t = tok(app)
    prompts = [t.encode(P["math"][0]), t.encode(P["code"][0])[:9]]
    out = post(app, {"model": "tiny:math", "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 4,
                     "temperature": 0})
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        full = t.convert_tokens_to_ids(lp["tokens"])       # the char tokenizer's token strings are its tokens
        assert full[:len(ids)] == ids and len(full) > len(ids)
        ref = ref_logprobs(app, full)
        assert choice["text"] == t.decode(full, skip_special_tokens=True)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == len(full) == len(lp["text_offset"])
        for i in range(1, len(full)):
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, full[i]]), abs=1e-4), i
            top = sorted(lp["top_logprobs"][i].values(), reverse=True)[:3]
            assert top == pytest.approx(torch.topk(ref[i - 1], 3).values.tolist(), abs=1e-4)
        assert lp["tokens"][1:] == [t.decode([x]) for x in full[1:]]
        # offsets index the returned text (<bos> is empty text, so the first two share offset 0)
        assert lp["text_offset"][:3] == [0, 0, 1]
        assert all(choice["text"][o:o + 1] == tk for o, tk in zip(lp["text_offset"], lp["tokens"])
                   if tk not in SPECIALS)


def test_string_prompt_batch_and_n_number_choices_like_openai(app):
    body = {"model": "tiny", "prompt": [P["math"][1], P["chat"][1]], "n": 2, "max_tokens": 6, "temperature": 0.9,
            "seed": 11}
    out = post(app, body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [r["top_expert"] for r in out["twin"]["prompts"]] == ["math", "chat"]
    assert out["twin"]["routing"] == out["twin"]["prompts"][0]
    # choice j of a prompt samples with seed + j: the same as asking for that prompt alone
    alone = post(app, dict(body, prompt=P["chat"][1]))
    assert [c["text"] for c in alone["choices"]] == [c["text"] for c in out["choices"][2:]]
    assert len({c["text"] for c in out["choices"]}) >= 3       # different seeds per choice, different samples


def test_best_of_returns_the_choice_of_highest_summed_logprob(app):
    body = {"model": "tiny:chat", "prompt": P["chat"][2], "max_tokens": 8, "temperature": 1.0, "seed": 5}
    every = post(app, dict(body, n=4, logprobs=0))["choices"]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in every]
    best = post(app, dict(body, n=1, best_of=4))
    assert len(best["choices"]) == 1 and best["choices"][0]["logprobs"] is None
    assert best["choices"][0]["text"] == every[max(range(4), key=lambda i: sums[i])]["text"]
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in every)


def test_null_means_default(app):
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
                               "echo", "top_k", "logprobs", "seed", "stop", "logit_bias", "best_of", "user",
                               "max_tokens", "stream_options", "suffix")}
    out = post(app, {"model": "tiny", "prompt": P["math"][2], **nulls})
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None
    chat_nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "logprobs", "top_logprobs",
                                    "response_format", "tools", "tool_choice", "max_completion_tokens")}
    out = post(app, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **chat_nulls},
               "/v1/chat/completions")
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_max_tokens_default_shrinks_to_fit_the_context(app):
    with no_eos(app):
        out = post(app, {"model": "tiny", "prompt": "a" * 120, "temperature": 0})     # 121 tokens of 128
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 7


# ----------------------------------------------------------------------------- penalties, logit_bias

def test_penalties_are_applied_to_the_sampled_distribution(app):
    """Each reported logprob is log_softmax(logits − frequency·count − presence·[count > 0]) of the model."""
    t = tok(app)
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4)
    prompt = P["code"][1]
    with no_eos(app):
        out = post(app, {"model": "tiny:math", "prompt": prompt, "max_tokens": 40, "temperature": 0, "logprobs": 2,
                         "presence_penalty": 0.7, "frequency_penalty": 0.4})
        plain = post(app, {"model": "tiny:math", "prompt": prompt, "max_tokens": 40, "temperature": 0})
    choice = out["choices"][0]
    ids = t.encode(prompt)
    gen = t.convert_tokens_to_ids(choice["logprobs"]["tokens"])
    assert len(gen) == 40 > len(set(gen))     # 40 tokens from a vocabulary of 37: some repeat
    ref = ref_logprobs(app, ids + gen)
    raw_gap = 0.0
    for k, tk in enumerate(gen):
        logits = ref[len(ids) - 1 + k]         # log_softmax differs from logits by a constant: same result
        want = torch.log_softmax(adjust_logits(logits, params, gen[:k]), -1)
        assert choice["logprobs"]["token_logprobs"][k] == pytest.approx(float(want[tk]), abs=1e-4)
        assert tk == int(want.argmax())        # greedy over the penalised distribution
        raw_gap = max(raw_gap, abs(float(want[tk]) - float(logits[tk])))
    assert raw_gap > 0.5                       # the penalties really moved the distribution
    assert plain["choices"][0]["text"] != choice["text"]


def test_logit_bias(app):
    t = tok(app)
    z = t.convert_tokens_to_ids("z")
    out = post(app, {"model": "tiny", "prompt": P["math"][0], "max_tokens": 5, "temperature": 0,
                     "logit_bias": {str(z): 100}})
    assert out["choices"][0]["text"] == "zzzzz"
    greedy = post(app, {"model": "tiny", "prompt": P["math"][0], "max_tokens": 1, "temperature": 0})["choices"][0]
    first = t.encode(greedy["text"], add_special_tokens=False)[0]
    banned = post(app, {"model": "tiny", "prompt": P["math"][0], "max_tokens": 1, "temperature": 0,
                        "logit_bias": {str(first): -100}})["choices"][0]
    assert banned["text"] and banned["text"] != greedy["text"]


def test_sampled_logprobs_follow_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    lp = torch.log_softmax(logits / 0.5, -1)
    from server.sampling import sampling_logprobs
    assert torch.allclose(sampling_logprobs(logits, SamplingParams(temperature=0.5)), lp)
    k2 = sampling_logprobs(logits, SamplingParams(temperature=0.5, top_k=2))
    assert torch.isinf(k2[2:]).all() and torch.allclose(k2[:2], torch.log_softmax(logits[:2] / 0.5, -1))


# ----------------------------------------------------------------------------- chat

def test_chat_content_parts_logprobs_and_n(app):
    text = P["chat"][0]
    as_str = post(app, {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 6,
                        "temperature": 0}, "/v1/chat/completions")
    parts = [{"type": "text", "text": text[:5]}, {"type": "text", "text": text[5:]}]
    msgs = [{"role": "assistant", "content": None}, {"role": "user", "content": parts}]
    out = post(app, {"model": "tiny", "messages": msgs, "n": 2, "max_completion_tokens": 6, "temperature": 0,
                     "logprobs": True, "top_logprobs": 2, "response_format": {"type": "text"}},
               "/v1/chat/completions")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["message"]["content"] == out["choices"][1]["message"]["content"]
    content = out["choices"][0]["logprobs"]["content"]
    special = set(tok(app).all_special_tokens)   # a sampled <unk> is a logprobs entry but not message text
    assert "".join(c["token"] for c in content if c["token"] not in special) == out["choices"][0]["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    # parts are joined with newlines: the prompt differs from the plain-string one by exactly that
    t = tok(app)
    assert out["usage"]["prompt_tokens"] > as_str["usage"]["prompt_tokens"]
    body = {"model": "tiny", "messages": msgs}
    assert app.post("/tokenize", json=body).json()["count"] == out["usage"]["prompt_tokens"]
    assert t  # tokenizer loaded


# ----------------------------------------------------------------------------- /tokenize, /detokenize

def test_tokenize_and_detokenize(app):
    r = app.post("/tokenize", json={"model": "tiny", "prompt": "hello", "return_token_strs": True}).json()
    assert r["count"] == 6 and r["max_model_len"] == 128 and r["token_strs"] == ["<bos>", "h", "e", "l", "l", "o"]
    assert app.post("/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json() == {"prompt": "hello"}
    usage = post(app, {"model": "tiny", "prompt": "hello", "max_tokens": 1})["usage"]
    assert usage["prompt_tokens"] == r["count"]
    bad = app.post("/detokenize", json={"tokens": [1, 999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert app.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert app.post("/tokenize", json={"model": "tiny"}).status_code == 400


# ----------------------------------------------------------------------------- streaming

def test_stream_echo_and_logprobs_equal_non_streaming(app):
    body = {"model": "tiny:code", "prompt": [P["code"][2], P["math"][2]], "echo": True, "logprobs": 1,
            "max_tokens": 6, "temperature": 0, "n": 2}
    ref = post(app, body)["choices"]
    r = app.post("/v1/completions", json=dict(body, stream=True))
    events = [e for e in sse_events(r.text.splitlines()) if e != "[DONE]"]
    for c in ref:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == c["index"]]
        assert "".join(x["text"] for x in mine) == c["text"]
        tokens = [t for x in mine if x["logprobs"] for t in x["logprobs"]["tokens"]]
        assert tokens == c["logprobs"]["tokens"]
        lps = [t for x in mine if x["logprobs"] for t in x["logprobs"]["token_logprobs"]]
        assert lps[0] is None and lps[1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-6)
        assert mine[-1]["finish_reason"] == c["finish_reason"]


# ----------------------------------------------------------------------------- lm-evaluation-harness

def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm_eval.models.openai_completions.LocalCompletionsAPI.parse_logprobs (lm-eval 0.4), verbatim logic."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops))))
    return res


def test_lm_eval_loglikelihood_and_generate_until_payloads(app):
    t = tok(app)
    pairs = [(P["math"][3], " abc"), (P["code"][3], "jim"), ("add", " b")]
    ctx = [t.encode(c) for c, _ in pairs]
    full = [c + t.encode(x, add_special_tokens=False) for c, (_, x) in zip(ctx, pairs)]
    payload = {"model": "tiny:math", "prompt": full, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    parsed = lm_eval_parse_logprobs(post(app, payload), [len(c) for c in ctx])
    for (ll, greedy), c, f in zip(parsed, ctx, full):
        ref = ref_logprobs(app, f)
        want = sum(float(ref[i - 1, f[i]]) for i in range(len(c), len(f)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(ref[i - 1].argmax()) == f[i] for i in range(len(c), len(f)))
    # generate_until: token-id prompts, stop = until + the eos text, greedy
    prompts = [P["math"][0], P["chat"][3]]
    gen = {"model": "tiny:math", "prompt": [t.encode(p) for p in prompts], "max_tokens": 12, "temperature": 0,
           "stop": ["\n", "<eos>"], "seed": 1234}
    out = post(app, gen)
    model = app.app.state.artifact.model
    ref = greedy_generate(model, t, prompts, MATH.expand(2, 3), max_new_tokens=12)
    assert [c["text"].strip() for c in out["choices"]] == ref


# ----------------------------------------------------------------------------- openai client

def test_openai_client_none_parts_n_logprobs(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    r = oai.completions.create(model="tiny", prompt=[P["math"][0], P["code"][0]], max_tokens=4, temperature=None,
                               n=2, logprobs=2, echo=True, top_p=None, presence_penalty=None)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].logprobs.token_logprobs[0] is None
    first = r.choices[0]   # sampled (temperature None = 1): it may end early on <eos>, which is reported too
    n_prompt = len(P["math"][0]) + 1                        # char tokenizer + <bos>
    if first.finish_reason == "length":
        assert len(first.logprobs.tokens) == n_prompt + 4
    else:
        assert n_prompt < len(first.logprobs.tokens) <= n_prompt + 4 and first.logprobs.tokens[-1] == "<eos>"
    c = oai.chat.completions.create(
        model="tiny", n=2, max_completion_tokens=5, temperature=None, logprobs=True, top_logprobs=3,
        messages=[{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                  {"role": "user", "content": [{"type": "text", "text": P["chat"][1]}]}])
    assert len(c.choices) == 2
    lp = c.choices[0].logprobs.content
    assert "".join(x.token for x in lp if x.token not in SPECIALS) == c.choices[0].message.content
    assert all(len(x.top_logprobs) == 3 for x in lp)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "image_url" in e.value.body["message"] and e.value.body["param"] == "messages.0.content"


# ----------------------------------------------------------------------------- disconnects

def test_non_streaming_request_is_cancelled_when_the_client_disconnects(routed_artifact):
    with live_server(routed_artifact) as s:
        engine, metrics = s.app.state.engine, s.app.state.metrics
        make_long(engine, delay_s=0.05)
        before = metrics.finished.labels("cancelled")._value.get()
        body = b'{"model": "tiny", "prompt": "add abc", "max_tokens": 100, "temperature": 0}'
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: len(engine.running) == 1, what="the request to run")
        sock.close()
        t0 = time.monotonic()
        wait_for(lambda: metrics.finished.labels("cancelled")._value.get() == before + 1, timeout=10,
                 what="the cancel")
        wait_for(lambda: engine_idle(engine), what="the slot to be freed")
        assert time.monotonic() - t0 < 0.4   # watched, not polled (100 tokens × 50 ms would take 5 s)
        assert metrics.finished.labels("length")._value.get() == 0


# ----------------------------------------------------------------------------- detokeniser flush

class ScriptedModel:
    """Stands in for the model: at every step the logits put all mass on the next token of ``script``."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int):
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

    def step(self, flat, cache):
        """The model runner's unified step: logits (R, V) at the flat token indices ``flat.logits_at``."""
        step = flat.positions[flat.logits_at] + 1 - self.prompt_len
        logits = torch.full((flat.logits_at.shape[0], self.vocab), -30.0)
        for i, s in enumerate(step.tolist()):
            logits[i, self.script[s]] = 30.0
        return logits


@pytest.mark.parametrize("case", ["eos_mid_char", "length_mid_char", "random_eos", "random_length"])
def test_detokeniser_flushes_at_every_finish_reason(routed_artifact, case):
    bpe = byte_bpe()
    eos = len(bpe)                                      # one past the tokenizer's vocab: never decoded
    rng = random.Random(case)
    if "mid_char" in case:   # CJK and emoji, ending in the first bytes of an emoji the BPE never merged
        ids = bpe.encode("日本語 🙂🙃 テキスト", add_special_tokens=False) + bpe.encode("😀")[:-1]
        assert bpe.decode(ids).endswith("\ufffd")
    else:
        ids = [rng.randrange(len(bpe)) for _ in range(24)]

    async def main():
        async with running_engine(routed_artifact) as (svc, engine):
            prompt = "add abc"
            svc.tokenizer = engine.tokenizer = bpe
            plen = len(bpe.encode(prompt))
            engine.runner.model = ScriptedModel(ids + [eos], plen, eos + 1)   # rows take it when routed
            engine.eos_ids = {eos}
            max_tokens = len(ids) + (5 if "eos" in case else 0)
            return await complete(svc, prompt, model="tiny:math", max_tokens=max_tokens)

    res = asyncio.run(main())
    assert res["finish_reason"] == ("stop" if "eos" in case else "length")
    assert res["completion_tokens"] == len(ids) + ("eos" in case)      # <eos> counts, as in the OpenAI API
    assert res["text"] == bpe.decode(ids)


# ----------------------------------------------------------------------------- OpenAPI

def test_openapi_shows_every_accepted_field(app):
    schema = app.get("/openapi.json").json()
    comps = schema["components"]["schemas"]
    completion = comps["CompletionRequest"]["properties"]
    forms = {json_type(x) for x in completion["prompt"]["anyOf"]}
    assert forms == {"string", "array<string>", "array<integer>", "array<array<integer>>"}
    for name in ("echo", "logprobs", "n", "best_of", "logit_bias", "presence_penalty", "frequency_penalty",
                 "seed", "stop", "stream_options", "twin", "top_k"):
        assert name in completion, name
    assert {"type": "null"} in completion["temperature"]["anyOf"]           # nullable as the spec has it
    chat = comps["ChatCompletionRequest"]["properties"]
    for name in ("messages", "logprobs", "top_logprobs", "response_format", "max_completion_tokens", "n"):
        assert name in chat, name
    assert "TextPart" in json.dumps(comps["ChatMessage"]["properties"]["content"])
    assert {"/tokenize", "/detokenize"} <= set(schema["paths"])
    ok = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/CompletionResponse")
    assert "text_offset" in comps["CompletionLogprobs"]["properties"]


def json_type(s: dict) -> str:
    if s.get("type") == "array":
        return f"array<{json_type(s['items'])}>"
    return s["type"]

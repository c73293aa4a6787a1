"""Engine: batching invariance, cancellation, back-pressure, timeouts, fusion modes, sampling."""
from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from server.errors import InternalError
from server.protocol import CompletionRequest
from server.specs import RoutingSpec
from tests.conftest import app_client, live_server
from twin.artifact import read_manifest
from twin.generate import encode_prompt

from .helpers import (
    TASK_PROMPTS,
    UNKNOWN_PROMPT,
    assert_openai_error,
    await_for,
    complete,
    engine_idle,
    make_long,
    record_batches,
    running_engine,
    sse_events,
    wait_for,
)

P = TASK_PROMPTS


# ----------------------------------------------------------------------------- batching invariance

MIXED = [
    {"prompt": P["math"][0], "max_tokens": 12},                                        # router
    {"prompt": P["code"][0], "max_tokens": 16},                                        # router
    {"prompt": P["chat"][0], "max_tokens": 10},                                        # router
    {"prompt": P["math"][1], "max_tokens": 14, "twin": {"expert": "chat"}},            # pinned in twin
    {"prompt": P["chat"][1], "max_tokens": 16, "model": "tiny:code"},                  # pinned in model id
    {"prompt": P["code"][1], "max_tokens": 9, "twin": {"experts": {"math": 0.3, "chat": 0.7}}},  # explicit
    {"prompt": P["chat"][2], "max_tokens": 13, "twin": {"top_k": 2, "temperature": 3.0}},  # router options
    {"prompt": P["math"][2], "max_tokens": 12, "temperature": 0.9, "seed": 7},         # seeded sampling
]
LATE = {"prompt": P["code"][2], "max_tokens": 8, "twin": {"expert": "math"}}           # joins a running batch


def test_output_is_the_same_alone_and_inside_a_mixed_batch(routed_artifact):
    async def main():
        async with running_engine(routed_artifact, max_batch_size=16) as (svc, engine):
            engine.eos_ids = set()   # every row runs to its own max_tokens: rows leave at different steps
            alone = [await complete(svc, **c) for c in MIXED + [LATE]]
            sizes = record_batches(engine)
            loop, late = asyncio.get_running_loop(), []
            recorded_step = engine.runner.step

            def step_then_submit_late(plan):     # engine thread: submit LATE right after the 2nd decode step
                out = recorded_step(plan)
                if len(sizes["decode"]) == 2 and not late:
                    loop.call_soon_threadsafe(lambda: late.append(asyncio.ensure_future(complete(svc, **LATE))))
                return out
            engine.runner.step = step_then_submit_late
            tasks = [asyncio.create_task(complete(svc, **c)) for c in MIXED]   # all queued before the next step
            await await_for(lambda: late, what="the late request")
            together = await asyncio.gather(*tasks, late[0])
            assert engine_idle(engine)
            return alone, together, sizes

    alone, together, sizes = asyncio.run(main())
    assert sizes["prefill"] == [len(MIXED), 1], sizes             # all mixed requests were prefilled together,
    # the late one was prefilled in the same forward as the 3rd decode step and decodes from the 4th on
    assert sizes["decode"][:4] == [len(MIXED)] * 3 + [len(MIXED) + 1], sizes
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a["text"] == b["text"], (i, a, b)
        assert a["finish_reason"] == b["finish_reason"] == "length"
        assert a["completion_tokens"] == b["completion_tokens"] == (MIXED + [LATE])[i]["max_tokens"]
        assert a["routing"]["weights"] == pytest.approx(b["routing"]["weights"], abs=1e-5)
    # the batch really mixed experts
    tops = [r["routing"]["top_expert"] for r in together]
    assert tops[:6] == ["math", "code", "chat", "chat", "code", "chat"]
    assert [r["routing"]["source"] for r in together] == ["router"] * 3 + ["request"] * 3 + ["router"] * 2 + ["request"]
    assert together[5]["routing"]["weights"] == {"math": 0.3, "code": 0.0, "chat": 0.7}
    routed_top2 = together[6]["routing"]["weights"]
    assert sum(1 for v in routed_top2.values() if v > 0) == 2 and sum(routed_top2.values()) == pytest.approx(1.0)
    assert len({r["text"] for r in together}) >= 6       # different experts, different outputs


# ----------------------------------------------------------------------------- cancellation

def test_cancelled_consumer_frees_the_slot(routed_artifact):
    async def main():
        async with running_engine(routed_artifact, max_batch_size=2) as (svc, engine):
            make_long(engine, delay_s=0.005)
            task = asyncio.create_task(complete(svc, P["chat"][0], max_tokens=100))
            await await_for(lambda: engine.running and engine.running[0].generated, what="generation to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await await_for(lambda: engine_idle(engine), what="the slot to be freed")
            cancelled = engine.metrics.finished.labels("cancelled")._value.get()
            after = await complete(svc, P["math"][0], max_tokens=5)
            return cancelled, after

    cancelled, after = asyncio.run(main())
    assert cancelled == 1
    assert after["finish_reason"] == "length" and after["completion_tokens"] == 5


def test_client_disconnect_during_streaming_frees_the_slot(routed_artifact):
    with live_server(routed_artifact, max_batch_size=3) as srv:
        engine = srv.app.state.engine
        make_long(engine, delay_s=0.01)
        body = {"model": "tiny", "prompt": P["code"][0], "max_tokens": 80, "stream": True, "temperature": 0}
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                got = []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        got.append(line)
                    if len(got) >= 4:
                        break
            # the response is closed mid-stream (80 tokens take >= 0.8 s): the client went away
            wait_for(lambda: engine_idle(engine), timeout=10, what="the engine to drop the disconnected request")
            assert engine.metrics.finished.labels("cancelled")._value.get() == 1
            assert len(engine.free_slots) == engine.max_batch == 3
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": P["math"][0], "max_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6


# ----------------------------------------------------------------------------- back-pressure and timeouts

def test_queue_full_is_429_with_retry_after(routed_artifact):
    with app_client(routed_artifact, max_batch_size=1, max_queue=1) as client:
        engine = client.app.state.engine
        make_long(engine, delay_s=0.01)
        results = {}

        def post(key, max_tokens):
            results[key] = client.post("/v1/completions", json={"model": "tiny", "prompt": P["chat"][0],
                                                                 "max_tokens": max_tokens})
        first = threading.Thread(target=post, args=("running", 60))
        first.start()
        wait_for(lambda: len(engine.running) == 1, what="the first request to be admitted")
        second = threading.Thread(target=post, args=("queued", 3))
        second.start()
        wait_for(lambda: len(engine.waiting) == 1, what="the second request to queue")
        rejected = client.post("/v1/completions", json={"model": "tiny", "prompt": P["chat"][0], "max_tokens": 3})
        stream_rejected = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
        first.join(30)
        second.join(30)
        wait_for(lambda: engine_idle(engine), what="the engine to drain")
        after = client.post("/v1/completions", json={"model": "tiny", "prompt": P["chat"][0], "max_tokens": 3})
    for r in (rejected, stream_rejected):
        err = assert_openai_error(r, 429, type_="rate_limit_error")
        assert err["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"
    assert results["running"].status_code == 200 and results["running"].json()["usage"]["completion_tokens"] == 60
    assert results["queued"].status_code == 200 and results["queued"].json()["usage"]["completion_tokens"] == 3
    assert after.status_code == 200


def test_request_timeout_is_504_and_frees_the_slot(routed_artifact):
    with app_client(routed_artifact, request_timeout_s=0.01, max_batch_size=2) as client:
        engine = client.app.state.engine
        make_long(engine, delay_s=0.01)
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": P["math"][0], "max_tokens": 100})
        err = assert_openai_error(r, 504, type_="timeout_error")
        assert err["code"] == "timeout"
        c = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 60,
                                                      "messages": [{"role": "user", "content": P["code"][0]}]})
        assert_openai_error(c, 504, type_="timeout_error")
        s = client.post("/v1/completions", json={"model": "tiny", "prompt": P["math"][0], "max_tokens": 100,
                                                 "stream": True})
        if s.status_code == 504:            # timed out before admission: a plain HTTP error
            assert_openai_error(s, 504, type_="timeout_error")
        else:                               # admitted in time: the error arrives inside the stream
            assert s.status_code == 200
            events = sse_events(s.text.splitlines())
            assert events[-1] == "[DONE]"
            assert events[-2]["error"]["type"] == "timeout_error"
        wait_for(lambda: engine_idle(engine), what="timed-out requests to leave")


# ----------------------------------------------------------------------------- engine failure

def test_engine_error_fails_every_running_request_and_frees_all_slots(routed_artifact):
    """A failing step must fail *all* rows of the batch (500) and free their slots, then keep serving."""
    async def main():
        async with running_engine(routed_artifact, max_batch_size=4) as (svc, engine):
            make_long(engine)
            orig = engine.runner.step
            calls = {"n": 0}

            def broken(plan):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("injected")
                return orig(plan)
            engine.runner.step = broken
            results = await asyncio.wait_for(asyncio.gather(
                *(complete(svc, P[t][0], max_tokens=20) for t in ("math", "code", "chat")),
                return_exceptions=True), timeout=20)
            await await_for(lambda: engine_idle(engine), what="slots to be freed after the failure")
            engine.runner.step = orig
            after = await complete(svc, P["math"][0], max_tokens=4)
            return results, after

    results, after = asyncio.run(main())
    assert all(isinstance(r, InternalError) for r in results), results
    assert after["completion_tokens"] == 4


# ----------------------------------------------------------------------------- fusion modes

def greedy_hf(model_dir, tokenizer, prompt: str, max_tokens: int) -> tuple[str, str]:
    """Reference greedy decode with transformers (no cache): (text, finish_reason)."""
    hf = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = encode_prompt(tokenizer, prompt)
    out = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            tok = int(hf(torch.tensor([ids + out])).logits[0, -1].argmax())
            if tok == tokenizer.eos_token_id:
                return tokenizer.decode(out, skip_special_tokens=True), "stop"
            out.append(tok)
    return tokenizer.decode(out, skip_special_tokens=True), "length"


async def backbone_only(svc, prompt: str, **fields) -> dict:
    """Lowrank with all-zero expert weights (the router fallback's w = 0; the API refuses all-zero
    twin.experts, so the engine requests are given them directly)."""
    call = svc.completion_call(CompletionRequest(model="tiny", prompt=prompt, temperature=0.0, **fields))
    for r in call.requests:
        r.routing = RoutingSpec(weights=(0.0,) * len(svc.names))
    (res,) = await svc.collect(call)
    return {"text": res.text, "finish_reason": res.finish_reason, "completion_tokens": res.completion_tokens}


@pytest.fixture(scope="module")
def lowrank_outputs(routed_artifact):
    """Greedy outputs of the default lowrank mode, for the mode comparisons."""
    async def main():
        async with running_engine(routed_artifact) as (svc, _):
            return {
                "pinned": await complete(svc, P["chat"][3], model="tiny:chat", max_tokens=16),
                "zero": await backbone_only(svc, P["code"][3], max_tokens=16),
            }
    return asyncio.run(main())


def test_materialize_mode_equals_lowrank(routed_artifact, lowrank_outputs):
    with app_client(routed_artifact, mode="materialize") as client:
        engine = client.app.state.engine
        assert engine.max_batch == 1
        r = client.post("/v1/completions", json={"model": "tiny:chat", "prompt": P["chat"][3], "max_tokens": 16,
                                                 "temperature": 0}).json()
        routed = client.post("/v1/completions", json={"model": "tiny", "prompt": P["code"][1], "max_tokens": 4,
                                                      "temperature": 0}).json()
    ref = lowrank_outputs["pinned"]
    assert r["choices"][0]["text"] == ref["text"]
    assert r["choices"][0]["finish_reason"] == ref["finish_reason"]
    assert r["usage"]["completion_tokens"] == ref["completion_tokens"]
    assert r["twin"]["routing"]["weights"] == {"math": 0.0, "code": 0.0, "chat": 1.0}
    assert routed["twin"]["routing"]["source"] == "router" and routed["twin"]["routing"]["top_expert"] == "code"


def test_backbone_mode_ignores_experts(routed_artifact, lowrank_outputs):
    with app_client(routed_artifact, mode="backbone") as client:
        assert client.app.state.artifact.model.num_experts == 0      # deltas are not even loaded
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": P["code"][3], "max_tokens": 16,
                                                 "temperature": 0}).json()
    ref = lowrank_outputs["zero"]   # lowrank with all-zero weights is exactly the backbone
    assert r["choices"][0]["text"] == ref["text"]
    assert r["usage"]["completion_tokens"] == ref["completion_tokens"]
    routing = r["twin"]["routing"]
    assert routing["source"] == "backbone" and routing["top_expert"] is None
    assert routing["weights"] == {"math": 0.0, "code": 0.0, "chat": 0.0}


def test_expert_mode_serves_the_dense_expert(routed_artifact):
    source = {e.name: e.source for e in read_manifest(routed_artifact).experts}
    with app_client(routed_artifact, mode="expert") as client:
        tok = client.app.state.artifact.tokenizer
        r = client.post("/v1/completions", json={"model": "tiny:code", "prompt": P["math"][0], "max_tokens": 10,
                                                 "temperature": 0})
        routed = client.post("/v1/completions", json={"model": "tiny", "prompt": P["chat"][0], "max_tokens": 10,
                                                      "temperature": 0})
    assert r.status_code == 200, r.text
    assert routed.status_code == 200, routed.text
    for resp, expert, prompt in ((r.json(), "code", P["math"][0]), (routed.json(), "chat", P["chat"][0])):
        text, finish = greedy_hf(source[expert], tok, prompt, 10)
        assert resp["twin"]["routing"]["top_expert"] == expert
        assert resp["choices"][0]["text"] == text
        assert resp["choices"][0]["finish_reason"] == finish


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def sampling_results(routed_artifact):
    prompt = P["code"][2]

    async def main():
        async with running_engine(routed_artifact) as (svc, engine):
            out = {}
            out["eos"] = [await complete(svc, p, model=f"tiny:{e}", max_tokens=30)
                          for p in (P["math"][0], P["code"][0], P["chat"][0]) for e in ("math", "code", "chat")]
            engine.eos_ids = set()
            s = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12}
            out["seed_a"] = await complete(svc, prompt, seed=123, **s)
            out["seed_b"] = await complete(svc, prompt, seed=123, **s)
            out["seeds"] = [await complete(svc, prompt, seed=k, **s) for k in range(5)]
            out["greedy"] = await complete(svc, prompt, max_tokens=24)
            out["top_k1"] = await complete(svc, prompt, max_tokens=24, temperature=1.5, top_k=1)
            g = out["greedy"]["text"]
            stop = g[len(g) // 2: len(g) // 2 + 2]
            out["stop_str"] = stop
            out["stopped"] = await complete(svc, prompt, max_tokens=24, stop=[stop, "never-occurs"])
            out["length"] = await complete(svc, prompt, max_tokens=7)
            out["chat_length"] = await complete(svc, prompt, max_tokens=5)
            return out
    return prompt, asyncio.run(main())



def test_expert_mode_without_a_reader_refuses_to_start(routed_artifact):
    """server/ does not import compression/: the dense experts' reader is passed to create_app (cli.main and
    the test helpers pass compression's); without it mode `expert` stops at startup with the reason."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.memory import StartupError
    from tests.conftest import server_settings

    app = create_app(server_settings(routed_artifact, mode="expert"))
    with pytest.raises(StartupError, match="mode `expert`.*expert reader"), TestClient(app):
        pass

def test_seed_makes_sampling_reproducible(sampling_results):
    _, r = sampling_results
    assert r["seed_a"]["text"] == r["seed_b"]["text"]
    assert len({x["text"] for x in r["seeds"]}) >= 3      # different seeds, different samples


def test_top_k_1_is_greedy(sampling_results):
    _, r = sampling_results
    assert r["top_k1"]["text"] == r["greedy"]["text"]


def test_stop_sequence_cuts_the_text(sampling_results):
    _, r = sampling_results
    g, stop = r["greedy"]["text"], r["stop_str"]
    assert len(g) >= 6 and len(stop) == 2, "the greedy reference must be long enough to cut"
    assert r["stopped"]["finish_reason"] == "stop"
    assert r["stopped"]["text"] == g[:g.index(stop)]
    assert stop not in r["stopped"]["text"]


def test_max_tokens_gives_length_and_usage(sampling_results, routed_artifact):
    prompt, r = sampling_results
    n_prompt = len(prompt) + 1      # char tokenizer + <bos>
    res = r["length"]
    assert res["finish_reason"] == "length"
    assert res["completion_tokens"] == 7
    assert res["prompt_tokens"] == n_prompt
    assert r["greedy"]["text"].startswith(res["text"])


def test_eos_ends_with_stop_before_max_tokens(sampling_results):
    _, r = sampling_results
    ended = [x for x in r["eos"] if x["finish_reason"] == "stop"]
    assert ended, "some expert/prompt pair of the tiny model should emit <eos> within 30 tokens"
    assert all(x["completion_tokens"] < 30 for x in ended)
    assert all(x["completion_tokens"] == 30 for x in r["eos"] if x["finish_reason"] == "length")


def test_fallback_prompt_goes_to_the_backbone(routed_artifact):
    async def main():
        async with running_engine(routed_artifact) as (svc, _):
            return await complete(svc, UNKNOWN_PROMPT, max_tokens=4)
    routing = asyncio.run(main())["routing"]
    assert routing["fallback"] is True and routing["source"] == "router"
    assert routing["weights"] == {"math": 0.0, "code": 0.0, "chat": 0.0}

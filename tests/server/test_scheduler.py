"""The scheduler on its own (no model), and the engine driven by a fake model runner."""
from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field

import pytest

from server.events import Finished
from server.scheduler import QueueFullError, Scheduler


@dataclass(eq=False)
class Seq:
    prompt_ids: list[int]
    deadline: float = 1e9
    arrival: float = 0.0
    cancelled: bool = False
    slot: int = -1
    num_computed: int = 0
    generated: list[int] = field(default_factory=list)


def test_long_prompt_is_prefilled_in_chunks_beside_running_decodes():
    s = Scheduler(max_slots=4, token_budget=8, max_queue=8)
    short, long = Seq([1] * 3), Seq([2] * 20)
    s.submit(short)
    plan = s.schedule(0.0)
    assert [(c.start, c.end, c.last) for c in plan.chunks] == [(0, 3, True)] and plan.admitted == [short]
    s.submit(long)
    plan = s.schedule(0.0)                        # short decodes (1 token of budget), long gets 7
    assert plan.decode == [short] and [(c.start, c.end, c.last) for c in plan.chunks] == [(0, 7, False)]
    plan = s.schedule(0.0)
    assert plan.decode == [short] and [(c.start, c.end) for c in plan.chunks] == [(7, 14)]
    plan = s.schedule(0.0)
    assert [(c.start, c.end, c.last) for c in plan.chunks] == [(14, 20, True)]
    plan = s.schedule(0.0)
    assert plan.decode == [short, long] and not plan.chunks   # ordered by slot


def test_a_prompt_advances_even_when_decodes_use_the_whole_budget():
    s = Scheduler(max_slots=8, token_budget=2, max_queue=8)
    running = [Seq([1]) for _ in range(3)]
    for r in running:
        s.submit(r)
    s.schedule(0.0), s.schedule(0.0)             # two admitted in step 1 (1 token each), one in step 2
    late = Seq([5] * 4)
    s.submit(late)
    plan = s.schedule(0.0)
    assert len(plan.decode) == 3 and [(c.start, c.end) for c in plan.chunks] == [(0, 1)]


def test_slots_lowest_first_and_freed_on_release():
    s = Scheduler(max_slots=3, token_budget=100, max_queue=8)
    a, b, c = Seq([1]), Seq([1]), Seq([1])
    for x in (a, b, c):
        s.submit(x)
    s.schedule(0.0)
    assert (a.slot, b.slot, c.slot) == (0, 1, 2) and s.free_slots == 0
    s.release(b)
    d = Seq([1])
    s.submit(d)
    s.schedule(0.0)
    assert d.slot == 1 and b.slot == -1
    assert [x.slot for x in s.schedule(0.0).decode] == [0, 1, 2]


def test_cancelled_and_expired_rows_leave_and_free_their_slots():
    s = Scheduler(max_slots=2, token_budget=100, max_queue=8)
    a, b = Seq([1], deadline=5.0), Seq([1], deadline=100.0)
    s.submit(a), s.submit(b)
    s.schedule(0.0)
    queued = Seq([1], deadline=5.0)
    s.submit(queued)
    b.cancelled = True
    plan = s.schedule(10.0)                        # a is past its deadline, b cancelled, queued expired
    assert plan.cancelled == [b] and set(plan.expired) == {a, queued} and plan.queued_expired == [queued]
    assert s.idle and s.free_slots == 2


def test_per_request_modes_run_one_sequence_at_a_time():
    s = Scheduler(max_slots=1, token_budget=100, max_queue=8, per_request=True)
    a, b = Seq([1, 2]), Seq([3])
    s.submit(a), s.submit(b)
    assert s.schedule(0.0).admitted == [a]
    assert s.schedule(0.0).admitted == [] and list(s.waiting) == [b]
    s.release(a)
    assert s.schedule(0.0).admitted == [b]


def test_queue_bound():
    s = Scheduler(max_slots=1, token_budget=10, max_queue=1)
    s.submit(Seq([1]))
    with pytest.raises(QueueFullError):
        s.submit(Seq([1]))


# ----------------------------------------------------------------------------- engine with a fake runner

class FakeRunner:
    """Stands in for the model runner: every sampled token is the sequence's prompt length + step count."""

    def __init__(self):
        self.plans = []
        self.released = []

    def warmup(self, tokenizer):
        pass

    def close(self):
        pass

    def release(self, seq):
        self.released.append(seq.id)

    def route(self, seqs, top_k, temperature):
        from server.events import RoutingDecision
        return {s.id: RoutingDecision(weights={"a": 1.0}, top_expert="a", entropy=0.0, fallback=False,
                                      source="request") for s in seqs}

    def step(self, plan):
        self.plans.append(([s.id for s in plan.decode], [(c.seq.id, c.start, c.end) for c in plan.chunks]))
        sampled = [(s, 10 + len(s.generated), None) for s in plan.decode]
        sampled += [(c.seq, 10, None) for c in plan.chunks if c.last]
        return types.SimpleNamespace(sampled=sampled, prompt_logprobs=[],
                                     prefill_tokens=sum(c.end - c.start for c in plan.chunks),
                                     decode_tokens=len(plan.decode))


def test_engine_streams_tokens_from_the_runner_and_frees_slots(tmp_path):
    from server.engine import Engine, Request
    from server.metrics import Metrics
    from server.sampling import SamplingParams
    from server.specs import RoutingSpec
    from tests.conftest import make_char_tokenizer, server_settings

    tok = make_char_tokenizer()
    art = types.SimpleNamespace(tokenizer=tok, expert_names=["a"], eos_token_ids={3},
                                config=types.SimpleNamespace(max_position_embeddings=64))
    settings = server_settings(tmp_path, max_batch_size=2, max_tokens_per_step=16)
    runner = FakeRunner()

    async def main():
        engine = Engine(art, None, settings, Metrics(["a"], "lowrank", "tiny"), runner=runner)
        await engine.start()
        loop = asyncio.get_running_loop()
        reqs = [Request(list(range(4, 4 + n)), SamplingParams(max_tokens=3, temperature=0.0), RoutingSpec(),
                        1e12, asyncio.Queue(), loop) for n in (20, 2)]
        for r in reqs:
            engine.submit(r)
        done = {}
        for r in reqs:
            while True:
                event = await r.events.get()
                if isinstance(event, Finished):
                    done[r.id] = event
                    break
        await engine.stop(0)
        return reqs, done, engine

    reqs, done, engine = asyncio.run(main())
    long, short = reqs
    # step 1: the 20-token prompt takes the whole budget of 16; step 2: its last 4 tokens + the short prompt
    assert runner.plans[0] == ([], [(long.id, 0, 16)])
    assert runner.plans[1] == ([], [(long.id, 16, 20), (short.id, 0, 2)])
    assert runner.plans[2] == ([long.id, short.id], [])
    assert all(d.completion_tokens == 3 and d.finish_reason == "length" for d in done.values())
    assert sorted(runner.released) == sorted(r.id for r in reqs) and engine.free_slots == [0, 1]


def test_chunked_prefill_gives_the_same_text_and_echo_logprobs(routed_artifact):
    """A 16-token step budget spreads every prompt over several steps: generated text and the echoed
    prompt's logprobs equal the unchunked server's, and a direct forward pass."""
    from tests.conftest import app_client
    from tests.server.helpers import wrap_step

    body = {"model": "tiny:math", "prompt": ["add abc def ghi jkl mno pqr", "purr op"], "echo": True,
            "logprobs": 2, "max_tokens": 6, "temperature": 0}
    outs = []
    for budget in (512, 16):
        with app_client(routed_artifact, max_tokens_per_step=budget) as c:
            engine = c.app.state.engine
            engine.eos_ids = set()
            plans: list[int] = []
            wrap_step(engine, lambda plan, plans=plans: plans.append(
                max((ch.end - ch.start for ch in plan.chunks), default=0)))
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            outs.append(r.json()["choices"])
            if budget == 16:
                assert max(plans) <= 16 and len(plans) > 7       # the 28-token prompt took more than one step
    for a, b in zip(*outs):
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=1e-4)

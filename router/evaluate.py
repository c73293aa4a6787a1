"""End-to-end router measurements for `twinserve eval`: routed weights, cost, unknown prompts."""
from __future__ import annotations

import time

import torch

from twin.generate import encode_prompts, greedy_generate
from twin.model import FlatBatch

from .features import router_features, router_prompt_features
from .model import Router, load_router

# Prompts of no known task: the fallback should take these.
UNKNOWN_PROMPTS = [
    "What is the capital of France?",
    "hello there, how are you today",
    "Write a haiku about the sea.",
    "2 + 2 =",
    "The quick brown fox jumps over the lazy dog",
    "Translate 'good morning' into German:",
    "summarize: the meeting was moved to friday",
    "Once upon a time",
    "1234567890",
    "Please list three colours.",
    "zzzz qqqq xxxx",
    "How many legs does a spider have?",
]


def router_weight_fn(art):
    """For eval: (task, rows) -> (n, T) weights from the artifact's learned router (None without one)."""
    router = load_router(art.path, art.manifest)
    if router is None:
        return None

    def weights(task: str, rows: list[dict]) -> torch.Tensor:
        x = router_prompt_features(art.model, art.tokenizer, [r["prompt"] for r in rows], router.config)
        return router.route(x).weights
    return weights


@torch.inference_mode()
def cost_fraction_of_prefill(art, router: Router, prompts: list[str], repeats: int = 5) -> float:
    """Time of features + router over the time of a full prefill (all layers + lm_head), same prompts."""
    model = art.model
    ids = encode_prompts(art.tokenizer, prompts)
    w = torch.full((model.num_experts,), 1.0 / max(1, model.num_experts), device=model.device)

    def full():   # the engine's prefill step: every prompt a chunk, logits at each last token
        flat = FlatBatch.build([], [(s, i, 0) for i, s in enumerate(ids)], model.device, bucket=True,
                               weights=[w] * len(ids))
        model.step(flat, model.new_cache(len(ids), max(len(s) for s in ids)))

    def route():
        router.route(router_prompt_features(model, art.tokenizer, prompts, router.config))

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    return best(route) / best(full)


@torch.inference_mode()
def continuation_report(art, router: Router, rows: list[dict]) -> dict:
    """Loglikelihood requests carry context + continuation as one prompt. For each test prompt, append the
    targets of one prompt of every task (its own task's answer and answers in every other task's style) and
    count how often the routing equals the context's own (same fallback, weights within 1e-4)."""
    tok = art.tokenizer
    by_task: dict[str, dict] = {}
    for r in rows:
        by_task.setdefault(r["task"], r)
    tails = [r["target"] for r in by_task.values() if r.get("target")]
    contexts = encode_prompts(tok, [r["prompt"] for r in rows])
    joined = [ctx + tok.encode(t, add_special_tokens=False) for ctx in contexts for t in tails]
    if not joined:
        return {"continuations": 0}
    base = router.route(router_features(art.model, contexts, router.config))
    out = router.route(router_features(art.model, joined, router.config))
    n = len(tails)
    same = [(not bool(out.fallback[i] ^ base.fallback[i // n]))
            and float((out.weights[i] - base.weights[i // n]).abs().max()) <= 1e-4 for i in range(len(joined))]
    return {"continuations": len(joined), "same_routing_rate": round(sum(same) / len(same), 4),
            "fallback_rate": round(float(out.fallback.float().mean()), 4)}


def unknown_prompt_report(art, router: Router, prompts: list[str] = UNKNOWN_PROMPTS) -> dict:
    x = router_prompt_features(art.model, art.tokenizer, prompts, router.config)
    r = router.route(x)
    outs = greedy_generate(art.model, art.tokenizer, prompts, r.weights, max_new_tokens=24)
    names = router.config.experts
    examples = [{"prompt": p, "output": o, "fallback": bool(fb), "top_expert": names[int(t)],
                 "top_weight": round(float(pr.max()), 3), "distance": round(float(d), 3)}
                for p, o, fb, t, pr, d in zip(prompts, outs, r.fallback, r.top, r.probs, r.distance)]
    return {"fallback": router.config.fallback, "fallback_rate": round(float(r.fallback.float().mean()), 4),
            "examples": examples}

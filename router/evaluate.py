"""End-to-end router measurements for `twinserve eval`: routed weights, cost, unknown prompts."""
from __future__ import annotations

import time

import torch

from twin.generate import encode_prompts, greedy_generate
from twin.model import FlatBatch

from .features import prompt_features
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
        x = prompt_features(art.model, art.tokenizer, [r["prompt"] for r in rows], router.config.feature_layer)
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
        router.route(prompt_features(model, art.tokenizer, prompts, router.config.feature_layer))

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)
    return best(route) / best(full)


def unknown_prompt_report(art, router: Router, prompts: list[str] = UNKNOWN_PROMPTS) -> dict:
    x = prompt_features(art.model, art.tokenizer, prompts, router.config.feature_layer)
    r = router.route(x)
    outs = greedy_generate(art.model, art.tokenizer, prompts, r.weights, max_new_tokens=24)
    names = router.config.experts
    examples = [{"prompt": p, "output": o, "fallback": bool(fb), "top_expert": names[int(t)],
                 "top_weight": round(float(pr.max()), 3), "distance": round(float(d), 3)}
                for p, o, fb, t, pr, d in zip(prompts, outs, r.fallback, r.top, r.probs, r.distance)]
    return {"fallback": router.config.fallback, "fallback_rate": round(float(r.fallback.float().mean()), 4),
            "examples": examples}

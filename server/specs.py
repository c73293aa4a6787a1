"""What a request asks of the engine, as plain data (no torch, no HTTP): sampling and routing specs.

The HTTP layer (server/protocol.py) builds these from validated requests; the engine turns them into
tensors. Keeping them torch-free lets the protocol, routes and a future scheduler import them cheaply.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling, with the semantics of the OpenAI API reference (completions / chat parameters).

    temperature < 1e-5 or top_k == 1 is greedy. ``logit_bias`` (token id -> bias in [-100, 100]) and the
    presence / frequency penalties (over the tokens generated so far) are added to the logits before
    temperature, top-k and top-p. ``logprobs`` = k ≥ 0 reports the sampled token's log-probability and the
    k most likely alternatives of the distribution actually sampled from; ``prompt_logprobs`` = k does the
    same for every prompt token (echo), from the prefill's logits. None = not reported.
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1   # tinier temperatures overflow logits/T to inf

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)


@dataclass
class RoutingSpec:
    """Explicit expert weights w (T,) from the request, or router options (all None = router defaults).

    ``weights`` is any sequence of T floats (a list, a tuple or a 1-D tensor); the engine moves it to
    the device.
    """
    weights: Sequence[float] | None = None
    top_k: int | None = None
    temperature: float | None = None

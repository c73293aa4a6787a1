"""What crosses from the engine thread to the HTTP side: the routing decision of a request and the typed
events of its lifetime. Plain data (floats, strings, records), no tensors and no JSON shapes: the routes
round and shape them for the API (server/protocol.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingDecision:
    """How one request is served: each expert's weight w_t (as served, unrounded) and where it came from."""
    weights: dict[str, float]
    top_expert: str | None      # the largest weight actually used; None when the fallback or θ* served it
    entropy: float              # of the normalised weights (nats)
    fallback: bool              # the router's fallback (or uniform weights without a router) served it
    source: str                 # router | request | uniform, or the serving mode's name when it does not route
    router_ms: float = 0.0      # the router pass per routed request of its batch
    router_guess: str | None = None   # the router's top expert when its fallback served the request


@dataclass(frozen=True)
class Routed:
    """First event of every request."""
    decision: RoutingDecision


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's token logprobs (echo with logprobs), after routing."""
    records: list


@dataclass(frozen=True)
class TextDelta:
    """Newly decoded text and the logprob records of its tokens."""
    text: str
    records: list


@dataclass(frozen=True)
class Finished:
    """Last event of a request that completed."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Last event of a request that failed (an APIError, or an engine error wrapped in one)."""
    error: Exception


Event = Routed | PromptLogprobs | TextDelta | Finished | Failed

"""OpenAI-compatible request, response and chunk models, plus the `twin` routing extension.

Source: the OpenAI API reference (legacy completions, chat completions) and vLLM's /tokenize and
/detokenize. A field the spec marks nullable accepts null as "default". Requests convert themselves
to the engine's plain-data specs (server/specs.py); nothing here imports torch.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import BadRequest, NotFound, UnsupportedMediaType
from .specs import RoutingSpec, SamplingParams

MAX_LOGPROBS = 20
FinishReason = Literal["stop", "length"]


def _drop_none(v: Any) -> bool:
    return v is None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate_at(v: Any, path: str) -> str | None:
    """The field path of the first string (value or key) in raw request data holding a lone UTF-16
    surrogate ("\\ud83d" without its pair: valid JSON, but no UTF-8 encoding exists), else None."""
    if isinstance(v, str):
        return path if _SURROGATE.search(v) else None
    if isinstance(v, dict):
        for k, x in v.items():
            key = str(k).encode("utf-8", "backslashreplace").decode("utf-8")   # printable in the error
            sub = f"{path}.{key}" if path else key
            if isinstance(k, str) and _SURROGATE.search(k):
                return path or sub
            bad = _lone_surrogate_at(x, sub)
            if bad is not None:
                return bad
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if isinstance(x, (str, dict, list)):
                bad = _lone_surrogate_at(x, f"{path}.{i}" if path else str(i))
                if bad is not None:
                    return bad
    return None


class RequestBody(BaseModel):
    """A request body: any string in it must be encodable as UTF-8 (400 naming the field, not a 500 later)."""

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        if isinstance(data, (bytes, str)):   # FastAPI hands over the raw body when it was not sent as JSON
            raise UnsupportedMediaType("the request body was not read as JSON: its Content-Type is not "
                                       "application/json (curl -d sends application/x-www-form-urlencoded; add "
                                       "-H 'Content-Type: application/json')", param=None)
        if isinstance(data, dict):
            bad = _lone_surrogate_at(data, "")
            if bad is not None:
                raise BadRequest(f"{bad}: contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                                 "which is not valid Unicode text", param=bad)
        return data


StrictFloat = Annotated[float, Field(strict=True)]   # JSON numbers only: no "1", no true


class TwinOptions(BaseModel):
    """Override or tune the routing of one request."""
    model_config = ConfigDict(extra="forbid")

    experts: dict[str, StrictFloat] | None = Field(None, description="explicit expert weights: numbers >= 0, "
                                                   "at least one > 0 (normalised to sum 1)")
    expert: str | None = Field(None, description="pin one expert (weight 1)")
    top_k: int | None = Field(None, ge=1, le=1024, description="keep the router's k largest weights")
    temperature: float | None = Field(None, gt=0, le=100, description="router softmax temperature")

    @field_validator("experts")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        bad = [k for k, x in v.items() if not (math.isfinite(x) and x >= 0)]
        if bad:
            raise ValueError(f"twin.experts weights must be finite and >= 0 (bad: {', '.join(bad)})")
        if not any(x > 0 for x in v.values()):
            raise ValueError("twin.experts must give at least one expert a weight > 0 (to serve the backbone "
                             "alone, use --mode backbone)")
        return v

    @model_validator(mode="after")
    def _one_override(self) -> TwinOptions:
        if self.experts is not None and self.expert is not None:
            raise ValueError("give either twin.experts or twin.expert, not both")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = Field(None, description="send a last chunk with usage and no choices")


class SamplingFields(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=0, le=1_000_000,
                                   description="default: the server's default, shrunk to fit the context; 0 only "
                                               "with echo (score the prompt, generate nothing)")
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="overrides max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="default 1; 0 = greedy (only the most likely "
                                                                "token, as vLLM)")
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="0 or -1 = off")
    n: int | None = Field(None, ge=1, le=128, description="choices per prompt (default 1)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1, description="any signed 64-bit integer; choice i of a "
                             "prompt samples with seed + i")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = None
    twin: TwinOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(s) == 0 or len(s) > 256 for s in v):
            raise ValueError("stop sequences must be 1..256 characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError("at most 300 logit_bias entries")
        for k, b in v.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 20):   # int() would accept "٣" and " 3"
                raise ValueError(f"keys must be token ids (non-negative integers in ASCII digits, as strings), "
                                 f"got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"bias of token {k} must be in [-100, 100], got {b}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    # ---- conversions to the engine's specs ------------------------------------------------------
    def routing_spec(self, model_name: str, experts: list[str]) -> RoutingSpec:
        """``model`` ("name" or "name:expert") and ``twin`` -> RoutingSpec; NotFound / BadRequest name the field."""
        ids = [model_name] + [f"{model_name}:{n}" for n in experts]
        if self.model == model_name:
            pinned = None
        elif self.model.startswith(model_name + ":"):
            pinned = self.model[len(model_name) + 1:]
            if not pinned:
                raise BadRequest(f"model {self.model!r} names no expert after ':'; use {model_name!r} or one of "
                                 f"{', '.join(ids[1:])}", param="model")
        else:
            raise NotFound(f"model {self.model!r} does not exist; available: {', '.join(ids)}", param="model")
        twin = self.twin
        if pinned is not None:
            if pinned not in experts:
                raise NotFound(f"model {self.model!r}: unknown expert {pinned!r} (experts: {', '.join(experts)})",
                               param="model")
            if twin is not None and (twin.experts is not None or twin.expert is not None):
                raise BadRequest("pin an expert either in model or in twin, not both", param="twin")
            _no_router_options(twin, f"model {self.model!r} pins an expert")
            return RoutingSpec(weights=_one_hot(experts, pinned))
        if twin is None:
            return RoutingSpec()
        if twin.expert is not None:
            if twin.expert not in experts:
                raise BadRequest(f"twin.expert: unknown expert {twin.expert!r} (experts: {', '.join(experts)})",
                                 param="twin.expert")
            _no_router_options(twin, "twin.expert pins an expert")
            return RoutingSpec(weights=_one_hot(experts, twin.expert))
        if twin.experts is not None:
            unknown = [k for k in twin.experts if k not in experts]
            if unknown:
                raise BadRequest(f"twin.experts: unknown expert(s) {', '.join(unknown)} "
                                 f"(experts: {', '.join(experts)})", param="twin.experts")
            _no_router_options(twin, "twin.experts sets the weights")
            w = [float(twin.experts.get(n, 0.0)) for n in experts]
            top = max(w)   # > 0: the validator refuses all-zero weights
            w = [x / top for x in w]   # scaled by the max first: huge weights must not overflow the sum
            total = sum(w)
            return RoutingSpec(weights=tuple(x / total for x in w))
        if twin.top_k is not None and twin.top_k > len(experts):
            raise BadRequest(f"twin.top_k must be <= the number of experts ({len(experts)})", param="twin.top_k")
        return RoutingSpec(top_k=twin.top_k, temperature=twin.temperature)

    def sampling_params(self, max_tokens: int, choice: int = 0, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's SamplingParams for choice ``choice`` of a prompt (seeds differ per choice)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if not self.top_p else self.top_p,     # top_p 0: greedy, as top_k 1
            top_k=1 if self.top_p == 0 else max(0, self.top_k or 0),
            seed=None if self.seed is None else (self.seed + choice) % 2**64,   # -1 and 2**63-1 differ
            stop=list(self.stop or []),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


def _no_router_options(twin: TwinOptions | None, why: str) -> None:
    """twin.top_k / twin.temperature tune the router; refused when the request fixes the weights itself."""
    for name in ("top_k", "temperature"):
        if twin is not None and getattr(twin, name) is not None:
            raise BadRequest(f"twin.{name} cannot apply: {why}, so the router does not run; drop twin.{name}",
                             param=f"twin.{name}")


def _one_hot(names: list[str], name: str) -> tuple[float, ...]:
    return tuple(1.0 if n == name else 0.0 for n in names)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of token-id lists; "
                         "each prompt gets n choices (index = prompt_index * n + choice)")
    echo: bool | None = Field(None, description="prepend the prompt (and, with logprobs, its token logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of each token and of the k most likely ones")
    best_of: int | None = Field(None, ge=1, le=128, description="generate best_of per prompt, return the n with "
                                                                "the highest summed logprob (not with stream)")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in v):
            v = [v]
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError(f"prompt {i}: token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens: 0 is allowed only with echo (to score the prompt); use >= 1",
                             param="max_tokens")
        if self.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise BadRequest(f"best_of ({self.best_of}) must be >= n ({self.choices_per_prompt})", param="best_of")
        if self.best_of is not None and self.best_of > self.choices_per_prompt and self.stream:
            raise BadRequest("best_of > n cannot be streamed", param="best_of")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        return self.prompt  # normalised by the validator: a list of strings and token-id lists


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = Field(None, description="text, or a list of text parts; "
                                                                   "null only for assistant turns")
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        if isinstance(v, list):
            for j, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {j}: type {kind!r} is not supported (only 'text' parts)")
        return v

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role {self.role!r} (null only for assistant)")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                   description="default: the server's default, shrunk to fit the context")
    logprobs: bool | None = Field(None, description="log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="k most likely tokens per position")
    response_format: ResponseFormat | None = Field(None, description="only {'type': 'text'}")
    tools: list[dict] | None = Field(None, description="not supported: must be absent or empty")
    tool_choice: str | dict | None = Field(None, description="not supported: absent, 'none' or 'auto' without tools")
    functions: list[dict] | None = Field(None, description="not supported")
    function_call: str | dict | None = Field(None, description="not supported")
    modalities: list[str] | None = Field(None, description="only ['text']")
    audio: dict | None = Field(None, description="not supported")
    prediction: dict | None = Field(None, description="not supported")

    @model_validator(mode="after")
    def _honourable(self) -> ChatCompletionRequest:
        """Fields that change the output in ways this server cannot do are refused, never ignored."""
        if self.response_format is not None and self.response_format.type != "text":
            raise BadRequest(f"response_format type {self.response_format.type!r} is not supported (only 'text')",
                             param="response_format.type")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs requires logprobs: true", param="top_logprobs")
        if self.tools:
            raise BadRequest("tools (function calling) are not supported", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice is not supported", param="tool_choice")
        for name in ("functions", "function_call", "audio", "prediction"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported", param=name)
        if self.modalities is not None and self.modalities != ["text"]:
            raise BadRequest("only the 'text' modality is supported", param="modalities")
        return self


# ---- responses -------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Routing(BaseModel):
    weights: dict[str, float]
    top_expert: str | None = Field(..., description="the expert with the largest weight actually used (null when "
                                                     "the fallback or the backbone served the request)")
    entropy: float
    fallback: bool
    router_ms: float
    source: Literal["router", "request", "backbone", "uniform"]
    router_guess: str | None = Field(None, exclude_if=_drop_none,
                                     description="the router's top expert when its fallback served the request")

    @classmethod
    def of(cls, d) -> Routing:
        """The API's shape of a `server.events.RoutingDecision`: weights to 6 decimals, entropy to 4, ms to 3."""
        return cls(weights={n: round(x, 6) for n, x in d.weights.items()}, top_expert=d.top_expert,
                   entropy=round(d.entropy, 4) + 0.0, fallback=d.fallback, router_ms=round(d.router_ms, 3),
                   source=d.source, router_guess=d.router_guess)


class TwinInfo(BaseModel):
    routing: Routing = Field(..., description="routing of the first prompt")
    prompts: list[Routing] | None = Field(None, exclude_if=_drop_none,
                                          description="routing of every prompt, when there are several")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Entry(NamedTuple):
    """One token's logprob, already decoded: (token text, logprob or None, top-k [(text, logprob)] or None,
    character offset in the choice's text)."""
    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None
    offset: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def build(cls, entries: list[Entry]) -> CompletionLogprobs:
        """The sampled token is always in top_logprobs (so up to k + 1 entries), as the OpenAI reference says."""
        tops: list[dict[str, float] | None] = []
        for e in entries:
            if e.top is None:
                tops.append(None)
                continue
            d = dict(e.top)
            d.setdefault(e.token, e.logprob)
            tops.append(d)
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=tops, text_offset=[e.offset for e in entries])


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    twin: TwinInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_drop_none)
    twin: TwinInfo | None = Field(None, exclude_if=_drop_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None

    @classmethod
    def build(cls, entries: list[Entry]) -> ChatLogprobs:
        def b(s: str) -> list[int]:
            return list(s.encode("utf-8"))
        return cls(content=[ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=b(e.token),
                                             top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=b(t))
                                                           for t, lp in (e.top or [])])
                            for e in entries])


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    twin: TwinInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_drop_none)
    content: str | None = Field(None, exclude_if=_drop_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_drop_none)
    twin: TwinInfo | None = Field(None, exclude_if=_drop_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "twinserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /tokenize, /detokenize (vLLM's shapes) ---------------------------------------------------------

class TokenizeRequest(RequestBody):
    """Either ``prompt`` (completion form) or ``messages`` (chat form, rendered with the chat template)."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for prompt; for messages, false when "
                                            "the chat template is used (it writes its own <bos>), as the chat "
                                            "endpoint counts them")
    add_generation_prompt: bool | None = Field(None, description="chat form; default true")
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise BadRequest("give exactly one of prompt or messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise BadRequest("messages must hold at least one message", param="messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=256)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str

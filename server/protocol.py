"""OpenAI-compatible request/response models, plus the `twin` routing extension."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TwinOptions(BaseModel):
    """Override or tune the routing of one request."""
    model_config = ConfigDict(extra="forbid")

    experts: dict[str, float] | None = Field(None, description="explicit expert weights (normalised to sum 1)")
    expert: str | None = Field(None, description="pin one expert (weight 1)")
    top_k: int | None = Field(None, ge=1, le=1024, description="keep the router's k largest weights")
    temperature: float | None = Field(None, gt=0, le=100, description="router softmax temperature")

    @model_validator(mode="after")
    def _one_override(self) -> TwinOptions:
        if self.experts is not None and self.expert is not None:
            raise ValueError("give either twin.experts or twin.expert, not both")
        if self.experts is not None:
            bad = [k for k, v in self.experts.items() if not (v >= 0) or v == float("inf")]
            if bad:
                raise ValueError(f"twin.experts weights must be finite and >= 0 (bad: {', '.join(bad)})")
        return self


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
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

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="one prompt (a list of one is accepted)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported; must be null or 0")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Routing(BaseModel):
    weights: dict[str, float]
    top_expert: str | None
    entropy: float
    fallback: bool
    router_ms: float
    source: Literal["router", "request", "backbone", "uniform"]


class TwinInfo(BaseModel):
    routing: Routing


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    twin: TwinInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    twin: TwinInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "twinserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Between routes and engine: resolve model and routing, encode, enforce limits, run a request."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import torch

from .engine import Engine, Request, RoutingSpec
from .errors import APIError, BadRequest, ContextLengthExceeded, NotFound
from twin.generate import encode_prompt
from .protocol import ChatMessage, SamplingFields
from .sampling import SamplingParams
from .settings import Settings


class Service:
    def __init__(self, engine: Engine, settings: Settings, model_name: str):
        self.engine = engine
        self.settings = settings
        self.model_name = model_name
        self.names = engine.names
        self.tokenizer = engine.tokenizer

    # ---- request -> engine Request ---------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.model_name] + [f"{self.model_name}:{n}" for n in self.names]

    def routing_spec(self, body: SamplingFields) -> RoutingSpec:
        base, _, pinned = body.model.partition(":")
        if base != self.model_name:
            raise NotFound(f"model {body.model!r} does not exist; available: {', '.join(self.model_ids())}",
                           param="model")
        twin = body.twin
        if pinned:
            if pinned not in self.names:
                raise NotFound(f"model {body.model!r}: unknown expert {pinned!r} (experts: {', '.join(self.names)})",
                               param="model")
            if twin is not None and (twin.experts is not None or twin.expert is not None):
                raise BadRequest("pin an expert either in model or in twin, not both", param="twin")
            return RoutingSpec(weights=self._one_hot(pinned))
        if twin is None:
            return RoutingSpec()
        if twin.expert is not None:
            if twin.expert not in self.names:
                raise BadRequest(f"twin.expert: unknown expert {twin.expert!r} (experts: {', '.join(self.names)})",
                                 param="twin.expert")
            return RoutingSpec(weights=self._one_hot(twin.expert))
        if twin.experts is not None:
            unknown = [k for k in twin.experts if k not in self.names]
            if unknown:
                raise BadRequest(f"twin.experts: unknown expert(s) {', '.join(unknown)} "
                                 f"(experts: {', '.join(self.names)})", param="twin.experts")
            w = torch.tensor([float(twin.experts.get(n, 0.0)) for n in self.names], dtype=torch.float64)
            if float(w.sum()) > 0:  # float64 and scaled by the max first: huge weights must not become inf/nan
                w = w / w.max()
                w = w / w.sum()
            return RoutingSpec(weights=w.float())
        if twin.top_k is not None and twin.top_k > len(self.names):
            raise BadRequest(f"twin.top_k must be <= the number of experts ({len(self.names)})", param="twin.top_k")
        return RoutingSpec(top_k=twin.top_k, temperature=twin.temperature)

    def _one_hot(self, name: str) -> torch.Tensor:
        w = torch.zeros(len(self.names))
        w[self.names.index(name)] = 1.0
        return w

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        msgs = [m.model_dump() for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def make_request(self, prompt: str, body: SamplingFields) -> Request:
        if body.presence_penalty or body.frequency_penalty:
            raise BadRequest("presence_penalty and frequency_penalty are not supported; use 0",
                             param="presence_penalty" if body.presence_penalty else "frequency_penalty")
        routing = self.routing_spec(body)
        ids = encode_prompt(self.tokenizer, prompt)
        limit = self.engine.max_len
        max_tokens = body.max_completion_tokens or body.max_tokens or self.settings.max_tokens_default
        if len(ids) >= limit:
            raise ContextLengthExceeded(f"prompt is {len(ids)} tokens; this model's context limit is {limit} tokens",
                                        param="prompt")
        if len(ids) + max_tokens > limit:
            raise ContextLengthExceeded(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context limit of {limit} tokens",
                param="max_tokens")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop=list(body.stop or []))
        loop = asyncio.get_running_loop()
        return Request(prompt_ids=ids, params=params, routing=routing,
                       deadline=time.perf_counter() + self.settings.request_timeout_s,
                       events=asyncio.Queue(), loop=loop)

    # ---- running --------------------------------------------------------------------------------
    async def events(self, req: Request, disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[tuple[str, object]]:
        """Yield ("routing", dict) / ("text", str) / ("done", dict) of a submitted request; raises APIError on
        failure. Cancels the request if the consumer goes away or the client disconnects."""
        finished = False
        checked = time.monotonic()
        try:
            while True:
                # asyncio.wait (not wait_for) so a cancel of this task is never swallowed by a ready event
                get = asyncio.ensure_future(req.events.get())
                try:
                    done, _ = await asyncio.wait({get}, timeout=0.5)
                finally:
                    if not get.done():
                        get.cancel()
                if disconnected is not None and time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await disconnected():
                        return
                if not done:
                    continue
                kind, payload = get.result()
                if kind == "error":
                    finished = True
                    raise payload if isinstance(payload, APIError) else APIError(str(payload))
                yield kind, payload
                if kind == "done":
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.cancel(req)

    async def run(self, req: Request, disconnected=None) -> tuple[str, dict, dict]:
        """Non-streaming: (text, done info, routing)."""
        self.engine.submit(req)
        parts: list[str] = []
        routing: dict = {}
        done: dict = {}
        async for kind, payload in self.events(req, disconnected):
            if kind == "routing":
                routing = payload
            elif kind == "text":
                parts.append(payload)
            else:
                done = payload
        if not done:  # client went away
            raise BadRequest("client disconnected")
        return "".join(parts), done, routing

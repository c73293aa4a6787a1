"""The model runner: owns the model, the KV cache and the per-row tensors; one ``step(plan)`` per tick.

It never sees HTTP or queues. A step turns the scheduler's `Plan` into one `FlatBatch` (decode tokens of
running rows, then prefill chunks), runs one forward through the model (every weight read once), samples
the rows that need a token and returns plain Python results. What weights a row carries and which model
serves it is its serving mode (server/modes.py).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from router.features import router_features
from router.model import Router
from twin.loading import LoadedArtifact
from twin.model.batch import FlatBatch

from .events import RoutingDecision
from .modes import ServingMode
from .sampling import TokenLogprob, make_generator, prompt_logprobs, sample_rows
from .scheduler import Plan


@dataclass
class Row:
    """Runner-side state of one running sequence (tensors live here, not on the request)."""
    w: torch.Tensor | None
    generator: torch.Generator | None
    model: torch.nn.Module
    prompt_logits: list[torch.Tensor] = field(default_factory=list)   # echo logprobs: logits per chunk


@dataclass
class StepOutput:
    sampled: list[tuple[object, int, TokenLogprob | None]]    # (sequence, token, logprob record)
    prompt_logprobs: list[tuple[object, list]]                 # (sequence, per prompt token records)
    prefill_tokens: int
    decode_tokens: int


class ModelRunner:
    def __init__(self, art: LoadedArtifact, router: Router | None, mode: ServingMode, max_slots: int,
                 max_len: int, fused_cache: int = 4):
        self.art, self.router, self.mode = art, router, mode
        self.model = art.model
        self.device = self.model.device
        self.names = art.expert_names
        self.max_len = max_len
        self.cache = self.model.new_cache(max_slots, max_len)
        self.rows: dict[int, Row] = {}
        self._models: collections.OrderedDict = collections.OrderedDict()
        self._fused_cache = fused_cache

    # ---- lifecycle ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warmup(self, tokenizer) -> None:
        prompt = tokenizer.encode("warm up", add_special_tokens=False)[:4] or [0]
        w = torch.full((len(self.names),), 1.0 / max(1, len(self.names)), device=self.device)
        model = self._model_for(w)
        flat = FlatBatch.build([], [(prompt, 0, 0)], self.device, weights=self._step_weights([w]), logits="all")
        model.step(flat, model.new_cache(1, 16))

    def close(self) -> None:
        self.rows.clear()
        self._models.clear()
        self.cache = None

    def dense_models(self) -> list:
        """The dense per-request models the LRU holds (materialize/expert modes; memory accounting)."""
        return list(self._models.values())

    def release(self, seq) -> None:
        self.rows.pop(seq.id, None)

    # ---- routing --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def route(self, seqs: list, default_top_k: int | None,
              default_temperature: float | None) -> dict[int, RoutingDecision]:
        """Expert weights w for newly admitted sequences; returns seq.id -> its routing decision."""
        need = [s for s in seqs if s.routing.weights is None and self.mode.routed and self.router is not None]
        info: dict[int, dict] = {}
        weights: dict[int, torch.Tensor | None] = {}
        if need:
            t0 = time.perf_counter()
            # the router reads the prompt's head (config.prefix_tokens): a continuation appended after it
            # (loglikelihood scoring) routes as its context does, and the pass is bounded by the head
            feats = router_features(self.model, [s.prompt_ids for s in need],
                                    self.router.config).cpu()  # the router MLP is tiny and lives on the CPU
            groups: dict[tuple, list[int]] = {}
            for i, s in enumerate(need):
                groups.setdefault((s.routing.top_k or default_top_k,
                                   s.routing.temperature or default_temperature), []).append(i)
            for (k, temp), idx in groups.items():
                out = self.router.route(feats[idx], temperature=temp, top_k=k)
                for j, i in enumerate(idx):
                    s = need[i]
                    weights[s.id] = out.weights[j].to(self.device)
                    guess, fallback = self.names[int(out.top[j])], bool(out.fallback[j])
                    # a fallback row is served by the fallback weights, not by the router's best guess
                    info[s.id] = {"top_expert": None if fallback else guess, "entropy": float(out.entropy[j]),
                                  "fallback": fallback, "source": "router", "router_guess": guess if fallback else None}
            ms = (time.perf_counter() - t0) * 1000 / len(need)
            for s in need:
                info[s.id]["router_ms"] = ms
        for s in seqs:
            if s.id not in info:
                if not self.mode.routed:
                    weights[s.id] = None
                    info[s.id] = {"top_expert": None, "entropy": 0.0, "fallback": False, "router_ms": 0.0,
                                  "source": self.mode.name}
                elif s.routing.weights is not None:
                    w = torch.as_tensor(s.routing.weights, dtype=torch.float32).to(self.device)
                    weights[s.id] = w
                    info[s.id] = {"top_expert": self.names[int(w.argmax())] if float(w.sum()) > 0 else None,
                                  "entropy": entropy(w), "fallback": False, "router_ms": 0.0, "source": "request"}
                else:  # no router in the artifact: uniform weights
                    w = torch.full((len(self.names),), 1.0 / len(self.names), device=self.device)
                    weights[s.id] = w
                    info[s.id] = {"top_expert": None, "entropy": entropy(w), "fallback": True, "router_ms": 0.0,
                                  "source": "uniform"}
            w = weights[s.id]
            info[s.id]["weights"] = dict(zip(self.names, w.tolist() if w is not None else [0.0] * len(self.names)))
            self.rows[s.id] = Row(w, make_generator(s.params, self.device), self._model_for(w))
        return {i: RoutingDecision(**d) for i, d in info.items()}

    def _model_for(self, w: torch.Tensor | None):
        if not self.mode.per_request:
            return self.model
        key = self.mode.model_key(w)
        m = self._models.get(key)
        if m is None:
            m = self._models[key] = self.mode.build_model(self.art, w)
            while len(self._models) > self._fused_cache:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return m

    def _step_weights(self, ws: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
        """One w per decode row and chunk when rows carry deltas into the shared model, else None (θ*)."""
        return ws if self.mode.deltas else None

    # ---- one step -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, plan: Plan) -> StepOutput:
        """Execute ``plan`` as one forward. Decode rows use ``seq.next_token`` at position
        len(prompt) + len(generated) − 1."""
        decode = [(s.next_token, len(s.prompt_ids) + len(s.generated) - 1, s.slot) for s in plan.decode]
        chunks = [(c.seq.prompt_ids[c.start:c.end], c.seq.slot, c.start) for c in plan.chunks]
        logits_of = ["all" if c.seq.params.prompt_logprobs is not None else "last" if c.last else "none"
                     for c in plan.chunks]           # echo logprobs need every prompt position
        rows = [self.rows[s.id] for s in plan.decode] + [self.rows[c.seq.id] for c in plan.chunks]
        flat = FlatBatch.build(decode, chunks, self.device, bucket=True,
                               weights=self._step_weights([r.w for r in rows]), logits=logits_of)
        models = {id(r.model): r.model for r in rows}
        if len(models) != 1:
            raise RuntimeError("one step must run one model (per-request modes schedule one sequence)")
        logits = next(iter(models.values())).step(flat, self.cache)
        # decode row j samples logits row j; a chunk that completes its prompt samples its last row
        sample_seqs, sample_at = list(plan.decode), list(range(len(decode)))
        echo: list[tuple] = []                              # (chunk, its first logits row, row count)
        for c, (first, n) in zip(plan.chunks, flat.chunk_logits):
            if c.seq.params.prompt_logprobs is not None:
                echo.append((c, first, n))
            if c.last:
                sample_seqs.append(c.seq)
                sample_at.append(first + n - 1)
        prompt_out = []
        for c, first, n in echo:
            row = self.rows[c.seq.id]
            row.prompt_logits.append(logits[first:first + n])
            if c.last:
                full = torch.cat(row.prompt_logits)
                prompt_out.append((c.seq, prompt_logprobs(full, c.seq.prompt_ids, c.seq.params.prompt_logprobs)))
                row.prompt_logits = []
        sampled = []
        if sample_seqs:
            sel = logits[torch.tensor(sample_at, device=logits.device)]
            tokens, records = sample_rows(sel, [s.params for s in sample_seqs],
                                          [self.rows[s.id].generator for s in sample_seqs],
                                          [s.generated for s in sample_seqs])
            sampled = list(zip(sample_seqs, tokens, records))
        return StepOutput(sampled, prompt_out, sum(c.end - c.start for c in plan.chunks), len(decode))


def entropy(w: torch.Tensor) -> float:
    p = w.float() / w.float().sum().clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-12).log()).sum()) + 0.0  # no -0.0 in JSON

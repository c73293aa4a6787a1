"""The scheduler: queues, KV slots, the per-step token budget and cancellation. No tensors, no model.

Each engine tick asks ``schedule(now)`` for a `Plan`, which the model runner executes as one forward
(vLLM's unified step with chunked prefill):

  1. running rows that were cancelled or passed their deadline leave and free their slots;
  2. every running row whose prompt is fully in the cache decodes one token (one token of budget each);
  3. rows still prefilling continue, then waiting requests are admitted (lowest free slot first), each
     taking a chunk of its prompt from what is left of the ``token_budget`` — a long prompt is spread
     over several steps instead of stalling every decode behind it.

Slots are handed out lowest first and decode rows are ordered by slot, so a steady batch occupies a
dense range of slots and attention reads a view of the cache instead of gathering it. Modes that serve
one dense model per request (``per_request``) run one sequence at a time.
"""
from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from typing import Protocol


class Sequence(Protocol):
    """What the scheduler reads and writes on a request (server.engine.Request implements it)."""
    prompt_ids: list[int]
    deadline: float
    arrival: float
    cancelled: bool
    slot: int
    num_computed: int          # prompt tokens already in the KV cache


@dataclass
class Chunk:
    """Prompt tokens [start, end) of ``seq`` to prefill this step; ``last`` when they finish the prompt."""
    seq: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


@dataclass
class Plan:
    decode: list = field(default_factory=list)          # running sequences: one new token each
    chunks: list[Chunk] = field(default_factory=list)   # prefill work
    admitted: list = field(default_factory=list)        # newly admitted (route them before their first chunk)
    cancelled: list = field(default_factory=list)       # left the batch: cancelled by the client
    expired: list = field(default_factory=list)         # left the batch or the queue: past the deadline
    queued_expired: list = field(default_factory=list)  # of ``expired``: those that never got a slot

    @property
    def empty(self) -> bool:
        return not (self.decode or self.chunks)


class QueueFullError(Exception):
    pass


class Scheduler:
    def __init__(self, max_slots: int, token_budget: int, max_queue: int, per_request: bool = False):
        if token_budget < 1 or max_slots < 1:
            raise ValueError("max_slots and token_budget must be >= 1")
        self.max_slots, self.token_budget, self.max_queue = max_slots, token_budget, max_queue
        self.per_request = per_request
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self._free = list(range(max_slots))     # a heap: the lowest free slot first
        heapq.heapify(self._free)

    # ---- queue ----------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"request queue is full ({self.max_queue} waiting)")
        seq.slot, seq.num_computed = -1, 0
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def release(self, seq: Sequence) -> None:
        """``seq`` left the batch (finished, failed or cancelled): free its slot."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1

    def drain(self) -> list:
        """Everything still queued or running (shutdown); the scheduler is empty afterwards."""
        out = list(self.waiting) + list(self.running)
        for seq in list(self.running):
            self.release(seq)
        self.waiting.clear()
        return out

    # ---- one step -------------------------------------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        plan = Plan()
        for seq in list(self.running):
            if seq.cancelled:
                self.release(seq)
                plan.cancelled.append(seq)
            elif now > seq.deadline:
                self.release(seq)
                plan.expired.append(seq)
        budget = self.token_budget
        prefilling = []
        for seq in sorted(self.running, key=lambda s: s.slot):
            if seq.num_computed >= len(seq.prompt_ids):
                plan.decode.append(seq)
                budget -= 1
            else:
                prefilling.append(seq)
        budget = max(budget, 1)   # a prompt always advances, even behind a full decode batch
        for seq in prefilling:
            if budget <= 0:
                break
            budget -= self._chunk(plan, seq, budget)
        while self.waiting and self._free and budget > 0:
            seq = self.waiting[0]
            if seq.cancelled or now > seq.deadline:
                self.waiting.popleft()
                if not seq.cancelled:
                    plan.expired.append(seq)
                    plan.queued_expired.append(seq)
                continue
            if self.per_request and self.running:
                break
            self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            seq.num_computed = 0
            self.running.append(seq)
            plan.admitted.append(seq)
            budget -= self._chunk(plan, seq, budget)
        return plan

    @staticmethod
    def _chunk(plan: Plan, seq: Sequence, budget: int) -> int:
        start = seq.num_computed
        end = min(len(seq.prompt_ids), start + budget)
        plan.chunks.append(Chunk(seq, start, end))
        seq.num_computed = end
        return end - start

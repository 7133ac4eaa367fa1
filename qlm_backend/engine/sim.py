"""A continuous-batching LLM engine in the style of vLLM, driven by a clock it is given.

Pure: no threads, no clock reads. The Triton model (triton/sim_engine.py) runs it against the wall
clock; the evaluation simulator runs it in virtual time:

    while (t := engine.next_event_s()) is not None:
        for ev in engine.advance(t): ...

One iteration admits waiting requests while sequence slots, the prefill token budget and KV blocks
allow, prefills them, and decodes one token for every running sequence. When a running sequence
needs a KV block and none is free, the most recently admitted (or, under priority scheduling, the
lowest-priority) sequence is preempted: recompute drops its KV and re-prefills prompt + generated
tokens later; swap copies its KV to host memory over PCIe and back. Times come from PerfModel.

Prefix caching is on, as in vLLM v1 (engine/prefix_cache.py): the blocks of a finished, aborted or
preempted request stay reusable until the allocator overwrites them, so a request that comes back
(re-admitted after preemption, or added again under the same `prefix_key` after an abort: an
evicted request resumed with prompt + text so far) recomputes only what was lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from qlm_backend.engine.hardware import KV_BLOCK_TOKENS
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.prefix_cache import PrefixCache, hit_tokens

Scheduling = Literal["fcfs", "priority"]
Preemption = Literal["recompute", "swap"]
SCHEDULING_POLICIES: tuple[Scheduling, ...] = ("fcfs", "priority")
PREEMPTION_MODES: tuple[Preemption, ...] = ("recompute", "swap")


@dataclass
class EngineRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    # Tokens the request produces before it stops (== max_tokens when ignore_eos).
    output_tokens: int
    priority: int = 0  # lower is served first, as in vLLM
    arrival_s: float = 0.0
    # Identity of its token content for the prefix cache (None: the request id). A request resumed
    # with the same prompt + text so far passes the key it had before.
    prefix_key: str | None = None

    @property
    def cache_key(self) -> str:
        return self.prefix_key if self.prefix_key is not None else self.request_id


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_index: int  # 0-based index of the output token just produced
    time_s: float
    finished: bool
    finish_reason: str | None  # "length" | "stop" when finished
    # With the first token (index 0) only: when the engine first scheduled the request.
    scheduled_s: float | None = None


@dataclass(eq=False)  # identity semantics: two sequences are never the same by value
class _Seq:
    req: EngineRequest
    order: int  # admission order key for FCFS tie-breaks
    ready_s: float = 0.0  # when it reaches the scheduler (after the per-request overhead)
    generated: int = 0
    computed: int = 0  # tokens whose KV is in the cache (or, when swapped, in host memory)
    blocks: int = 0
    swapped: bool = False  # KV lives in host memory
    scheduled_s: float | None = None

    @property
    def context_tokens(self) -> int:
        return self.req.prompt_tokens + self.generated

    @property
    def target(self) -> int:
        return min(self.req.output_tokens, self.req.max_tokens)


@dataclass
class EngineStats:
    iterations: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    swaps_out: int = 0
    aborted: int = 0
    finished: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens not recomputed thanks to the prefix cache


@dataclass
class _Iteration:
    end_s: float
    scheduled: list[tuple[_Seq, int]]  # (sequence, tokens it computes in this step)


@dataclass
class SimEngine:
    perf: PerfModel
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduling: Scheduling = "fcfs"
    preemption: Preemption = "recompute"
    prefix_caching: bool = True  # vLLM v1's default
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling must be one of {SCHEDULING_POLICIES}, got {self.scheduling!r}"
            )
        if self.preemption not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption must be one of {PREEMPTION_MODES}, got {self.preemption!r}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        self.total_blocks = self.perf.kv_capacity_blocks
        self.free_blocks = self.total_blocks  # not held by a sequence (cached ones included)
        self.cache = PrefixCache()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._current: _Iteration | None = None
        # When idle, the next iteration starts at the first arrival's time, so that requests that
        # arrive at the same instant share one iteration (as vLLM's engine loop picks them up).
        self._start_at: float | None = None
        self._order = 0
        self._ids: set[str] = set()

    # --- public API -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._ids

    def add(self, req: EngineRequest, now: float) -> None:
        if req.request_id in self._ids:
            raise ValueError(f"request_id {req.request_id!r} is already in the engine")
        if req.prompt_tokens < 1 or req.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if self._blocks_for(req.prompt_tokens + 1) > self.total_blocks:
            raise ValueError(
                f"prompt of {req.prompt_tokens} tokens exceeds the KV cache "
                f"({self.total_blocks * KV_BLOCK_TOKENS} tokens)"
            )
        self._ids.add(req.request_id)
        ready = now + self.perf.eff.request_overhead_s
        self._waiting.append(_Seq(req, self._order, ready))
        self._order += 1
        self._kick(ready)

    def abort(self, request_id: str, now: float) -> bool:
        if request_id not in self._ids:
            return False
        for lst in (self._waiting, self._running):
            for s in lst:
                if s.req.request_id == request_id:
                    lst.remove(s)
                    self._release(s)
        # A sequence in the iteration in progress simply produces nothing when it ends.
        self._ids.discard(request_id)
        self.stats.aborted += 1
        if not self._waiting and not self._running:
            self._start_at = None
        return True

    def _kick(self, now: float) -> None:
        if self._current is None and self._start_at is None:
            self._start_at = now

    def next_event_s(self) -> float | None:
        """When advance() next has something to do: an iteration's end, or an idle engine's start."""
        if self._current is not None:
            return self._current.end_s
        return self._start_at

    def advance(self, now: float) -> list[TokenEvent]:
        """Complete every iteration that ends at or before `now`; start the next one."""
        events: list[TokenEvent] = []
        while True:
            if self._current is None:
                if self._start_at is None or self._start_at > now:
                    break
                start, self._start_at = self._start_at, None
                self._start_iteration(start)
                if self._current is None:
                    break
                continue
            if self._current.end_s > now:
                break
            it = self._current
            self._current = None
            events.extend(self._finish_iteration(it))
            self._start_iteration(it.end_s)
        return events

    def expected_step_s(self) -> float:
        """Decode step time at the current batch (for schedulers that want a rate)."""
        ctx = sum(s.context_tokens for s in self._running)
        return self.perf.decode_step_s(max(1, len(self._running)), ctx)

    # --- internals ----------------------------------------------------------------------------
    @staticmethod
    def _blocks_for(tokens: int) -> int:
        return math.ceil(tokens / KV_BLOCK_TOKENS)

    def _release(self, s: _Seq) -> None:
        if not s.swapped:
            self.free_blocks += s.blocks
            if self.prefix_caching:
                full = min(s.blocks, s.computed // KV_BLOCK_TOKENS)
                self.cache.put(s.req.cache_key, full)
        s.blocks = 0

    def _allocate(self, blocks: int) -> None:
        self.free_blocks -= blocks
        self.cache.trim_to(self.free_blocks)  # the allocator overwrote the oldest cached blocks

    def cached_tokens(self, key: str) -> int:
        """Tokens of `key` still in the prefix cache (what a resumed request would skip)."""
        return self.cache.peek(key) * KV_BLOCK_TOKENS

    def _queue_key(self, s: _Seq) -> tuple[int, int]:
        if self.scheduling == "priority":
            return (s.req.priority, s.order)
        return (0, s.order)

    def _victim(self) -> _Seq:
        # vLLM v1: the lowest-priority running request under priority scheduling, else the one
        # admitted last.
        if self.scheduling == "priority":
            return max(self._running, key=self._queue_key)
        return self._running[-1]

    def _start_iteration(self, now: float) -> None:
        """vLLM v1's schedule(): running requests first (a decode token each, or the next chunk
        of a prompt), preempting when KV blocks run out; then, if nothing was preempted, waiting
        requests in queue order while sequence slots, the token budget and blocks allow. A
        prompt longer than the budget is prefilled in chunks over several steps."""
        if not self._waiting and not self._running:
            return
        budget = self.max_num_batched_tokens
        sched: dict[_Seq, int] = {}
        swap_s = 0.0
        preempted: set[_Seq] = set()
        for s in list(self._running):
            if budget <= 0:
                break
            if s in preempted:  # a victim earlier in this loop
                continue
            new = min(s.context_tokens - s.computed, budget)
            need = self._blocks_for(s.computed + new) - s.blocks
            while need > self.free_blocks:
                victim = self._victim()
                budget += sched.pop(victim, 0)
                swap_s += self._preempt(victim)
                preempted.add(victim)
                if victim is s:
                    break
            if s in preempted:
                continue
            self._allocate(max(0, need))
            s.blocks += max(0, need)
            sched[s] = new
            budget -= new
        if not preempted:
            self._waiting.sort(key=self._queue_key)
            admitted: set[_Seq] = set()
            for s in self._waiting:
                if budget <= 0 or len(self._running) >= self.max_num_seqs:
                    break
                if s.ready_s > now:  # still on its way to the scheduler
                    continue
                hit = 0
                if self.prefix_caching and not s.swapped and s.computed == 0:
                    hit = hit_tokens(self.cache.peek(s.req.cache_key), s.context_tokens)
                new = min(s.context_tokens - hit - s.computed, budget)
                need = self._blocks_for(s.computed + hit + new)
                if need > self.free_blocks:
                    break
                if hit:
                    self.cache.take(s.req.cache_key)
                    s.computed = hit
                    self.stats.prefix_hit_tokens += hit
                admitted.add(s)
                self._allocate(need)
                s.blocks = need
                if s.swapped:
                    swap_s += self.perf.kv_swap_s(s.computed)
                    s.swapped = False
                if s.scheduled_s is None:
                    s.scheduled_s = now
                self._running.append(s)
                sched[s] = new
                budget -= new
            if admitted:
                self._waiting = [w for w in self._waiting if w not in admitted]
        if not sched:
            if any(w.ready_s <= now for w in self._waiting):
                if preempted:  # vLLM admits nothing in a step that preempted: the next one does
                    self._start_at = now
            elif self._waiting:  # requests still on their way to the scheduler start the engine
                self._start_at = min(w.ready_s for w in self._waiting)
            return
        n_decode, ctx = 0, 0
        chunks: list[tuple[int, int]] = []
        for s, n in sched.items():
            if n == 1 and s.computed == s.context_tokens - 1:  # a decode: its last token's KV
                n_decode += 1
                ctx += s.computed
            else:
                chunks.append((n, s.computed))
        dur = self.perf.step_s(n_decode, ctx, chunks) + swap_s
        self.stats.iterations += 1
        self.stats.busy_s += dur
        self.stats.prefill_tokens += sum(n for n, _ in chunks)
        self._current = _Iteration(now + dur, list(sched.items()))

    def _preempt(self, victim: _Seq) -> float:
        self._running.remove(victim)
        self.stats.preemptions += 1
        cost = 0.0
        if self.preemption == "swap":
            cost = self.perf.kv_swap_s(victim.computed)
            self.free_blocks += victim.blocks
            victim.blocks = 0
            victim.swapped = True
            self.stats.swaps_out += 1
        else:
            self._release(victim)
            # Recompute: prompt + generated tokens are prefilled again, less what the prefix
            # cache still holds when it is re-admitted.
            victim.computed = 0
        self._waiting.append(victim)
        return cost

    def _finish_iteration(self, it: _Iteration) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for s, new in it.scheduled:
            if s not in self._running:  # aborted or preempted during the iteration
                continue
            s.computed += new
            if s.computed < s.context_tokens:  # a prompt chunk: no token yet
                continue
            idx = s.generated
            s.generated += 1
            self.stats.generated_tokens += 1
            done = s.generated >= s.target
            reason = None
            if done:
                reason = "length" if s.generated >= s.req.max_tokens else "stop"
                self._running.remove(s)
                self._release(s)
                self._ids.discard(s.req.request_id)
                self.stats.finished += 1
            sched = s.scheduled_s if idx == 0 else None
            events.append(TokenEvent(s.req.request_id, idx, it.end_s, done, reason, sched))
        return events

"""The executor: what happens to a request between the core's actions and the engines.

One implementation for both places QLM runs: the `qlm` router (real time; engines reached through
`router/stream_driver.py` over Triton gRPC streams) and qlm-eval's simulator (virtual time; engines
are `SimEngine`s behind `eval/sim_driver.py`). The executor is synchronous and owns no clock: every
call carries `now` in core seconds, and the driver reports back what engines did (`on_chunk`,
`on_stream_error`, `on_loaded`, `on_load_failed`). It owns:

- dispatch with generations: a Pull opens stream `<rid>.<gen>`; anything that moves the request on
  (eviction, cancellation, failure, a newer Pull) bumps `gen`, so a stale stream's chunks and errors
  are ignored and the driver is told to stop it;
- eviction and exact resume: the request keeps the text and token count it produced; the driver
  reopens it as prompt + text so far with `max_tokens` minus tokens produced (`Flight.text`,
  `Flight.tokens_done`), and the client sees one continuous stream;
- cancellation of queued and running requests (client gone, send failed, shutdown);
- swaps and warm starts: a swap is warm only if the model is in the host's warm set, which KeepWarm
  and Release maintain; an instance serves nothing between the swap and `on_loaded`;
- engine failure: every request in flight on the instance queues again and the driver recovers it;
- outcome accounting: every accepted request ends exactly once as attained / missed (first token
  by its deadline or not), rejected, cancelled or failed, counted in `counters`;
- the wall deadline (`request_timeout_s`, the router's; the simulator sets none): a request not
  finished that long after its arrival fails with an explicit error, its engine stream stopped.

What the two drivers do differently (not shared, by nature): the stream driver runs each stream in
an asyncio task and retries a failed instance's load with backoff; the simulation driver turns
`SimEngine` token events into one-token chunks and models a host KV swap tier (eviction with
resume "swap"), which real engines here do not have (the router resumes by recompute).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from qlm_backend.core.actions import (
    Action,
    Evict,
    KeepWarm,
    Pull,
    Rebalance,
    Reject,
    Release,
    SwapModel,
)
from qlm_backend.core.fleet import InstanceSpec
from qlm_backend.core.manager import QueueManager
from qlm_backend.core.request import Request
from qlm_backend.router.flight import (
    Chunk,
    Driver,
    ErrorKind,
    Flight,
    Outcome,
    StopKind,
)


def _quiet(*_: Any) -> None:
    return None


class Executor:
    def __init__(
        self,
        qm: QueueManager,
        driver: Driver,
        instances: Sequence[InstanceSpec],
        *,
        on_outcome: Callable[[Flight, Outcome, float], None] = _quiet,
        on_lso: Callable[[str, int], None] = _quiet,
        wake: Callable[[], None] = _quiet,
        log: Callable[[str, str], None] = _quiet,  # (level, message)
        on_resume: Callable[[str, int, int], None] = _quiet,  # (instance, context, cached)
        request_timeout_s: float | None = None,
        timeout_message: str = "request timed out",
    ) -> None:
        """`request_timeout_s` (core seconds; None: no wall deadline, as in the simulator): a
        request not finished that long after its arrival ends with `timeout_message` (`_expire`)."""
        self.qm, self.driver = qm, driver
        self.on_outcome, self.on_lso, self.wake, self.log = on_outcome, on_lso, wake, log
        self.on_resume = on_resume
        self.flights: dict[str, Flight] = {}
        self._streams: dict[str, Flight] = {}
        self.counters: Counter[str] = Counter()
        self.host_of = {s.instance_id: s.host for s in instances}
        self.model_of: dict[str, str | None] = {s.instance_id: s.initial_model for s in instances}
        self.loading: dict[str, str] = {}  # instance -> model being loaded (swap or recovery)
        self.host_warm: dict[str, set[str]] = {}
        self._cancel_cursor = 0
        self.request_timeout_s, self.timeout_message = request_timeout_s, timeout_message
        self._expiry: list[tuple[float, str]] = []  # (expiry, rid), a heap; may hold ended ones

    # ------------------------------------------------------------------ requests in
    def admit(self, flight: Flight, req: Request, now: float) -> bool:
        """Queue a request in the core, or end it at once as rejected (shed)."""
        rej = self.qm.add_request(req, now)
        if rej is not None:
            self._lso("reject")
            self._end(flight, "rejected", now, (f"request shed: {rej.reason}", "unavailable"))
            return False
        self.flights[flight.rid] = flight
        if self.request_timeout_s is not None:
            heapq.heappush(self._expiry, (flight.arrival_s + self.request_timeout_s, flight.rid))
            # Entries of requests that ended stay until their time; compacted once they outnumber
            # the live ones, so the heap stays O(live) (amortized O(1) per admission).
            if len(self._expiry) > 2 * len(self.flights) + 1024:
                self._expiry = [e for e in self._expiry if e[1] in self.flights]
                heapq.heapify(self._expiry)
        self.wake()
        return True

    def is_live(self, stream_id: str) -> bool:
        """Whether stream `stream_id` is still wanted (a driver checks before it opens one)."""
        return stream_id in self._streams

    # ------------------------------------------------------------------ the core's actions
    def step(self, now: float) -> list[Action]:
        if self._expiry and self._expiry[0][0] <= now:
            self._expire(now)
        actions = self.qm.plan(now)
        for a in actions:
            self.execute(a, now)
        return actions

    def execute(self, a: Action, now: float) -> None:
        if isinstance(a, Pull):
            self._pull(a, now)
        elif isinstance(a, Evict):
            self._evict(a, now)
        elif isinstance(a, SwapModel):
            self._swap(a, now)
        elif isinstance(a, KeepWarm):
            self.host_warm.setdefault(self.host_of[a.instance_id], set()).add(a.model)
            self._lso("keep_warm")
        elif isinstance(a, Release):
            host = self.host_of[a.instance_id]
            self.host_warm.get(host, set()).discard(a.model)
            self._lso("release")
            for iid, h in self.host_of.items():
                if h == host and a.model not in (self.model_of.get(iid), self.loading.get(iid)):
                    self.driver.release(iid, a.model, now)
        elif isinstance(a, Rebalance):
            self._lso("rebalance")
        elif isinstance(a, Reject):
            self._lso("reject")
            f = self.flights.pop(a.request_id, None)
            if f is not None:
                self.qm.on_cancelled(f.rid, now)
                self._end(f, "rejected", now, (f"request shed: {a.reason}", "unavailable"))

    def _pull(self, a: Pull, now: float) -> None:
        self._lso("pull", len(a.request_ids))
        wrong: list[str] = []
        for rid in a.request_ids:
            f = self.flights.get(rid)
            if f is None:
                continue
            if self.model_of.get(a.instance_id) != f.model:
                wrong.append(rid)  # the instance does not (or no longer) serve its model
                continue
            if f.streaming:  # pulled while a stream is open: that stream is now stale
                self._stop(f, "cancel", now)
            f.gen += 1
            f.instance, f.streaming = a.instance_id, True
            # A resume re-prefills prompt + text so far, less what the engine's prefix cache
            # still holds: its first chunk says how much (where the engine reports it).
            f.resume_context = f.prompt_tokens + f.tokens_done if f.tokens_done else 0
            if f.pulled_s is None:
                f.pulled_s = now
            if f.first_token_s is None:
                f.token_pull_s = now
            self._streams[f.stream_id] = f
            self.driver.open(f, a.instance_id, a.priority, now)
        if wrong:
            self.counters["pull_to_wrong_model"] += len(wrong)
            self.qm.on_dispatch_failed(wrong, a.instance_id, now)

    def _evict(self, a: Evict, now: float) -> None:
        self._lso("evict_swap" if a.resume == "swap" else "evict")
        f = self.flights.get(a.request_id)
        if f is None:
            return
        if not f.streaming:
            self.counters["evict_not_in_engine"] += 1  # its stream ended before the eviction
        f.evictions += 1
        self._stop(f, "evict-swap" if a.resume == "swap" else "evict-recompute", now)
        self.qm.on_evicted(f.rid, f.tokens_done, now)

    def _swap(self, a: SwapModel, now: float) -> None:
        iid = a.instance_id
        if any(f.streaming and f.instance == iid for f in self.flights.values()):
            self.counters["swap_on_busy_engine"] += 1
        # Warm only if the weights really are in this host's memory (KeepWarm/Release say so);
        # counted as warm only if the driver reports the engine really started warm (on_loaded).
        kept = self.host_warm.get(self.host_of[iid], set())
        warm = a.to_model in kept
        if warm != a.warm:
            self.counters["warm_flag_mismatch"] += 1
        self.model_of[iid] = None
        self.loading[iid] = a.to_model
        self.driver.swap(iid, a.from_model, a.to_model, warm, a.from_model in kept, now)

    # ------------------------------------------------------------------ engine events
    def on_chunk(self, stream_id: str, ch: Chunk, now: float) -> bool:
        """A response from stream `stream_id`; True if the planner should run again."""
        f = self._streams.get(stream_id)
        if f is None:
            return False  # stale: evicted, cancelled or failed meanwhile
        if f.resume_context and ch.cached_tokens is not None and f.instance is not None:
            cached = min(ch.cached_tokens, f.resume_context)
            self.counters["resume_tokens"] += f.resume_context
            self.counters["resume_cached_tokens"] += cached
            self.qm.on_resume_cached(f.instance, cached, f.resume_context, now)
            self.on_resume(f.instance, f.resume_context, cached)
            f.resume_context = 0
        if ch.text:
            f.text.append(ch.text)
        f.tokens_done += ch.num_output_tokens
        if ch.extras:
            f.extras.update(ch.extras)
            if not f.stream and "logprobs" in ch.extras:
                f.logprob_parts.append(ch.extras["logprobs"])
        progressed = False
        if f.first_token_s is None and ch.num_output_tokens > 0:
            f.first_token_s, f.scheduled_s = now, ch.scheduled_s
            self.qm.on_first_token(f.rid, now)
            progressed = True
        final = ch.finish_reason is not None
        if f.stream and not f.sink.send(f, ch.text, ch.num_output_tokens, ch.finish_reason, final):
            self._cancel(f, now, None)  # the client is gone: stop the engine's work too
            return True
        if final:
            self._finish(f, ch.finish_reason, now)
            return True
        return progressed

    def on_stream_error(
        self,
        stream_id: str,
        message: str,
        unavailable: bool,
        now: float,
        kind: ErrorKind = "internal",
    ) -> bool:
        """Stream `stream_id` failed: `unavailable` means its engine is gone (the request queues
        again with what it produced); anything else fails the request with an error."""
        f = self._streams.pop(stream_id, None)
        if f is None:
            return False
        f.streaming = False
        f.gen += 1
        self.qm.on_tokens_done(f.rid, f.tokens_done, now)
        if unavailable and f.instance is not None:
            self.log("warn", f"{message}; re-queueing {f.rid}")
            self._engine_failed(f.instance, f.model, now)
        else:
            self._fail(f, message, kind, now)
        self.wake()
        return True

    def on_loaded(self, instance_id: str, model: str, now: float, warm: bool | None = None) -> bool:
        """`model` serves on the instance: after a swap, `warm` says whether it really started
        warm (from host memory, an engine woken); None after a recovery."""
        if warm is not None:
            self._lso("swap_model_warm" if warm else "swap_model_cold")
        self.loading.pop(instance_id, None)
        self.model_of[instance_id] = model
        self.qm.on_model_loaded(instance_id, model, now, warm=warm)
        self.wake()
        return True

    def on_load_failed(self, instance_id: str, model: str, message: str, now: float) -> bool:
        """A swap's load failed: the instance counts as failed and the driver recovers it."""
        self.log("error", f"load of {model} on {instance_id} failed: {message}")
        self.loading.pop(instance_id, None)
        self._engine_failed(instance_id, model, now)
        self.wake()
        return True

    def _engine_failed(self, instance_id: str, model: str, now: float) -> None:
        model = self.model_of.get(instance_id) or model
        for f in list(self.flights.values()):
            if f.streaming and f.instance == instance_id:
                self._stop(f, "cancel", now)  # the core queues them again, below
        self.counters["engine_failures"] += 1
        self.qm.on_engine_failed(instance_id, now)
        self.model_of[instance_id] = None
        if instance_id not in self.loading:
            self.loading[instance_id] = model
            self.driver.recover(instance_id, model, now)

    # ------------------------------------------------------------------ clients
    def cancel(self, rid: str, now: float, message: str | None = "Request was cancelled") -> bool:
        """The client cancelled: stop the request wherever it is; `message` goes to the client."""
        f = self.flights.get(rid)
        if f is None:
            return False
        self._client_cancelled(f, now, message)
        return True

    def poll_cancelled(self, now: float, window: int = 64) -> None:
        """Ask sinks whether their clients cancelled: every running request each time and queued
        ones in a rolling window (a sink's check may be an IPC round trip)."""
        running = [f for f in self.flights.values() if f.streaming]
        queued = [f for f in self.flights.values() if not f.streaming]
        start = self._cancel_cursor % max(1, len(queued))
        self._cancel_cursor = start + window
        for f in running + queued[start : start + window]:
            if f.sink.is_cancelled():
                self._client_cancelled(f, now, "Request was cancelled")

    def _client_cancelled(self, f: Flight, now: float, message: str | None) -> None:
        # One line per cancel, where the request was: with the engine's trace (its request id is
        # the stream id) it tells a cancel the router lost from one a frontend lost.
        where = f"stream {f.stream_id} on {f.instance}" if f.streaming else "queued"
        self.log("info", f"{f.rid}: cancelled by its client ({where})")
        self._cancel(f, now, message)

    def shutdown(self, now: float, message: str) -> None:
        for f in list(self.flights.values()):
            self._cancel(f, now, None)
            f.sink.error(message, "unavailable")

    # ------------------------------------------------------------------ endings
    def _expire(self, now: float) -> None:
        """End every request past its wall deadline, wherever it is (queued, or streaming from an
        engine that may never answer): an explicit error instead of a client held forever, and its
        engine stream stopped. O(expired) per call: the heap's head is the next deadline."""
        while self._expiry and self._expiry[0][0] <= now:
            expiry, rid = heapq.heappop(self._expiry)
            f = self.flights.get(rid)
            # Ended before its deadline, or a later request under the same id (its own entry).
            if f is None or f.arrival_s + (self.request_timeout_s or 0.0) != expiry:
                continue
            self.counters["timed_out"] += 1
            self.log("warn", f"{rid}: {self.timeout_message}")
            self._fail(f, self.timeout_message, "unavailable", now)

    def _stop(self, f: Flight, kind: StopKind, now: float) -> None:
        if f.streaming:
            sid = f.stream_id
            self._streams.pop(sid, None)
            f.streaming = False
            self.driver.stop(f, sid, kind, now)
        f.gen += 1

    def _cancel(self, f: Flight, now: float, message: str | None) -> None:
        self._drop(f, "cancelled", now, (message, "cancelled") if message else None)

    def _fail(self, f: Flight, message: str, kind: ErrorKind, now: float) -> None:
        self._drop(f, "failed", now, (message, kind))

    def _drop(
        self, f: Flight, outcome: Outcome, now: float, error: tuple[str, ErrorKind] | None
    ) -> None:
        """End a request that will not finish: stop its stream, forget it in the core."""
        if self.flights.pop(f.rid, None) is None:
            return
        self._stop(f, "cancel", now)
        self.qm.on_cancelled(f.rid, now)
        self._end(f, outcome, now, error)
        self.wake()

    def _finish(self, f: Flight, reason: str | None, now: float) -> None:
        self.flights.pop(f.rid, None)
        self._streams.pop(f.stream_id, None)
        f.streaming = False
        self.qm.on_finished(f.rid, f.tokens_done, now)
        if not f.stream:
            f.sink.send(f, "".join(f.text), f.tokens_done, reason, True)
        first = f.first_token_s if f.first_token_s is not None else now
        self._end(f, "attained" if first <= f.deadline_s else "missed", now)
        self.wake()

    def _end(
        self, f: Flight, outcome: Outcome, now: float, error: tuple[str, ErrorKind] | None = None
    ) -> None:
        self.counters[outcome] += 1
        if error is not None:
            f.sink.error(*error)
        self.on_outcome(f, outcome, now)

    def _lso(self, kind: str, n: int = 1) -> None:
        self.counters[kind] += n
        self.on_lso(kind, n)


__all__ = ["Executor"]

"""The router's metrics on Triton's own metrics endpoint (pb_utils.MetricFamily), so existing
Prometheus scrapes of :8002 see them: queues and predicted waits per model and class, SLO outcomes per
class, refusals by reason, LSO counts by kind, planner time and solver fallbacks.

Every pb_utils.Metric call is a synchronous IPC: gauges are pushed on an interval, counters on events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import triton_python_backend_utils as pb_utils

from qlm_backend.core.decisions import PlanDecision
from qlm_backend.core.manager import QueueStat
from qlm_backend.router.flight import Flight

REJECT_REASONS = ("shed", "queue_full")
PLANNER_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
# Seconds to first token and in the router's queue. The shipped classes' TTFT SLOs (20, 60, 3600 s)
# are bucket bounds, so attainment per class reads off one bucket: le="<slo>" / count.
LATENCY_BUCKETS = [
    0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600, 7200,
]  # fmt: skip


class RouterMetrics:
    def __init__(self, router: str, kinds: Sequence[tuple[str, str]] = ()) -> None:
        self._labels = {"router": router}
        fam = pb_utils.MetricFamily
        self._queue = fam(
            "qlm_queue_length", "Requests queued in the router, per model and SLO class.", fam.GAUGE
        )
        self._wait = fam(
            "qlm_predicted_wait_seconds",
            "Predicted time to first token of the head group, per model and SLO class (simulated seconds).",
            fam.GAUGE,
        )
        self._outcome = fam(
            "qlm_requests_total",
            "Requests by SLO class and outcome (attained, missed, rejected, cancelled, failed).",
            fam.COUNTER,
        )
        self._rejected = fam(
            "qlm_rejected_total",
            "Requests refused (outcome rejected), by reason: shed (admission control: its "
            "deadline cannot be met) or queue_full (the router at max_pending_requests).",
            fam.COUNTER,
        )
        self._lso = fam(
            "qlm_lso_total", "LLM serving operations carried out, by kind.", fam.COUNTER
        )
        self._ttft = fam(
            "qlm_ttft_seconds",
            "Time to first token of finished requests, from receipt, per model and SLO class "
            "(simulated seconds: wall seconds / time_scale).",
            fam.HISTOGRAM,
        )
        self._queued = fam(
            "qlm_queue_seconds",
            "Time in the router's queue before the first dispatch, per model and SLO class "
            "(simulated seconds).",
            fam.HISTOGRAM,
        )
        self._resume = fam(
            "qlm_resume_tokens_total",
            "Context tokens (prompt + text so far) of requests resumed after an eviction, per "
            "instance: kind=context all of them, kind=cached those the engine's prefix cache "
            "still held (reported by our engines; the plan charges a resume the rest).",
            fam.COUNTER,
        )
        self._probes = fam(
            "qlm_engine_probes_total",
            "One-token probes of an instance silent under open streams, by result: answered, "
            "no-answer (the engine took it: alive, maybe slow; the cancelled probe is an abort in "
            "the engine's counters), gone (refused as dead: the instance is recovered), error.",
            fam.COUNTER,
        )
        self._plan = fam("qlm_planner_seconds", "Wall time of planner decisions.", fam.HISTOGRAM)
        self._fallback = fam(
            "qlm_solver_fallbacks_total", "Plans decided by the heuristic fallback.", fam.COUNTER
        )
        self._plan_m = self._plan.Metric(labels=self._labels, buckets=PLANNER_BUCKETS)
        self._fallback_m = self._fallback.Metric(labels=self._labels)
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._last_decision: PlanDecision | None = None
        # Every (model, class) pair is exported from the start, at zero, so dashboards see all series.
        self._queue_keys: set[tuple[str, str]] = set(kinds)
        self.queues([])
        for reason in REJECT_REASONS:
            self._m(self._rejected, reason=reason)

    def _m(self, fam: Any, buckets: list[float] | None = None, **labels: str) -> Any:
        """The family's metric with these labels (created once; `buckets` for histograms)."""
        key = (fam.__class__.__name__ + str(id(fam)), tuple(sorted(labels.items())))
        m = self._metrics.get(key)
        if m is None:
            kw = {} if buckets is None else {"buckets": buckets}
            m = self._metrics[key] = fam.Metric(labels={**self._labels, **labels}, **kw)
        return m

    def ended(self, f: Flight, outcome: str, now: float) -> None:
        """A request's outcome (the executor's on_outcome), and its latencies if it finished."""
        self.outcome(f.slo_class, outcome)
        if outcome == "rejected":  # the executor rejects only by shedding
            self._m(self._rejected, reason="shed").increment(1)
        if outcome in ("attained", "missed"):
            ttft = None if f.first_token_s is None else f.first_token_s - f.arrival_s
            queue = (f.pulled_s if f.pulled_s is not None else now) - f.arrival_s
            self.latency(f.model, f.slo_class, ttft, queue)

    def latency(self, model: str, slo_class: str, ttft_s: float | None, queue_s: float) -> None:
        """A finished request's time to first token and queue time."""
        for fam, value in ((self._ttft, ttft_s), (self._queued, queue_s)):
            if value is not None:
                self._m(fam, LATENCY_BUCKETS, model=model, slo_class=slo_class).observe(value)

    def outcome(self, slo_class: str, outcome: str) -> None:
        self._m(self._outcome, slo_class=slo_class, outcome=outcome).increment(1)

    def refused(self, slo_class: str, reason: str) -> None:
        """A request the router refused before the executor saw it (e.g. queue_full)."""
        self.outcome(slo_class, "rejected")
        self._m(self._rejected, reason=reason).increment(1)

    def lso(self, kind: str, n: int = 1) -> None:
        self._m(self._lso, kind=kind).increment(n)

    def probe(self, instance: str, result: str) -> None:
        self._m(self._probes, instance=instance, result=result).increment(1)

    def resume(self, instance: str, context_tokens: int, cached_tokens: int) -> None:
        """A resumed request's context and the part its engine found cached."""
        self._m(self._resume, instance=instance, kind="context").increment(context_tokens)
        self._m(self._resume, instance=instance, kind="cached").increment(cached_tokens)

    def planner(self, decisions: Sequence[PlanDecision]) -> None:
        """Observe the decisions made since the last call (the core keeps a bounded history)."""
        new: list[PlanDecision] = []
        for d in reversed(decisions):
            if d is self._last_decision:
                break
            new.append(d)
        if decisions:
            self._last_decision = decisions[-1]
        for d in new:
            self._plan_m.observe(d.planner_s)
            if d.path == "fallback":
                self._fallback_m.increment(1)

    def queues(self, stats: Sequence[QueueStat]) -> None:
        seen = set()
        for s in stats:
            key = (s.model, s.slo_class)
            seen.add(key)
            self._m(self._queue, model=s.model, slo_class=s.slo_class).set(s.queued)
            self._m(self._wait, model=s.model, slo_class=s.slo_class).set(s.predicted_wait_s)
        # Kinds that emptied since the last push go back to zero instead of keeping a stale value.
        for model, cls in self._queue_keys - seen:
            self._m(self._queue, model=model, slo_class=cls).set(0)
            self._m(self._wait, model=model, slo_class=cls).set(0)
        self._queue_keys |= seen

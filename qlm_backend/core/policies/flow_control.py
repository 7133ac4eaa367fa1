"""flow-control: the flow control layer of the Kubernetes Gateway API inference extension's Endpoint
Picker (EPP), what llm-d deploys in front of vLLM, with the engines on vLLM priority scheduling.

Each rule and the upstream fact it stands for (kubernetes-sigs/gateway-api-inference-extension):

- Strict priority bands. Every queued request of a higher band is dispatched before any of a lower
  one (site-src/guides/flow-control.md, "Priority (Strict Ordering)"). The band is the SLO class's
  priority; here a lower number is served first (upstream a higher one), and a sheddable class
  plays the part of upstream's negative priorities.
- EDF within a band. Upstream each band orders by FCFS (the default) or EDF, whose deadline is the
  enqueue time plus the request's TTL (pkg/epp/flowcontrol/.../ordering edf). We choose EDF with
  the class's TTFT SLO as the TTL, so the deadline is arrival + ttft_slo_s (Request.deadline_s).
  With one SLO per class this is FCFS unless a request carries its own SLO.
- A saturation detector per engine. An endpoint has capacity while its waiting queue is at most
  QueueDepthThreshold (default 5) and its KV-cache use at most KVCacheUtilThreshold (default 0.8);
  the pool is saturated when no endpoint has capacity (pkg/epp/saturationdetector, defaults in
  pkg/epp/common/config). The core sees no engine metrics, so both are estimated from the router's
  own state (`engine_metrics`); an engine at its in-flight bound (InstanceSpec.max_in_flight) also
  counts as saturated, as upstream's alternative concurrency-detector does at maxConcurrency.
- Backpressure in the router. Requests wait in the router (bounded pull) and are dispatched one at a
  time in band order while some candidate engine of their model has capacity, each to the candidate
  with the most capacity left (the scheduler's queue and KV-cache scorers). When every candidate
  is saturated, dispatch for that model stops: the head request waits, and nothing behind it may
  take the capacity it waits for ("Strict Priority Preservation"). One model is one pool (upstream:
  one InferencePool per base model), so a saturated model does not hold another.
- Shedding, at admission. A sheddable class is refused (Reject) when every candidate engine is
  saturated and its deadline cannot be met even if the work queued ahead of it drains at the pool's
  full decode rate. Upstream the same request would wait in its band and be evicted when its TTL
  runs out (QueueOutcomeEvictedTTL, HTTP 503), with TTL = its SLO: the same outcome, earlier. The
  core can reject only at admission, so a sheddable request whose deadline passes in the queue (it
  would have expired upstream) goes behind all other work instead of being dropped. Classes that
  are not sheddable are never refused.
- In the engine, vLLM priority scheduling with the class priority (an addition to the EPP alone: it
  orders the few requests held in the engine by band as well).
- Model swaps are not part of llm-d (a pool serves one model); as in the other baselines here, a
  model with queued work that no instance runs gets one designated instance (an empty one, else the
  least busy), which drains and switches, keeping the old weights warm in host memory.

Not modelled: fairness between flows inside a band (one flow per (model, class) here), per-band byte
capacities (HTTP 429), metric refresh lag (the detector reads the router's state exactly), prefix
cache affinity scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qlm_backend.core.decisions import PlanDecision
from qlm_backend.core.estimator import ENGINE_MAX_SEQS
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies.base import PolicyTraits
from qlm_backend.core.policies.common import designate, entries_from, queued_states, serving
from qlm_backend.core.request import Request, RequestState


@dataclass(frozen=True)
class SaturationThresholds:
    """The utilization detector's defaults upstream (DefaultQueueThresholdCritical,
    DefaultKVCacheThreshold)."""

    queue_depth: int = 5  # requests waiting in the engine (vLLM num_requests_waiting)
    kv_cache_util: float = 0.8  # share of the engine's KV cache in use (vLLM kv_cache_usage_perc)


@dataclass(frozen=True)
class EngineMetrics:
    """What the saturation detector reads of one engine, estimated from the router's state: the
    engine runs its requests in priority then dispatch order while sequence slots and KV cache
    allow (vLLM admits from its waiting queue only while the next one fits); the rest wait."""

    in_flight: int
    bound: int  # the router's in-flight bound for the engine
    running: int
    waiting: int
    kv_tokens: float
    kv_capacity_tokens: float

    @property
    def kv_util(self) -> float:
        return self.kv_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens > 0 else 1.0

    def saturated(self, th: SaturationThresholds) -> bool:
        return (
            self.in_flight >= self.bound
            or self.waiting > th.queue_depth
            or self.kv_util > th.kv_cache_util
        )

    def pressure(self, th: SaturationThresholds) -> float:
        """The most constrained resource as a share of its threshold (upstream's roofline score)."""
        return max(self.waiting / max(1, th.queue_depth), self.kv_util / th.kv_cache_util)

    def plus(self, context_tokens: float) -> EngineMetrics:
        """The load after one more request of `context_tokens` is dispatched to the engine."""
        fits = (
            self.waiting == 0
            and self.running < ENGINE_MAX_SEQS
            and self.kv_tokens + context_tokens <= self.kv_capacity_tokens
        )
        if fits:
            return replace(
                self,
                in_flight=self.in_flight + 1,
                running=self.running + 1,
                kv_tokens=self.kv_tokens + context_tokens,
            )
        return replace(self, in_flight=self.in_flight + 1, waiting=self.waiting + 1)


def context_tokens(st: RequestState, step_s: float, now: float) -> float:
    """KV-cache tokens a request holds in its engine: its prompt plus the output so far (one token
    a decode step since its first token, at most max_tokens)."""
    out = float(st.tokens_done)
    if st.first_token_s is not None and step_s > 0:
        out = max(out, (now - st.first_token_s) / step_s)
    return st.req.prompt_tokens + min(out, float(st.req.max_tokens))


def engine_metrics(inst: InstanceState, ctx: PlanContext, now: float) -> EngineMetrics:
    """The detector's reading of a ready instance (one running a model)."""
    model = inst.model
    assert model is not None
    est = ctx.estimator
    perf = est.perf(model, inst.spec)
    assert perf is not None  # the instance runs the model, so it fits
    step_s = est.profile(model, inst.spec).step_s
    sts = sorted(
        (ctx.requests[r] for r in inst.in_flight),
        key=lambda s: (s.priority, s.dispatched_s or 0.0, s.req.request_id),
    )
    load = EngineMetrics(0, inst.spec.max_in_flight, 0, 0, 0.0, float(perf.kv_capacity_tokens))
    for st in sts:
        load = load.plus(context_tokens(st, step_s, now))
    return load


class FlowControlPolicy:
    name = "flow-control"

    def __init__(
        self,
        *,
        thresholds: SaturationThresholds | None = None,
        warm_start: bool = True,
        shed: bool = True,
    ) -> None:
        self.thresholds = thresholds or SaturationThresholds()
        self.traits = PolicyTraits(
            bounded_pull=True, engine_scheduling="priority", warm_start=warm_start, sheds=shed
        )
        self._switching: dict[str, str] = {}  # instance -> model it drains (or loads) for

    # ------------------------------------------------------------------ order
    def order_key(self, st: RequestState, ctx: PlanContext, now: float) -> tuple[object, ...]:
        """Band, then deadline (EDF), then arrival; expired sheddable requests last of all."""
        r = st.req
        expired = ctx.classes[r.slo_class].sheddable and r.deadline_s < now
        return (expired, st.priority, r.deadline_s, r.arrival_s, r.request_id)

    # ------------------------------------------------------------------ admission
    def admit(self, req: Request, ctx: PlanContext, now: float) -> str | None:
        if not ctx.classes[req.slo_class].sheddable:
            return None
        pool = [
            i
            for i in ctx.instances.values()
            if i.usable and i.model == req.model and i.instance_id not in self._switching
        ]
        if not pool:
            return None  # the model is absent or loading: a swap will bring it
        th = self.thresholds
        if any(not engine_metrics(i, ctx, now).saturated(th) for i in pool):
            return None
        t_first = self._first_token_s(req, pool, ctx, now)
        if t_first <= req.deadline_s:
            return None
        return (
            f"every {req.model} engine saturated (over {th.queue_depth} waiting, "
            f"{th.kv_cache_util:.0%} KV cache or its in-flight bound) and the deadline in "
            f"{req.deadline_s - now:.1f} s cannot be met (first token in ~{t_first - now:.1f} s "
            f"behind the work queued ahead of it)"
        )

    def _first_token_s(
        self, req: Request, pool: list[InstanceState], ctx: PlanContext, now: float
    ) -> float:
        """An optimistic first-token time: the work queued ahead of it in dispatch order drains at
        the pool's full decode rate and a slot is free the moment it reaches the head; arrivals of
        higher bands while it waits are not counted. So only what cannot make it is shed."""
        est = ctx.estimator
        rate, prefill = 0.0, math.inf  # output tokens per second of the whole pool
        for inst in pool:
            prof = est.profile(req.model, inst.spec)
            rate += 1.0 / prof.token_cost_s
            prefill = min(prefill, prof.prefill_first_s)
        prof0 = est.profile(req.model, pool[0].spec)
        prio = ctx.classes[req.slo_class].priority
        mine = (False, prio, req.deadline_s, req.arrival_s, req.request_id)
        tokens = 0.0
        for st in queued_states(ctx):
            if st.req.model == req.model and self.order_key(st, ctx, now) < mine:
                tokens += est.request_work(st, prof0)[0] / prof0.token_cost_s
        return now + tokens / rate + prefill

    # ------------------------------------------------------------------ planning
    def _prune_switching(self, ctx: PlanContext, wanted: set[str]) -> None:
        for iid, model in list(self._switching.items()):
            inst = ctx.instances[iid]
            # Done (loaded), failed, or nothing left to switch for before the swap started.
            if (
                not inst.healthy
                or inst.model == model
                or (inst.loading != model and model not in wanted)
            ):
                del self._switching[iid]

    def plan(self, ctx: PlanContext, now: float) -> Plan:
        th = self.thresholds
        order = sorted(queued_states(ctx), key=lambda s: self.order_key(s, ctx, now))
        self._prune_switching(ctx, {s.req.model for s in order})
        switching_to = {m: iid for iid, m in self._switching.items()}
        per_inst: dict[str, list[str]] = {}
        loads: dict[str, EngineMetrics] = {}
        steps: dict[str, float] = {}
        halted: set[str] = set()  # models whose every engine is saturated
        for st in order:
            model, rid = st.req.model, st.req.request_id
            if model in halted:
                continue  # strict priority: nothing passes the held head of its pool
            if model in switching_to:
                # Pulled only once the instance has loaded the model (the LSO drains it first),
                # and by then this plan is redone with the instance as a candidate.
                per_inst.setdefault(switching_to[model], []).append(rid)
                continue
            cands = serving(ctx, model, exclude=set(self._switching))
            if not cands:
                target = designate(ctx, model, set(self._switching))
                if target is not None:
                    self._switching[target.instance_id] = model
                    switching_to[model] = target.instance_id
                    per_inst.setdefault(target.instance_id, []).append(rid)
                continue
            best: tuple[float, int, str] | None = None
            for inst in cands:
                if not inst.usable or inst.model != model:
                    continue  # still loading: no capacity yet
                iid = inst.instance_id
                if iid not in loads:
                    loads[iid] = engine_metrics(inst, ctx, now)
                    steps[iid] = ctx.estimator.profile(model, inst.spec).step_s
                ld = loads[iid]
                if ld.saturated(th):
                    continue
                key = (ld.pressure(th), ld.in_flight, iid)
                if best is None or key < best:
                    best = key
            if best is None:
                halted.add(model)
                continue
            iid = best[2]
            loads[iid] = loads[iid].plus(context_tokens(st, steps[iid], now))
            per_inst.setdefault(iid, []).append(rid)
        queues: dict[str, list[QueueEntry]] = {
            iid: entries_from(rids, ctx) for iid, rids in per_inst.items()
        }
        reason = f"{self.name} dispatch"
        if halted:
            reason += f"; saturated, held in the router: {', '.join(sorted(halted))}"
        decision = PlanDecision(
            now,
            self.name,
            "policy",
            reason,
            ctx.trigger,
            len(ctx.groups),
            len(order),
            len(ctx.instances),
        )
        return Plan(queues=queues, decision=decision if order else None)


__all__ = [
    "EngineMetrics",
    "FlowControlPolicy",
    "SaturationThresholds",
    "context_tokens",
    "engine_metrics",
]

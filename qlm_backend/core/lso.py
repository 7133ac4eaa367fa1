"""The LSO executor: turns a policy's Plan into actions, keeping the invariants for every policy.

- Pulling (late binding): an instance takes requests from the head of its virtual queue only while
  its in-flight count is under its bound (bounded policies) and only of the model it runs; the rest
  stays in the router where the planner can still move it. A policy with traits.pull_bound "work"
  also bounds what the engine holds by the work it brings (`EngineLoad`): prompt tokens not yet
  prefilled (a request pulled later waits behind them: vLLM schedules running prefills before
  waiting requests, whatever their priority) and KV tokens (past the cache the engine preempts and
  recomputes, and requests wait inside it where no plan can reorder them).
- Model swapping: when the head of a queue needs another model, the instance stops pulling, drains,
  and only then gets a SwapModel (so it never holds two models' requests at once). Whether a swap is
  worth it (hysteresis) is the policy's call when it orders the queue.
- Warm start: the model swapped out is kept in host memory (KeepWarm), releasing the least recently
  used one past the host's slots (Release); not on an instance whose engine cannot start warm
  (InstanceSpec.warm_start false: every swap there is cold).
- Eviction: the policy names requests; here the resume mode is chosen (KV swap when copying the KV
  cache out and back is cheaper than recomputing the prefill) and the per-request cap enforced.
- Load balancing shows as Rebalance notices when a group's instance changed between plans.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from qlm_backend.core.actions import (
    Action,
    Evict,
    KeepWarm,
    Pull,
    Rebalance,
    Release,
    ResumeMode,
    SwapModel,
)
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies.base import PolicyTraits
from qlm_backend.core.request import RequestState, Status

# vLLM's default CPU swap space per GPU (swap_space=4 GiB): larger KV caches must be recomputed.
SWAP_SPACE_BYTES = 4 * 1024**3


def choose_resume(st: RequestState, iid: str, ctx: PlanContext, now: float) -> ResumeMode:
    """KV swap if copying the KV out and back over PCIe beats recomputing the prefill."""
    inst = ctx.instances[iid]
    model = st.req.model
    perf = ctx.estimator.perf(model, inst.spec)
    if perf is None or not ctx.config.kv_swap_resume:
        return "recompute"
    done = st.tokens_done
    if st.first_token_s is not None:
        step = ctx.estimator.profile(model, inst.spec).step_s
        done = max(done, int((now - st.first_token_s) / max(step, 1e-6)))
    tokens = st.req.prompt_tokens + done
    if tokens * perf.kv_bytes_per_token > SWAP_SPACE_BYTES:
        return "recompute"
    swap_s = 2.0 * perf.kv_swap_s(tokens)
    recompute_s = perf.prefill_s(tokens)
    return "swap" if swap_s < recompute_s else "recompute"


class EngineLoad:
    """What an instance's engine holds, in work: unprefilled prompt seconds and KV tokens, with the
    caps `fits` checks a pull against. Built once per instance and plan, updated per pull."""

    def __init__(
        self, inst: InstanceState, ctx: PlanContext, now: float, by_priority: bool = True
    ) -> None:
        self.ctx = ctx
        self.by_priority = by_priority
        cfg = ctx.config
        self.perf = ctx.estimator.perf(inst.model, inst.spec) if inst.model else None
        slo = min((c.ttft_slo_s for c in ctx.classes.values()), default=20.0)
        self.prefill_cap_s = cfg.pull_prefill_backlog_share * slo
        self.kv_cap = (
            cfg.pull_kv_overcommit * self.perf.kv_capacity_tokens if self.perf else math.inf
        )
        # Per class priority: under priority scheduling only work of the same or a higher class
        # is ahead of a new request in the engine, so each priority level is checked against the
        # work at or above it (a lower class's backlog never keeps an interactive request out).
        self.prefill_by_prio: dict[int, float] = {}
        self.kv_by_prio: dict[int, float] = {}
        for rid in inst.in_flight:
            st = ctx.requests.get(rid)
            if st is None:
                continue
            pre, kv = self.cost(st)
            if st.first_token_s is None:
                pass
            elif st.dispatched_s is not None and st.first_token_s < st.dispatched_s:
                # Resumed: its re-prefill runs first; assume it takes its predicted time.
                pre = max(0.0, pre - (now - st.dispatched_s))
            else:
                pre = 0.0
            self._add(self._prio(st), pre, kv)

    def _prio(self, st: RequestState) -> int:
        # An FCFS engine serves in arrival order: all work in it is ahead of a new request.
        return st.priority if self.by_priority else 0

    def _add(self, prio: int, pre: float, kv: float) -> None:
        self.prefill_by_prio[prio] = self.prefill_by_prio.get(prio, 0.0) + pre
        self.kv_by_prio[prio] = self.kv_by_prio.get(prio, 0.0) + kv

    def _ahead(self, by_prio: dict[int, float], prio: int) -> float:
        return sum(v for p, v in by_prio.items() if p <= prio)

    def cost(self, st: RequestState) -> tuple[float, float]:
        """(prefill seconds, KV tokens at its expected end) the request brings to this engine."""
        r = st.req
        ctx_tokens = r.prompt_tokens + st.tokens_done
        if self.perf is None:
            return 0.0, 0.0
        mean_out, _ = self.ctx.estimator.output_stats(r.model, r.slo_class)
        out = r.max_tokens if r.output_fixed else min(r.max_tokens, mean_out)
        return self.perf.prefill_s(ctx_tokens), ctx_tokens + max(0.0, out - st.tokens_done)

    def fits(self, st: RequestState) -> bool:
        """An empty engine always takes one request (else a huge one could never run)."""
        pre, kv = self.cost(st)
        backlog = self._ahead(self.prefill_by_prio, self._prio(st))
        if backlog > 0 and backlog + pre > self.prefill_cap_s:
            return False
        # KV is shared whatever the priority: vLLM admits no waiting request, however urgent,
        # into blocks a running one holds (only eviction frees them).
        used = self.kv_used
        return used <= 0 or used + kv <= self.kv_cap

    def prefill_ahead_s(self, st: RequestState) -> float:
        """Unprefilled prompt seconds in the engine that a new request `st` would wait behind."""
        return self._ahead(self.prefill_by_prio, self._prio(st))

    @property
    def kv_used(self) -> float:
        return sum(self.kv_by_prio.values())

    def remove(self, st: RequestState) -> None:
        """Forget an in-flight request (an eviction candidate): its KV and prefill leave."""
        pre, kv = self.cost(st)
        p = self._prio(st)
        self.kv_by_prio[p] = self.kv_by_prio.get(p, 0.0) - kv
        if st.first_token_s is None:
            self.prefill_by_prio[p] = self.prefill_by_prio.get(p, 0.0) - pre

    def add(self, st: RequestState) -> None:
        self._add(self._prio(st), *self.cost(st))


def _entry_model(e: QueueEntry, requests: Mapping[str, RequestState]) -> str | None:
    for rid in e.request_ids:
        st = requests.get(rid)
        if st is not None:
            return st.req.model
    return None


def execute_plan(
    plan: Plan,
    ctx: PlanContext,
    traits: PolicyTraits,
    now: float,
    previous: Plan | None = None,
) -> list[Action]:
    actions: list[Action] = []
    requests = ctx.requests
    freed: dict[str, int] = {}
    evicted: set[str] = set()
    for rid, reason in plan.evictions:
        st = requests.get(rid)
        if st is None or st.status is not Status.IN_FLIGHT or rid in evicted:
            continue
        if st.evictions >= ctx.config.max_evictions_per_request:
            continue
        iid = st.instance_id
        assert iid is not None
        actions.append(Evict(rid, iid, choose_resume(st, iid, ctx, now), reason))
        evicted.add(rid)
        freed[iid] = freed.get(iid, 0) + 1

    taken: set[str] = set()
    warm_local: dict[str, list[str]] = {}
    slots = ctx.config.warm_slots_per_host
    for iid, inst in ctx.instances.items():
        if not inst.healthy and inst.loading is None and inst.model is None:
            # A failed engine comes back through on_model_loaded; nothing to do meanwhile.
            continue
        if inst.loading is not None:
            continue
        entries = plan.queues.get(iid, ())
        head_model = None
        for e in entries:
            if any(
                requests.get(r) is not None
                and requests[r].status is Status.QUEUED
                and r not in taken
                for r in e.request_ids
            ):
                head_model = _entry_model(e, requests)
                break
        if head_model is None:
            continue
        in_flight = len(inst.in_flight) - freed.get(iid, 0)
        if head_model != inst.model:
            if in_flight > 0:
                continue  # drain before the swap: one model per instance at a time
            if head_model not in inst.spec.models_allowed:
                continue
            host = inst.spec.host
            warm_models = warm_local.setdefault(host, ctx.warm.models(host))
            # An engine that cannot start from host memory swaps cold and keeps nothing warm.
            warm = inst.spec.warm_start and head_model in warm_models
            keep = traits.warm_start and slots > 0 and inst.spec.warm_start
            # KeepWarm of the outgoing model before the swap: the executor then knows, when it
            # carries the swap out, to put that engine to sleep rather than unload it.
            if keep and inst.model is not None:
                if inst.model in warm_models:
                    warm_models.remove(inst.model)
                warm_models.append(inst.model)
                actions.append(KeepWarm(inst.model, iid))
            actions.append(SwapModel(iid, inst.model, head_model, warm))
            if keep:
                if warm and head_model in warm_models:
                    warm_models.remove(head_model)
                    warm_models.append(head_model)  # most recently used
                while len(warm_models) > slots:
                    actions.append(Release(warm_models.pop(0), iid))
            continue
        bound = inst.spec.max_in_flight if traits.bounded_pull else math.inf
        room = bound - in_flight
        load = None
        if traits.pull_bound == "work":
            load = EngineLoad(inst, ctx, now, traits.engine_scheduling == "priority")
        # Lowest class priority value a work cap refused: later requests of that class or below
        # wait (plan order within a class holds); a higher class may still pass (its own cap).
        blocked = math.inf
        for e in entries:
            if room <= 0:
                break
            if _entry_model(e, requests) != inst.model:
                break  # the swap waits until what runs now drains
            ids: list[str] = []
            for rid in e.request_ids:
                if room - len(ids) <= 0:
                    break
                st = requests.get(rid)
                if st is None or st.status is not Status.QUEUED or rid in taken:
                    continue
                if load is not None:
                    if st.priority >= blocked or not load.fits(st):
                        blocked = min(blocked, st.priority)
                        continue
                    load.add(st)
                ids.append(rid)
            if ids:
                prio = ctx.classes[requests[ids[0]].req.slo_class].priority
                if traits.engine_scheduling != "priority":
                    prio = 0
                actions.append(Pull(iid, e.group_id, tuple(ids), prio))
                taken.update(ids)
                room -= len(ids)

    if previous is not None:
        actions.extend(_rebalances(previous, plan))
    return actions


def _rebalances(previous: Plan, plan: Plan) -> list[Rebalance]:
    """A notice for each group whose first instance changed between two plans."""
    before = previous.first_instances()
    out: list[Rebalance] = []
    for gid, iid in plan.first_instances().items():
        old = before.get(gid)
        if old is not None and old != iid:
            out.append(Rebalance(gid, old, iid))
    return out


__all__ = ["SWAP_SPACE_BYTES", "choose_resume", "execute_plan"]

"""QueueManager: admission, groups, virtual queues, planning and LSO actions behind one class.

Pure state machine: every method takes `now`; nothing here reads a clock except `timer` (default
time.perf_counter), used only to measure and budget the planner's own compute time. The caller
executes the returned actions and reports events back (see api.py for the loop).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.decisions import PlanDecision
from qlm_backend.core.estimator import RwtEstimator
from qlm_backend.core.fleet import FleetConfig
from qlm_backend.core.groups import GroupIndex
from qlm_backend.core.instances import InstanceState, WarmSet
from qlm_backend.core.lso import execute_plan
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies import POLICIES, make_policy, validate_policy_name
from qlm_backend.core.policies.base import Policy
from qlm_backend.core.request import Request, RequestState, Status
from qlm_backend.core.slo import SloClass, index_classes


@dataclass(frozen=True)
class QueueStat:
    """Queued work per (model, class) and the estimator's predicted wait of its earliest group."""

    model: str
    slo_class: str
    queued: int
    groups: int
    predicted_wait_s: float  # mean time to first token of the first group of this kind, from now


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    gpu: str
    model: str | None
    loading: str | None
    healthy: bool
    in_flight: int
    max_in_flight: int
    queued_planned: int  # requests in its virtual queue
    warm_models: tuple[str, ...]


@dataclass(frozen=True)
class RequestView:
    request_id: str
    status: str
    instance_id: str | None
    group_id: str | None
    tokens_done: int
    evictions: int
    kv_instance: str | None


class QueueManager:
    """One queue manager for a fleet; the scheduling policy is pluggable by name.

    In-flight contract: a Pull puts its requests IN_FLIGHT on that instance when the action is
    returned, and they count against the instance's `max_in_flight` (for bounded policies) until
    on_finished / on_cancelled / on_evicted-after-Evict / on_dispatch_failed / on_engine_failed.
    """

    def __init__(
        self,
        fleet: FleetConfig,
        policy: str | Policy = "qlm",
        config: ManagerConfig | None = None,
        *,
        timer: Callable[[], float] = time.perf_counter,
        **policy_kwargs: object,
    ) -> None:
        self.fleet = fleet
        self.config = config or ManagerConfig(warm_slots_per_host=fleet.warm_slots_per_host)
        self.classes: dict[str, SloClass] = index_classes(fleet.slo_classes)
        self.timer = timer
        if isinstance(policy, str):
            # A planner that budgets its compute time reads the manager's clock: the step's start
            # and the planner's elapsed time must come from one timer.
            factory = POLICIES[validate_policy_name(policy)]
            if "timer" in inspect.signature(factory).parameters:
                policy_kwargs.setdefault("timer", timer)
            self.policy: Policy = make_policy(policy, **policy_kwargs)
        else:
            self.policy = policy
        self.estimator = RwtEstimator(self.classes, self.config)
        self.groups = GroupIndex(
            self.config.group_window_s,
            self.config.group_max_size,
            small_size=self.config.group_small_size,
            small_below=self.config.group_small_below_queued,
        )
        self.requests: dict[str, RequestState] = {}
        self.instances: dict[str, InstanceState] = {}
        for spec in fleet.instances:
            st = InstanceState(spec, model=spec.initial_model, loaded_s=float("-inf"))
            self.instances[spec.instance_id] = st
        self.models_served = frozenset(fleet.models)
        self.warm = WarmSet(self.config.warm_slots_per_host)
        self._plan: Plan | None = None
        self._decisions: deque[PlanDecision] = deque(maxlen=self.config.decisions_kept)
        self.counters: Counter[str] = Counter()
        # Replan triggers.
        self._last_full_s = float("-inf")
        self._unplanned = 0
        self._oldest_unplanned_s = float("inf")
        self._dirty: str | None = "first plan"
        self._touched_groups: set[str] = set()
        self._resumed: set[str] = set()  # queued requests with tokens done (see PlanContext)
        # Read-only observer of each plan step, called before its actions change any state (so
        # that forecasts from the context see what the planner saw); the calibration measurement.
        self.plan_observer: Callable[[Plan, PlanContext, list[Action], float], None] | None = None

    # ------------------------------------------------------------------ admission
    def make_request(
        self,
        request_id: str,
        model: str,
        slo_class: str,
        arrival_s: float,
        prompt_tokens: int,
        max_tokens: int,
        *,
        ttft_slo_s: float | None = None,
        true_output_tokens: int | None = None,
        output_fixed: bool = False,
    ) -> Request:
        """Build a Request whose deadline is arrival + the class's TTFT SLO (or the override)."""
        cls = self._class(slo_class)
        slo = cls.ttft_slo_s if ttft_slo_s is None else ttft_slo_s
        return Request(
            request_id,
            model,
            slo_class,
            arrival_s,
            arrival_s + slo,
            prompt_tokens,
            max_tokens,
            true_output_tokens,
            output_fixed,
        )

    def add_request(self, req: Request, now: float) -> Reject | None:
        """Admit a request into its group, or return the Reject (shedding / no instance serves the
        model). An unknown SLO class or a duplicate id raises ValueError (caller bugs)."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        cls = self._class(req.slo_class)
        if req.model not in self.models_served:
            self.counters["rejected"] += 1
            return Reject(
                req.request_id,
                f"no instance serves model {req.model!r}; served: {sorted(self.models_served)}",
            )
        self.estimator.observe_prompt(req.model, req.prompt_tokens)
        self.estimator.observe_arrival(req.model, req.slo_class, now)
        if self.policy.traits.sheds and cls.sheddable:
            reason = self.policy.admit(req, self._context("admission"), now)
            if reason is not None:
                self.counters["rejected"] += 1
                self.counters["shed"] += 1
                return Reject(req.request_id, reason)
        st = RequestState(req, priority=cls.priority)
        self.requests[req.request_id] = st
        self._enqueue(st, now)
        self.counters["admitted"] += 1
        return None

    # ------------------------------------------------------------------ planning
    def plan(self, now: float) -> list[Action]:
        """One planner step: a full replan when due (arrivals batched, timer, failures, loads),
        otherwise an incremental placement of new work; then the LSOs turn it into actions."""
        t_start = self.timer()
        trigger = self._full_plan_due(now)
        ctx = self._context(trigger or "incremental")
        plan = self.policy.plan(ctx, now)
        actions = execute_plan(
            plan,
            ctx,
            self.policy.traits,
            now,
            previous=self._plan,
        )
        if self.plan_observer is not None:
            self.plan_observer(plan, ctx, actions, now)
        self._apply(actions, now)
        self._plan = plan
        if trigger is not None:
            self._last_full_s = now
            self._unplanned = 0
            self._oldest_unplanned_s = float("inf")
            self._dirty = None
            self._touched_groups.clear()
        d = plan.decision
        if d is not None:
            d = PlanDecision(
                **{
                    **d.__dict__,
                    "planner_s": self.timer() - t_start,
                    "actions": len(actions),
                    "trigger": trigger or "incremental",
                }
            )
            plan.decision = d
            self._decisions.append(d)
            self.counters[f"path_{d.path}"] += 1
        return actions

    def _full_plan_due(self, now: float) -> str | None:
        if self._dirty is not None:
            return self._dirty
        if self._unplanned >= self.config.arrival_batch:
            return f"arrivals ({self._unplanned} batched)"
        if self._unplanned and now - self._oldest_unplanned_s >= self.config.arrival_batch_s:
            return "arrivals (batch age)"
        if len(self.groups) and now - self._last_full_s >= self.config.replan_interval_s:
            return "timer"
        return None

    def _context(self, trigger: str) -> PlanContext:
        return PlanContext(
            requests=self.requests,
            groups=self.groups,
            instances=self.instances,
            warm=self.warm,
            classes=self.classes,
            estimator=self.estimator,
            config=self.config,
            previous=self._plan,
            trigger=trigger,
            new_groups=frozenset(self._touched_groups),
            resumed=self._resumed,
        )

    def _apply(self, actions: Iterable[Action], now: float) -> None:
        """Move state as the actions say (they are executed by the caller after we return)."""
        for a in actions:
            if isinstance(a, Pull):
                inst = self.instances[a.instance_id]
                for rid in a.request_ids:
                    st = self.requests[rid]
                    assert st.status is Status.QUEUED and st.group_id is not None, rid
                    self.groups.remove(st.group_id, st.req)
                    self._resumed.discard(rid)
                    st.status, st.group_id = Status.IN_FLIGHT, None
                    st.instance_id, st.dispatched_s = a.instance_id, now
                    inst.in_flight.add(rid)
                self.counters["pulled"] += len(a.request_ids)
            elif isinstance(a, Evict):
                inst = self.instances[a.instance_id]
                st = self.requests[a.request_id]
                inst.in_flight.discard(a.request_id)
                inst.last_evict_s = now
                st.status = Status.EVICTING
                st.evictions += 1
                st.last_evicted_s = now
                st.kv_instance = a.instance_id if a.resume == "swap" else None
                self.counters["evictions"] += 1
                self.counters[f"evictions_{a.resume}"] += 1
            elif isinstance(a, SwapModel):
                inst = self.instances[a.instance_id]
                assert not inst.in_flight, "swap emitted on a busy instance"
                inst.loading, inst.model = a.to_model, None
                inst.loaded_s = now  # load start; on_model_loaded sets the ready time
                inst.loading_warm = a.warm
                inst.ready_s = now + self.estimator.load_s(a.to_model, inst.spec, a.warm)
                self.counters["swaps"] += 1
                self.counters["warm_starts" if a.warm else "cold_starts"] += 1
            elif isinstance(a, KeepWarm):
                host = self.instances[a.instance_id].spec.host
                self.warm.touch(host, a.model, a.instance_id)
                self.counters["keep_warm"] += 1
            elif isinstance(a, Release):
                host = self.instances[a.instance_id].spec.host
                self.warm.discard(host, a.model)
                self.counters["release"] += 1
            elif isinstance(a, Rebalance):
                self.counters["rebalances"] += 1

    # ------------------------------------------------------------------ events
    def on_first_token(self, request_id: str, now: float) -> None:
        st = self.requests.get(request_id)
        if st is not None and st.first_token_s is None:
            st.first_token_s = now

    def on_finished(self, request_id: str, output_tokens: int, now: float) -> None:
        """The request ended normally with `output_tokens` produced in total (across evictions)."""
        st = self.requests.pop(request_id, None)
        if st is None:
            return
        self._leave(st)
        inst = self.instances.get(st.instance_id or "")
        if inst is not None:
            self.estimator.observe_finished(st, output_tokens, inst, now)
        self.counters["finished"] += 1

    def on_cancelled(self, request_id: str, now: float) -> None:
        """The client went away: forget the request wherever it is. If it was in flight the caller
        aborts it in the engine itself (no Evict is emitted)."""
        st = self.requests.pop(request_id, None)
        if st is None:
            return
        self._leave(st)
        self.counters["cancelled"] += 1

    def on_evicted(self, request_id: str, tokens_done: int, now: float) -> None:
        """An Evict was carried out; the request queues again and resumes with tokens_done."""
        st = self.requests.get(request_id)
        if st is None or st.status is not Status.EVICTING:
            return
        st.tokens_done = max(st.tokens_done, tokens_done)
        self._enqueue(st, now)
        self._dirty = self._dirty or "eviction"

    def on_dispatch_failed(self, request_ids: Iterable[str], instance_id: str, now: float) -> None:
        """The engine refused a Pull (e.g. transient error): queue those requests again."""
        inst = self.instances[instance_id]
        for rid in request_ids:
            st = self.requests.get(rid)
            if st is None or st.status is not Status.IN_FLIGHT or st.instance_id != instance_id:
                continue
            inst.in_flight.discard(rid)
            self._enqueue(st, now)
        self._dirty = self._dirty or "dispatch failed"

    def on_model_loaded(
        self, instance_id: str, model: str, now: float, warm: bool | None = None
    ) -> None:
        """`warm`: how the load really started, where the executor knows (else as planned)."""
        inst = self.instances[instance_id]
        if inst.loading is not None and inst.loading != model:
            raise ValueError(f"{instance_id}: loaded {model!r} but {inst.loading!r} was requested")
        if inst.loading is not None and self.config.measured_load_costs:
            # The end of a SwapModel's load (a recovery's reload, with no SwapModel, is not
            # measured): from the swap's time (loaded_s) to now, the old model's unload included.
            started_warm = inst.loading_warm if warm is None else warm
            self.estimator.observe_load(model, inst.spec, started_warm, now - inst.loaded_s)
            self.counters["loads_measured"] += 1
        inst.loading, inst.model, inst.loaded_s = None, model, now
        inst.healthy = True
        self._dirty = "model loaded"

    def on_resume_cached(
        self, instance_id: str, cached_tokens: int, context_tokens: int, now: float
    ) -> None:
        """A resumed request's engine reported what its prefix cache held of its context."""
        self.estimator.observe_resume(instance_id, cached_tokens, context_tokens)
        self.counters["resumes_reported"] += 1

    def on_engine_failed(self, instance_id: str, now: float) -> None:
        """The instance's engine died: its in-flight requests queue again (they resume by recompute
        with the tokens they had), and it takes no work until on_model_loaded."""
        inst = self.instances[instance_id]
        for rid in sorted(inst.in_flight):
            st = self.requests[rid]
            st.kv_instance = None
            self._enqueue(st, now)
        inst.in_flight.clear()
        inst.healthy, inst.model, inst.loading = False, None, None
        self._dirty = "engine failed"
        self.counters["engine_failures"] += 1

    def on_tokens_done(self, request_id: str, tokens_done: int, now: float) -> None:
        """Optional progress report (improves the remaining-work estimate of in-flight requests)."""
        st = self.requests.get(request_id)
        if st is not None and st.status is Status.IN_FLIGHT:
            st.tokens_done = max(st.tokens_done, tokens_done)

    # ------------------------------------------------------------------ views
    @property
    def decisions(self) -> tuple[PlanDecision, ...]:
        return tuple(self._decisions)

    @property
    def num_queued(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def num_in_flight(self) -> int:
        return sum(len(i.in_flight) for i in self.instances.values())

    def in_flight(self, instance_id: str) -> frozenset[str]:
        return frozenset(self.instances[instance_id].in_flight)

    def virtual_queue(self, instance_id: str) -> tuple[QueueEntry, ...]:
        if self._plan is None:
            return ()
        return tuple(self._plan.queues.get(instance_id, ()))

    def instance_views(self) -> list[InstanceView]:
        out = []
        for iid, inst in self.instances.items():
            vq = self.virtual_queue(iid)
            out.append(
                InstanceView(
                    iid,
                    inst.spec.gpu,
                    inst.model,
                    inst.loading,
                    inst.healthy,
                    len(inst.in_flight),
                    inst.spec.max_in_flight,
                    sum(len(e.request_ids) for e in vq),
                    tuple(self.warm.models(inst.spec.host)),
                )
            )
        return out

    def request_view(self, request_id: str) -> RequestView | None:
        st = self.requests.get(request_id)
        if st is None:
            return None
        return RequestView(
            request_id,
            st.status.value,
            st.instance_id,
            st.group_id,
            st.tokens_done,
            st.evictions,
            st.kv_instance,
        )

    def queue_stats(self, now: float) -> list[QueueStat]:
        by_kind: dict[tuple[str, str], list[str]] = {}
        for g in self.groups:
            by_kind.setdefault((g.model, g.slo_class), []).append(g.group_id)
        waits = self._predicted_waits(now)
        out = []
        for (model, cls), gids in sorted(by_kind.items()):
            n = sum(len(self.groups.groups[g]) for g in gids)
            w = min((waits.get(g, float("inf")) for g in gids), default=float("inf"))
            out.append(QueueStat(model, cls, n, len(gids), w))
        return out

    def _predicted_waits(self, now: float) -> dict[str, float]:
        if self._plan is None:
            return {}
        out: dict[str, float] = {}
        ctx = self._context("view")
        for iid, entries in self._plan.queues.items():
            fc = self.estimator.forecast_queue(self.instances[iid], entries, ctx, now)
            for e, f in zip(entries, fc, strict=True):
                w = f.first_token_mean_s - now
                out[e.group_id] = min(out.get(e.group_id, float("inf")), w)
        return out

    def resume_info(self, request_id: str) -> tuple[int, str | None]:
        """(tokens_done, instance holding its swapped KV or None) for a request being dispatched."""
        st = self.requests[request_id]
        return st.tokens_done, st.kv_instance

    # ------------------------------------------------------------------ internals
    def _class(self, name: str) -> SloClass:
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(
                f"unknown slo_class {name!r}; known: {', '.join(sorted(self.classes))}"
            ) from None

    def _enqueue(self, st: RequestState, now: float) -> None:
        st.status, st.instance_id = Status.QUEUED, None
        g = self.groups.add(st.req)
        st.group_id = g.group_id
        if st.tokens_done:
            self._resumed.add(st.req.request_id)
        self._touched_groups.add(g.group_id)
        self._unplanned += 1
        self._oldest_unplanned_s = min(self._oldest_unplanned_s, now)

    def _leave(self, st: RequestState) -> None:
        self._resumed.discard(st.req.request_id)
        if st.status is Status.QUEUED and st.group_id is not None:
            self.groups.remove(st.group_id, st.req)
        elif st.status is Status.IN_FLIGHT and st.instance_id is not None:
            self.instances[st.instance_id].in_flight.discard(st.req.request_id)
        st.status = Status.DONE


def check_invariants(m: QueueManager) -> None:
    """Every admitted request is in exactly one place; used by the property tests."""
    seen: dict[str, str] = {}
    for g in m.groups:
        for rid in g.request_ids:
            assert rid not in seen, f"{rid} twice"
            seen[rid] = "queued"
            assert m.requests[rid].status is Status.QUEUED
    for iid, inst in m.instances.items():
        for rid in inst.in_flight:
            assert rid not in seen, f"{rid} queued and in flight"
            seen[rid] = iid
            assert m.requests[rid].status is Status.IN_FLIGHT
        assert not (inst.loading and inst.in_flight), f"{iid} loading with work in flight"
    for rid, st in m.requests.items():
        if st.status is Status.EVICTING:
            assert rid not in seen
            seen[rid] = "evicting"
    assert set(seen) == set(m.requests), set(m.requests) ^ set(seen)
    resumed = {r for r, st in m.requests.items() if st.status is Status.QUEUED and st.tokens_done}
    assert m._resumed == resumed, m._resumed ^ resumed


__all__ = [
    "InstanceView",
    "QueueManager",
    "QueueStat",
    "RequestView",
    "check_invariants",
]

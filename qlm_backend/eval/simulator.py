"""Discrete-event simulation in virtual time of one policy on one workload.

The SAME code as the Triton deployment: the core's QueueManager plans (its `plan(now)` takes the
virtual time), one simulated engine (engine/sim.py, via ResumableEngine) per instance runs every
batch, and the LSO actions are executed as the router executes them:

- Pull: the requests enter the instance's engine (a resumed request comes back as prompt + tokens
  already produced under its old prefix-cache key, so it recomputes only what the engine's prefix
  cache lost meanwhile; with `kv_swap`, if its KV cache was swapped out on this very instance, it
  is copied back instead);
- Evict: abort in the engine, then `on_evicted` with the tokens produced so far. By default as the
  deployed router does it with vLLM v1 (resume by recompute; the core is told so through
  ManagerConfig.kv_swap_resume); `kv_swap` models a host swap tier (resume="swap" charges the KV
  copy to host memory, PerfModel.kv_swap_s);
- SwapModel: the instance serves nothing for PerfModel.load_s(warm) (warm only if the model is in
  the host's warm set, which KeepWarm/Release maintain), then `on_model_loaded`;
- KeepWarm / Release / Rebalance: bookkeeping and counts.

Time moves from event to event: arrivals, engine iteration ends, load completions and planner
wake-ups (the core's replan timer and arrival batching). The planner's own compute time is measured
(wall clock) and reported, not added to virtual time, and its budget counts predicted work
(ManagerConfig.plan_budget_clock "work"), so a run does not depend on how busy the machine is. Every request ends exactly once: finished,
rejected (admission), refused (no engine could take it) or unfinished (still open at the horizon).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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
from qlm_backend.core.fleet import FleetConfig, InstanceSpec
from qlm_backend.core.manager import QueueManager
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest
from qlm_backend.eval.perturb import engine_perf
from qlm_backend.eval.resumable import ResumableEngine
from qlm_backend.eval.scenario import WorkloadRequest

Outcome = Literal["finished", "rejected", "refused", "unfinished"]
# A stuck run (queued work, idle engines, plans that do nothing) is cut after this many idle plans.
STALL_PLANS = 50
# After an eviction or a load, plan again this soon: the evicted request is back in the queue.
FOLLOW_UP_S = 1e-3


@dataclass(frozen=True)
class SimSettings:
    policy: str
    label: str = ""
    manager_config: ManagerConfig | None = None
    policy_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. qlm ablation switches
    engine_max_num_seqs: int = 256  # vLLM defaults
    engine_max_num_batched_tokens: int = 8192
    engine_preemption: Literal["recompute", "swap"] = "recompute"  # vLLM v1 recomputes
    # An engine with a host KV swap tier (vLLM v0's swap space). Off as in vLLM v1 and the deployed
    # router: every eviction resumes by recompute, helped by the prefix cache.
    kv_swap: bool = False
    horizon_s: float = math.inf  # virtual time at which open requests end as "unfinished"
    # The engines' iterations take this times what the core's profiles say (eval/perturb.py): a
    # world the estimator is not calibrated for. 1: the engines are exactly PerfModel.
    step_time_scale: float = 1.0
    # The planner's clock for its measured compute time (tests give a slow one).
    timer: Callable[[], float] = time.perf_counter


@dataclass
class RequestRecord:
    req: WorkloadRequest
    deadline_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    outcome: Outcome | None = None
    tokens: int = 0  # output tokens produced, across evictions
    instance: str | None = None
    evictions: int = 0
    kv_at: str | None = None  # instance whose host memory holds its swapped-out KV
    # Timeline of the first token: the pull that led to it, and when the engine first scheduled it
    # (TTFT = router wait + engine queue + prefill; metrics.py reports the first two per class).
    pulled_s: float | None = None
    scheduled_s: float | None = None


@dataclass(frozen=True)
class Segment:
    instance_id: str
    model: str | None
    start_s: float
    end_s: float
    kind: Literal["serve", "load-warm", "load-cold"]


@dataclass
class SimResult:
    label: str
    policy: str
    records: list[RequestRecord]
    segments: list[Segment]
    counters: dict[str, int]
    planner_s: list[float]  # wall time of every plan() call
    full_planner_s: list[float]  # wall time of full plans (decision path lp / fallback / policy)
    busy_gpu_s: float  # engine busy time x GPUs of the instance
    gpus: int
    start_s: float
    end_s: float
    wall_s: float
    core_counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Inst:
    spec: InstanceSpec
    engine: ResumableEngine | None
    model: str | None
    seg_start_s: float = 0.0
    loading: str | None = None
    ready_s: float = math.inf
    load_kind: Literal["load-warm", "load-cold"] = "load-cold"
    busy_s: float = 0.0  # of engines already replaced


class Simulation:
    def __init__(
        self,
        fleet: FleetConfig,
        workload: Sequence[WorkloadRequest],
        settings: SimSettings,
        on_ended: Callable[[int], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.workload = sorted(workload, key=lambda w: (w.arrival_s, w.request_id))
        cfg = settings.manager_config or ManagerConfig(
            warm_slots_per_host=fleet.warm_slots_per_host
        )
        # Keep every decision record: planner time percentiles and fallbacks come from them.
        # The planner's budget counts predicted work, not wall seconds: the same run decides the
        # same on a busy machine (its wall time is still measured and reported).
        cfg = cfg.with_(
            decisions_kept=10_000_000, plan_budget_clock="work", kv_swap_resume=settings.kv_swap
        )
        self.qm = QueueManager(
            fleet,
            policy=settings.policy,
            config=cfg,
            timer=settings.timer,
            **dict(settings.policy_kwargs),
        )
        self.cfg = cfg
        self.scheduling = self.qm.policy.traits.engine_scheduling
        self.on_ended = on_ended or (lambda n: None)
        self.insts: dict[str, _Inst] = {}
        for spec in fleet.instances:
            eng = self._engine(spec, spec.initial_model) if spec.initial_model else None
            self.insts[spec.instance_id] = _Inst(spec, eng, spec.initial_model)
        self.host_warm: dict[str, set[str]] = {}
        self.records: dict[str, RequestRecord] = {}
        self.segments: list[Segment] = []
        self.counters: dict[str, int] = {}
        self.planner_s: list[float] = []
        self._ended = 0
        self._perf: dict[tuple[str, str, int], PerfModel] = {}

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def perf(self, model: str, spec: InstanceSpec) -> PerfModel:
        key = (model, spec.gpu, spec.tp)
        p = self._perf.get(key)
        if p is None:
            p = self._perf[key] = PerfModel.from_names(model, spec.gpu, spec.tp)
        return p

    def _engine(self, spec: InstanceSpec, model: str) -> ResumableEngine:
        s = self.settings
        return ResumableEngine(
            engine_perf(PerfModel.from_names(model, spec.gpu, spec.tp), s.step_time_scale),
            max_num_seqs=s.engine_max_num_seqs,
            max_num_batched_tokens=s.engine_max_num_batched_tokens,
            scheduling=self.scheduling,
            preemption=s.engine_preemption,
        )

    def _end(self, rec: RequestRecord, outcome: Outcome, now: float) -> None:
        assert rec.outcome is None, f"{rec.req.request_id} ended twice"
        rec.outcome = outcome
        rec.finish_s = now
        self._ended += 1
        self.on_ended(1)

    # ------------------------------------------------------------------ the loop
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        qm, arrivals = self.qm, self.workload
        n, ai = len(arrivals), 0
        next_plan = math.inf
        idle_plans = 0
        now = arrivals[0].arrival_s if arrivals else 0.0
        start = now
        for inst in self.insts.values():
            inst.seg_start_s = start
        horizon = self.settings.horizon_s
        while self._ended < n:
            cand = next_plan
            if ai < n:
                cand = min(cand, arrivals[ai].arrival_s)
            for inst in self.insts.values():
                if inst.engine is not None:
                    e = inst.engine.next_event_s()
                    if e is not None and e < cand:
                        cand = e
                if inst.ready_s < cand:
                    cand = inst.ready_s
            if cand == math.inf or cand > horizon:
                break
            now = max(now, cand)
            progressed = self._loads_done(now)
            progressed |= self._engine_events(now)
            arrived = False
            while ai < n and arrivals[ai].arrival_s <= now:
                self._arrive(arrivals[ai], now)
                ai += 1
                arrived = True
            if not (progressed or arrived or now >= next_plan):
                continue
            t0 = time.perf_counter()
            actions = qm.plan(now)
            self.planner_s.append(time.perf_counter() - t0)
            follow = self._execute(actions, now)
            next_plan = now + self.cfg.replan_interval_s if qm.num_queued else math.inf
            if arrived:
                next_plan = min(next_plan, now + self.cfg.arrival_batch_s)
            if follow:
                next_plan = min(next_plan, now + FOLLOW_UP_S)
            # A run whose queue can never drain (nothing runs, nothing loads, nothing arrives and
            # plans do nothing) is cut rather than spun to the horizon.
            busy = any(
                i.loading is not None or (i.engine is not None and i.engine.next_event_s())
                for i in self.insts.values()
            )
            idle_plans = 0 if (actions or busy or ai < n) else idle_plans + 1
            if idle_plans >= STALL_PLANS:
                self._count("stalled")
                break
        end = now
        for rec in self.records.values():
            if rec.outcome is None:
                self._end(rec, "unfinished", end)
        for w in arrivals[ai:]:
            rec = RequestRecord(w, w.arrival_s + self._slo(w.slo_class))
            self.records[w.request_id] = rec
            self._end(rec, "unfinished", end)
        for inst in self.insts.values():
            if inst.engine is not None:
                inst.busy_s += inst.engine.stats.busy_s
                self.segments.append(
                    Segment(inst.spec.instance_id, inst.model, inst.seg_start_s, end, "serve")
                )
            elif inst.loading is not None:
                self.segments.append(
                    Segment(
                        inst.spec.instance_id, inst.loading, inst.seg_start_s, end, inst.load_kind
                    )
                )
        full = [d.planner_s for d in qm.decisions if d.trigger != "incremental"]
        return SimResult(
            label=self.settings.label or self.settings.policy,
            policy=self.settings.policy,
            records=list(self.records.values()),
            segments=self.segments,
            counters=dict(self.counters),
            planner_s=self.planner_s,
            full_planner_s=full,
            busy_gpu_s=sum(i.busy_s * i.spec.tp for i in self.insts.values()),
            gpus=sum(i.spec.tp for i in self.insts.values()),
            start_s=start,
            end_s=end,
            wall_s=time.perf_counter() - wall0,
            core_counters=dict(qm.counters),
        )

    def _slo(self, cls: str) -> float:
        return self.qm.classes[cls].ttft_slo_s

    # ------------------------------------------------------------------ events
    def _loads_done(self, now: float) -> bool:
        done = False
        for iid, inst in self.insts.items():
            if inst.loading is None or inst.ready_s > now:
                continue
            model = inst.loading
            self.segments.append(
                Segment(iid, model, inst.seg_start_s, inst.ready_s, inst.load_kind)
            )
            inst.engine = self._engine(inst.spec, model)
            inst.model, inst.loading = model, None
            inst.seg_start_s, inst.ready_s = now, math.inf
            self.qm.on_model_loaded(iid, model, now)
            done = True
        return done

    def _engine_events(self, now: float) -> bool:
        progressed = False
        qm = self.qm
        for inst in self.insts.values():
            eng = inst.engine
            if eng is None:
                continue
            t = eng.next_event_s()
            if t is None or t > now:
                continue
            for ev in eng.advance(now):
                rec = self.records[ev.request_id]
                rec.tokens += 1
                if rec.first_token_s is None:
                    rec.first_token_s = ev.time_s
                    rec.scheduled_s = ev.scheduled_s
                    qm.on_first_token(ev.request_id, ev.time_s)
                    progressed = True
                if ev.finished:
                    qm.on_finished(ev.request_id, rec.tokens, ev.time_s)
                    self._end(rec, "finished", ev.time_s)
                    progressed = True
        return progressed

    def _arrive(self, w: WorkloadRequest, now: float) -> None:
        req = self.qm.make_request(
            w.request_id,
            w.model,
            w.slo_class,
            w.arrival_s,
            w.prompt_tokens,
            w.max_tokens,
            true_output_tokens=w.output_tokens,  # read by the oracle policy only
        )
        rec = RequestRecord(w, req.deadline_s)
        self.records[w.request_id] = rec
        rej = self.qm.add_request(req, now)
        if rej is not None:
            self._count("rejected")
            self._end(rec, "rejected", now)

    # ------------------------------------------------------------------ actions
    def _execute(self, actions: list[Action], now: float) -> bool:
        follow = False
        for a in actions:
            if isinstance(a, Pull):
                self._pull(a, now)
            elif isinstance(a, Evict):
                self._evict(a, now)
                follow = True
            elif isinstance(a, SwapModel):
                self._swap(a, now)
            elif isinstance(a, KeepWarm):
                self.host_warm.setdefault(self.insts[a.instance_id].spec.host, set()).add(a.model)
                self._count("keep_warm")
            elif isinstance(a, Release):
                self.host_warm.get(self.insts[a.instance_id].spec.host, set()).discard(a.model)
                self._count("release")
            elif isinstance(a, Rebalance):
                self._count("rebalances")
            elif isinstance(a, Reject):
                rec = self.records.get(a.request_id)
                self._count("rejected")
                if rec is not None and rec.outcome is None:
                    self.qm.on_cancelled(a.request_id, now)
                    self._end(rec, "rejected", now)
        return follow

    def _pull(self, a: Pull, now: float) -> None:
        inst = self.insts[a.instance_id]
        eng = inst.engine
        failed: list[str] = []
        for rid in a.request_ids:
            rec = self.records[rid]
            w = rec.req
            if eng is None or inst.model != w.model:
                failed.append(rid)  # the core pulled onto an instance not running the model
                continue
            done = rec.tokens
            try:
                if done and rec.kv_at == a.instance_id and self.settings.kv_swap:
                    er = EngineRequest(
                        rid, w.prompt_tokens, w.max_tokens, w.output_tokens, a.priority, w.arrival_s
                    )
                    eng.add_swapped(er, done, now)
                    self._count("kv_swap_in")
                else:
                    er = EngineRequest(
                        rid,
                        w.prompt_tokens + done,
                        w.max_tokens - done,
                        w.output_tokens - done,
                        a.priority,
                        w.arrival_s,
                    )
                    if done:
                        self._count("resume_recompute")
                        # What the prefix cache still holds of it as it goes back in (the hit
                        # realised at admission may be smaller if it waits in the engine).
                        self._count("resume_tokens", w.prompt_tokens + done)
                        self._count("resume_cached_tokens", eng.cached_tokens(rid))
                    eng.add(er, now)
            except ValueError:
                # The engine cannot hold it (prompt over its KV cache): it can never run there.
                self._count("refused")
                self.qm.on_cancelled(rid, now)
                self._end(rec, "refused", now)
                continue
            rec.kv_at = None
            rec.instance = a.instance_id
            if rec.first_token_s is None:
                rec.pulled_s = now
            self._count("pulls")
        if failed:
            self._count("pull_to_wrong_model", len(failed))
            self.qm.on_dispatch_failed(failed, a.instance_id, now)

    def _evict(self, a: Evict, now: float) -> None:
        inst = self.insts[a.instance_id]
        rec = self.records[a.request_id]
        if inst.engine is None or not inst.engine.abort(a.request_id, now):
            self._count("evict_not_in_engine")
        rec.evictions += 1
        self._count("evictions")
        if a.resume == "swap" and self.settings.kv_swap and inst.engine is not None:
            perf = inst.engine.perf
            inst.engine.charge_s(perf.kv_swap_s(rec.req.prompt_tokens + rec.tokens), now)
            rec.kv_at = a.instance_id
            self._count("kv_swap_out")
        else:
            self._count("evictions_recompute")
        self.qm.on_evicted(a.request_id, rec.tokens, now)

    def _swap(self, a: SwapModel, now: float) -> None:
        inst = self.insts[a.instance_id]
        iid = a.instance_id
        if inst.engine is not None:
            if inst.engine.num_running or inst.engine.num_waiting:
                self._count("swap_on_busy_engine")
            inst.busy_s += inst.engine.stats.busy_s
            self.segments.append(Segment(iid, inst.model, inst.seg_start_s, now, "serve"))
        # Warm only if the weights really are in this host's memory (mirrors KeepWarm/Release).
        warm = a.to_model in self.host_warm.get(inst.spec.host, set())
        if warm != a.warm:
            self._count("warm_flag_mismatch")
        cost = self.perf(a.to_model, inst.spec).load_s(warm)
        inst.engine, inst.model = None, None
        inst.loading, inst.ready_s = a.to_model, now + cost
        inst.seg_start_s = now
        inst.load_kind = "load-warm" if warm else "load-cold"
        self._count("model_swaps")
        self._count("model_swaps_warm" if warm else "model_swaps_cold")


def simulate(
    fleet: FleetConfig,
    workload: Sequence[WorkloadRequest],
    settings: SimSettings,
    on_ended: Callable[[int], None] | None = None,
) -> SimResult:
    return Simulation(fleet, workload, settings, on_ended).run()


__all__ = ["RequestRecord", "Segment", "SimResult", "SimSettings", "Simulation", "simulate"]

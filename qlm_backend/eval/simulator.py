"""Discrete-event simulation in virtual time of one policy on one workload.

The SAME code as the Triton deployment: the core's QueueManager plans (its `plan(now)` takes the
virtual time) and the router's executor (router/executor.py) carries out its actions, exactly as in
the `qlm` router; only the driver differs: eval/sim_driver.py runs one simulated engine (engine/sim.py,
via ResumableEngine) per instance where the router streams from Triton engine models. So Pull,
Evict (resume by recompute, helped by the engine's prefix cache; a host KV swap tier only with
`kv_swap`), SwapModel (warm only if the host's warm set holds the model), KeepWarm / Release,
cancellation and outcome accounting are the router's.

Time moves from event to event: arrivals, engine iteration ends, load completions and planner
wake-ups (the core's replan timer and arrival batching). The planner's own compute time is measured
(wall clock) and reported, not added to virtual time, and its budget counts predicted work
(ManagerConfig.plan_budget_clock "work"), so a run does not depend on how busy the machine is. Every
request ends exactly once: finished, rejected (admission), refused (no engine could take it) or
unfinished (still open at the horizon).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qlm_backend.core.actions import Evict
from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.fleet import FleetConfig, InstanceSpec
from qlm_backend.core.manager import QueueManager
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.perturb import engine_perf
from qlm_backend.eval.resumable import ResumableEngine
from qlm_backend.eval.scenario import WorkloadRequest
from qlm_backend.eval.sim_driver import Segment, SimDriver
from qlm_backend.router.executor import Executor
from qlm_backend.router.flight import ErrorKind, Flight, Outcome

SimOutcome = Literal["finished", "rejected", "refused", "unfinished"]
_SIM_OUTCOME: dict[Outcome, SimOutcome] = {
    "attained": "finished",
    "missed": "finished",
    "rejected": "rejected",
    "failed": "refused",  # the engine could not hold it
    "cancelled": "refused",  # simulated clients never cancel
}
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
    outcome: SimOutcome | None = None
    tokens: int = 0  # output tokens produced, across evictions
    instance: str | None = None
    evictions: int = 0
    # Timeline of the first token: the pull that led to it, and when the engine first scheduled it
    # (TTFT = router wait + engine queue + prefill; metrics.py reports the first two per class).
    pulled_s: float | None = None
    scheduled_s: float | None = None


@dataclass
class SimResult:
    label: str
    policy: str
    records: list[RequestRecord]
    segments: list[Segment]
    counters: dict[str, int]  # the executor's and the simulated engines' counts
    planner_s: list[float]  # wall time of every plan() call
    full_planner_s: list[float]  # wall time of full plans (decision path lp / fallback / policy)
    busy_gpu_s: float  # engine busy time x GPUs of the instance
    gpus: int
    start_s: float
    end_s: float
    wall_s: float
    core_counters: dict[str, int] = field(default_factory=dict)


class _NoClient:
    """Simulated clients: they read nothing back, never cancel."""

    def send(
        self, flight: Flight, text: str, num_tokens: int, reason: str | None, final: bool
    ) -> bool:
        return True

    def error(self, message: str, kind: ErrorKind) -> None:
        return None

    def is_cancelled(self) -> bool:
        return False


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
        self.driver = SimDriver(fleet, self._engine, kv_swap=settings.kv_swap)
        self.ex = Executor(self.qm, self.driver, fleet.instances, on_outcome=self._outcome)
        self.driver.bind(self.ex)
        self.records: dict[str, RequestRecord] = {}
        self.planner_s: list[float] = []
        self.counters: dict[str, int] = {}
        self._client = _NoClient()
        self._ended = 0

    # ------------------------------------------------------------------ helpers
    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def _engine(self, spec: InstanceSpec, model: str) -> ResumableEngine:
        s = self.settings
        return ResumableEngine(
            engine_perf(PerfModel.from_names(model, spec.gpu, spec.tp), s.step_time_scale),
            max_num_seqs=s.engine_max_num_seqs,
            max_num_batched_tokens=s.engine_max_num_batched_tokens,
            scheduling=self.scheduling,
            preemption=s.engine_preemption,
        )

    def _end(self, rec: RequestRecord, outcome: SimOutcome, now: float) -> None:
        assert rec.outcome is None, f"{rec.req.request_id} ended twice"
        rec.outcome = outcome
        rec.finish_s = now
        self._ended += 1
        self.on_ended(1)

    def _fill(self, f: Flight) -> RequestRecord:
        rec = self.records[f.rid]
        rec.first_token_s, rec.tokens, rec.instance = f.first_token_s, f.tokens_done, f.instance
        rec.evictions = f.evictions
        rec.pulled_s, rec.scheduled_s = f.token_pull_s, f.scheduled_s
        return rec

    def _outcome(self, f: Flight, outcome: Outcome, now: float) -> None:
        self._end(self._fill(f), _SIM_OUTCOME[outcome], now)

    # ------------------------------------------------------------------ the loop
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        qm, arrivals, driver = self.qm, self.workload, self.driver
        n, ai = len(arrivals), 0
        next_plan = math.inf
        idle_plans = 0
        now = arrivals[0].arrival_s if arrivals else 0.0
        start = now
        driver.start(start)
        horizon = self.settings.horizon_s
        while self._ended < n:
            cand = min(next_plan, driver.next_event_s())
            if ai < n:
                cand = min(cand, arrivals[ai].arrival_s)
            if cand == math.inf or cand > horizon:
                break
            now = max(now, cand)
            progressed = driver.advance(now)
            arrived = False
            while ai < n and arrivals[ai].arrival_s <= now:
                self._arrive(arrivals[ai], now)
                ai += 1
                arrived = True
            if not (progressed or arrived or now >= next_plan):
                continue
            t0 = time.perf_counter()
            actions = self.ex.step(now)
            self.planner_s.append(time.perf_counter() - t0)
            next_plan = now + self.cfg.replan_interval_s if qm.num_queued else math.inf
            if arrived:
                next_plan = min(next_plan, now + self.cfg.arrival_batch_s)
            if any(isinstance(a, Evict) for a in actions):
                next_plan = min(next_plan, now + FOLLOW_UP_S)
            # A run whose queue can never drain (nothing runs, nothing loads, nothing arrives and
            # plans do nothing) is cut rather than spun to the horizon.
            idle_plans = 0 if (actions or driver.busy() or ai < n) else idle_plans + 1
            if idle_plans >= STALL_PLANS:
                self._count("stalled")
                break
        end = now
        for f in list(self.ex.flights.values()):
            self._end(self._fill(f), "unfinished", end)
        for w in arrivals[ai:]:
            rec = RequestRecord(w, w.arrival_s + self._slo(w.slo_class))
            self.records[w.request_id] = rec
            self._end(rec, "unfinished", end)
        busy = driver.finish(end)
        full = [d.planner_s for d in qm.decisions if d.trigger != "incremental"]
        counters = {**self.ex.counters, **driver.counters, **self.counters}
        return SimResult(
            label=self.settings.label or self.settings.policy,
            policy=self.settings.policy,
            records=list(self.records.values()),
            segments=driver.segments,
            counters=counters,
            planner_s=self.planner_s,
            full_planner_s=full,
            busy_gpu_s=busy,
            gpus=sum(i.spec.tp for i in driver.insts.values()),
            start_s=start,
            end_s=end,
            wall_s=time.perf_counter() - wall0,
            core_counters=dict(qm.counters),
        )

    def _slo(self, cls: str) -> float:
        return self.qm.classes[cls].ttft_slo_s

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
        self.records[w.request_id] = RequestRecord(w, req.deadline_s)
        flight = Flight(
            w.request_id,
            w.model,
            w.slo_class,
            w.arrival_s,
            req.deadline_s,
            w.prompt_tokens,
            w.max_tokens,
            stream=False,
            payload=w,
            sink=self._client,
        )
        self.ex.admit(flight, req, now)


def simulate(
    fleet: FleetConfig,
    workload: Sequence[WorkloadRequest],
    settings: SimSettings,
    on_ended: Callable[[int], None] | None = None,
) -> SimResult:
    return Simulation(fleet, workload, settings, on_ended).run()


__all__ = ["RequestRecord", "Segment", "SimResult", "SimSettings", "Simulation", "simulate"]

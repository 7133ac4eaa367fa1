"""Factories for the core tests: requests, fleets, a fake clock, and a small virtual-time cluster
that couples a QueueManager with SimEngines (the evaluation simulator is the full version)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from qlm_backend.core.api import (
    Evict,
    FleetConfig,
    Pull,
    QueueManager,
    Request,
    SwapModel,
    parse_fleet,
)
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest, SimEngine

SLO = {c.name: c.ttft_slo_s for c in DEFAULT_SLO_CLASSES}


def make_request(
    request_id: str = "r0",
    model: str = "mistral-7b",
    slo_class: str = "interactive",
    arrival_s: float = 0.0,
    *,
    deadline_s: float | None = None,
    prompt_tokens: int = 256,
    max_tokens: int = 512,
    true_output_tokens: int | None = None,
) -> Request:
    dl = arrival_s + SLO[slo_class] if deadline_s is None else deadline_s
    return Request(
        request_id, model, slo_class, arrival_s, dl, prompt_tokens, max_tokens, true_output_tokens
    )


def make_fleet(
    n: int = 2,
    gpu: str = "A100-80G",
    models: tuple[str, ...] = ("mistral-7b",),
    initial: str | None = "mistral-7b",
    max_in_flight: int = 8,
    warm_slots: int = 2,
    host: str | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> FleetConfig:
    inst: dict[str, Any] = {
        "instance_id": "i",
        "count": n,
        "gpu": gpu,
        "models_allowed": list(models),
        "max_in_flight": max_in_flight,
    }
    if n == 1:
        inst["instance_id"] = "i-0"
    if initial is not None:
        inst["initial_model"] = initial
    if host is not None:
        inst["host"] = host
    return parse_fleet({"instances": [inst, *(extra or [])], "warm_slots_per_host": warm_slots})


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.now = t

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


@dataclass
class Cluster:
    """QueueManager + one SimEngine per instance, in virtual time."""

    qm: QueueManager
    engine_kw: dict[str, Any] = field(default_factory=dict)
    plan_every_s: float = 0.25
    engines: dict[str, SimEngine | None] = field(default_factory=dict)
    loads: list[tuple[float, str, str]] = field(default_factory=list)
    first_token: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    produced: dict[str, int] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    actions: list[Any] = field(default_factory=list)
    reqs: dict[str, Request] = field(default_factory=dict)
    now: float = 0.0

    def __post_init__(self) -> None:
        for iid, inst in self.qm.instances.items():
            self.engines[iid] = self._engine(inst.spec, inst.model) if inst.model else None

    def _engine(self, spec: Any, model: str) -> SimEngine:
        perf = PerfModel.from_names(model, spec.gpu, spec.tp)
        sched = self.qm.policy.traits.engine_scheduling
        return SimEngine(perf, scheduling=sched, **self.engine_kw)

    def _execute(self, t: float) -> None:
        for a in self.qm.plan(t):
            self.actions.append(a)
            if isinstance(a, Pull):
                eng = self.engines[a.instance_id]
                assert eng is not None
                for rid in a.request_ids:
                    r = self.reqs[rid]
                    done = self.produced.get(rid, 0)
                    out = (r.true_output_tokens or r.max_tokens) - done
                    eng.add(
                        EngineRequest(
                            rid,
                            r.prompt_tokens + done,
                            r.max_tokens - done,
                            max(1, out),
                            a.priority,
                            t,
                        ),
                        t,
                    )
            elif isinstance(a, Evict):
                eng = self.engines[a.instance_id]
                assert eng is not None
                eng.abort(a.request_id, t)
                self.qm.on_evicted(a.request_id, self.produced.get(a.request_id, 0), t)
            elif isinstance(a, SwapModel):
                eng = self.engines[a.instance_id]
                assert eng is None or (eng.num_running == 0 and eng.num_waiting == 0)
                spec = self.qm.instances[a.instance_id].spec
                perf = PerfModel.from_names(a.to_model, spec.gpu, spec.tp)
                self.engines[a.instance_id] = None
                heapq.heappush(self.loads, (t + perf.load_s(a.warm), a.instance_id, a.to_model))

    def run(self, arrivals: list[Request], until_s: float = 1e5) -> Cluster:
        arr = sorted(arrivals, key=lambda r: r.arrival_s)
        for r in arr:
            self.reqs[r.request_id] = r
        ai = 0
        next_plan = 0.0
        while True:
            cands = [next_plan]
            if ai < len(arr):
                cands.append(arr[ai].arrival_s)
            if self.loads:
                cands.append(self.loads[0][0])
            for e in self.engines.values():
                if e is not None and (x := e.next_event_s()) is not None:
                    cands.append(x)
            t = min(cands)
            if t > until_s:
                break
            idle = (
                ai >= len(arr)
                and not self.loads
                and self.qm.num_queued == 0
                and self.qm.num_in_flight == 0
            )
            if idle:
                break
            self.now = t
            while ai < len(arr) and arr[ai].arrival_s <= t:
                rej = self.qm.add_request(arr[ai], t)
                if rej is not None:
                    self.rejected.add(rej.request_id)
                ai += 1
            while self.loads and self.loads[0][0] <= t:
                _, iid, model = heapq.heappop(self.loads)
                self.engines[iid] = self._engine(self.qm.instances[iid].spec, model)
                self.qm.on_model_loaded(iid, model, t)
            for eng in self.engines.values():
                if eng is None:
                    continue
                for ev in eng.advance(t):
                    self.produced[ev.request_id] = self.produced.get(ev.request_id, 0) + 1
                    if ev.request_id not in self.first_token:
                        self.first_token[ev.request_id] = ev.time_s
                        self.qm.on_first_token(ev.request_id, ev.time_s)
                    if ev.finished:
                        self.finished[ev.request_id] = ev.time_s
                        self.qm.on_finished(ev.request_id, self.produced[ev.request_id], ev.time_s)
            self._execute(t)
            if t >= next_plan:
                next_plan = t + self.plan_every_s
        return self

    def attainment(self, slo_class: str | None = None) -> float:
        rs = [r for r in self.reqs.values() if slo_class is None or r.slo_class == slo_class]
        ok = sum(1 for r in rs if self.first_token.get(r.request_id, 1e18) <= r.deadline_s)
        return ok / max(1, len(rs))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def request_factory() -> Callable[..., Request]:
    return make_request


@pytest.fixture
def fleet_factory() -> Callable[..., FleetConfig]:
    return make_fleet

"""The attainment bound: never below a real schedule (the simulated engine, enumerated, and the
policies themselves), equal to the exact preemptive optimum where the relaxation is tight (one
instance), monotone, 1.0 when everything fits, and a request no instance serves is a miss."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from qlm_backend.core.fleet import FleetConfig, parse_fleet
from qlm_backend.core.policies import POLICY_NAMES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest, SimEngine
from qlm_backend.eval.bound import (
    DEFAULT_MAX_BATCHED_TOKENS,
    BoundResult,
    attainment_bound,
    bound_summary,
    prefill_work_s,
)
from qlm_backend.eval.scenario import WorkloadRequest
from qlm_backend.eval.simulator import SimSettings, simulate

MODEL, GPU = "mistral-7b", "A10"  # ~0.18 s a 1,000-token prefill
CLASSES: list[dict[str, Any]] = [
    {"name": "fast", "ttft_slo_s": 0.6, "weight": 10},
    {"name": "slow", "ttft_slo_s": 1.5, "weight": 1},
]


def _fleet(
    count: int = 1, classes: list[dict[str, Any]] | None = None, models: Sequence[str] = (MODEL,)
):
    return parse_fleet(
        {
            "slo_classes": classes or CLASSES,
            "instances": [
                {
                    "instance_id": "i",
                    "count": count,
                    "gpu": GPU,
                    "models_allowed": list(models),
                    "initial_model": models[0],
                }
            ],
        }
    )


def _req(k: int, arrival_s: float, prompt: int, cls: str, output: int = 2, model: str = MODEL):
    return WorkloadRequest(f"r{k}", arrival_s, model, cls, prompt, output, output)


def _random_case(rng: random.Random, n: int) -> list[WorkloadRequest]:
    t = 0.0
    out = []
    for k in range(n):
        t += rng.uniform(0.0, 0.4)
        out.append(_req(k, round(t, 3), rng.randint(300, 3500), rng.choice(["fast", "slow"])))
    return out


def _deadlines(fleet: FleetConfig, reqs: Sequence[WorkloadRequest]) -> list[float]:
    slo = {c.name: c.ttft_slo_s for c in fleet.slo_classes}
    return [w.arrival_s + slo[w.slo_class] for w in reqs]


def _weight_share(fleet: FleetConfig, reqs: Sequence[WorkloadRequest], met: Sequence[int]) -> float:
    wt = {c.name: c.weight for c in fleet.slo_classes}
    return sum(wt[reqs[i].slo_class] for i in met) / sum(wt[w.slo_class] for w in reqs)


# --- exact references ----------------------------------------------------------------------------
def _edf_feasible(jobs: list[tuple[float, float, float]]) -> bool:
    """Preemptive EDF on one machine, (release, deadline, work): optimal for meeting deadlines."""
    pending = sorted(jobs)
    ready: list[list[float]] = []  # [deadline, work left]
    t, i = 0.0, 0
    while i < len(pending) or ready:
        if not ready:
            t = max(t, pending[i][0])
        while i < len(pending) and pending[i][0] <= t:
            ready.append([pending[i][1], pending[i][2]])
            i += 1
        ready.sort()
        nxt = pending[i][0] if i < len(pending) else math.inf
        job = ready[0]
        run = min(job[1], nxt - t)
        t += run
        job[1] -= run
        if job[1] <= 1e-12:
            if t > job[0] + 1e-9:
                return False
            ready.pop(0)
    return True


def _best_preemptive(fleet: FleetConfig, reqs: Sequence[WorkloadRequest]) -> float:
    """The best weighted attainment of any preemptive schedule of the prefill work on one
    instance (every subset, EDF decides feasibility)."""
    perf = PerfModel.from_names(MODEL, GPU)
    dls = _deadlines(fleet, reqs)
    jobs = [
        (w.arrival_s, d, prefill_work_s(perf, w.prompt_tokens))
        for w, d in zip(reqs, dls, strict=True)
    ]
    best = 0.0
    for k in range(len(reqs) + 1):
        for subset in itertools.combinations(range(len(reqs)), k):
            if _edf_feasible([jobs[i] for i in subset]):
                best = max(best, _weight_share(fleet, reqs, subset))
    return best


def _engine_run(
    fleet: FleetConfig, reqs: Sequence[WorkloadRequest], on: Sequence[int], rank: Sequence[int]
) -> float:
    """Weighted attainment of the simulated engines when request i goes to instance on[i] (-1:
    shed) at its arrival with priority rank[i]."""
    perf = PerfModel.from_names(MODEL, GPU)
    engines = [SimEngine(perf, scheduling="priority") for _ in fleet.instances]
    first: dict[str, float] = {}
    todo = sorted((w.arrival_s, i) for i, w in enumerate(reqs) if on[i] >= 0)
    while True:
        times = [e.next_event_s() for e in engines]
        cand = [t for t in times if t is not None]
        if todo:
            cand.append(todo[0][0])
        if not cand:
            break
        now = min(cand)
        for e in engines:
            for ev in e.advance(now):
                first.setdefault(ev.request_id, ev.time_s)
        while todo and todo[0][0] <= now:
            _, i = todo.pop(0)
            w = reqs[i]
            er = EngineRequest(
                w.request_id, w.prompt_tokens, w.max_tokens, w.output_tokens, rank[i], w.arrival_s
            )
            engines[on[i]].add(er, now)
    dls = _deadlines(fleet, reqs)
    met = [i for i, w in enumerate(reqs) if w.request_id in first and first[w.request_id] <= dls[i]]
    return _weight_share(fleet, reqs, met)


# --- the work figure -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "gpu"),
    [
        ("mistral-7b", "A10"),
        ("vicuna-13b", "A100-80G"),
        ("llama-3-70b", "A100-80G"),
        ("tiny-llama", "cpu-2core"),
    ],
)
def test_prefill_work_is_below_any_chunking_and_batching(model: str, gpu: str) -> None:
    """Whatever the steps carry (chunks of several prompts, decodes), they last at least the
    prompts' prefill_work_s: the lemma the window rows stand on."""
    perf = PerfModel.from_names(model, gpu)
    rng = random.Random(7)
    budget = DEFAULT_MAX_BATCHED_TOKENS
    for _ in range(40):
        prompts = [rng.randint(1, 12_000) for _ in range(rng.randint(1, 5))]
        done = [0] * len(prompts)
        total_s = 0.0
        while any(d < p for d, p in zip(done, prompts, strict=True)):
            decodes = rng.randint(0, 200)
            room = budget - decodes
            chunks = []
            for j in rng.sample(range(len(prompts)), len(prompts)):
                left = prompts[j] - done[j]
                if left <= 0 or room <= 0:
                    continue
                c = min(left, room, rng.randint(1, budget))
                chunks.append((c, done[j]))
                done[j] += c
                room -= c
            total_s += perf.step_s(decodes, decodes * rng.randint(0, 3000), chunks)
        assert total_s >= sum(prefill_work_s(perf, p) for p in prompts)
    # The perturbed engines (SimSettings.step_time_scale): every step scaled, and the work with it.
    assert 1.7 * perf.prefill_s(3000) >= prefill_work_s(perf, 3000, step_time_scale=1.7)
    if gpu == "cpu-2core":
        return  # a tiny model: per-step costs dominate, which only a full budget amortises
    # ...and it is close to a whole prompt's own prefill step (the bound is not loose by design).
    for p in (500, 2000, 8000):
        assert 0.85 * perf.prefill_s(p) <= prefill_work_s(perf, p) <= perf.prefill_s(p)


# --- against exact schedules ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_equals_the_exact_preemptive_optimum_on_one_instance(seed: int) -> None:
    """One instance, one model: the MIP over all windows is Horn's condition, i.e. exact for
    preemptive schedules of the prefill work; the LP is above it."""
    rng = random.Random(seed)
    fleet = _fleet()
    reqs = _random_case(rng, rng.randint(4, 7))
    exact = _best_preemptive(fleet, reqs)
    mip = attainment_bound(fleet, reqs, integer=True)
    lp = attainment_bound(fleet, reqs)
    assert mip.status == "optimal" and mip.weighted_attainment is not None
    assert mip.weighted_attainment == pytest.approx(exact, rel=2e-4, abs=1e-9)
    assert lp.weighted_attainment is not None and lp.weighted_attainment >= exact - 1e-9
    assert lp.lp_weighted_attainment == lp.weighted_attainment
    assert mip.weighted_attainment <= lp.weighted_attainment + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_no_engine_schedule_beats_it(seed: int) -> None:
    """Every subset and priority order on the real (simulated) engine, one instance; every
    assignment to two instances and every order: never above the bound (LP or MIP)."""
    rng = random.Random(100 + seed)
    reqs = _random_case(rng, 5)
    one = _fleet()
    lp = attainment_bound(one, reqs, integer=False).weighted_attainment
    mip = attainment_bound(one, reqs, integer=True).weighted_attainment
    assert lp is not None and mip is not None and mip <= lp + 1e-9
    best = 0.0
    for k in range(len(reqs) + 1):
        for subset in itertools.combinations(range(len(reqs)), k):
            for order in itertools.permutations(subset):
                on = [0 if i in subset else -1 for i in range(len(reqs))]
                rank = [order.index(i) if i in subset else 0 for i in range(len(reqs))]
                best = max(best, _engine_run(one, reqs, on, rank))
    assert best <= mip + 1e-9
    two = _fleet(count=2)
    bound2 = attainment_bound(two, reqs, integer=True).weighted_attainment
    assert bound2 is not None and bound2 >= mip - 1e-3
    for assign in itertools.product((0, 1), repeat=len(reqs)):
        for order in itertools.permutations(range(len(reqs))):
            assert _engine_run(two, reqs, assign, order) <= bound2 + 1e-9


def test_no_policy_beats_it() -> None:
    """Every registered policy in the evaluation simulator, on an overload where the bound binds:
    neither the weighted figure nor any class is above it."""
    classes = [
        {"name": "fast", "ttft_slo_s": 3.0, "weight": 10, "sheddable": False},
        {"name": "slow", "ttft_slo_s": 10.0, "weight": 1, "sheddable": True},
    ]
    fleet = _fleet(classes=classes)
    rng = random.Random(5)
    reqs = [
        _req(k, round(k * 0.08, 3), rng.randint(500, 3000), rng.choice(["fast", "slow"]), 4)
        for k in range(60)
    ]
    res = attainment_bound(fleet, reqs)
    assert res.weighted_attainment is not None and res.weighted_attainment < 0.95
    assert res.attainment is not None
    for policy in POLICY_NAMES:
        records = simulate(fleet, reqs, SimSettings(policy)).records
        index = {w.request_id: i for i, w in enumerate(reqs)}
        met = [
            index[r.req.request_id]
            for r in records
            if r.first_token_s is not None and r.first_token_s <= r.deadline_s + 1e-9
        ]  # as eval/metrics.py counts a met SLO
        assert _weight_share(fleet, reqs, met) <= res.weighted_attainment + 1e-9, policy
        assert len(met) / len(reqs) <= res.attainment + 1e-9, policy
        for c, b in res.per_class.items():
            assert sum(reqs[i].slo_class == c for i in met) <= b.max_attained, (policy, c)


# --- shape of the bound --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_monotone_in_capacity_and_deadlines(seed: int) -> None:
    rng = random.Random(200 + seed)
    reqs = _random_case(rng, 30)

    def b(fleet: FleetConfig, work: Sequence[WorkloadRequest] = reqs, scale: float = 1.0) -> float:
        # The LP: the MIP stops within its relative gap, which could blur a comparison.
        v = attainment_bound(fleet, work, integer=False, step_time_scale=scale).weighted_attainment
        assert v is not None
        return v

    base = b(_fleet())
    assert base < 1.0  # the case binds, so the comparisons below say something
    assert b(_fleet(count=2)) >= base - 1e-9
    assert b(_fleet(), scale=0.7) >= base - 1e-9
    assert b(_fleet(classes=[{**c, "ttft_slo_s": c["ttft_slo_s"] * 1.5} for c in CLASSES])) >= (
        base - 1e-9
    )
    # One request at a time gets a later deadline and nothing else changes (same weight).
    late = [*CLASSES, {"name": "fast-late", "ttft_slo_s": 1.0, "weight": 10}]
    for k in (i for i, w in enumerate(reqs) if w.slo_class == "fast"):
        moved = list(reqs)
        moved[k] = replace(reqs[k], slo_class="fast-late")
        assert b(_fleet(classes=late), moved) >= base - 1e-9


def test_everything_fits_gives_one() -> None:
    reqs = [_req(k, 3.0 * k, 1000, "fast" if k % 2 else "slow") for k in range(20)]
    res = attainment_bound(_fleet(), reqs)
    assert res.weighted_attainment == 1.0 and res.attainment == 1.0 and res.status == "optimal"
    assert all(b.max_attained == b.requests for b in res.per_class.values())


def test_unserved_model_and_hopeless_requests_are_misses() -> None:
    fleet = _fleet(models=("mistral-7b", "llama-3-8b"))
    reqs = [
        _req(0, 0.0, 500, "fast"),
        _req(1, 10.0, 500, "fast", model="vicuna-13b"),  # no instance may run it
        _req(2, 20.0, 7000, "fast"),  # its own prefill alone takes longer than the SLO
        _req(3, 30.0, 500, "slow", model="llama-3-8b"),
    ]
    res = attainment_bound(fleet, reqs)
    assert res.per_class["fast"].screened_in == 1 and res.per_class["fast"].max_attained == 1
    assert res.per_class["slow"].max_attained == 1
    assert res.weighted_attainment == pytest.approx((10 + 1) / (3 * 10 + 1))
    assert res.attainment == pytest.approx(2 / 4)


def test_shared_instance_bounds_the_models_together() -> None:
    """Two models on one instance share its time: a burst of both fits no better than one."""
    fleet = _fleet(models=("mistral-7b", "llama-3-8b"))
    burst = [_req(k, 0.0, 1500, "fast") for k in range(4)]
    mixed = [
        _req(k, 0.0, 1500, "fast", model="mistral-7b" if k % 2 else "llama-3-8b") for k in range(4)
    ]
    one = attainment_bound(fleet, burst).weighted_attainment
    both = attainment_bound(fleet, mixed).weighted_attainment
    assert one is not None and both is not None and one < 1.0
    assert both == pytest.approx(one, abs=0.02)


def test_empty_and_summary() -> None:
    empty = attainment_bound(_fleet(), [])
    assert empty.weighted_attainment is None and empty.requests == 0
    res = attainment_bound(_fleet(), _random_case(random.Random(1), 10))
    assert isinstance(res, BoundResult)
    d = bound_summary(res)
    assert set(d) >= {"weighted_attainment", "per_class", "solve_s", "status", "method"}
    assert set(d["per_class"]) == {"fast", "slow"}
    assert d["per_class"]["fast"]["requests"] == res.per_class["fast"].requests

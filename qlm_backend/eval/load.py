"""Offered load: the fleet's estimated capacity for a workload, and the trace time-scaling to X x it.

Capacity is a fluid estimate from the same roofline the engines run (PerfModel), independent of the
policy under test: on instance i a request of model m costs, in instance-seconds, its own prefill
plus its share of decode steps at the batch the engine holds when busy (vLLM's 256-sequence cap or
as many average contexts as fit in the KV cache, whichever is smaller). The fleet's capacity is the
largest arrival rate lambda whose model mix the instances can serve when each splits its time
between the models it may run (a small LP: max lambda s.t. sum_i x[i,m] * rate[i,m] >= lambda *
share[m], sum_m x[i,m] <= 1). Model swap time is not in it: that is the schedulers' problem.
`--load X` then rescales arrival times so the window's mean arrival rate is X x that capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pulp

from qlm_backend.core.fleet import FleetConfig
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import WorkloadRequest

ENGINE_MAX_NUM_SEQS = 256  # vLLM's default max_num_seqs, also what the simulator's engines use


@dataclass(frozen=True)
class Capacity:
    requests_per_s: float
    per_instance_rps: Mapping[str, Mapping[str, float]]  # instance -> model -> requests/s alone
    model_shares: Mapping[str, float]


def request_cost_s(perf: PerfModel, prompts: Sequence[int], outputs: Sequence[int]) -> float:
    """Mean instance-seconds per request of this (model, instance), at the busy batch size."""
    n = len(prompts)
    mean_prompt = sum(prompts) / n
    mean_out = sum(outputs) / n
    ctx = mean_prompt + mean_out / 2
    batch = max(
        1, min(ENGINE_MAX_NUM_SEQS, int(perf.kv_capacity_tokens // (mean_prompt + mean_out)))
    )
    decode = mean_out * perf.decode_step_s(batch, int(batch * ctx)) / batch
    # A prefill rides in one iteration with the running decodes; its cost beyond a decode step.
    base = perf.decode_step_s(1, 0)
    prefill = sum(max(0.0, perf.prefill_s(p) - base) for p in prompts) / n
    return decode + prefill


def estimate_capacity(fleet: FleetConfig, workload: Sequence[WorkloadRequest]) -> Capacity:
    by_model: dict[str, list[WorkloadRequest]] = {}
    for w in workload:
        by_model.setdefault(w.model, []).append(w)
    shares = {m: len(v) / len(workload) for m, v in by_model.items()}
    rates: dict[str, dict[str, float]] = {}
    for inst in fleet.instances:
        rates[inst.instance_id] = {}
        for m in inst.models_allowed:
            if m not in by_model:
                continue
            try:
                perf = PerfModel.from_names(m, inst.gpu, inst.tp)
            except ValueError:
                continue  # does not fit on this instance
            ws = by_model[m]
            cost = request_cost_s(
                perf, [w.prompt_tokens for w in ws], [w.output_tokens for w in ws]
            )
            rates[inst.instance_id][m] = 1.0 / cost
    prob = pulp.LpProblem("capacity", pulp.LpMaximize)
    lam = pulp.LpVariable("lam", lowBound=0)
    x = {
        (i, m): pulp.LpVariable(f"x_{k}_{j}", lowBound=0)
        for k, (i, ms) in enumerate(rates.items())
        for j, m in enumerate(ms)
    }
    prob += lam
    for m, s in shares.items():
        served = [x[i, m] * rates[i][m] for i in rates if m in rates[i]]
        if not served:
            raise ValueError(f"no instance of the fleet can run model {m}")
        prob += pulp.lpSum(served) >= lam * s
    for i, ms in rates.items():
        if ms:
            prob += pulp.lpSum(x[i, m] for m in ms) <= 1
    # threads=1: HiGHS fixes its thread scheduler at the first solve of the process, and the
    # core's planner LP asks for one thread; a first solve with the default would break it.
    prob.solve(pulp.HiGHS(msg=False, threads=1))
    value = pulp.value(lam)
    if value is None or value <= 0:
        raise ValueError("capacity estimate failed (the LP found no positive rate)")
    return Capacity(float(value), rates, shares)


def scale_to_load(
    workload: Sequence[WorkloadRequest], capacity_rps: float, load: float
) -> tuple[list[WorkloadRequest], float]:
    """Rescale arrivals so the mean rate is `load` x capacity; returns (workload, time factor)."""
    if load <= 0:
        raise ValueError(f"load must be > 0, got {load}")
    if len(workload) < 2:
        return list(workload), 1.0
    span = workload[-1].arrival_s - workload[0].arrival_s
    # The rate over n arrivals is (n - 1) / span; the target span gives (n - 1) / (load x capacity).
    target_span = (len(workload) - 1) / (load * capacity_rps)
    factor = target_span / span if span > 0 else 1.0
    t0 = workload[0].arrival_s
    return [replace(w, arrival_s=(w.arrival_s - t0) * factor) for w in workload], factor


__all__ = ["Capacity", "estimate_capacity", "request_cost_s", "scale_to_load"]

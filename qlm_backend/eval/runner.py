"""One evaluation: a scenario on a trace window at one or more loads, every policy on the identical
arrival sequence, plus the qlm ablations (each LSO switched off in turn)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.fleet import FleetConfig
from qlm_backend.eval.bound import attainment_bound, bound_summary
from qlm_backend.eval.load import OfferedCapacity, estimate_capacity, scale_to_load
from qlm_backend.eval.metrics import summarize
from qlm_backend.eval.scenario import Scenario, WorkloadRequest
from qlm_backend.eval.simulator import SimResult, SimSettings, simulate

DEFAULT_POLICIES = (
    "qlm",
    "fcfs",
    "edf",
    "priority",
    "shepherd",
    "flow-control",
    "qlm-true-lengths",
)


@dataclass(frozen=True)
class Ablation:
    """qlm with one mechanism off. `policy_kwargs` go to QlmPolicy, `config` to ManagerConfig."""

    label: str
    what: str
    policy_kwargs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    kv_swap: bool = False
    max_in_flight: int | None = None


ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        "qlm-no-lp",
        "global LP off: the swap-aware EDF heuristic plans every step",
        {"solver": "fallback"},
    ),
    Ablation("qlm-no-evict", "request eviction off", {"evict": False}),
    Ablation(
        "qlm-kvswap",
        "GPU-CPU KV swap on: an evicted request's KV waits in host memory (vLLM v0's swap space; "
        "the deployed router resumes by recompute with the prefix cache)",
        kv_swap=True,
    ),
    Ablation(
        "qlm-no-warm", "model warm start off: every swap is a cold load", {"warm_start": False}
    ),
    Ablation(
        "qlm-no-lb",
        "load balancing off: each group has a single candidate instance",
        config={"candidates_per_group": 1},
    ),
    Ablation(
        "qlm-no-pull",
        "late-binding pull off: up to vLLM's 256 requests pushed into each engine",
        max_in_flight=256,
    ),
    Ablation(
        "qlm-no-shed", "admission shedding of hopeless sheddable requests off", {"shed": False}
    ),
)


@dataclass(frozen=True)
class RunSpec:
    label: str
    policy: str
    fleet: FleetConfig
    settings: SimSettings


def _with_bound(fleet: FleetConfig, bound: int) -> FleetConfig:
    return replace(fleet, instances=tuple(replace(i, max_in_flight=bound) for i in fleet.instances))


def run_specs(
    sc: Scenario, policies: Sequence[str], ablate: bool, horizon_s: float
) -> list[RunSpec]:
    base_cfg = ManagerConfig(warm_slots_per_host=sc.fleet.warm_slots_per_host)
    out = [
        RunSpec(
            p, p, sc.fleet, SimSettings(p, label=p, manager_config=base_cfg, horizon_s=horizon_s)
        )
        for p in policies
    ]
    if ablate:
        for a in ABLATIONS:
            fleet = sc.fleet if a.max_in_flight is None else _with_bound(sc.fleet, a.max_in_flight)
            cfg = base_cfg.with_(**dict(a.config)) if a.config else base_cfg
            s = SimSettings(
                "qlm",
                label=a.label,
                manager_config=cfg,
                policy_kwargs=dict(a.policy_kwargs),
                kv_swap=a.kv_swap,
                horizon_s=horizon_s,
            )
            out.append(RunSpec(a.label, "qlm", fleet, s))
    return out


def horizon_for(workload: Sequence[WorkloadRequest], sc: Scenario) -> float:
    """A guard, not a cut: every run is meant to drain. Far beyond any plausible drain time."""
    span = workload[-1].arrival_s - workload[0].arrival_s if workload else 0.0
    max_slo = max(c.ttft_slo_s for c in sc.fleet.slo_classes)
    return workload[-1].arrival_s + max(2 * max_slo, 20 * span) if workload else math.inf


def evaluate_load(
    sc: Scenario,
    workload: Sequence[WorkloadRequest],
    load: float,
    policies: Sequence[str],
    *,
    ablate: bool,
    seed: int,
    trace_path: str,
    on_ended: Callable[[int], None] | None = None,
    on_run: Callable[[str], None] | None = None,
    capacity: OfferedCapacity | None = None,
) -> tuple[dict[str, Any], dict[str, SimResult]]:
    """Every policy (and ablation) on the same scaled arrivals: (results object, raw results).
    `load` multiplies `capacity` (eval/load.py; the cli measures it), the fluid estimate if None."""
    if capacity is None:
        fluid = estimate_capacity(sc.fleet, workload).requests_per_s
        capacity = OfferedCapacity("fluid", fluid, fluid)
    cap = capacity
    scaled, factor = scale_to_load(workload, cap.requests_per_s, load)
    horizon = horizon_for(scaled, sc)
    # No schedule of these arrivals can beat it (eval/bound.py; the runs below use the simulator's
    # default step times and token budget, which the bound assumes).
    bound = bound_summary(attainment_bound(sc.fleet, scaled))
    classes = [c.name for c in sc.fleet.slo_classes]
    weights = {c.name: c.weight for c in sc.fleet.slo_classes}
    pols: dict[str, Any] = {}
    abl: dict[str, Any] = {}
    raw: dict[str, SimResult] = {}
    for spec in run_specs(sc, policies, ablate, horizon):
        if on_run is not None:
            on_run(spec.label)
        res = simulate(spec.fleet, scaled, spec.settings, on_ended)
        raw[spec.label] = res
        summary = summarize(res, classes, weights)
        (pols if spec.label == spec.policy else abl)[spec.label] = summary
    span = scaled[-1].arrival_s - scaled[0].arrival_s if len(scaled) > 1 else 0.0
    obj: dict[str, Any] = {
        "scenario": sc.name,
        "load": load,
        "trace": trace_path,
        "seed": seed,
        "requests": len(scaled),
        "capacity_rps": round(cap.requests_per_s, 4),
        "offered_rps": round((len(scaled) - 1) / span, 4) if span > 0 else None,
        "time_scale": round(factor, 6),
        "arrival_span_s": round(span, 2),
        "classes": classes,
        "policies": pols,
        "bound": bound,
    }
    if abl:
        obj["ablations"] = abl
        obj["ablation_notes"] = {a.label: a.what for a in ABLATIONS}
    return obj, raw


__all__ = ["ABLATIONS", "DEFAULT_POLICIES", "Ablation", "RunSpec", "evaluate_load", "run_specs"]

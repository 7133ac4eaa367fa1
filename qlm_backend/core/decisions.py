"""Decision records: what a plan step decided, by which path and why, and how long it took."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PlanPath = Literal["lp", "fallback", "policy", "incremental"]


@dataclass(frozen=True)
class PlanDecision:
    time_s: float  # the `now` of the plan step
    policy: str
    path: PlanPath  # lp: the assignment LP decided; fallback: the heuristic; policy: a baseline's rule
    reason: str  # why this path ("lp optimal", "budget 0 ms exhausted before solve", ...)
    trigger: str  # why a full plan ran (arrivals, completion, timer, failure, ...) or "incremental"
    groups: int
    queued: int
    instances: int
    lp_cols: int = 0
    lp_rows: int = 0
    build_s: float = 0.0
    solve_s: float = 0.0
    planner_s: float = 0.0  # wall time of the whole decision (measured with perf_counter)
    expected_violations: float = 0.0  # weighted, of the chosen plan, per the estimator
    actions: int = 0


__all__ = ["PlanDecision", "PlanPath"]

"""The Policy protocol: what a scheduling policy sees and returns.

A policy never emits actions itself. It returns a `Plan` (core/plan.py: an ordered virtual queue
per instance, plus evictions it wants) and the shared LSO executor (lso.py) turns that into actions
while keeping the invariants every policy must respect: one model per instance at a time, swap only
a drained instance, pull only up to the bound, never lose or duplicate a request. `traits` says
which mechanisms the policy uses, so a baseline gets exactly what the real system it stands for
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from qlm_backend.core.plan import Plan, PlanContext
    from qlm_backend.core.request import Request

PolicyName = Literal[
    "qlm", "fcfs", "edf", "priority", "shepherd", "flow-control", "qlm-true-lengths"
]
EngineScheduling = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class PolicyTraits:
    # False: every request goes to an engine at once (what vLLM alone does); True: late binding,
    # at most `max_in_flight` per instance, the rest waits in the router.
    bounded_pull: bool = True
    # How the caller should configure the engines (vLLM scheduling_policy) for this policy.
    engine_scheduling: EngineScheduling = "fcfs"
    warm_start: bool = True  # keep swapped-out weights in host memory (KeepWarm/Release)
    sheds: bool = False  # Reject sheddable requests that cannot meet their deadline anywhere
    uses_true_lengths: bool = False  # qlm-true-lengths only
    # "count": the in-flight bound counts requests; "work": also the prefill and KV work they bring
    # (core/lso.py EngineLoad).
    pull_bound: Literal["count", "work"] = "count"


class Policy(Protocol):
    name: str
    traits: PolicyTraits

    def admit(self, req: Request, ctx: PlanContext, now: float) -> str | None:
        """Return a rejection reason, or None to admit."""
        ...

    def plan(self, ctx: PlanContext, now: float) -> Plan:
        """Order the queued work onto instances; may ask for evictions."""
        ...


__all__ = [
    "EngineScheduling",
    "Policy",
    "PolicyName",
    "PolicyTraits",
]

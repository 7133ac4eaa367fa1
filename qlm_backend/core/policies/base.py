"""The Policy protocol: what a scheduling policy sees and returns.

A policy never emits actions itself. It returns a `Plan` (an ordered virtual queue per instance, plus
evictions it wants) and the shared LSO executor (lso.py) turns that into actions while keeping the
invariants every policy must respect: one model per instance at a time, swap only a drained instance,
pull only up to the bound, never lose or duplicate a request. `traits` says which mechanisms the
policy uses, so a baseline gets exactly what the real system it stands for does.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from qlm_backend.core.decisions import PlanDecision

if TYPE_CHECKING:
    from qlm_backend.core.config import ManagerConfig
    from qlm_backend.core.estimator import RwtEstimator
    from qlm_backend.core.groups import GroupIndex
    from qlm_backend.core.instances import InstanceState, WarmSet
    from qlm_backend.core.request import Request, RequestState
    from qlm_backend.core.slo import SloClass

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


@dataclass(frozen=True)
class QueueEntry:
    """A slice of one group placed on one instance's virtual queue, in execution order."""

    group_id: str
    request_ids: tuple[str, ...]


@dataclass
class Plan:
    queues: dict[str, list[QueueEntry]]  # instance_id -> planned order (only QUEUED requests)
    evictions: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)
    decision: PlanDecision | None = None


@dataclass
class PlanContext:
    """Read-only view of the manager's state handed to a policy (do not mutate)."""

    requests: Mapping[str, RequestState]
    groups: GroupIndex
    instances: Mapping[str, InstanceState]
    warm: WarmSet
    classes: Mapping[str, SloClass]
    estimator: RwtEstimator
    config: ManagerConfig
    previous: Plan | None  # the last plan, pruned of requests that left the queue
    trigger: str  # why plan() runs a full plan now, or "incremental"
    new_groups: frozenset[str] = frozenset()  # groups touched since the last full plan
    # Queued requests that resume with tokens already produced (their work differs from their
    # group's mean). None: not tracked by the caller, the estimator checks every request.
    resumed: AbstractSet[str] | None = None


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
    "Plan",
    "PlanContext",
    "Policy",
    "PolicyName",
    "PolicyTraits",
    "QueueEntry",
]

"""What a scheduling policy sees and returns: the read-only `PlanContext` handed to it, and the
`Plan` (an ordered virtual queue of `QueueEntry` per instance, plus evictions) it gives back.

These are core types, not a policy's: the estimator forecasts over a plan's queues, the LSO
executor (lso.py) turns a plan into actions, and every policy (core/policies/) builds one.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qlm_backend.core.decisions import PlanDecision

if TYPE_CHECKING:
    from qlm_backend.core.config import ManagerConfig
    from qlm_backend.core.estimator import RwtEstimator
    from qlm_backend.core.groups import GroupIndex
    from qlm_backend.core.instances import InstanceState, WarmSet
    from qlm_backend.core.request import RequestState
    from qlm_backend.core.slo import SloClass


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

    def first_instances(self) -> dict[str, str]:
        """Group id -> the instance whose queue holds the group's first entry."""
        out: dict[str, str] = {}
        for iid, entries in self.queues.items():
            for e in entries:
                out.setdefault(e.group_id, iid)
        return out


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


__all__ = ["Plan", "PlanContext", "QueueEntry"]

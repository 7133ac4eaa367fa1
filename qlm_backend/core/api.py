"""Public API of the QLM core (pure Python: no Triton, no threads, no clock reads).

How to drive the QueueManager (router in real time, simulator in virtual time)::

    fleet = load_fleet("fleet.json")                      # or parse_fleet(dict)
    qm = QueueManager(fleet, policy="qlm")                # or any name in POLICY_NAMES
    # engines use qm.policy.traits.engine_scheduling ("fcfs" or "priority")
    while running:
        for req in arrivals(now):                         # Request(...) or qm.make_request(...)
            if (rej := qm.add_request(req, now)):  reply_error(rej)
        for a in qm.plan(now):                            # call after events and on a timer
            execute(a)   # Pull -> engine.add(..., priority=a.priority); Evict -> abort/preempt,
                         # then qm.on_evicted(id, tokens_done, t); SwapModel -> load, then
                         # qm.on_model_loaded(inst, model, t); KeepWarm/Release/Rebalance -> bookkeeping
        for ev in engine_events():                        # first token / finish / failure
            qm.on_first_token(id, t); qm.on_finished(id, n_tokens, t); qm.on_engine_failed(inst, t)

Contracts (details in actions.py and manager.py): a Pull puts its requests IN_FLIGHT on that
instance at once; a SwapModel is only emitted for an instance with nothing in flight and makes it
unusable until on_model_loaded; an Evict takes the request out of flight at once and it is queued
again by on_evicted. Read-only views: `qm.queue_stats(now)`, `qm.instance_views()`,
`qm.virtual_queue(iid)`, `qm.in_flight(iid)`, `qm.request_view(rid)`, `qm.decisions`,
`qm.counters`.
"""

from __future__ import annotations

from qlm_backend.core.actions import (
    Action,
    Evict,
    KeepWarm,
    Pull,
    Rebalance,
    Reject,
    Release,
    ResumeMode,
    SwapModel,
)
from qlm_backend.core.config import ManagerConfig, OutputPrior
from qlm_backend.core.decisions import PlanDecision, PlanPath
from qlm_backend.core.estimator import GroupForecast, RwtEstimator
from qlm_backend.core.fleet import FleetConfig, InstanceSpec, load_fleet, parse_fleet
from qlm_backend.core.manager import (
    InstanceView,
    QueueManager,
    QueueStat,
    RequestView,
    check_invariants,
)
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies import POLICIES, POLICY_NAMES, make_policy, validate_policy_name
from qlm_backend.core.policies.base import Policy, PolicyName, PolicyTraits
from qlm_backend.core.request import Request, Status
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES, SloClass

__all__ = [
    "DEFAULT_SLO_CLASSES",
    "POLICIES",
    "POLICY_NAMES",
    "Action",
    "Evict",
    "FleetConfig",
    "GroupForecast",
    "InstanceSpec",
    "InstanceView",
    "KeepWarm",
    "ManagerConfig",
    "OutputPrior",
    "Plan",
    "PlanContext",
    "PlanDecision",
    "PlanPath",
    "Policy",
    "PolicyName",
    "PolicyTraits",
    "Pull",
    "QueueEntry",
    "QueueManager",
    "QueueStat",
    "Rebalance",
    "Reject",
    "Release",
    "Request",
    "RequestView",
    "ResumeMode",
    "RwtEstimator",
    "SloClass",
    "Status",
    "SwapModel",
    "check_invariants",
    "load_fleet",
    "make_policy",
    "parse_fleet",
    "validate_policy_name",
]

"""fcfs: what vLLM does alone behind a plain load balancer.

Every request goes to an engine at once (no router queue: unbounded pull), to the least-loaded (or
round-robin) instance running its model; the engine batches FCFS with its own preemption. A model
swap happens only when the oldest waiting request needs a model no instance runs: one instance
(an empty one, else the least busy) drains and switches, keeping the old model's weights warm in
host memory (every policy that swaps gets warm start: a cold load where the fleet has host memory
for a warm one would handicap the baseline, not show its scheduling). No eviction, no shedding.
"""

from __future__ import annotations

import itertools
from typing import Literal

from qlm_backend.core.decisions import PlanDecision
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies.base import PolicyTraits
from qlm_backend.core.policies.common import designate, entries_from, queued_states, serving
from qlm_backend.core.request import Request, RequestState

Balance = Literal["least_loaded", "round_robin"]


class PushPolicy:
    """Dispatch-at-once baseline; subclasses change the order and the engine's scheduling."""

    name = "fcfs"

    def __init__(self, *, balance: Balance = "least_loaded", warm_start: bool = True) -> None:
        self.balance = balance
        self.traits = PolicyTraits(
            bounded_pull=False,
            engine_scheduling=self.engine_scheduling(),
            warm_start=warm_start,
            sheds=False,
        )
        self._switching: dict[str, str] = {}  # instance -> model it drains for
        self._rr = itertools.count()

    def engine_scheduling(self) -> Literal["fcfs", "priority"]:
        return "fcfs"

    def order_key(self, st: RequestState) -> tuple[float, ...]:
        return (st.req.arrival_s, 0.0)

    def admit(self, req: Request, ctx: PlanContext, now: float) -> str | None:
        return None

    def _prune_switching(self, ctx: PlanContext) -> None:
        for iid, model in list(self._switching.items()):
            inst = ctx.instances[iid]
            if not inst.healthy or inst.model == model:
                del self._switching[iid]

    def plan(self, ctx: PlanContext, now: float) -> Plan:
        self._prune_switching(ctx)
        queued = sorted(queued_states(ctx), key=self.order_key)
        per_inst: dict[str, list[str]] = {}
        load = {iid: len(i.in_flight) for iid, i in ctx.instances.items()}
        switching_to = {m: iid for iid, m in self._switching.items()}
        for st in queued:
            model = st.req.model
            if model in switching_to:
                per_inst.setdefault(switching_to[model], []).append(st.req.request_id)
                continue
            insts = serving(ctx, model, exclude=set(self._switching))
            if not insts:
                target = designate(ctx, model, set(self._switching))
                if target is None:
                    continue
                self._switching[target.instance_id] = model
                switching_to[model] = target.instance_id
                per_inst.setdefault(target.instance_id, []).append(st.req.request_id)
                continue
            if self.balance == "round_robin":
                inst = insts[next(self._rr) % len(insts)]
            else:
                inst = min(insts, key=lambda i: (load[i.instance_id], i.instance_id))
            load[inst.instance_id] += 1
            per_inst.setdefault(inst.instance_id, []).append(st.req.request_id)
        queues: dict[str, list[QueueEntry]] = {
            iid: entries_from(rids, ctx) for iid, rids in per_inst.items()
        }
        decision = PlanDecision(
            now,
            self.name,
            "policy",
            f"{self.name} dispatch",
            ctx.trigger,
            len(ctx.groups),
            len(queued),
            len(ctx.instances),
        )
        return Plan(queues=queues, decision=decision if queued else None)


class FcfsPolicy(PushPolicy):
    name = "fcfs"


__all__ = ["Balance", "FcfsPolicy", "PushPolicy"]

"""edf: the router holds the queue and instances pull in earliest-deadline order (the released QLM
code's default). Bounded in-flight per engine; requests of a model are dealt to the instances
running it by load relative to their speed; a swap only when the earliest-deadline waiting request
needs a model nobody runs, with warm start as every policy that swaps. No planner, no eviction, no
shedding."""

from __future__ import annotations

import heapq

from qlm_backend.core.decisions import PlanDecision
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies.base import PolicyTraits
from qlm_backend.core.policies.common import designate, entries_from, queued_states, serving
from qlm_backend.core.request import Request, RequestState


class EdfPolicy:
    name = "edf"

    def __init__(self, *, warm_start: bool = True) -> None:
        self.traits = PolicyTraits(
            bounded_pull=True, engine_scheduling="fcfs", warm_start=warm_start, sheds=False
        )
        self._switching: dict[str, str] = {}

    def admit(self, req: Request, ctx: PlanContext, now: float) -> str | None:
        return None

    def order_key(self, st: RequestState, now: float) -> tuple[float, ...]:
        return (st.req.deadline_s, st.req.arrival_s)

    def plan(self, ctx: PlanContext, now: float) -> Plan:
        for iid, model in list(self._switching.items()):
            inst = ctx.instances[iid]
            if not inst.healthy or inst.model == model:
                del self._switching[iid]
        queued = sorted(queued_states(ctx), key=lambda s: self.order_key(s, now))
        by_model: dict[str, list[RequestState]] = {}
        for st in queued:
            by_model.setdefault(st.req.model, []).append(st)
        # Absent models, in the order their most urgent request appears.
        switching_to = {m: iid for iid, m in self._switching.items()}
        per_inst: dict[str, list[str]] = {}
        for st in queued:
            model = st.req.model
            if model in switching_to or serving(ctx, model, set(self._switching)):
                continue
            target = designate(ctx, model, set(self._switching))
            if target is not None:
                self._switching[target.instance_id] = model
                switching_to[model] = target.instance_id
        for model, sts in by_model.items():
            if model in switching_to:
                per_inst.setdefault(switching_to[model], []).extend(s.req.request_id for s in sts)
                continue
            insts = serving(ctx, model, set(self._switching))
            if not insts:
                continue
            # Deal in deadline order to the instance with the least load per unit of speed.
            heap = []
            for inst in insts:
                prof = ctx.estimator.profile(model, inst.spec)
                unit = prof.token_cost_s
                heap.append((len(inst.in_flight) * unit, unit, inst.instance_id))
            heapq.heapify(heap)
            for s in sts:
                ld, unit, iid = heapq.heappop(heap)
                per_inst.setdefault(iid, []).append(s.req.request_id)
                heapq.heappush(heap, (ld + unit, unit, iid))
        queues: dict[str, list[QueueEntry]] = {
            iid: entries_from(r, ctx) for iid, r in per_inst.items()
        }
        decision = PlanDecision(
            now,
            self.name,
            "policy",
            f"{self.name} order",
            ctx.trigger,
            len(ctx.groups),
            len(queued),
            len(ctx.instances),
        )
        return Plan(
            queues=queues,
            evictions=self.evictions(ctx, queues, now),
            decision=decision if queued else None,
        )

    def evictions(
        self, ctx: PlanContext, queues: dict[str, list[QueueEntry]], now: float
    ) -> list[tuple[str, str]]:
        return []


__all__ = ["EdfPolicy"]
